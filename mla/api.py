"""The public, FlashMLA-compatible entry points: validate, plan, dispatch.

This layer knows shapes and rules, never launch geometry: it checks every argument (naming it,
with expected and actual values) before any work, builds or reuses the scheduler plan, and hands
plain arrays to a backend (``mla.backends``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from . import _arrays
from . import scheduler as _scheduler
from .fp8 import FP8_TOKEN_BYTES

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "MLASchedMeta", "BACKENDS"]

BACKENDS = ("auto", "numpy", "numba", "cupy")


@dataclass
class MLASchedMeta:
    """A scheduler plan filled in lazily by the first ``flash_mla_with_kvcache`` call.

    FlashMLA's newer call style: ``sched, _ = get_mla_metadata()`` returns an empty one; the first
    decode call computes the plan from its ``cache_seqlens`` and the call's shapes, and later calls
    reuse it while those stay the same. As in FlashMLA the *values* of ``cache_seqlens`` are the
    caller's promise (no host sync to compare them); a different shape or flag raises ValueError.
    Make a new one (or call ``reset()``) when the lengths change.
    """

    tile_scheduler_metadata: object = None
    num_splits: object = None
    key: tuple | None = field(default=None, repr=False)

    @property
    def is_filled(self) -> bool:
        return self.tile_scheduler_metadata is not None

    def reset(self) -> None:
        self.tile_scheduler_metadata = self.num_splits = self.key = None


def _num_sms() -> int:
    """SMs of the current GPU, or the H100's 132 when there is none (the plan is then for the CPU)."""
    if _arrays.gpu_available():
        cp = _arrays.cupy_module()
        try:
            return int(cp.cuda.Device().attributes["MultiProcessorCount"])
        except Exception:
            pass
    return _scheduler.DEFAULT_NUM_SMS


def _check_int(name, value, low=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def get_mla_metadata(
    cache_seqlens=None,
    num_q_tokens_per_head_k: int | None = None,
    num_heads_k: int | None = None,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
    *,
    num_sms: int | None = None,
):
    """Plan the split-KV work of a decode step (FlashMLA's ``get_mla_metadata``).

    cache_seqlens: int32 [b]; num_q_tokens_per_head_k = s_q * h_q // h_kv; num_heads_k = h_kv;
    topk: the number of indices per query row in sparse mode (the plan then splits the indices
    list instead of the cache). ``num_sms`` overrides the worker count's SM basis (default: the
    current GPU's SM count, 132 without a GPU). num_heads_q and is_fp8_kvcache are accepted for
    FlashMLA compatibility; the plan does not depend on them.

    Returns ``(tile_scheduler_metadata int32 [num_workers, 8], num_splits int32 [b + 1])`` in the
    array kind of ``cache_seqlens`` (see ``mla.scheduler`` for the format). Called with no
    arguments it returns ``(MLASchedMeta(), None)``, an empty plan the first decode call fills in.
    """
    if cache_seqlens is None:
        if num_q_tokens_per_head_k is not None or num_heads_k is not None:
            raise ValueError("cache_seqlens is required when num_q_tokens_per_head_k / num_heads_k are given")
        return MLASchedMeta(), None
    if num_q_tokens_per_head_k is None or num_heads_k is None:
        raise TypeError("get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, ...): "
                        "num_q_tokens_per_head_k and num_heads_k are required with cache_seqlens")
    tokens = _check_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k, 1)
    h_kv = _check_int("num_heads_k", num_heads_k, 1)
    if num_heads_q is not None:
        _check_int("num_heads_q", num_heads_q, 1)
    sms = _num_sms() if num_sms is None else _check_int("num_sms", num_sms, 1)
    on_device = _arrays.is_device_array(cache_seqlens)
    seqlens = _arrays.to_cupy(cache_seqlens, "cache_seqlens") if on_device else _arrays.to_host(
        cache_seqlens, "cache_seqlens")
    if seqlens.ndim != 1:
        raise ValueError(f"cache_seqlens must be 1-D [b], got shape {tuple(seqlens.shape)}")
    if not np.issubdtype(seqlens.dtype, np.integer):
        raise TypeError(f"cache_seqlens must be int32, got {seqlens.dtype}")
    if topk is not None:
        topk = _check_int("topk", topk, 1)
    if on_device:
        plan = _device_plan(seqlens, tokens, h_kv, sms, topk)
        if plan is not None:
            return plan
    lengths = _arrays.asnumpy(seqlens).astype(np.int64)
    if topk is not None:
        lengths = np.full_like(lengths, topk)
    if (lengths < 0).any():
        raise ValueError(f"cache_seqlens must be >= 0, got min {int(lengths.min())}")
    workers = _scheduler.num_sm_parts(sms, tokens, h_kv)
    metadata, num_splits = _scheduler.plan(lengths, workers)
    if on_device:
        cp = _arrays.cupy_module()
        return cp.asarray(metadata), cp.asarray(num_splits)
    return metadata, num_splits


