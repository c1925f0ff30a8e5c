"""libclsa's calls as torch.library custom ops, for torch.compile and CUDA graphs.

``import clsa.torch`` imports torch (``import clsa`` never does) and registers four ops in the
``clsa`` namespace, each with a fake (meta) implementation and a schema that declares what it
writes:

``torch.ops.clsa.append(cache, sequence, k, v, index_keys, k_pool!, v_pool!, index_pool!)``
    appends tokens to a sequence of a SharedKVCache (it writes the cache's pool);
``torch.ops.clsa.select(indexer, batch, index_pool, q_idx, head_weights, positions!, counts!, slots!?)``
    routes every query token into caller tensors (CrossLayerIndexer.select with out=);
``torch.ops.clsa.sparse_attention(attention, batch, k_pool, v_pool, positions, counts, slots?, q, out!, lse!?)``
``torch.ops.clsa.dense_attention(attention, batch, k_pool, v_pool, q, out!, lse!?)``
    one layer's attention into caller tensors.

Ops take tensors and ints only, so libclsa's objects cross as integer handles (``handle()``), and
the cache's pool is passed as tensors (``pool()``): the ops that read it name it as an input and
``append`` names it as written, so a compiled graph keeps appends before the reads that follow.
``Ops`` binds the handles and pool tensors of one cache, indexer, attention and batch once, outside
the compiled region, and allocates outputs when none are given. Every op runs on the current torch
stream of its tensors' device (the binding's default), so ops captured by ``torch.cuda.graph``
replay on the capture stream's graph.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from . import _clsa

__all__ = ["Ops", "handle", "object_of", "pool", "release"]

_objects: dict = {}  # handle -> object (kept alive until release())
_handles: dict = {}  # id(object) -> handle
_pools: dict = {}  # handle of a cache -> (k_pool, v_pool, index_pool) tensors
_counter = itertools.count(1)

# torch keeps references (the handles above, compiled graphs' guards and constants) until after
# the interpreter has torn this module down: nanobind would report those objects as leaks.
_clsa._set_leak_warnings(False)


def handle(obj) -> int:
    """The integer handle of a libclsa object (SharedKVCache, CacheBatch, CrossLayerIndexer,
    SparseCrossAttention, DenseCrossAttention) for the ops; the object stays alive until
    ``release()``. The same object always gets the same handle."""
    key = id(obj)
    existing = _handles.get(key)
    if existing is not None and _objects.get(existing) is obj:
        return existing
    new = next(_counter)
    _objects[new] = obj
    _handles[key] = new
    return new


def object_of(h: int):
    """The object behind a handle; clsa.Error(invalid_argument) for an unknown one."""
    try:
        return _objects[h]
    except KeyError:
        raise _error(f"clsa.torch: {h} is not a handle of a live libclsa object (handle())") from None


def release(h: int) -> None:
    """Forgets a handle (and the pool tensors of a cache's handle)."""
    obj = _objects.pop(h, None)
    if obj is not None:
        _handles.pop(id(obj), None)
    _pools.pop(h, None)


def pool(cache) -> tuple:
    """The pool of a SharedKVCache as torch tensors over its memory (no copy): K and V
    [num_pages, page_size, num_kv_heads, head_dim], indexer keys [num_pages, page_size, index_dim]
    (e4m3 as uint8). The ops name them as what ``append`` writes and the others read."""
    h = handle(cache)
    tensors = _pools.get(h)
    if tensors is None:
        layout = cache.layout()
        tensors = tuple(torch.from_dlpack(a) for a in (layout.k, layout.v, layout.index_keys))
        _pools[h] = tensors
    return tensors


def _error(message: str) -> Exception:
    err = _clsa.Error(message)
    err.code = _clsa.ErrorCode.invalid_argument
    return err


# --- the ops -------------------------------------------------------------------------------------


@torch.library.custom_op("clsa::append", mutates_args=("k_pool", "v_pool", "index_pool"))
def _append(
    cache: int,
    sequence: int,
    k: torch.Tensor,
    v: torch.Tensor,
    index_keys: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    index_pool: torch.Tensor,
) -> None:
    object_of(cache).append(sequence, k, v, index_keys)


@_append.register_fake
def _(cache, sequence, k, v, index_keys, k_pool, v_pool, index_pool) -> None:
    return None


@torch.library.custom_op("clsa::select", mutates_args=("positions", "counts", "slots"))
def _select(
    indexer: int,
    batch: int,
    index_pool: torch.Tensor,
    q_idx: torch.Tensor,
    head_weights: torch.Tensor,
    positions: torch.Tensor,
    counts: torch.Tensor,
    slots: Optional[torch.Tensor],
) -> None:
    out = _clsa.RoutingIndex(positions, counts, slots=slots)
    object_of(indexer).select(object_of(batch), q_idx, head_weights, out=out)


@_select.register_fake
def _(indexer, batch, index_pool, q_idx, head_weights, positions, counts, slots) -> None:
    return None


@torch.library.custom_op("clsa::sparse_attention", mutates_args=("out", "lse"))
def _sparse_attention(
    attention: int,
    batch: int,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    positions: torch.Tensor,
    counts: torch.Tensor,
    slots: Optional[torch.Tensor],
    q: torch.Tensor,
    out: torch.Tensor,
    lse: Optional[torch.Tensor],
) -> None:
    routing = _clsa.RoutingIndex(positions, counts, slots=slots)
    object_of(attention).forward(object_of(batch), routing, q, out, lse=lse)


@_sparse_attention.register_fake
def _(attention, batch, k_pool, v_pool, positions, counts, slots, q, out, lse) -> None:
    return None


@torch.library.custom_op("clsa::dense_attention", mutates_args=("out", "lse"))
def _dense_attention(
    attention: int,
    batch: int,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    q: torch.Tensor,
    out: torch.Tensor,
    lse: Optional[torch.Tensor],
) -> None:
    object_of(attention).forward(object_of(batch), q, out, lse=lse)


@_dense_attention.register_fake
def _(attention, batch, k_pool, v_pool, q, out, lse) -> None:
    return None


# --- the ops bound to one set of objects ---------------------------------------------------------


class Ops:
    """The ops over one cache and batch, with an indexer and an attention object (either may be
    None): build it outside the compiled function or graph, call its methods inside.

    ``select`` and the attentions write caller tensors when given (the engine's preallocated
    outputs, as a CUDA graph needs) and allocate them otherwise.
    """

    def __init__(self, cache, batch, indexer=None, attention=None, dense=None):
        self.cache = handle(cache)
        self.batch = handle(batch)
        self.indexer = handle(indexer) if indexer is not None else -1
        self.attention = handle(attention) if attention is not None else -1
        self.dense = handle(dense) if dense is not None else -1
        self.top_k = indexer.config.top_k if indexer is not None else 0
        self.k_pool, self.v_pool, self.index_pool = pool(cache)

    def append(self, sequence: int, k, v, index_keys) -> None:
        torch.ops.clsa.append(self.cache, sequence, k, v, index_keys, self.k_pool, self.v_pool, self.index_pool)

    def select(self, q_idx, head_weights, positions=None, counts=None, slots=None):
        """Routes into (positions, counts[, slots]); returns (positions, counts, slots)."""
        b, t = q_idx.shape[0], q_idx.shape[1]
        if positions is None:
            positions = torch.empty((b, t, self.top_k), dtype=torch.int32, device=q_idx.device)
        if counts is None:
            counts = torch.empty((b, t), dtype=torch.int32, device=q_idx.device)
        torch.ops.clsa.select(
            self.indexer, self.batch, self.index_pool, q_idx, head_weights, positions, counts, slots
        )
        return positions, counts, slots

    def sparse_attention(self, positions, counts, q, out=None, lse=None, slots=None):
        if out is None:
            out = torch.empty_like(q)
        torch.ops.clsa.sparse_attention(
            self.attention, self.batch, self.k_pool, self.v_pool, positions, counts, slots, q, out, lse
        )
        return out

    def dense_attention(self, q, out=None, lse=None):
        if out is None:
            out = torch.empty_like(q)
        torch.ops.clsa.dense_attention(self.dense, self.batch, self.k_pool, self.v_pool, q, out, lse)
        return out
