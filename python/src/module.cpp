// clsa._clsa: the Python binding of libclsa's public API (nanobind). The objects are those of the
// C++ API; tensors are any arrays that speak DLPack or the buffer protocol, viewed without a copy
// (tensors.hpp), and every clsa::Error reaches Python as clsa.Error with its code.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "clsa/clsa.hpp"
#include "tensors.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace clsa_py {
namespace {

using clsa::ErrorCode;

// ---------------------------------------------------------------------------------------------
// Objects that keep what their C++ counterparts point at alive.

/// A paged pool (clsa::PagedCacheLayout) with the arrays it points into.
struct Layout {
  clsa::PagedCacheLayout layout{};
  nb::object k, v, index_keys, index_scales, k_scales, v_scales;
};

/// A SharedKVCache; `pool` keeps an engine's pool alive (wrap()).
struct Cache {
  explicit Cache(clsa::SharedKVCache c) : cache(std::move(c)) {}
  clsa::SharedKVCache cache;
  nb::object pool;
};

/// A CacheBatch; `keep` holds what its tables and pool live in (its cache, or wrapped arrays).
struct Batch {
  clsa::CacheBatch batch;
  nb::object keep;
};

struct Indexer {
  explicit Indexer(clsa::CrossLayerIndexer i) : indexer(std::move(i)) {}
  clsa::CrossLayerIndexer indexer;
  nb::object workspace;
  /// Bumped by every select() and re-plan: an index the indexer returned is valid while it holds.
  std::uint64_t generation = 0;
};

/// A RoutingIndex: over caller arrays (`positions`... hold them), or returned by an indexer
/// (`owner`, with the generation it was returned in; its arrays are made on first access).
struct Routing {
  clsa::RoutingIndex index;
  nb::object positions, counts, slots, kv;
  nb::object owner;
  std::uint64_t generation = 0;
  bool writable = false;
  bool as_torch = false;
};

struct Sparse {
  explicit Sparse(clsa::SparseCrossAttention a) : attention(std::move(a)) {}
  clsa::SparseCrossAttention attention;
  nb::object workspace;
};

struct Dense {
  explicit Dense(clsa::DenseCrossAttention a) : attention(std::move(a)) {}
  clsa::DenseCrossAttention attention;
  nb::object workspace;
};

// ---------------------------------------------------------------------------------------------
// Helpers.

std::string shape_text(const clsa::TensorView& view) {
  return view.defined() ? view.describe() : "undefined";
}

void expect_rank(const CallContext& call, const char* name, const clsa::TensorView& view, int rank, const char* dims) {
  if (view.rank() != rank) {
    fail(ErrorCode::shape_mismatch, call,
         std::string(name) + " is " + shape_text(view) + "; expected rank " + std::to_string(rank) + " " + dims);
  }
}

void expect_dtype(const CallContext& call, const char* name, const clsa::TensorView& view, clsa::DType dtype) {
  if (view.dtype() != dtype) {
    fail(ErrorCode::dtype_mismatch, call,
         std::string(name) + " is " + view.describe() + "; expected dtype " + clsa::dtype_name(dtype));
  }
}

void expect_device(const CallContext& call, const char* name, const clsa::TensorView& view, clsa::Device device) {
  if (view.device() != device) {
    fail(ErrorCode::device_mismatch, call,
         std::string(name) + " is " + view.describe() + " but the pool lives on " + clsa::device_name(device));
  }
}

/// A 1-D int32 table read through its pointer: contiguous.
clsa::TensorView table_view(CallContext& call, const char* name, nb::handle obj) {
  const clsa::TensorView view = to_view(call, name, obj, Access::read);
  expect_rank(call, name, view, 1, "[n]");
  expect_dtype(call, name, view, clsa::DType::i32);
  if (view.size(0) > 1 && view.stride(0) != 1) {
    fail(ErrorCode::shape_mismatch, call, std::string(name) + " is " + view.describe() + "; it must be contiguous");
  }
  return view;
}

/// A workspace array: contiguous (any dtype), its bytes.
std::pair<void*, std::size_t> workspace_of(CallContext& call, nb::handle obj) {
  const clsa::TensorView view = to_view(call, "workspace", obj, Access::write);
  if (!view.is_contiguous()) {
    fail(ErrorCode::shape_mismatch, call, "workspace is " + view.describe() + "; it must be contiguous");
  }
  return {view.data(), static_cast<std::size_t>(view.numel()) * clsa::dtype_size(view.dtype())};
}

std::vector<clsa::SequenceId>& sequences_of(const CallContext& call, nb::handle sequences) {
  static std::vector<clsa::SequenceId> ids;  // the GIL serialises its users
  ids.clear();
  if (PyLong_Check(sequences.ptr()) || !nb::isinstance<nb::iterable>(sequences)) {
    fail(ErrorCode::invalid_argument, call,
         "sequences must be an iterable of sequence ids (int, or None for an empty slot)");
  }
  for (nb::handle item : nb::iter(sequences)) {
    std::int64_t id = 0;
    if (!item.is_none() && !nb::try_cast(item, id, /*convert=*/false)) {
      fail(ErrorCode::invalid_argument, call,
           "sequences holds a " + std::string(nb::type_name(item.type()).c_str()) + "; expected int ids or None");
    }
    ids.push_back(static_cast<clsa::SequenceId>(id));
  }
  return ids;
}

/// `out` if given, else a new array like `q` from q's own framework (numpy.empty_like,
/// torch.empty_like, cupy.empty_like, ...).
nb::object output_like(const CallContext& call, nb::handle q, nb::handle out) {
  if (!out.is_none()) return nb::borrow(out);
  const std::string module_name = nb::cast<std::string>(q.type().attr("__module__"));
  const nb::object module = nb::module_::import_(module_name.substr(0, module_name.find('.')).c_str());
  if (!nb::hasattr(module, "empty_like")) {
    fail(ErrorCode::invalid_argument, call,
         "out is None and q's module " + module_name + " has no empty_like(): pass out=");
  }
  return module.attr("empty_like")(q);
}

Routing& routing_of(nb::handle obj) {
  return nb::cast<Routing&>(obj);
}

/// The C++ index of `routing`, refusing one that its indexer has since overwritten or re-planned.
const clsa::RoutingIndex& valid_index(const CallContext& call, const Routing& routing) {
  if (routing.owner.is_valid() && nb::cast<const Indexer&>(routing.owner).generation != routing.generation) {
    fail(ErrorCode::invalid_argument, call,
         "routing was returned by an earlier select() of its indexer, whose later select() or re-plan "
         "(reserve, set_workspace, gather_routed_kv) reused its memory; use the latest select()'s index, or "
         "select into caller arrays (out=RoutingIndex(...))");
  }
  return routing.index;
}

nb::object routing_array(Routing& routing, nb::object& slot, const clsa::TensorView& view, const char* name) {
  if (slot.is_valid()) return slot;
  if (!view.defined()) return nb::none();
  CallContext call(name);
  valid_index(call, routing);
  slot = to_array(view, routing.owner, routing.as_torch);
  return slot;
}

/// The pool of a cache (or an engine's), as arrays over its memory owned by `owner`.
Layout layout_arrays(const clsa::PagedCacheLayout& l, nb::handle owner) {
  Layout out;
  out.layout = l;
  const clsa::DType index_dtype = l.index_key_dtype();
  const std::int64_t k_shape[] = {l.num_pages, l.page_size, l.num_kv_heads, l.head_dim};
  const std::int64_t k_strides[] = {l.k_page_stride, l.k_token_stride, l.k_head_stride, 1};
  const std::int64_t v_strides[] = {l.v_page_stride, l.v_token_stride, l.v_head_stride, 1};
  const std::int64_t i_shape[] = {l.num_pages, l.page_size, l.index_dim};
  const std::int64_t i_strides[] = {l.index_page_stride, l.index_token_stride, 1};
  auto array = [&](const void* data, clsa::DType dtype, int rank, const std::int64_t* shape,
                   const std::int64_t* strides) {
    return to_array(clsa::TensorView(const_cast<void*>(data), dtype, rank, shape, strides, l.device), owner, false);
  };
  out.k = array(l.k, l.dtype, 4, k_shape, k_strides);
  out.v = array(l.v, l.dtype, 4, k_shape, v_strides);
  out.index_keys = array(l.index_keys, index_dtype, 3, i_shape, i_strides);
  out.index_scales = out.k_scales = out.v_scales = nb::none();
  if (l.index_scales != nullptr) {
    const std::int64_t s_strides[] = {l.index_scale_page_stride, l.index_scale_token_stride};
    out.index_scales = array(l.index_scales, clsa::DType::f32, 2, i_shape, s_strides);
  }
  const std::int64_t heads[] = {l.num_kv_heads};
  if (l.k_scales != nullptr) {
    const std::int64_t stride[] = {l.k_scale_stride};
    out.k_scales = array(l.k_scales, clsa::DType::f32, 1, heads, stride);
  }
  if (l.v_scales != nullptr) {
    const std::int64_t stride[] = {l.v_scale_stride};
    out.v_scales = array(l.v_scales, clsa::DType::f32, 1, heads, stride);
  }
  return out;
}

/// An engine's pool from its arrays: k and v [num_pages, page_size, num_kv_heads, head_dim],
/// index_keys [num_pages, page_size, index_dim], any outer strides; e4m3 index keys with their
/// per-token f32 scales [num_pages, page_size]; e4m3 K/V with their scales, f32 [1] or
/// [num_kv_heads].
void init_layout(Layout* self, nb::handle k, nb::handle v, nb::handle index_keys, nb::handle index_scales,
                 nb::handle k_scales, nb::handle v_scales) {
  CallContext call("PagedCacheLayout");
  const clsa::TensorView kv = to_view(call, "k", k, Access::read);
  const clsa::TensorView vv = to_view(call, "v", v, Access::read);
  const clsa::TensorView iv = to_view(call, "index_keys", index_keys, Access::read);
  const clsa::TensorView sv = to_view(call, "index_scales", index_scales, Access::read, true);
  const clsa::TensorView ksv = to_view(call, "k_scales", k_scales, Access::read, true);
  const clsa::TensorView vsv = to_view(call, "v_scales", v_scales, Access::read, true);
  expect_rank(call, "k", kv, 4, "[num_pages, page_size, num_kv_heads, head_dim]");
  expect_rank(call, "v", vv, 4, "[num_pages, page_size, num_kv_heads, head_dim]");
  expect_rank(call, "index_keys", iv, 3, "[num_pages, page_size, index_dim]");
  for (int d = 0; d < 4; ++d) {
    if (vv.size(d) != kv.size(d)) {
      fail(ErrorCode::shape_mismatch, call, "v is " + vv.describe() + " but k is " + kv.describe());
    }
  }
  if (iv.size(0) != kv.size(0) || iv.size(1) != kv.size(1)) {
    fail(ErrorCode::shape_mismatch, call,
         "index_keys is " + iv.describe() + " but k is " + kv.describe() + " (pages and page_size must agree)");
  }
  expect_dtype(call, "v", vv, kv.dtype());
  const clsa::Device device = kv.device();
  expect_device(call, "v", vv, device);
  expect_device(call, "index_keys", iv, device);
  for (const auto& [name, view] :
       {std::pair<const char*, const clsa::TensorView*>{"k", &kv}, {"v", &vv}, {"index_keys", &iv}}) {
    if (view->stride(view->rank() - 1) != 1) {
      fail(ErrorCode::shape_mismatch, call,
           std::string(name) + " is " + view->describe() + "; its innermost stride must be 1");
    }
  }
  Layout made;
  clsa::PagedCacheLayout& l = made.layout;
  l.k = kv.data();
  l.v = vv.data();
  l.index_keys = iv.data();
  l.dtype = kv.dtype();
  l.index_dtype = iv.dtype();
  l.device = device;
  l.num_pages = kv.size(0);
  l.page_size = static_cast<int>(kv.size(1));
  l.num_kv_heads = static_cast<int>(kv.size(2));
  l.head_dim = static_cast<int>(kv.size(3));
  l.index_dim = static_cast<int>(iv.size(2));
  l.k_page_stride = kv.stride(0);
  l.k_token_stride = kv.stride(1);
  l.k_head_stride = kv.stride(2);
  l.v_page_stride = vv.stride(0);
  l.v_token_stride = vv.stride(1);
  l.v_head_stride = vv.stride(2);
  l.index_page_stride = iv.stride(0);
  l.index_token_stride = iv.stride(1);
  if (sv.defined()) {
    expect_rank(call, "index_scales", sv, 2, "[num_pages, page_size]");
    expect_dtype(call, "index_scales", sv, clsa::DType::f32);
    expect_device(call, "index_scales", sv, device);
    if (sv.size(0) != kv.size(0) || sv.size(1) != kv.size(1)) {
      fail(ErrorCode::shape_mismatch, call, "index_scales is " + sv.describe() + " but k is " + kv.describe());
    }
    l.index_scales = sv.data_as<const float>();
    l.index_scale_page_stride = sv.stride(0);
    l.index_scale_token_stride = sv.stride(1);
  }
  auto kv_scales = [&](const char* name, const clsa::TensorView& view, const float*& data, std::int64_t& stride) {
    if (!view.defined()) return;
    expect_rank(call, name, view, 1, "[1] or [num_kv_heads]");
    expect_dtype(call, name, view, clsa::DType::f32);
    expect_device(call, name, view, device);
    if (view.size(0) != 1 && view.size(0) != kv.size(2)) {
      fail(ErrorCode::shape_mismatch, call,
           std::string(name) + " is " + view.describe() + "; expected [1] or [num_kv_heads] = [" +
               std::to_string(kv.size(2)) + "]");
    }
    data = view.data_as<const float>();
    stride = view.size(0) == 1 ? 0 : view.stride(0);
  };
  kv_scales("k_scales", ksv, l.k_scales, l.k_scale_stride);
  kv_scales("v_scales", vsv, l.v_scales, l.v_scale_stride);
  clsa::validate_layout("PagedCacheLayout", l);
  made.k = nb::borrow(k);
  made.v = nb::borrow(v);
  made.index_keys = nb::borrow(index_keys);
  made.index_scales = nb::borrow(index_scales);
  made.k_scales = nb::borrow(k_scales);
  made.v_scales = nb::borrow(v_scales);
  new (self) Layout(std::move(made));  // nanobind hands __init__ raw memory
}

/// Wraps engine page tables (FlashInfer/vLLM layout) over `pool`.
void wrap_tables(const Layout& pool, nb::handle pool_obj, nb::handle page_indptr, nb::handle page_indices,
                 nb::handle last_page_lengths, nb::handle host_page_indptr, nb::handle host_last_page_lengths,
                 Batch& into, bool reuse) {
  CallContext call("CacheBatch::wrap");
  const clsa::TensorView indptr = table_view(call, "page_indptr", page_indptr);
  const clsa::TensorView indices = table_view(call, "page_indices", page_indices);
  const clsa::TensorView last = table_view(call, "last_page_lengths", last_page_lengths);
  const clsa::Device device = pool.layout.device;
  expect_device(call, "page_indptr", indptr, device);
  expect_device(call, "page_indices", indices, device);
  expect_device(call, "last_page_lengths", last, device);
  const std::int64_t sequences = last.size(0);
  if (indptr.size(0) != sequences + 1) {
    fail(ErrorCode::shape_mismatch, call,
         "page_indptr is " + indptr.describe() + " but last_page_lengths is " + last.describe() + "; expected [" +
             std::to_string(sequences + 1) + "] (num_sequences + 1)");
  }
  clsa::TensorView host_indptr = indptr, host_last = last;
  if (device.is_cuda() || !host_page_indptr.is_none() || !host_last_page_lengths.is_none()) {
    if (host_page_indptr.is_none() || host_last_page_lengths.is_none()) {
      fail(ErrorCode::invalid_argument, call,
           "tables on " + clsa::device_name(device) +
               " need their host copies: host_page_indptr and host_last_page_lengths");
    }
    host_indptr = table_view(call, "host_page_indptr", host_page_indptr);
    host_last = table_view(call, "host_last_page_lengths", host_last_page_lengths);
    expect_device(call, "host_page_indptr", host_indptr, clsa::Device::cpu());
    expect_device(call, "host_last_page_lengths", host_last, clsa::Device::cpu());
    if (host_indptr.size(0) != indptr.size(0) || host_last.size(0) != last.size(0)) {
      fail(ErrorCode::shape_mismatch, call,
           "host_page_indptr is " + host_indptr.describe() + " and host_last_page_lengths is " + host_last.describe() +
               "; expected the shapes of page_indptr and last_page_lengths");
    }
  }
  const clsa::PageTableView tables{static_cast<int>(sequences),
                                   indptr.data_as<const std::int32_t>(),
                                   indices.data_as<const std::int32_t>(),
                                   last.data_as<const std::int32_t>(),
                                   host_indptr.data_as<const std::int32_t>(),
                                   host_last.data_as<const std::int32_t>()};
  if (reuse) {
    clsa::CacheBatch::wrap(pool.layout, tables, into.batch);
  } else {
    into.batch = clsa::CacheBatch::wrap(pool.layout, tables);
  }
  into.keep =
      nb::make_tuple(pool_obj, page_indptr, page_indices, last_page_lengths, host_page_indptr, host_last_page_lengths);
}

std::string why_not(bool supported, const std::string& why) {
  return supported ? std::string() : why;
}

// ---------------------------------------------------------------------------------------------

void bind_vocabulary(nb::module_& m) {
  nb::enum_<clsa::DType>(m, "DType", "Element type of a tensor (e4m3: float8_e4m3fn; NumPy passes its bytes as uint8).")
      .value("f32", clsa::DType::f32)
      .value("f16", clsa::DType::f16)
      .value("bf16", clsa::DType::bf16)
      .value("i32", clsa::DType::i32)
      .value("e4m3", clsa::DType::e4m3);
  nb::enum_<clsa::Backend>(m, "Backend", "automatic: CUDA when built with it and a GPU is present, else the CPU.")
      .value("automatic", clsa::Backend::automatic)
      .value("cpu", clsa::Backend::cpu)
      .value("cuda", clsa::Backend::cuda);
  nb::enum_<clsa::ScaleFormat>(m, "ScaleFormat",
                               "Per-token scales of e4m3 indexer keys: f32, or powers of two (ue8m0).")
      .value("f32", clsa::ScaleFormat::f32)
      .value("ue8m0", clsa::ScaleFormat::ue8m0);
  nb::enum_<ErrorCode>(m, "ErrorCode", "What went wrong (clsa.Error.code).")
      .value("invalid_argument", ErrorCode::invalid_argument)
      .value("shape_mismatch", ErrorCode::shape_mismatch)
      .value("dtype_mismatch", ErrorCode::dtype_mismatch)
      .value("device_mismatch", ErrorCode::device_mismatch)
      .value("unknown_sequence", ErrorCode::unknown_sequence)
      .value("capacity_exceeded", ErrorCode::capacity_exceeded)
      .value("unsupported", ErrorCode::unsupported)
      .value("cuda_error", ErrorCode::cuda_error);

  m.def("version", &clsa::version, "The version of the linked libclsa.");
  m.def("built_with_cuda", &clsa::built_with_cuda, "True when this build contains the CUDA kernels.");
  m.def("cuda_device_count", &clsa::cuda_device_count, "Usable CUDA devices (0 without a CUDA build, driver or GPU).");
  m.def("resolve_backend", &clsa::resolve_backend, "backend"_a,
        "Resolves automatic; raises Error(unsupported) for cuda where it cannot run.");
  m.def("dtype_size", &clsa::dtype_size, "dtype"_a);
  m.def(
      "synchronize",
      [](nb::handle stream) {
        const CallContext call("synchronize");
        clsa::synchronize(to_stream(call, stream));
      },
      "stream"_a = nb::none(), "Waits for the work enqueued on `stream` (nothing to wait for on the CPU).");
  m.def(
      "keep_routed_kv_in_l2",
      [](int device, std::size_t bytes) { return clsa::keep_routed_kv_in_l2(clsa::Device::cuda(device), bytes); },
      "device"_a, "bytes"_a,
      "Keeps routed K/V blocks (RoutingIndex.kv) of CUDA device `device` in a persisting-L2 carve-out of up to "
      "`bytes` (0: off). Returns the bytes granted.");
  m.attr("EMPTY_SLOT") = static_cast<std::int64_t>(clsa::empty_slot);

  nb::class_<clsa::CacheConfig>(m, "CacheConfig", "Shape and element types of a SharedKVCache.")
      .def(
          "__init__",
          [](clsa::CacheConfig* c, int num_kv_heads, int head_dim, int index_dim, int page_size, std::int64_t max_pages,
             clsa::DType dtype, std::optional<clsa::DType> index_dtype, clsa::ScaleFormat index_scale_format,
             std::vector<float> k_scales, std::vector<float> v_scales) {
            new (c) clsa::CacheConfig();
            c->num_kv_heads = num_kv_heads;
            c->head_dim = head_dim;
            c->index_dim = index_dim;
            c->page_size = page_size;
            c->max_pages = max_pages;
            c->dtype = dtype;
            c->index_dtype = index_dtype;
            c->index_scale_format = index_scale_format;
            c->k_scales = std::move(k_scales);
            c->v_scales = std::move(v_scales);
          },
          nb::kw_only(), "num_kv_heads"_a = 8, "head_dim"_a = 128, "index_dim"_a = 128, "page_size"_a = 64,
          "max_pages"_a = 0, "dtype"_a = clsa::DType::bf16, "index_dtype"_a = nb::none(),
          "index_scale_format"_a = clsa::ScaleFormat::f32, "k_scales"_a = std::vector<float>{},
          "v_scales"_a = std::vector<float>{})
      .def_rw("num_kv_heads", &clsa::CacheConfig::num_kv_heads)
      .def_rw("head_dim", &clsa::CacheConfig::head_dim)
      .def_rw("index_dim", &clsa::CacheConfig::index_dim)
      .def_rw("page_size", &clsa::CacheConfig::page_size)
      .def_rw("max_pages", &clsa::CacheConfig::max_pages)
      .def_rw("dtype", &clsa::CacheConfig::dtype)
      .def_rw("index_dtype", &clsa::CacheConfig::index_dtype)
      .def_rw("index_scale_format", &clsa::CacheConfig::index_scale_format)
      .def_rw("k_scales", &clsa::CacheConfig::k_scales)
      .def_rw("v_scales", &clsa::CacheConfig::v_scales)
      .def("index_key_dtype", &clsa::CacheConfig::index_key_dtype)
      .def("__repr__", [](const clsa::CacheConfig& c) {
        return "CacheConfig(num_kv_heads=" + std::to_string(c.num_kv_heads) +
               ", head_dim=" + std::to_string(c.head_dim) + ", index_dim=" + std::to_string(c.index_dim) +
               ", page_size=" + std::to_string(c.page_size) + ", max_pages=" + std::to_string(c.max_pages) +
               ", dtype=" + clsa::dtype_name(c.dtype) + ", index_dtype=" + clsa::dtype_name(c.index_key_dtype()) + ")";
      });

  nb::class_<clsa::IndexerConfig>(m, "IndexerConfig", "The lightning indexer: heads, key dim, top_k, sinks, window.")
      .def(
          "__init__",
          [](clsa::IndexerConfig* c, int num_heads, int index_dim, int top_k, int sink_tokens, int local_window,
             float scale, bool enable_pdl) {
            new (c) clsa::IndexerConfig{num_heads, index_dim, top_k, sink_tokens, local_window, scale, enable_pdl};
          },
          nb::kw_only(), "num_heads"_a = 16, "index_dim"_a = 128, "top_k"_a = 2048, "sink_tokens"_a = 0,
          "local_window"_a = 0, "scale"_a = 1.0f, "enable_pdl"_a = false)
      .def_rw("num_heads", &clsa::IndexerConfig::num_heads)
      .def_rw("index_dim", &clsa::IndexerConfig::index_dim)
      .def_rw("top_k", &clsa::IndexerConfig::top_k)
      .def_rw("sink_tokens", &clsa::IndexerConfig::sink_tokens)
      .def_rw("local_window", &clsa::IndexerConfig::local_window)
      .def_rw("scale", &clsa::IndexerConfig::scale)
      .def_rw("enable_pdl", &clsa::IndexerConfig::enable_pdl)
      .def("__repr__", [](const clsa::IndexerConfig& c) {
        return "IndexerConfig(num_heads=" + std::to_string(c.num_heads) + ", index_dim=" + std::to_string(c.index_dim) +
               ", top_k=" + std::to_string(c.top_k) + ", sink_tokens=" + std::to_string(c.sink_tokens) +
               ", local_window=" + std::to_string(c.local_window) + ", scale=" + std::to_string(c.scale) +
               ", enable_pdl=" + (c.enable_pdl ? "True" : "False") + ")";
      });

  nb::class_<clsa::AttentionConfig>(m, "AttentionConfig",
                                    "Query heads, kv heads, head dim, softmax scale (0: 1/sqrt(D)).")
      .def(
          "__init__",
          [](clsa::AttentionConfig* c, int num_q_heads, int num_kv_heads, int head_dim, float softmax_scale,
             bool enable_pdl) {
            new (c) clsa::AttentionConfig{num_q_heads, num_kv_heads, head_dim, softmax_scale, enable_pdl};
          },
          nb::kw_only(), "num_q_heads"_a = 32, "num_kv_heads"_a = 8, "head_dim"_a = 128, "softmax_scale"_a = 0.0f,
          "enable_pdl"_a = false)
      .def_rw("num_q_heads", &clsa::AttentionConfig::num_q_heads)
      .def_rw("num_kv_heads", &clsa::AttentionConfig::num_kv_heads)
      .def_rw("head_dim", &clsa::AttentionConfig::head_dim)
      .def_rw("softmax_scale", &clsa::AttentionConfig::softmax_scale)
      .def_rw("enable_pdl", &clsa::AttentionConfig::enable_pdl)
      .def("__repr__", [](const clsa::AttentionConfig& c) {
        return "AttentionConfig(num_q_heads=" + std::to_string(c.num_q_heads) +
               ", num_kv_heads=" + std::to_string(c.num_kv_heads) + ", head_dim=" + std::to_string(c.head_dim) +
               ", softmax_scale=" + std::to_string(c.softmax_scale) +
               ", enable_pdl=" + (c.enable_pdl ? "True" : "False") + ")";
      });

  nb::class_<clsa::MemoryStats>(m, "MemoryStats", "Pages, sequences, tokens and bytes of a SharedKVCache.")
      .def_ro("pages_total", &clsa::MemoryStats::pages_total)
      .def_ro("pages_used", &clsa::MemoryStats::pages_used)
      .def_ro("pages_free", &clsa::MemoryStats::pages_free)
      .def_ro("sequences", &clsa::MemoryStats::sequences)
      .def_ro("tokens", &clsa::MemoryStats::tokens)
      .def_ro("kv_bytes_per_token", &clsa::MemoryStats::kv_bytes_per_token)
      .def_ro("index_bytes_per_token", &clsa::MemoryStats::index_bytes_per_token)
      .def_ro("bytes_per_token", &clsa::MemoryStats::bytes_per_token)
      .def_ro("pool_bytes", &clsa::MemoryStats::pool_bytes)
      .def("per_layer_cache_bytes", &clsa::MemoryStats::per_layer_cache_bytes, "layers"_a)
      .def("shared_cache_bytes", &clsa::MemoryStats::shared_cache_bytes);
}

void bind_cache(nb::module_& m) {
  nb::class_<Layout>(m, "PagedCacheLayout",
                     "A paged K/V/indexer-key pool: an engine's own arrays (for SharedKVCache.wrap and "
                     "CacheBatch.wrap), or a cache's pool (SharedKVCache.layout()).")
      .def("__init__", &init_layout, "k"_a.none(), "v"_a.none(), "index_keys"_a.none(), nb::kw_only(),
           "index_scales"_a = nb::none(), "k_scales"_a = nb::none(), "v_scales"_a = nb::none(),
           "k, v: [num_pages, page_size, num_kv_heads, head_dim]; index_keys: [num_pages, page_size, index_dim]; "
           "any outer strides, innermost stride 1, no copy. e4m3 index keys: index_scales f32 [num_pages, "
           "page_size]; e4m3 K/V: k_scales and v_scales f32 [1] or [num_kv_heads].")
      .def_ro("k", &Layout::k)
      .def_ro("v", &Layout::v)
      .def_ro("index_keys", &Layout::index_keys)
      .def_ro("index_scales", &Layout::index_scales)
      .def_ro("k_scales", &Layout::k_scales)
      .def_ro("v_scales", &Layout::v_scales)
      .def_prop_ro("dtype", [](const Layout& l) { return l.layout.dtype; })
      .def_prop_ro("index_dtype", [](const Layout& l) { return l.layout.index_key_dtype(); })
      .def_prop_ro("device", [](const Layout& l) { return clsa::device_name(l.layout.device); })
      .def_prop_ro("num_pages", [](const Layout& l) { return l.layout.num_pages; })
      .def_prop_ro("page_size", [](const Layout& l) { return l.layout.page_size; })
      .def_prop_ro("num_kv_heads", [](const Layout& l) { return l.layout.num_kv_heads; })
      .def_prop_ro("head_dim", [](const Layout& l) { return l.layout.head_dim; })
      .def_prop_ro("index_dim", [](const Layout& l) { return l.layout.index_dim; });

  nb::class_<Batch>(m, "CacheBatch",
                    "Page tables of a batch of sequences (SharedKVCache.batch / reserve_batch / refill, or an "
                    "engine's own tables through CacheBatch.wrap).")
      .def_static(
          "wrap",
          [](nb::handle pool, nb::handle page_indptr, nb::handle page_indices, nb::handle last_page_lengths,
             nb::handle host_page_indptr, nb::handle host_last_page_lengths, nb::handle out) -> nb::object {
            const Layout& layout = nb::cast<const Layout&>(pool);
            if (out.is_none()) {
              Batch batch;
              wrap_tables(layout, pool, page_indptr, page_indices, last_page_lengths, host_page_indptr,
                          host_last_page_lengths, batch, false);
              return nb::cast(std::move(batch));
            }
            wrap_tables(layout, pool, page_indptr, page_indices, last_page_lengths, host_page_indptr,
                        host_last_page_lengths, nb::cast<Batch&>(out), true);
            return nb::borrow(out);
          },
          "pool"_a.none(), "page_indptr"_a.none(), "page_indices"_a.none(), "last_page_lengths"_a.none(),
          "host_page_indptr"_a = nb::none(), "host_last_page_lengths"_a = nb::none(), nb::kw_only(),
          "out"_a = nb::none(),
          "A batch over an engine's pool (PagedCacheLayout) and FlashInfer/vLLM page tables (int32, contiguous, "
          "on the pool's device; for a CUDA pool also their host copies). Nothing is copied: the arrays must "
          "outlive the batch (it holds them). out=: refill that batch in place (no allocation once it has held "
          "as many sequences).")
      .def_prop_ro("num_sequences", [](const Batch& b) { return b.batch.num_sequences(); })
      .def("__len__", [](const Batch& b) { return b.batch.num_sequences(); })
      .def_prop_ro("capacity", [](const Batch& b) { return b.batch.capacity(); })
      .def_prop_ro("page_capacity", [](const Batch& b) { return b.batch.page_capacity(); })
      .def_prop_ro("fixed_capacity", [](const Batch& b) { return b.batch.fixed_capacity(); })
      .def_prop_ro("captured", [](const Batch& b) { return b.batch.captured(); })
      .def_prop_ro("max_length", [](const Batch& b) { return b.batch.max_length(); })
      .def_prop_ro("device", [](const Batch& b) { return clsa::device_name(b.batch.device()); })
      .def_prop_ro("lengths",
                   [](const Batch& b) {
                     const std::int32_t* lengths = b.batch.lengths();
                     return std::vector<std::int64_t>(lengths, lengths + b.batch.num_sequences());
                   })
      .def("__repr__", [](const Batch& b) {
        return "CacheBatch(num_sequences=" + std::to_string(b.batch.num_sequences()) +
               ", max_length=" + std::to_string(b.batch.max_length()) +
               ", capacity=" + std::to_string(b.batch.capacity()) + ", device=" + clsa::device_name(b.batch.device()) +
               ")";
      });

  nb::class_<Cache>(m, "SharedKVCache", "ONE paged K/V/indexer-key cache shared by every cross-decoder layer.")
      .def(
          "__init__",
          [](Cache* self, const clsa::CacheConfig& config, clsa::Backend backend) {
            new (self) Cache(clsa::SharedKVCache(config, backend));
          },
          "config"_a, "backend"_a = clsa::Backend::automatic,
          "Allocates the page pool (config.max_pages pages) on the backend's device.")
      .def_static(
          "wrap",
          [](const clsa::CacheConfig& config, nb::handle pool) {
            Cache cache(clsa::SharedKVCache::wrap(config, nb::cast<const Layout&>(pool).layout));
            cache.pool = nb::borrow(pool);
            return cache;
          },
          "config"_a, "pool"_a.none(),
          "A cache over an engine's pool (PagedCacheLayout): libclsa manages sequences, pages and appends, the "
          "memory stays the engine's (the cache holds the arrays).")
      .def_prop_ro("config", [](const Cache& c) { return c.cache.config(); })
      .def_prop_ro("backend", [](const Cache& c) { return c.cache.backend(); })
      .def_prop_ro("device", [](const Cache& c) { return clsa::device_name(c.cache.device()); })
      .def(
          "layout", [](nb::handle self) { return layout_arrays(nb::cast<Cache&>(self).cache.layout(), self); },
          "The pool as arrays over its memory (NumPy on the CPU, DLPack ndarrays otherwise), alive with the cache.")
      .def(
          "add_sequence", [](Cache& c) { return static_cast<std::int64_t>(c.cache.add_sequence()); },
          "A new, empty sequence; returns its id (an int, never reused).")
      .def(
          "release", [](Cache& c, std::int64_t id) { c.cache.release(static_cast<clsa::SequenceId>(id)); },
          "sequence"_a, "Returns the sequence's pages to the pool.")
      .def(
          "contains",
          [](const Cache& c, std::int64_t id) { return c.cache.contains(static_cast<clsa::SequenceId>(id)); },
          "sequence"_a)
      .def("__contains__",
           [](const Cache& c, std::int64_t id) { return c.cache.contains(static_cast<clsa::SequenceId>(id)); })
      .def(
          "length", [](const Cache& c, std::int64_t id) { return c.cache.length(static_cast<clsa::SequenceId>(id)); },
          "sequence"_a)
      .def(
          "pages", [](const Cache& c, std::int64_t id) { return c.cache.pages(static_cast<clsa::SequenceId>(id)); },
          "sequence"_a, "Page indices of the sequence, in position order.")
      .def(
          "append",
          [](Cache& c, std::int64_t id, nb::handle k, nb::handle v, nb::handle index_keys, nb::handle index_scales,
             nb::handle stream) {
            CallContext call("SharedKVCache::append");
            call.on(c.cache.device());
            const clsa::TensorView kv = to_view(call, "k", k, Access::read);
            const clsa::TensorView vv = to_view(call, "v", v, Access::read);
            const clsa::TensorView iv = to_view(call, "index_keys", index_keys, Access::read);
            const clsa::TensorView sv = to_view(call, "index_scales", index_scales, Access::read, true);
            c.cache.append(static_cast<clsa::SequenceId>(id), kv, vv, iv, to_stream(call, stream), sv);
          },
          "sequence"_a, "k"_a.none(), "v"_a.none(), "index_keys"_a.none(), nb::kw_only(), "index_scales"_a = nb::none(),
          "stream"_a = nb::none(),
          "Appends T tokens: k, v [T, num_kv_heads, head_dim], index_keys [T, index_dim] (e4m3 caches also take "
          "f32/f16/bf16 values and quantize them). All-or-nothing.")
      .def(
          "batch",
          [](nb::handle self, nb::handle sequences, nb::handle stream) {
            Cache& c = nb::cast<Cache&>(self);
            CallContext call("SharedKVCache::batch");
            call.on(c.cache.device());
            const std::vector<clsa::SequenceId>& ids = sequences_of(call, sequences);
            Batch batch{c.cache.batch(clsa::Span<clsa::SequenceId>(ids), to_stream(call, stream)), nb::borrow(self)};
            return batch;
          },
          "sequences"_a.none(), nb::kw_only(), "stream"_a = nb::none(),
          "The page tables of `sequences` (ids; None or EMPTY_SLOT: an empty slot), in new tables.")
      .def(
          "reserve_batch",
          [](nb::handle self, int max_sequences, std::int64_t max_length) {
            Batch batch{nb::cast<Cache&>(self).cache.reserve_batch(max_sequences, max_length), nb::borrow(self)};
            return batch;
          },
          "max_sequences"_a, "max_length"_a,
          "An empty batch whose tables (allocated here) never move: refill() writes them in place, so a CUDA graph "
          "captured over it stays valid.")
      .def(
          "refill",
          [](nb::handle self, Batch& batch, nb::handle sequences, nb::handle stream) {
            Cache& c = nb::cast<Cache&>(self);
            CallContext call("SharedKVCache::refill");
            call.on(c.cache.device());
            const std::vector<clsa::SequenceId>& ids = sequences_of(call, sequences);
            c.cache.batch(clsa::Span<clsa::SequenceId>(ids), batch.batch, to_stream(call, stream));
            batch.keep = nb::borrow(self);
          },
          "batch"_a, "sequences"_a.none(), nb::kw_only(), "stream"_a = nb::none(),
          "Refills `batch` in place for `sequences` (slots past them are emptied); a reserve_batch() batch that "
          "cannot hold them raises capacity_exceeded and is left as it was, others grow.")
      .def("memory", [](const Cache& c) { return c.cache.memory(); });
}

void bind_routing(nb::module_& m) {
  nb::class_<Routing>(m, "RoutingIndex",
                      "The routed tokens of every query token: positions int32 [B, T, top_k], counts int32 [B, T], "
                      "optional slots int32 [B, T, top_k] and kv [B, T, 2, Hkv, top_k, head_dim].")
      .def(
          "__init__",
          [](Routing* self, nb::handle positions, nb::handle counts, std::optional<int> top_k, nb::handle slots,
             nb::handle kv) {
            CallContext call("RoutingIndex");
            // Writable when all are (then select() may fill it); a read-only index still serves forward().
            bool writable = true;
            for (nb::handle obj : {positions, counts, slots, kv}) {
              nb::ndarray<> array;
              if (!obj.is_none() && !nb::try_cast(obj, array, false)) writable = false;
            }
            const clsa::TensorView p = to_view(call, "positions", positions, Access::read);
            const clsa::TensorView c = to_view(call, "counts", counts, Access::read);
            const clsa::TensorView s = to_view(call, "slots", slots, Access::read, true);
            const clsa::TensorView k = to_view(call, "kv", kv, Access::read, true);
            if (!top_k && p.rank() != 3) {
              fail(ErrorCode::shape_mismatch, call, "positions is " + p.describe() + "; expected [B, T, top_k]");
            }
            new (self) Routing();
            self->index = clsa::RoutingIndex{p, c, top_k ? *top_k : static_cast<int>(p.size(2)), s, k};
            self->positions = nb::borrow(positions);
            self->counts = nb::borrow(counts);
            self->slots = nb::borrow(slots);
            self->kv = nb::borrow(kv);
            self->writable = writable;
          },
          "positions"_a.none(), "counts"_a.none(), "top_k"_a = nb::none(), nb::kw_only(), "slots"_a = nb::none(),
          "kv"_a = nb::none(),
          "An index over caller arrays (no copy): to select() into (out=) or to hand to forward(). top_k defaults "
          "to positions.shape[2].")
      .def_prop_ro(
          "positions",
          [](Routing& r) { return routing_array(r, r.positions, r.index.positions, "RoutingIndex::positions"); })
      .def_prop_ro("counts",
                   [](Routing& r) { return routing_array(r, r.counts, r.index.counts, "RoutingIndex::counts"); })
      .def_prop_ro("slots", [](Routing& r) { return routing_array(r, r.slots, r.index.slots, "RoutingIndex::slots"); })
      .def_prop_ro("kv", [](Routing& r) { return routing_array(r, r.kv, r.index.kv, "RoutingIndex::kv"); })
      .def_prop_ro("top_k", [](const Routing& r) { return r.index.top_k; })
      .def_prop_ro("num_sequences", [](const Routing& r) { return r.index.defined() ? r.index.num_sequences() : 0; })
      .def_prop_ro("tokens", [](const Routing& r) { return r.index.defined() ? r.index.tokens() : 0; });

  nb::class_<Indexer>(m, "CrossLayerIndexer",
                      "One lightning-indexer pass and one top-k per decoding step; its RoutingIndex serves every "
                      "cross-decoder layer.")
      .def(
          "__init__",
          [](Indexer* self, const clsa::IndexerConfig& config, clsa::Backend backend) {
            new (self) Indexer(clsa::CrossLayerIndexer(config, backend));
          },
          "config"_a, "backend"_a = clsa::Backend::automatic)
      .def_static(
          "supports",
          [](const clsa::IndexerConfig& config, clsa::DType cache_dtype, clsa::Backend backend) {
            return clsa::CrossLayerIndexer::supports(config, cache_dtype, backend);
          },
          "config"_a, "cache_dtype"_a = clsa::DType::bf16, "backend"_a = clsa::Backend::automatic,
          "Whether `backend` has kernels for this configuration over indexer keys of `cache_dtype`.")
      .def_static(
          "unsupported_reason",
          [](const clsa::IndexerConfig& config, clsa::DType cache_dtype, clsa::Backend backend) {
            std::string why;
            return why_not(clsa::CrossLayerIndexer::supports(config, cache_dtype, backend, &why), why);
          },
          "config"_a, "cache_dtype"_a = clsa::DType::bf16, "backend"_a = clsa::Backend::automatic,
          "Why supports() is False (the message select() would raise as Error(unsupported)); '' when supported.")
      .def_prop_ro("config", [](const Indexer& i) { return i.indexer.config(); })
      .def_prop_ro("backend", [](const Indexer& i) { return i.indexer.backend(); })
      .def_prop_ro("device", [](const Indexer& i) { return clsa::device_name(i.indexer.device()); })
      .def_prop_ro("gathers_routed_kv", [](const Indexer& i) { return i.indexer.gathers_routed_kv(); })
      .def(
          "workspace_bytes",
          [](const Indexer& i, int max_sequences, int max_tokens, std::int64_t max_length) {
            return i.indexer.workspace_bytes(max_sequences, max_tokens, max_length);
          },
          "max_sequences"_a, "max_tokens"_a, "max_length"_a)
      .def(
          "reserve",
          [](Indexer& i, int max_sequences, int max_tokens, std::int64_t max_length) {
            ++i.generation;
            i.indexer.reserve(max_sequences, max_tokens, max_length);
            i.workspace = nb::object();
          },
          "max_sequences"_a, "max_tokens"_a, "max_length"_a,
          "Plans for batches up to these bounds on the indexer's own workspace: later select() calls within them "
          "allocate nothing and never synchronise (CUDA-graph capturable).")
      .def(
          "set_workspace",
          [](Indexer& i, nb::handle workspace, int max_sequences, int max_tokens, std::int64_t max_length) {
            CallContext call("CrossLayerIndexer::set_workspace");
            const auto [data, bytes] = workspace_of(call, workspace);
            ++i.generation;
            i.indexer.set_workspace(data, bytes, max_sequences, max_tokens, max_length);
            i.workspace = nb::borrow(workspace);
          },
          "workspace"_a.none(), "max_sequences"_a, "max_tokens"_a, "max_length"_a,
          "The same plan on a caller array (contiguous, >= workspace_bytes(), 256-byte aligned; held by the "
          "indexer).")
      .def(
          "check_status", [](Indexer& i) { i.indexer.check_status(); },
          "Raises Error(capacity_exceeded) if a kernel launched earlier (a graph replay) met a sequence beyond "
          "the plan, and clears that report.")
      .def(
          "gather_routed_kv",
          [](Indexer& i, const clsa::CacheConfig& cache, bool enabled) {
            ++i.generation;
            i.indexer.gather_routed_kv(cache, enabled);
          },
          "cache"_a, "enabled"_a = true,
          "Opt-in: select() also copies the routed tokens' K and V rows once per step (RoutingIndex.kv).")
      .def(
          "select",
          [](nb::handle self, const Batch& batch, nb::handle q_idx, nb::handle head_weights, nb::handle out,
             nb::handle stream) -> nb::object {
            Indexer& i = nb::cast<Indexer&>(self);
            CallContext call("CrossLayerIndexer::select");
            const clsa::TensorView q = to_view(call, "q_idx", q_idx, Access::read);
            const clsa::TensorView w = to_view(call, "head_weights", head_weights, Access::read);
            const clsa::Stream s = to_stream(call, stream);
            ++i.generation;
            if (!out.is_none()) {
              Routing& into = routing_of(out);
              if (!into.writable || into.owner.is_valid()) {
                fail(ErrorCode::invalid_argument, call,
                     "out must be a RoutingIndex over writable caller arrays (RoutingIndex(positions, counts, "
                     "slots=..., kv=...))");
              }
              i.indexer.select(batch.batch, q, w, into.index, s);
              return nb::borrow(out);
            }
            Routing routing;
            routing.index = i.indexer.select(batch.batch, q, w, s);
            routing.owner = nb::borrow(self);
            routing.generation = i.generation;
            routing.as_torch = is_torch_tensor(q_idx);
            return nb::cast(std::move(routing));
          },
          "batch"_a, "q_idx"_a.none(), "head_weights"_a.none(), nb::kw_only(), "out"_a = nb::none(),
          "stream"_a = nb::none(),
          "Routes every query token: q_idx [B, T, num_heads, index_dim], head_weights [B, T, num_heads]. Returns "
          "an index in the indexer's workspace, valid until its next select() or re-plan (its arrays alias that "
          "memory), or fills out= (a RoutingIndex over caller arrays) and returns it.");
}

void bind_attention(nb::module_& m) {
  nb::class_<Sparse>(m, "SparseCrossAttention",
                     "Attention of each query token over its routed tokens only (one object may serve every layer).")
      .def(
          "__init__",
          [](Sparse* self, const clsa::AttentionConfig& config, clsa::Backend backend) {
            new (self) Sparse(clsa::SparseCrossAttention(config, backend));
          },
          "config"_a, "backend"_a = clsa::Backend::automatic)
      .def_static(
          "supports",
          [](const clsa::AttentionConfig& config, std::optional<clsa::DType> kv_dtype, clsa::Backend backend) {
            return kv_dtype ? clsa::SparseCrossAttention::supports(config, *kv_dtype, backend)
                            : clsa::SparseCrossAttention::supports(config, backend);
          },
          "config"_a, "kv_dtype"_a = nb::none(), "backend"_a = clsa::Backend::automatic,
          "Whether `backend` has kernels for this configuration (over f32/f16/bf16 K/V, or `kv_dtype`).")
      .def_static(
          "unsupported_reason",
          [](const clsa::AttentionConfig& config, std::optional<clsa::DType> kv_dtype, clsa::Backend backend) {
            std::string why;
            const bool ok = kv_dtype ? clsa::SparseCrossAttention::supports(config, *kv_dtype, backend, &why)
                                     : clsa::SparseCrossAttention::supports(config, backend, &why);
            return why_not(ok, why);
          },
          "config"_a, "kv_dtype"_a = nb::none(), "backend"_a = clsa::Backend::automatic)
      .def_prop_ro("config", [](const Sparse& a) { return a.attention.config(); })
      .def_prop_ro("backend", [](const Sparse& a) { return a.attention.backend(); })
      .def_prop_ro("device", [](const Sparse& a) { return clsa::device_name(a.attention.device()); })
      .def(
          "workspace_bytes",
          [](const Sparse& a, int max_sequences, int max_tokens, int top_k) {
            return a.attention.workspace_bytes(max_sequences, max_tokens, top_k);
          },
          "max_sequences"_a, "max_tokens"_a, "top_k"_a)
      .def(
          "reserve",
          [](Sparse& a, int max_sequences, int max_tokens, int top_k) {
            a.attention.reserve(max_sequences, max_tokens, top_k);
            a.workspace = nb::object();
          },
          "max_sequences"_a, "max_tokens"_a, "top_k"_a)
      .def(
          "set_workspace",
          [](Sparse& a, nb::handle workspace, int max_sequences, int max_tokens, int top_k) {
            CallContext call("SparseCrossAttention::set_workspace");
            const auto [data, bytes] = workspace_of(call, workspace);
            a.attention.set_workspace(data, bytes, max_sequences, max_tokens, top_k);
            a.workspace = nb::borrow(workspace);
          },
          "workspace"_a.none(), "max_sequences"_a, "max_tokens"_a, "top_k"_a)
      .def(
          "forward",
          [](Sparse& a, const Batch& batch, const Routing& routing, nb::handle q, nb::handle out, nb::handle lse,
             nb::handle stream) {
            CallContext call("SparseCrossAttention::forward");
            const clsa::RoutingIndex& index = valid_index(call, routing);
            const clsa::TensorView qv = to_view(call, "q", q, Access::read);
            nb::object result = output_like(call, q, out);
            const clsa::TensorView ov = to_view(call, "out", result, Access::write);
            const clsa::TensorView lv = to_view(call, "lse", lse, Access::write, true);
            a.attention.forward(batch.batch, index, qv, ov, to_stream(call, stream), lv);
            return result;
          },
          "batch"_a, "routing"_a, "q"_a.none(), "out"_a = nb::none(), nb::kw_only(), "lse"_a = nb::none(),
          "stream"_a = nb::none(),
          "out[b,t,h] = attention of q[b,t,h] over the routed tokens; q, out [B, T, num_q_heads, head_dim], lse "
          "f32 [B, T, num_q_heads] (optional). Allocates out like q when not given; returns out.");

  nb::class_<Dense>(m, "DenseCrossAttention",
                    "Full causal attention over the same cache: the YOCO baseline and the exact path.")
      .def(
          "__init__",
          [](Dense* self, const clsa::AttentionConfig& config, clsa::Backend backend) {
            new (self) Dense(clsa::DenseCrossAttention(config, backend));
          },
          "config"_a, "backend"_a = clsa::Backend::automatic)
      .def_prop_ro("config", [](const Dense& a) { return a.attention.config(); })
      .def_prop_ro("backend", [](const Dense& a) { return a.attention.backend(); })
      .def_prop_ro("device", [](const Dense& a) { return clsa::device_name(a.attention.device()); })
      .def(
          "workspace_bytes",
          [](const Dense& a, int max_sequences, int max_tokens, std::int64_t max_length) {
            return a.attention.workspace_bytes(max_sequences, max_tokens, max_length);
          },
          "max_sequences"_a, "max_tokens"_a, "max_length"_a)
      .def(
          "reserve",
          [](Dense& a, int max_sequences, int max_tokens, std::int64_t max_length) {
            a.attention.reserve(max_sequences, max_tokens, max_length);
            a.workspace = nb::object();
          },
          "max_sequences"_a, "max_tokens"_a, "max_length"_a)
      .def(
          "set_workspace",
          [](Dense& a, nb::handle workspace, int max_sequences, int max_tokens, std::int64_t max_length) {
            CallContext call("DenseCrossAttention::set_workspace");
            const auto [data, bytes] = workspace_of(call, workspace);
            a.attention.set_workspace(data, bytes, max_sequences, max_tokens, max_length);
            a.workspace = nb::borrow(workspace);
          },
          "workspace"_a.none(), "max_sequences"_a, "max_tokens"_a, "max_length"_a)
      .def("check_status", [](Dense& a) { a.attention.check_status(); })
      .def(
          "forward",
          [](Dense& a, const Batch& batch, nb::handle q, nb::handle out, nb::handle lse, nb::handle stream) {
            CallContext call("DenseCrossAttention::forward");
            const clsa::TensorView qv = to_view(call, "q", q, Access::read);
            nb::object result = output_like(call, q, out);
            const clsa::TensorView ov = to_view(call, "out", result, Access::write);
            const clsa::TensorView lv = to_view(call, "lse", lse, Access::write, true);
            a.attention.forward(batch.batch, qv, ov, to_stream(call, stream), lv);
            return result;
          },
          "batch"_a, "q"_a.none(), "out"_a = nb::none(), nb::kw_only(), "lse"_a = nb::none(), "stream"_a = nb::none(),
          "out[b,t,h] = causal attention of q[b,t,h] over every visible cached token. Returns out.");
}

}  // namespace
}  // namespace clsa_py