def _device_plan(seqlens, tokens: int, h_kv: int, sms: int, topk: int | None):
    """The plan computed on the GPU (kernels/mla_metadata.cu): no device->host copy, so a decode
    loop can be captured in a CUDA graph. None when the CuPy kernels are unusable here (the caller
    then plans on the host). As in FlashMLA the length values are not checked here (that needs
    the host); ``flash_mla_with_kvcache`` checks them unless ``validate=False``."""
    from .backends import cupy_backend

    if os.environ.get("MLA_HOST_PLAN") == "1" or not cupy_backend.available()[0]:
        return None
    if topk is not None:
        seqlens = _arrays.cupy_module().full(seqlens.shape, topk, dtype=np.int32)
    return cupy_backend.device_plan(seqlens, tokens, h_kv, num_sms=sms)


# ----------------------------------------------------------------------------------------------
# validation


@dataclass
class _Problem:
    """Validated arguments, as arrays of one kind (NumPy or CuPy), plus the derived sizes."""

    q: object
    k_cache: object
    block_table: object
    cache_seqlens: object
    indices: object
    topk_length: object
    attn_sink: object
    b: int
    s_q: int
    h_q: int
    d: int
    h_kv: int
    head_dim_v: int
    page_block_size: int
    num_blocks: int
    on_device: bool
    softmax_scale: float
    causal: bool
    is_fp8_kvcache: bool
    out_dtype: object = None  # np.dtype of out: q's dtype, or float32 (``out_dtype=`` of the API)

    @property
    def is_sparse(self) -> bool:
        return self.indices is not None

    @property
    def out_float32(self) -> bool:
        """out is float32 while q is 16-bit: no row may be rounded on the way (kernels merge every piece)."""
        return self.out_dtype is not None and self.out_dtype != np.dtype(self.q.dtype)

    def plan_key(self) -> tuple:
        topk = None if self.indices is None else int(self.indices.shape[-1])
        return (self.b, self.s_q, self.h_q, self.h_kv, self.d, self.head_dim_v, self.causal,
                self.is_fp8_kvcache, topk, self.on_device)


def _shape(x) -> tuple:
    return tuple(int(n) for n in x.shape)


def _require_rank(name, x, rank, layout):
    if x.ndim != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {_shape(x)}")


def _require_int32(name, x):
    if x.dtype != np.int32:
        raise TypeError(f"{name} must be int32, got {_arrays.dtype_name(x.dtype)} "
                        f"(use .astype(np.int32))")


