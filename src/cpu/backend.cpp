// The CPU backend: host memory, host page tables, appends as copies; the indexer and attention
// drivers live in indexer.cpp and attention.cpp beside this file.
#include "cpu/backend.hpp"

#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "clsa/numeric.hpp"
#include "clsa/paged_view.hpp"
#include "common/check.hpp"
#include "cpu/cpu_util.hpp"

namespace clsa {
namespace detail {

namespace {

/// Copies the [T, heads, dim] rows of `source` (of the pool's dtype, `element` bytes) to
/// destination(t, h).
template <class Destination>
void copy_rows(const TensorView& source, int heads, int dim, std::int64_t element, Destination destination) {
  const auto* base = static_cast<const char*>(source.data());
  const std::size_t row_bytes = static_cast<std::size_t>(dim * element);
  for (std::int64_t t = 0; t < source.size(0); ++t) {
    for (int h = 0; h < heads; ++h)
      std::memcpy(destination(t, h), base + (t * source.stride(0) + h * source.stride(1)) * element, row_bytes);
  }
}

/// Quantizes the [T, heads, dim] rows of `source` (Src values, finite) into e4m3 rows at
/// destination(t, h): e4m3(x / s) with kv head h's scale s = scales[h * scale_stride] (vLLM's
/// reshape_and_cache: the quotient rounded to nearest even, saturating at +-448).
template <class Src, class Destination>
void quantize_kv_rows(const TensorView& source, int heads, int dim, const float* scales, std::int64_t scale_stride,
                      Destination destination) {
  const Src* base = source.data_as<const Src>();
  for (std::int64_t t = 0; t < source.size(0); ++t) {
    for (int h = 0; h < heads; ++h) {
      const float scale = scales[h * scale_stride];
      const Src* row = base + t * source.stride(0) + h * source.stride(1);
      auto* out = reinterpret_cast<float8_e4m3*>(destination(t, h));
      for (int d = 0; d < dim; ++d) out[d] = to_float8_e4m3(to_float(row[d]) / scale);
    }
  }
}

/// On the CPU the kernels read the host tables themselves: one array, published as it is.
class HostTables final : public TableUpload {
 public:
  explicit HostTables(std::size_t entries) : tables_(entries, 0) {}
  std::int32_t* next() override { return tables_.data(); }
  const std::int32_t* publish(std::size_t /*used*/, Stream /*stream*/) override { return tables_.data(); }

 private:
  std::vector<std::int32_t> tables_;
};

class CpuBackend final : public ComputeBackend {
 public:
  Backend kind() const override { return Backend::cpu; }

  Device current_device() const override { return Device::cpu(); }
  int make_current(Device /*device*/) const override { return -1; }
  void restore_current(int /*previous*/) const noexcept override {}
  void* allocate(Device /*device*/, std::size_t bytes) const override {
    try {
      return ::operator new(bytes, std::align_val_t(256));
    } catch (const std::bad_alloc&) {
      fail(ErrorCode::capacity_exceeded, concat("host allocation of ", bytes, " bytes failed"));
    }
  }
  void deallocate(Device /*device*/, void* pointer) const noexcept override {
    ::operator delete(pointer, std::align_val_t(256));
  }
  void zero(Device /*device*/, void* data, std::size_t bytes, Stream /*stream*/, bool /*on_stream*/) const override {
    std::memset(data, 0, bytes);
  }
  void copy(void* dst, const void* src, std::size_t bytes) const override { std::memcpy(dst, src, bytes); }
  void synchronize(Stream /*stream*/) const override {}
  bool capturing(Stream /*stream*/) const override { return false; }
  std::unique_ptr<TableUpload> make_table_upload(Device /*device*/, std::size_t entries) const override {
    return std::make_unique<HostTables>(entries);
  }
  std::unique_ptr<StatusReport> make_status_report() const override { return nullptr; }

  // The reference kernels take every float dtype of K/V and of the indexer keys, in any mix.
  std::string cache_unsupported(DType /*kv_dtype*/, DType /*index_dtype*/) const override { return {}; }