NB_MODULE(_clsa, m) {
  m.doc() = "libclsa: Cross-Layer Sparse Attention for YOCO-style cross-decoders (the C++ API, bound with nanobind).";

  // clsa.Error: every failure libclsa reports, with .code (ErrorCode) and the C++ message.
  // The type lives as long as the process (one reference is never dropped): the translator uses it.
  PyObject* error = PyErr_NewExceptionWithDoc(
      "clsa.Error",
      "A libclsa error: .code is the clsa.ErrorCode, str() the message naming the function, the argument and the "
      "shapes.",
      PyExc_RuntimeError, nullptr);
  if (error == nullptr) throw nb::python_error();
  m.attr("Error") = nb::borrow(error);
  nb::register_exception_translator(
      [](const std::exception_ptr& p, void* payload) {
        try {
          std::rethrow_exception(p);
        } catch (const clsa::Error& e) {
          PyObject* type = static_cast<PyObject*>(payload);
          const nb::object value = nb::steal(PyObject_CallFunction(type, "s", e.what()));
          if (!value.is_valid()) return;  // the call set its own exception
          if (PyObject_SetAttrString(value.ptr(), "code", nb::cast(e.code()).ptr()) != 0) return;
          PyErr_SetObject(type, value.ptr());
        }
      },
      error);

  // torch (clsa.torch, torch.compile's caches) may hold libclsa objects past the interpreter's
  // teardown of this module; clsa.torch turns nanobind's leak report off for that reason.
  m.def("_set_leak_warnings", &nb::set_leak_warnings, "enabled"_a);

  clsa_py::bind_vocabulary(m);
  clsa_py::bind_cache(m);
  clsa_py::bind_routing(m);
  clsa_py::bind_attention(m);
}
