"""libclsa from Python: Cross-Layer Sparse Attention (CLSA) for YOCO-style cross-decoders.

One ``SharedKVCache`` holds K, V and indexer keys for every cross-decoder layer; one
``CrossLayerIndexer.select`` per decoding step routes each query token to its top-k cached tokens;
every layer's ``SparseCrossAttention.forward`` reuses that ``RoutingIndex``. Tensors are any arrays
that speak DLPack or the buffer protocol (NumPy on the CPU; PyTorch, CuPy, JAX on either device),
used in place: no copy, strides as they are (the innermost stride must be 1). Every failure is a
``clsa.Error`` whose ``code`` is a ``clsa.ErrorCode``. ``clsa.torch`` has the torch.library ops.
"""

from ._clsa import (
    EMPTY_SLOT,
    AttentionConfig,
    Backend,
    CacheBatch,
    CacheConfig,
    CrossLayerIndexer,
    DenseCrossAttention,
    DType,
    Error,
    ErrorCode,
    IndexerConfig,
    MemoryStats,
    PagedCacheLayout,
    RoutingIndex,
    ScaleFormat,
    SharedKVCache,
    SparseCrossAttention,
    built_with_cuda,
    cuda_device_count,
    dtype_size,
    keep_routed_kv_in_l2,
    resolve_backend,
    synchronize,
    version,
)

__version__ = version()

__all__ = [
    "EMPTY_SLOT",
    "AttentionConfig",
    "Backend",
    "CacheBatch",
    "CacheConfig",
    "CrossLayerIndexer",
    "DenseCrossAttention",
    "DType",
    "Error",
    "ErrorCode",
    "IndexerConfig",
    "MemoryStats",
    "PagedCacheLayout",
    "RoutingIndex",
    "ScaleFormat",
    "SharedKVCache",
    "SparseCrossAttention",
    "built_with_cuda",
    "cuda_device_count",
    "dtype_size",
    "keep_routed_kv_in_l2",
    "resolve_backend",
    "synchronize",
    "version",
]
