"""Shared helpers of the Python tests: a cache the tests mirror in float64, and float64 references
of the indexer and of attention (written here in NumPy, independent of libclsa)."""

import ctypes

import numpy as np
import pytest

import clsa

CPU = clsa.Backend.cpu


class MirroredCache:
    """A SharedKVCache plus the test's own float64 record of every token appended to it."""

    def __init__(self, kv_heads=2, head_dim=64, index_dim=64, page_size=16, max_pages=256, dtype=clsa.DType.f32):
        self.config = clsa.CacheConfig(
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            index_dim=index_dim,
            page_size=page_size,
            max_pages=max_pages,
            dtype=dtype,
        )
        self.cache = clsa.SharedKVCache(self.config, CPU)
        self.np_dtype = {clsa.DType.f32: np.float32, clsa.DType.f16: np.float16}[dtype]
        self.k, self.v, self.keys = {}, {}, {}

    def add(self, rng, length):
        seq = self.cache.add_sequence()
        self.k[seq] = np.zeros((0, self.config.num_kv_heads, self.config.head_dim))
        self.v[seq] = np.zeros((0, self.config.num_kv_heads, self.config.head_dim))
        self.keys[seq] = np.zeros((0, self.config.index_dim))
        if length:
            self.append(rng, seq, length)
        return seq

    def append(self, rng, seq, tokens):
        c = self.config
        k = rng.standard_normal((tokens, c.num_kv_heads, c.head_dim)).astype(self.np_dtype)
        v = rng.standard_normal((tokens, c.num_kv_heads, c.head_dim)).astype(self.np_dtype)
        keys = rng.standard_normal((tokens, c.index_dim)).astype(self.np_dtype)
        self.cache.append(seq, k, v, keys)
        self.k[seq] = np.concatenate([self.k[seq], k.astype(np.float64)])
        self.v[seq] = np.concatenate([self.v[seq], v.astype(np.float64)])
        self.keys[seq] = np.concatenate([self.keys[seq], keys.astype(np.float64)])

    def release(self, seq):
        self.cache.release(seq)
        del self.k[seq], self.v[seq], self.keys[seq]


def reference_scores(keys, q_idx, weights, scale):
    """score[s] = scale * sum_h w[h] * relu(q_idx[h] . keys[s]), float64."""
    dots = np.maximum(keys.astype(np.float64) @ q_idx.astype(np.float64).T, 0.0)  # [n, H]
    return scale * dots @ weights.astype(np.float64)


def check_routing(mirror, sequences, config, q_idx, weights, positions, counts, tolerance=1e-4):
    """Holds a routing against the float64 indexer: per query row the right count, distinct
    ascending visible positions, sinks and window inside, and no unrouted position scoring above a
    routed non-forced one (beyond `tolerance`, relative)."""
    tokens = q_idx.shape[1]
    for b, seq in enumerate(sequences):
        for t in range(tokens):
            row = positions[b, t]
            count = int(counts[b, t])
            if seq is None or seq == clsa.EMPTY_SLOT:
                assert count == 0 and np.all(row == -1)
                continue
            n = mirror.keys[seq].shape[0]
            visible = n - tokens + t + 1
            assert count == min(config.top_k, visible)
            routed = row[:count]
            assert np.all(row[count:] == -1)
            assert np.all(np.diff(routed) > 0) and routed[0] >= 0 and routed[-1] < visible
            forced = set(range(min(config.sink_tokens, visible))) | set(
                range(visible - min(config.local_window, visible), visible)
            )
            assert forced <= set(routed.tolist())
            scores = reference_scores(mirror.keys[seq][:visible], q_idx[b, t], weights[b, t], config.scale)
            free = [p for p in routed.tolist() if p not in forced]
            unrouted = np.setdiff1d(np.arange(visible), routed)
            if free and unrouted.size:
                lowest_routed = scores[free].min()
                highest_left = scores[unrouted].max()
                assert highest_left <= lowest_routed + tolerance * max(1.0, abs(lowest_routed))


def reference_attention(mirror, sequences, q, routed, softmax_scale=None):
    """out[b,t,h] (float64) and lse[b,t,h] over the positions routed[b][t] (a list of position arrays)."""
    batch, tokens, heads, dim = q.shape
    scale = softmax_scale or 1.0 / np.sqrt(dim)
    out = np.zeros((batch, tokens, heads, dim))
    lse = np.full((batch, tokens, heads), -np.inf)
    kv_heads = mirror.config.num_kv_heads
    group = heads // kv_heads
    for b, seq in enumerate(sequences):
        for t in range(tokens):
            where = routed[b][t]
            if seq is None or seq == clsa.EMPTY_SLOT or len(where) == 0:
                continue
            for h in range(heads):
                keys = mirror.k[seq][where, h // group]
                values = mirror.v[seq][where, h // group]
                logits = scale * keys @ q[b, t, h].astype(np.float64)
                top = logits.max()
                p = np.exp(logits - top)
                out[b, t, h] = p @ values / p.sum()
                lse[b, t, h] = top + np.log(p.sum())
    return out, lse


def visible_positions(mirror, sequences, tokens):
    """Every visible position of every query row (what dense attention attends to)."""
    rows = []
    for seq in sequences:
        if seq is None or seq == clsa.EMPTY_SLOT:
            rows.append([np.zeros(0, dtype=np.int64)] * tokens)
            continue
        n = mirror.k[seq].shape[0]
        rows.append([np.arange(n - tokens + t + 1) for t in range(tokens)])
    return rows


def routed_positions(positions, counts):
    return [[positions[b, t, : counts[b, t]] for t in range(positions.shape[1])] for b in range(positions.shape[0])]


@pytest.fixture
def rng():
    return np.random.default_rng(20)


# --- an array on a device the CPU cannot reach, without a GPU -----------------------------------


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.CFUNCTYPE(None, ctypes.c_void_p)),
]


class ForeignDeviceArray:
    """A float32 array that says (through DLPack) it lives on `device_type` (2: CUDA), over host
    memory that no one may read as such: what a GPU tensor looks like to a CPU-only test."""

    def __init__(self, shape, device_type=2, device_id=0):
        self._host = np.zeros(shape, dtype=np.float32)
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        strides = np.array(self._host.strides) // 4
        self._strides = (ctypes.c_int64 * len(shape))(*strides.tolist())
        self._device = (device_type, device_id)
        self._deleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: None)

    def __dlpack_device__(self):
        return self._device

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        managed = _DLManagedTensor()
        managed.dl_tensor.data = self._host.ctypes.data
        managed.dl_tensor.device = _DLDevice(*self._device)
        managed.dl_tensor.ndim = len(self._shape)
        managed.dl_tensor.dtype = _DLDataType(2, 32, 1)
        managed.dl_tensor.shape = self._shape
        managed.dl_tensor.strides = self._strides
        managed.deleter = self._deleter
        self._managed = managed  # alive as long as this object
        capsule_new = ctypes.pythonapi.PyCapsule_New
        capsule_new.restype = ctypes.py_object
        capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return capsule_new(ctypes.addressof(managed), b"dltensor", None)