  void append(const AppendCall& call, Stream /*stream*/) const override {
    const PagedCacheLayout& layout = call.layout;
    const DType index_dtype = layout.index_key_dtype();
    const std::int64_t kv_element = static_cast<std::int64_t>(dtype_size(layout.dtype));
    const std::int64_t index_element = static_cast<std::int64_t>(dtype_size(index_dtype));
    auto* k_pool = static_cast<char*>(const_cast<void*>(layout.k));
    auto* v_pool = static_cast<char*>(const_cast<void*>(layout.v));
    auto* index_pool = static_cast<char*>(const_cast<void*>(layout.index_keys));
    const std::int64_t tokens = call.k.size(0);
    const PagedRows pages{call.pages, call.page_shift};
    // K, then V: each row copied, or quantized with its kv head's scale.
    const TensorView* sources[] = {&call.k, &call.v};
    char* pools[] = {k_pool, v_pool};
    const float* scales[] = {layout.k_scales, layout.v_scales};
    const std::int64_t scale_strides[] = {layout.k_scale_stride, layout.v_scale_stride};
    for (int part = 0; part < 2; ++part) {
      const TensorView& source = *sources[part];
      const auto destination = [&](std::int64_t t, int h) {
        const PoolRow where = pages.row(call.first_position + t);
        return pools[part] + kv_element * (part == 0 ? where.k_offset(layout, h) : where.v_offset(layout, h));
      };
      if (source.dtype() == layout.dtype) {
        copy_rows(source, layout.num_kv_heads, layout.head_dim, kv_element, destination);
      } else {
        dispatch_activation(source.dtype(), [&](auto tag) {
          using Src = typename decltype(tag)::type;
          quantize_kv_rows<Src>(source, layout.num_kv_heads, layout.head_dim, scales[part], scale_strides[part],
                                destination);
        });
      }
    }
    // The indexer keys, and with e4m3 keys each token's scale.
    const auto key_at = [&](std::int64_t t) {
      return index_pool + index_element * pages.row(call.first_position + t).index_offset(layout);
    };
    const auto scale_at = [&](std::int64_t t) {
      const PoolRow where = pages.row(call.first_position + t);
      return const_cast<float*>(layout.index_scales) + where.page * layout.index_scale_page_stride +
             where.offset * layout.index_scale_token_stride;
    };
    const TensorView& keys = call.index_keys;
    const std::size_t key_bytes = static_cast<std::size_t>(layout.index_dim * index_element);
    if (keys.dtype() == index_dtype) {
      for (std::int64_t t = 0; t < tokens; ++t) {
        std::memcpy(key_at(t), static_cast<const char*>(keys.data()) + t * keys.stride(0) * index_element, key_bytes);
        if (index_dtype == DType::e4m3)
          *scale_at(t) = call.index_scales.data_as<const float>()[t * call.index_scales.stride(0)];
      }
    } else {
      dispatch_activation(keys.dtype(), [&](auto tag) {
        using Src = typename decltype(tag)::type;
        for (std::int64_t t = 0; t < tokens; ++t) {
          *scale_at(t) = quantize_row_e4m3(keys.data_as<const Src>() + t * keys.stride(0), layout.index_dim,
                                           reinterpret_cast<float8_e4m3*>(key_at(t)), call.index_scale_format);
        }
      });
    }
  }

  // The reference kernels take every shape and float dtype.
  std::string indexer_unsupported(const IndexerConfig& /*config*/, DType /*dtype*/) const override { return {}; }
  std::unique_ptr<Plan> plan_indexer(const IndexerConfig& config, const Bounds& bounds) const override {
    return plan_indexer_cpu(config, bounds);
  }
  void select(const IndexerConfig& config, const SelectCall& call, const Plan& plan, void* scratch,
              StatusReport* /*status*/, Stream /*stream*/) const override {
    select_cpu(config, call, plan, scratch);
  }
  std::string routed_kv_unsupported(DType /*dtype*/, int /*head_dim*/) const override { return {}; }
  // The host's caches are not steered from here.
  std::size_t keep_routed_kv_in_l2(Device /*device*/, std::size_t /*bytes*/) const override { return 0; }
  std::string attention_unsupported(const AttentionConfig& /*config*/) const override { return {}; }
  std::string attention_kv_unsupported(const AttentionConfig& /*config*/, DType /*kv_dtype*/) const override {
    return {};
  }
  std::unique_ptr<Plan> plan_attention(const AttentionConfig& config, const Bounds& bounds) const override {
    return plan_attention_cpu(config, bounds);
  }
  void attend(const AttentionConfig& config, const AttendCall& call, const Plan& plan, void* scratch,
              StatusReport* /*status*/, Stream /*stream*/) const override {
    attend_cpu(config, call, plan, scratch);
  }
};

}  // namespace

const ComputeBackend& cpu_backend() {
  static const CpuBackend backend;
  return backend;
}

}  // namespace detail
}  // namespace clsa
