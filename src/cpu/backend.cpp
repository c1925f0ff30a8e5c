// The CPU backend: host memory, host page tables, appends as copies; the indexer and attention
// drivers live in indexer.cpp and attention.cpp beside this file.
#include "cpu/backend.hpp"

#include <cstring>
#include <new>
#include <vector>

#include "clsa/paged_view.hpp"
#include "common/check.hpp"

namespace clsa {
namespace detail {

namespace {

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

  void append(const AppendCall& call, Stream /*stream*/) const override {
    const PagedCacheLayout& layout = call.layout;
    const std::size_t element = dtype_size(layout.dtype);
    const std::size_t head_bytes = static_cast<std::size_t>(layout.head_dim) * element;
    const std::size_t index_bytes = static_cast<std::size_t>(layout.index_dim) * element;
    auto* k_pool = static_cast<char*>(const_cast<void*>(layout.k));
    auto* v_pool = static_cast<char*>(const_cast<void*>(layout.v));
    auto* index_pool = static_cast<char*>(const_cast<void*>(layout.index_keys));
    const auto* k_src = static_cast<const char*>(call.k.data());
    const auto* v_src = static_cast<const char*>(call.v.data());
    const auto* index_src = static_cast<const char*>(call.index_keys.data());
    const std::int64_t tokens = call.k.size(0);
    const PagedRows pages{call.pages, call.page_shift};
    const auto bytes_at = [element](std::int64_t elements) { return elements * static_cast<std::int64_t>(element); };
    for (std::int64_t t = 0; t < tokens; ++t) {
      const PoolRow where = pages.row(call.first_position + t);
      for (int h = 0; h < layout.num_kv_heads; ++h) {
        std::memcpy(k_pool + bytes_at(where.k_offset(layout, h)),
                    k_src + bytes_at(t * call.k.stride(0) + h * call.k.stride(1)), head_bytes);
        std::memcpy(v_pool + bytes_at(where.v_offset(layout, h)),
                    v_src + bytes_at(t * call.v.stride(0) + h * call.v.stride(1)), head_bytes);
      }
      std::memcpy(index_pool + bytes_at(where.index_offset(layout)),
                  index_src + bytes_at(t * call.index_keys.stride(0)), index_bytes);
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