def _validate(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache,
              indices, topk_length, attn_sink, validate) -> _Problem:
    named = {"q": q, "k_cache": k_cache, "block_table": block_table, "cache_seqlens": cache_seqlens,
             "indices": indices, "topk_length": topk_length, "attn_sink": attn_sink}
    for name in ("q", "k_cache"):
        if named[name] is None:
            raise TypeError(f"{name} is required")
    sparse = indices is not None
    if not sparse:
        for name in ("block_table", "cache_seqlens"):
            if named[name] is None:
                raise TypeError(f"{name} is required in dense mode (indices=None)")

    # one array kind for everything: all host or all on one device
    present = {k: v for k, v in named.items() if v is not None}
    kinds = {k: _arrays.is_device_array(v) for k, v in present.items()}
    on_device = kinds["q"]
    mismatched = [k for k, dev in kinds.items() if dev != on_device]
    if mismatched:
        where = "on a CUDA device" if on_device else "on the host (NumPy)"
        raise ValueError(f"{', '.join(mismatched)} must be {where} like q; mixing host and device "
                         "arrays is not allowed")
    if on_device:
        arrays = {k: _arrays.to_cupy(v, k) for k, v in present.items()}
        devices = {k: _arrays.device_id(v) for k, v in arrays.items()}
        if len(set(devices.values())) > 1:
            raise ValueError(f"all arrays must be on one device, got devices {devices}")
    else:
        arrays = {k: _arrays.to_host(v, k) for k, v in present.items()}
    q, k_cache = arrays["q"], arrays["k_cache"]

    _require_rank("q", q, 4, "[b, s_q, h_q, d]")
    if q.dtype not in _arrays.FLOAT_DTYPES:
        raise TypeError(f"q must be {_arrays.FLOAT_DTYPE_NAMES}, got {_arrays.dtype_name(q.dtype)}")
    b, s_q, h_q, d = _shape(q)
    if s_q < 1 or h_q < 1 or d < 1:
        raise ValueError(f"q must have s_q, h_q, d >= 1, got shape {_shape(q)}")
    _require_rank("k_cache", k_cache, 4, "[num_blocks, page_block_size, h_kv, d]")
    num_blocks, page, h_kv, d_cache = _shape(k_cache)
    if page < 1 or h_kv < 1:
        raise ValueError(f"k_cache must have page_block_size >= 1 and h_kv >= 1, got shape {_shape(k_cache)}")
    if h_q % h_kv:
        raise ValueError(f"h_q ({h_q}, q.shape[2]) must be a multiple of h_kv ({h_kv}, k_cache.shape[2])")

    if not isinstance(is_fp8_kvcache, (bool, np.bool_)):
        raise TypeError(f"is_fp8_kvcache must be a bool, got {type(is_fp8_kvcache).__name__}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    head_dim_v = _check_int("head_dim_v", head_dim_v)
    if is_fp8_kvcache:
        if k_cache.dtype != np.uint8:
            raise TypeError(f"k_cache must be uint8 bytes with is_fp8_kvcache=True, got "
                            f"{_arrays.dtype_name(k_cache.dtype)}")
        if d_cache != FP8_TOKEN_BYTES:
            raise ValueError(f"k_cache.shape[-1] must be {FP8_TOKEN_BYTES} (FP8 layout) with "
                             f"is_fp8_kvcache=True, got {d_cache}")
        if d != 576 or head_dim_v != 512:
            raise ValueError(f"the FP8 layout needs q.shape[-1] == 576 and head_dim_v == 512, got "
                             f"{d} and {head_dim_v}")
    else:
        if k_cache.dtype != q.dtype:
            raise TypeError(f"k_cache dtype must equal q's ({_arrays.dtype_name(q.dtype)}), got "
                            f"{_arrays.dtype_name(k_cache.dtype)}")
        if d_cache != d:
            raise ValueError(f"k_cache.shape[-1] must equal q.shape[-1] = {d}, got {d_cache}")
    if not 0 < head_dim_v <= d:
        raise ValueError(f"head_dim_v must be in (0, {d}] (d = q.shape[-1]), got {head_dim_v}")

    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    else:
        if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(softmax_scale, (int, float, np.number)):
            raise TypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
        softmax_scale = float(softmax_scale)
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")

    block_table = arrays.get("block_table")
    cache_seqlens = arrays.get("cache_seqlens")
    if cache_seqlens is not None:
        _require_rank("cache_seqlens", cache_seqlens, 1, "[b]")
        _require_int32("cache_seqlens", cache_seqlens)
        if cache_seqlens.shape[0] != b:
            raise ValueError(f"cache_seqlens must have shape [b] = [{b}] (b = q.shape[0]), got "
                             f"{_shape(cache_seqlens)}")
    if block_table is not None:
        _require_rank("block_table", block_table, 2, "[b, max_blocks_per_seq]")
        _require_int32("block_table", block_table)
        if block_table.shape[0] != b:
            raise ValueError(f"block_table.shape[0] must be b = {b} (q.shape[0]), got {block_table.shape[0]}")

    topk_arr = arrays.get("topk_length")
    sink = arrays.get("attn_sink")
    if sparse:
        indices = arrays["indices"]
        if causal:
            raise ValueError("causal=True is not supported with indices (sparse mode): the indices "
                             "already say which keys each query row sees")
        _require_rank("indices", indices, 3, "[b, s_q, topk]")
        _require_int32("indices", indices)
        if _shape(indices)[:2] != (b, s_q):
            raise ValueError(f"indices must have shape [b, s_q, topk] = [{b}, {s_q}, topk], got {_shape(indices)}")
        if indices.shape[2] < 1:
            raise ValueError("indices must have topk >= 1")
        if topk_arr is not None:
            _require_rank("topk_length", topk_arr, 1, "[b]")
            _require_int32("topk_length", topk_arr)
            if topk_arr.shape[0] != b:
                raise ValueError(f"topk_length must have shape [{b}], got {_shape(topk_arr)}")
    else:
        if topk_arr is not None:
            raise ValueError("topk_length is only meaningful with indices (sparse mode)")
    if sink is not None:
        _require_rank("attn_sink", sink, 1, "[h_q]")
        if sink.dtype != np.float32:
            raise TypeError(f"attn_sink must be float32, got {_arrays.dtype_name(sink.dtype)}")
        if sink.shape[0] != h_q:
            raise ValueError(f"attn_sink must have shape [h_q] = [{h_q}], got {_shape(sink)}")

    if validate and b > 0:
        _validate_values(block_table, cache_seqlens, page, num_blocks, arrays.get("indices"), topk_arr)

    return _Problem(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                    indices=arrays.get("indices"), topk_length=topk_arr, attn_sink=sink, b=b, s_q=s_q,
                    h_q=h_q, d=d, h_kv=h_kv, head_dim_v=head_dim_v, page_block_size=page,
                    num_blocks=num_blocks, on_device=on_device, softmax_scale=softmax_scale,
                    causal=bool(causal), is_fp8_kvcache=bool(is_fp8_kvcache))


def _validate_values(block_table, cache_seqlens, page, num_blocks, indices, topk_length):
    """Range checks on values (one small device->host copy for device inputs)."""
    if indices is not None:
        idx = _arrays.asnumpy(indices)
        lo, hi = int(idx.min()), int(idx.max())
        limit = num_blocks * page
        if lo < -1 or hi >= limit:
            raise ValueError(f"indices must be in [-1, num_blocks * page_block_size) = [-1, {limit}), "
                             f"got min {lo}, max {hi}")
        if topk_length is not None:
            tl = _arrays.asnumpy(topk_length)
            topk = idx.shape[-1]
            if tl.min() < 0 or tl.max() > topk:
                raise ValueError(f"topk_length must be in [0, topk] = [0, {topk}], got min {int(tl.min())}, "
                                 f"max {int(tl.max())}")
        return
    lengths = _arrays.asnumpy(cache_seqlens).astype(np.int64)
    max_len = block_table.shape[1] * page
    if lengths.min() < 0:
        i = int(np.argmin(lengths))
        raise ValueError(f"cache_seqlens must be >= 0, got cache_seqlens[{i}] = {int(lengths[i])}")
    if lengths.max() > max_len:
        i = int(np.argmax(lengths))
        raise ValueError(f"cache_seqlens[{i}] = {int(lengths[i])} exceeds max_blocks_per_seq * "
                         f"page_block_size = {block_table.shape[1]} * {page} = {max_len}")
    table = _arrays.asnumpy(block_table)
    used = np.arange(table.shape[1])[None, :] < (-(-lengths // page))[:, None]  # pages holding tokens
    bad = used & ((table < 0) | (table >= num_blocks))
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"block_table[{i}, {j}] = {int(table[i, j])} is outside [0, num_blocks) = "
                         f"[0, {num_blocks}) but page {j} of sequence {i} is in use "
                         f"(cache_seqlens[{i}] = {int(lengths[i])})")


def _resolve_plan(problem: _Problem, tile_scheduler_metadata, num_splits):
    """The plan (metadata, num_splits) to run: given, lazily filled, or computed now."""
    if isinstance(tile_scheduler_metadata, MLASchedMeta):
        if num_splits is not None:
            raise ValueError("num_splits must be None when tile_scheduler_metadata is an MLASchedMeta")
        sched = tile_scheduler_metadata
        key = problem.plan_key()
        if sched.is_filled:
            if sched.key != key:
                raise ValueError(f"tile_scheduler_metadata was planned for (b, s_q, h_q, h_kv, d, d_v, causal, "
                                 f"fp8, topk, on_device) = {sched.key}, this call has {key}; use a fresh "
                                 "get_mla_metadata() (or .reset()) when shapes change")
            return sched.tile_scheduler_metadata, sched.num_splits
        metadata, splits = _plan_for(problem)
        sched.tile_scheduler_metadata, sched.num_splits, sched.key = metadata, splits, key
        return metadata, splits
    if tile_scheduler_metadata is None:
        if num_splits is not None:
            raise ValueError("num_splits given without tile_scheduler_metadata")
        return _plan_for(problem)
    if num_splits is None:
        raise ValueError("num_splits is required with tile_scheduler_metadata arrays (both come from "
                         "get_mla_metadata)")
    conv = _arrays.to_cupy if problem.on_device else _arrays.to_host
    for name, arr in (("tile_scheduler_metadata", tile_scheduler_metadata), ("num_splits", num_splits)):
        if _arrays.is_device_array(arr) != problem.on_device:
            raise ValueError(f"{name} must be on the same side (host/device) as q")
    metadata, splits = conv(tile_scheduler_metadata, "tile_scheduler_metadata"), conv(num_splits, "num_splits")
    _require_rank("tile_scheduler_metadata", metadata, 2, f"[num_workers, {_scheduler.METADATA_WIDTH}]")
    _require_int32("tile_scheduler_metadata", metadata)
    if metadata.shape[1] != _scheduler.METADATA_WIDTH or metadata.shape[0] < 1:
        raise ValueError(f"tile_scheduler_metadata must have shape [num_workers >= 1, {_scheduler.METADATA_WIDTH}], "
                         f"got {_shape(metadata)}")
    _require_rank("num_splits", splits, 1, "[b + 1]")
    _require_int32("num_splits", splits)
    if splits.shape[0] != problem.b + 1:
        raise ValueError(f"num_splits must have shape [b + 1] = [{problem.b + 1}], got {_shape(splits)}")
    return metadata, splits


def _plan_for(problem: _Problem):
    topk = int(problem.indices.shape[-1]) if problem.is_sparse else None
    seqlens = problem.cache_seqlens
    if seqlens is None:  # sparse mode without cache_seqlens: plan over topk for every sequence
        xp = _arrays.cupy_module() if problem.on_device else np
        seqlens = xp.zeros(problem.b, dtype=np.int32)  # made on the device: no host copy (graph capture)
    return get_mla_metadata(seqlens, problem.s_q * problem.h_q // problem.h_kv, problem.h_kv,
                            problem.h_q, problem.is_fp8_kvcache, topk)


def _out_dtype(out_dtype, problem: _Problem):
    """The checked ``out_dtype`` argument: None -> q's dtype; q's dtype or float32, else TypeError."""
    q_dtype = np.dtype(problem.q.dtype)
    if out_dtype is None:
        return q_dtype
    try:
        dt = np.dtype(out_dtype)
    except TypeError:
        raise TypeError(f"out_dtype: expected None, q's dtype or float32, got {out_dtype!r}") from None
    if dt not in (q_dtype, np.dtype(np.float32)):
        raise TypeError(f"out_dtype: expected None, q's dtype ({_arrays.dtype_name(q_dtype)}) or float32, "
                        f"got {_arrays.dtype_name(dt)}")
    if dt != q_dtype and problem.is_sparse:
        raise ValueError("out_dtype=float32 is for dense decode; sparse decode (indices) writes q's dtype")
    return dt


def _empty_result(problem: _Problem):
    xp = _arrays.cupy_module() if problem.on_device else np
    out = xp.zeros((problem.b, problem.s_q, problem.h_q, problem.head_dim_v),
                   dtype=problem.out_dtype if problem.out_dtype is not None else problem.q.dtype)
    lse = xp.zeros((problem.b, problem.h_q, problem.s_q), dtype=np.float32)
    return out, lse


def flash_mla_with_kvcache(
    q,
    k_cache,
    block_table,
    cache_seqlens,
    head_dim_v: int,
    tile_scheduler_metadata=None,
    num_splits=None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices=None,
    *,
    topk_length=None,
    attn_sink=None,
    backend: str = "auto",
    validate: bool = True,
    out_dtype=None,
):
    """MLA decode over a paged KV cache (FlashMLA's ``flash_mla_with_kvcache``).

    q [b, s_q, h_q, d]; k_cache [num_blocks, page_block_size, h_kv, d] (uint8 [..., 656] when
    ``is_fp8_kvcache``); block_table int32 [b, max_blocks_per_seq]; cache_seqlens int32 [b];
    head_dim_v: V is the first head_dim_v channels of the cache. Sparse mode: indices int32
    [b, s_q, topk] (block * page_block_size + offset, -1 = unused; block_table is then unused and
    may be None), optional topk_length int32 [b] and attn_sink float32 [h_q].

    tile_scheduler_metadata / num_splits: a plan from ``get_mla_metadata`` (arrays), an
    ``MLASchedMeta`` (lazy), or None (planned here). softmax_scale defaults to 1/sqrt(d).
    backend: "auto" (CuPy for device arrays when available, else NumPy), "numpy", "numba", "cupy".
    validate: range-check the values of cache_seqlens / block_table / indices (one small
    device->host copy for device inputs). ``validate=False`` skips only these value checks (for
    CUDA-graph capture); shapes and dtypes are always checked.
    out_dtype: None (q's dtype, as FlashMLA) or float32: out unrounded, for callers that merge
    results further (``mla.distributed`` merges context-parallel partials: a 16-bit partial would
    add one rounding before the merge). Dense decode on the "numpy" and "cupy" backends (every piece
    then goes through the combine kernel); "numba" and sparse decode write q's dtype only.

    Returns (out [b, s_q, h_q, head_dim_v] in q's dtype (or out_dtype), lse float32 [b, h_q, s_q]),
    NumPy for host inputs, CuPy for device inputs.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    problem = _validate(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                        is_fp8_kvcache, indices, topk_length, attn_sink, bool(validate))
    problem.out_dtype = _out_dtype(out_dtype, problem)
    from . import backends  # late import: backends import this module's helpers

    impl = backends.select(backend, problem)
    if problem.b == 0:
        return _empty_result(problem)
    metadata, splits = _resolve_plan(problem, tile_scheduler_metadata, num_splits)
    return impl.decode(problem, metadata, splits)
