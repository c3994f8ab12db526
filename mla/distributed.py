"""Multi-GPU MLA decode: context-parallel split-KV and head-parallel sharding (issue #8).

Context parallel (one long sequence, or a batch, spread over G GPUs by its pages)
----------------------------------------------------------------------------------
Each sequence's pages are dealt to G shards (``how="range"``: contiguous page ranges;
``how="round_robin"``: pages dealt cyclically). Shard g keeps its own compact cache::

    k_cache      [num_blocks_g, page, h_kv, d]   only the blocks shard g holds (copied, renumbered)
    block_table  int32 [b, max_blocks_g]         local page k -> local block (-1 padded)
    cache_seqlens int32 [b]                      keys shard g holds of each sequence
    global_pages int32 [b, max_blocks_g]         local page k = page global_pages[i, k] of sequence i

so a shard is an ordinary decode problem for ``mla.flash_mla_with_kvcache``. Every rank computes a
*partial* over its keys -- (o_g normalised by its own softmax sum, lse_g) -- and the partials are
merged exactly like the split-KV combine (``mla.reference.combine_splits``)::

    lse = log sum_g exp(lse_g),   out = sum_g exp(lse_g - lse) o_g

which equals the single-GPU result in real arithmetic.

**Causal masking with local positions.** The API masks a causal query row r with the shard's
*local* length L_g (key j visible iff j <= L_g - s_q + r), while the truth is the global rule
j <= L - s_q + r. The layout makes the two agree: every sequence's *tail* -- the pages holding its
last s_q - 1 keys (at least its last page) -- goes to the last shard (``holds_tails``), as the end
of that shard's local key list. Then

* a shard that holds no tail has only keys j <= L - s_q, which every query row sees: run it with
  causal=False;
* the tail shard's masked keys are the last s_q - 1 of its local list and of the sequence alike,
  so the API's local causal rule is the global one: run it with causal=True.

A query row that sees nothing on a shard comes back from the API as out = 0, lse = +inf; as a
partial that must read lse = -inf (an empty partial weighs nothing), see ``partial_from_result``.
``shard_partial_reference`` computes the same partials with *global* positions straight from
``mla.reference.split_partials`` (a per-shard plan), an independent check of this argument.

Head parallel
-------------
The query heads are cut into G contiguous ranges (whole KV-head groups, or pieces of one group);
each rank decodes its heads over the (replicated) latent cache and the results are concatenated
along the head axis. No combine is needed.

The multi-GPU path (one process per GPU, NCCL through ``cupy.cuda.nccl``)
-------------------------------------------------------------------------
    python -m mla.distributed --mode context --gpus 1 2 --b 1 --s-k 1048576 --h-q 128

``launch`` spawns one process per GPU (multiprocessing, spawn context; no mpirun). Rank 0 makes the
NCCL unique id and sends it to the other ranks through multiprocessing pipes; every process sets
``NCCL_NVLS_ENABLE=0`` (NVLink multicast off) before NCCL is touched. Each rank builds the same
seeded problem on its GPU, takes its shard, runs ``flash_mla_with_kvcache(backend="auto")``,
all-gathers (o, lse) with ``NcclCommunicator.allGather`` and merges; rank 0 checks the result
against a single-GPU run and times both with CUDA events. The collective sits behind a tiny
``group.all_gather(x) -> [G, *x.shape]`` interface, so the same rank code runs on the CPU in tests
with threads standing in for GPUs.

This module imports neither CuPy nor NCCL at import time; it is not imported by ``mla/__init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import sys
import time
import traceback
import warnings
from dataclasses import dataclass

import numpy as np

from . import _arrays
from . import reference as _reference
from .api import flash_mla_with_kvcache, get_mla_metadata

__all__ = [
    "ContextShard",
    "HeadShard",
    "NcclGroup",
    "RunConfig",
    "context_layout",
    "context_parallel_decode_simulated",
    "context_shard",
    "head_parallel_decode_simulated",
    "launch",
    "main",
    "merge_partials",
    "partial_from_result",
    "run_context_parallel",
    "run_head_parallel",
    "shard_context",
    "shard_heads",
    "shard_paged_cache",
    "shard_partial",
    "shard_partial_reference",
]

HOW = ("range", "round_robin")


# ----------------------------------------------------------------------------------------------
# array helpers (NumPy on the host, CuPy on the device)


def _xp(x):
    """The array module of x: cupy for device arrays, numpy otherwise."""
    if _arrays.is_device_array(x):
        return _arrays.cupy_module()
    return np


def _cast(x, dtype):
    """x.astype(dtype); bfloat16 on the device falls back to round-to-nearest-even on the bits."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    try:
        return x.astype(dtype)
    except Exception:  # a CuPy that cannot cast to ml_dtypes.bfloat16 itself
        if dtype != _arrays.BFLOAT16:
            raise
        xp = _xp(x)
        bits = x.astype(xp.float32).view(xp.uint32)
        bits = bits + xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1))
        return (bits >> 16).astype(xp.uint16).view(dtype)


def _to_float32(x):
    """x as float32; bfloat16 on the device is widened through its bits if CuPy cannot cast it."""
    xp = _xp(x)
    try:
        return x.astype(xp.float32, copy=False)
    except Exception:
        if x.dtype != _arrays.BFLOAT16:
            raise
        return (_copy_contiguous(x).view(xp.uint16).astype(xp.uint32) << 16).view(xp.float32)


def _copy_contiguous(x):
    """A C-contiguous copy-if-needed of x, moving 16-bit floats as uint16 (no dtype-specific kernel)."""
    xp = _xp(x)
    if x.dtype.itemsize == 2 and x.dtype.kind != "u":
        return xp.ascontiguousarray(x.view(xp.uint16)).view(x.dtype)
    return xp.ascontiguousarray(x)


def _check_count(name, value, low=1):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# partials and their merge


def partial_from_result(out, lse):
    """A decode result as a partial for ``merge_partials``.

    out [b, s_q, h_q, d_v], lse [b, h_q, s_q] (the API's layout; +inf marks a row that saw no key)
    -> (o [b, s_q, h_q, d_v], lse [b, s_q, h_q] with -inf for those rows). An empty partial must
    weigh exp(-inf) = 0 in the merge; +inf would poison it, so the sign is flipped here.
    """
    xp = _xp(lse)
    lse = xp.swapaxes(lse, 1, 2)
    return out, xp.where(xp.isposinf(lse), -xp.inf, lse).astype(xp.float32)


def merge_partials(partials, out_dtype=None, check: bool = True):
    """The lse combine of G partials of the same queries over disjoint key sets.

    partials: a sequence of (o [b, s_q, h_q, d_v] normalised by its own sum, lse [b, s_q, h_q]
    natural log, -inf where the partial saw no key), all NumPy or all CuPy. Returns the API's
    (out [b, s_q, h_q, d_v] in out_dtype (default: o's dtype), lse float32 [b, h_q, s_q]) with rows
    that no partial saw as out = 0, lse = +inf -- ``mla.reference.combine_splits`` semantics. An
    empty partial's o is ignored whatever it holds. check: reject lse = +inf or NaN (a result not
    passed through ``partial_from_result``); costs a device sync for CuPy inputs.
    """
    partials = list(partials)
    if not partials:
        raise ValueError("merge_partials needs at least one partial, got none")
    o0, lse0 = partials[0]
    if o0.ndim != 4 or tuple(lse0.shape) != tuple(o0.shape[:3]):
        raise ValueError(f"partial 0: expected o [b, s_q, h_q, d_v] and lse [b, s_q, h_q], got "
                         f"{tuple(o0.shape)} and {tuple(lse0.shape)}")
    for g, (o, lse) in enumerate(partials):
        if tuple(o.shape) != tuple(o0.shape) or tuple(lse.shape) != tuple(lse0.shape):
            raise ValueError(f"partial {g}: shapes {tuple(o.shape)}, {tuple(lse.shape)} differ from partial 0's "
                             f"{tuple(o0.shape)}, {tuple(lse0.shape)}")
    xp = _xp(o0)
    lse_all = xp.stack([xp.asarray(lse, dtype=xp.float32) for _, lse in partials])
    if check:
        bad = xp.isposinf(lse_all) | xp.isnan(lse_all)
        if bool(bad.any()):
            g = int(xp.argwhere(bad.reshape(len(partials), -1).any(axis=1))[0, 0])
            raise ValueError(f"partial {g}: lse holds +inf or NaN; a partial marks an empty row with -inf "
                             "(convert API results with partial_from_result)")
    o_all = xp.stack([_to_float32(o) for o, _ in partials])
    return _merge_stacked(o_all, lse_all, o0.dtype if out_dtype is None else out_dtype)


def _merge_stacked(o_all, lse_all, out_dtype):
    """merge_partials on stacked partials o_all [G, b, s_q, h_q, d_v], lse_all [G, b, s_q, h_q]."""
    xp = _xp(o_all)
    o_all = _to_float32(o_all)
    lse_all = lse_all.astype(xp.float32, copy=False)
    m = lse_all.max(axis=0)
    m_safe = xp.where(xp.isfinite(m), m, xp.float32(0))  # every partial empty: m = -inf
    w = xp.exp(lse_all - m_safe)  # exp(-inf) = 0: empty partials drop out
    total = w.sum(axis=0)
    seen = total > 0
    total_safe = xp.where(seen, total, xp.float32(1))
    lse = xp.where(seen, m_safe + xp.log(total_safe), xp.float32(np.inf))
    scale = (w / total_safe)[..., None]
    out = xp.where(scale > 0, scale * o_all, xp.float32(0)).sum(axis=0)
    lse = xp.ascontiguousarray(xp.swapaxes(lse, 1, 2)).astype(xp.float32)
    return _cast(out, out_dtype), lse


# ----------------------------------------------------------------------------------------------
# context parallel: layout and shards


def context_layout(cache_seqlens, page_block_size: int, num_shards: int, how: str = "range", s_q: int = 1):
    """Which logical pages of each sequence each shard holds.

    Returns ``pages[g][i]``: int64 array of the page indices (ascending) of sequence i on shard g.
    Rules (see the module docstring): the pages of a sequence are a disjoint cover of
    ``0 .. ceil(L/page) - 1``; its tail run (the pages holding its last max(s_q - 1, 1) keys, or
    all of it when L < s_q) sits on the last shard; the other pages are dealt by range (shard g gets
    ``[P*g//G, P*(g+1)//G)`` pages, cut at the tail) or round-robin (pages and the tail run as units,
    counted so that the tail unit lands on the last shard).
    """
    page = _check_count("page_block_size", page_block_size)
    G = _check_count("num_shards", num_shards)
    s_q = _check_count("s_q", s_q)
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
    lengths = np.asarray(_arrays.asnumpy(cache_seqlens)).astype(np.int64).reshape(-1)
    if (lengths < 0).any():
        raise ValueError(f"cache_seqlens must be >= 0, got min {int(lengths.min())}")
    pages = [[] for _ in range(G)]
    for L in lengths:
        P = -(-int(L) // page)
        tail_start = max(int(L) - s_q + 1, 0)  # first key a causal row may not see
        T = min(max(P - tail_start // page, 1), P)  # tail run: pages [P - T, P)
        owner = np.full(P, G - 1, dtype=np.int64)
        if how == "range":
            cut = min(P * (G - 1) // G, P - T)
            bounds = [min(P * g // G, cut) for g in range(G)]
            for g in range(G - 1):
                owner[bounds[g] : bounds[g + 1]] = g
        else:
            units = P - T + 1  # single pages, then the tail run
            owner[: P - T] = (np.arange(P - T) - units + G) % G
        for g in range(G):
            pages[g].append(np.flatnonzero(owner == g).astype(np.int64))
    return pages


@dataclass
class ContextShard:
    """One shard of a context-parallel decode: an ordinary paged decode problem plus its place.

    k_cache [num_blocks_g, page, h_kv, d] (>= 1 block; an unused block is poisoned with NaN);
    block_table int32 [b, max_blocks_g]; cache_seqlens int32 [b] -- in the array kind of the input
    cache. global_pages int32 [b, max_blocks_g] (host): the logical page of the full sequence that
    each local page holds (-1 pad); global_seqlens int32 [b] (host): the full lengths. holds_tails:
    this shard holds every sequence's tail and is run with the caller's causal flag; the others are
    run non-causal. s_q: the most query rows the layout was made for (causal needs s_q <= this).
    """

    rank: int
    num_shards: int
    how: str
    s_q: int
    k_cache: object
    block_table: object
    cache_seqlens: object
    global_pages: np.ndarray
    global_seqlens: np.ndarray

    @property
    def holds_tails(self) -> bool:
        return self.rank == self.num_shards - 1

    @property
    def page_block_size(self) -> int:
        return int(self.k_cache.shape[1])

    def positions(self, i: int) -> np.ndarray:
        """int64 [L_g]: the global key position of each local key of sequence i, in local order."""
        page = self.page_block_size
        n = int(_arrays.asnumpy(self.cache_seqlens)[i])
        local = np.arange(n)
        return self.global_pages[i, local // page].astype(np.int64) * page + local % page


def _poisoned_block(k_cache, xp):
    """One block shaped like k_cache's, all 0xFF bytes (NaN in every float dtype and the FP8 layout)."""
    blk = xp.empty((1,) + tuple(k_cache.shape[1:]), dtype=k_cache.dtype)
    blk.view(xp.uint8).fill(0xFF)
    return blk


def context_shard(k_cache, block_table, cache_seqlens, num_shards: int, rank: int, how: str = "range",
                  *, s_q: int = 1, layout=None) -> ContextShard:
    """Shard ``rank`` of ``num_shards`` of a paged decode problem (see ``context_layout``).

    k_cache [num_blocks, page, h_kv, d] (any dtype, FP8 byte rows included), block_table int32
    [b, max_blocks], cache_seqlens int32 [b]; NumPy or CuPy (block_table / cache_seqlens are read on
    the host). s_q: the number of query rows the shard will be decoded with when causal.
    Only the blocks this shard holds are copied; unused table entries are never read.
    """
    G = _check_count("num_shards", num_shards)
    rank = _check_count("rank", rank, 0)
    if rank >= G:
        raise ValueError(f"rank must be in [0, num_shards) = [0, {G}), got {rank}")
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be 4-D [num_blocks, page_block_size, h_kv, d], got shape "
                         f"{tuple(k_cache.shape)}")
    xp = _xp(k_cache)
    table = np.asarray(_arrays.asnumpy(block_table))
    lengths = np.asarray(_arrays.asnumpy(cache_seqlens)).astype(np.int64).reshape(-1)
    num_blocks, page = int(k_cache.shape[0]), int(k_cache.shape[1])
    if table.ndim != 2 or table.shape[0] != lengths.shape[0]:
        raise ValueError(f"block_table must be [b, max_blocks] with b = {lengths.shape[0]} (len(cache_seqlens)), "
                         f"got shape {table.shape}")
    if layout is None:
        layout = context_layout(lengths, page, G, how, s_q)
    mine = layout[rank]
    b = lengths.shape[0]
    width = max([len(p) for p in mine] + [1])
    global_pages = np.full((b, width), -1, dtype=np.int32)
    physical = np.full((b, width), -1, dtype=np.int64)
    local_lengths = np.zeros(b, dtype=np.int32)
    for i, pg in enumerate(mine):
        if len(pg) and (pg[-1] >= table.shape[1]):
            raise ValueError(f"cache_seqlens[{i}] = {int(lengths[i])} needs {pg[-1] + 1} pages but block_table has "
                             f"{table.shape[1]} columns")
        phys = table[i, pg].astype(np.int64)
        if ((phys < 0) | (phys >= num_blocks)).any():
            j = int(pg[np.argmax((phys < 0) | (phys >= num_blocks))])
            raise ValueError(f"block_table[{i}, {j}] = {int(table[i, j])} is outside [0, num_blocks) = "
                             f"[0, {num_blocks}) but page {j} of sequence {i} is in use")
        global_pages[i, : len(pg)] = pg
        physical[i, : len(pg)] = phys
        local_lengths[i] = int(np.minimum(page, lengths[i] - pg * page).sum())
    used = physical >= 0
    blocks, inverse = np.unique(physical[used], return_inverse=True)  # a block shared by two sequences: once
    local_table = np.full((b, width), -1, dtype=np.int32)
    local_table[used] = inverse
    if blocks.size:
        k_local = k_cache[xp.asarray(blocks)]
    else:
        k_local = _poisoned_block(k_cache, xp)
    return ContextShard(rank=rank, num_shards=G, how=how, s_q=int(s_q), k_cache=k_local,
                        block_table=xp.asarray(local_table), cache_seqlens=xp.asarray(local_lengths),
                        global_pages=global_pages, global_seqlens=lengths.astype(np.int32))


def shard_context(k_cache, block_table, cache_seqlens, num_shards: int, how: str = "range", *, s_q: int = 1):
    """All ``num_shards`` shards (``context_shard`` for each rank), as a list of ContextShard."""
    page = int(k_cache.shape[1]) if getattr(k_cache, "ndim", 0) == 4 else 1
    layout = context_layout(cache_seqlens, page, num_shards, how, s_q)
    return [context_shard(k_cache, block_table, cache_seqlens, num_shards, g, how, s_q=s_q, layout=layout)
            for g in range(num_shards)]


def shard_paged_cache(cache, num_shards: int, how: str = "range", seq_ids=None, *, s_q: int = 1):
    """``shard_context`` of an ``mla.PagedKVCache`` (its sequences ``seq_ids``, default all, in order)."""
    return shard_context(cache.k_cache, cache.block_table(seq_ids), cache.cache_seqlens(seq_ids), num_shards,
                         how, s_q=s_q)


def _check_rows(q, shard: ContextShard, causal: bool):
    if causal and q.shape[1] > shard.s_q:
        raise ValueError(f"q has s_q = {q.shape[1]} query rows but the shards were made for s_q <= {shard.s_q}; "
                         "causal masking needs the tail of every sequence on one shard: shard with s_q=q.shape[1]")


def shard_partial(q, shard: ContextShard, head_dim_v: int, *, causal: bool = False, softmax_scale=None,
                  is_fp8_kvcache: bool = False, backend: str = "auto", plan=(None, None), validate: bool = True):
    """This shard's partial (o float32 [b, s_q, h_q, d_v], lse float32 [b, s_q, h_q], -inf = empty), from
    ``mla.flash_mla_with_kvcache(..., out_dtype=float32)`` on the shard's local arrays (causal only on
    the tail shard). float32, not q's dtype: a 16-bit partial would be rounded once before the merge
    and once after, and near-cancelling outputs then miss the DESIGN §6 tolerances (measured on 2
    GPUs, 2026-11-26). Backends "cupy" and "numpy" (and "auto") write float32 out.

    plan: (tile_scheduler_metadata, num_splits) for the shard (e.g. from ``get_mla_metadata`` on
    ``shard.cache_seqlens``), reused across calls; (None, None) plans on every call.
    """
    _check_rows(q, shard, causal)
    out, lse = flash_mla_with_kvcache(q, shard.k_cache, shard.block_table, shard.cache_seqlens, head_dim_v,
                                      plan[0], plan[1], softmax_scale=softmax_scale,
                                      causal=bool(causal) and shard.holds_tails, is_fp8_kvcache=is_fp8_kvcache,
                                      backend=backend, validate=validate, out_dtype=np.float32)
    return partial_from_result(out, lse)


def shard_partial_reference(q, shard: ContextShard, head_dim_v: int, *, causal: bool = False, softmax_scale=None,
                            is_fp8_kvcache: bool = False):
    """The same partial computed with *global* key positions (host, float32, independent of the
    tail rule): ``mla.reference.split_partials`` over a per-shard plan with one piece per run of
    consecutive pages, on a block table indexed by global page (-1 where the shard holds nothing),
    merged per sequence. Returns (o float32 [b, s_q, h_q, d_v], lse float32 [b, s_q, h_q])."""
    q = np.asarray(q)
    b = q.shape[0]
    page = shard.page_block_size
    lengths = shard.global_seqlens.astype(np.int64)
    local_table = _arrays.asnumpy(shard.block_table)
    n_pages = -(-lengths // page)
    view = np.full((b, max(int(n_pages.max(initial=0)), 1)), -1, dtype=np.int32)  # global page -> local block
    rows, num_splits = [], [0]
    for i in range(b):
        pg = shard.global_pages[i][shard.global_pages[i] >= 0].astype(np.int64)
        view[i, pg] = local_table[i, : len(pg)]
        runs = np.split(pg, np.flatnonzero(np.diff(pg) != 1) + 1) if len(pg) else []
        for s, run in enumerate(runs):
            start, stop = int(run[0]) * page, min(int(run[-1] + 1) * page, int(lengths[i]))
            rows.append([i, start, i, stop, s, 0, 0, 0])
        num_splits.append(num_splits[-1] + max(len(runs), 1))  # an empty sequence keeps one empty split
    metadata = np.asarray(rows, dtype=np.int32).reshape(-1, 8)
    num_splits = np.asarray(num_splits, dtype=np.int32)
    k_cache = _arrays.asnumpy(shard.k_cache)
    o_p, lse_p = _reference.split_partials(q, k_cache, view, lengths.astype(np.int32), head_dim_v, metadata,
                                           num_splits, softmax_scale, bool(causal), is_fp8_kvcache)
    out, lse = _reference.combine_splits(o_p, lse_p, num_splits, np.float32)
    return partial_from_result(out, lse)


def context_parallel_decode_simulated(q, k_cache, block_table, cache_seqlens, head_dim_v: int, num_shards: int, *,
                                      how: str = "range", causal: bool = False, softmax_scale=None,
                                      is_fp8_kvcache: bool = False, method: str = "local", backend: str = "numpy"):
    """Context-parallel decode with the G shards run one after another in this process, then merged.

    method "local": each shard through ``mla.flash_mla_with_kvcache`` on its local arrays (what every
    GPU rank does); "global": ``shard_partial_reference`` (global positions). Returns the API's
    (out [b, s_q, h_q, d_v] in q's dtype, lse float32 [b, h_q, s_q]).
    """
    if method not in ("local", "global"):
        raise ValueError(f"method must be 'local' or 'global', got {method!r}")
    shards = shard_context(k_cache, block_table, cache_seqlens, num_shards, how, s_q=int(q.shape[1]))
    kw = dict(causal=causal, softmax_scale=softmax_scale, is_fp8_kvcache=is_fp8_kvcache)
    if method == "local":
        partials = [shard_partial(q, s, head_dim_v, backend=backend, **kw) for s in shards]
    else:
        partials = [shard_partial_reference(q, s, head_dim_v, **kw) for s in shards]
    return merge_partials(partials, out_dtype=q.dtype)


# ----------------------------------------------------------------------------------------------
# head parallel


@dataclass(frozen=True)
class HeadShard:
    """Query heads [q_lo, q_hi) and the KV heads [kv_lo, kv_hi) they read."""

    q_lo: int
    q_hi: int
    kv_lo: int
    kv_hi: int

    @property
    def num_heads(self) -> int:
        return self.q_hi - self.q_lo


def shard_heads(h_q: int, h_kv: int, num_shards: int) -> list[HeadShard]:
    """Cut h_q query heads into ``num_shards`` contiguous ranges that a decode call can take.

    Query head h reads KV head h // (h_q // h_kv). With G <= h_kv each shard gets whole groups
    (as even as possible); with more shards than KV heads the shards are spread over the groups and
    each group's heads are cut among its shards. Some shards may be empty when G > h_q.
    """
    h_q, h_kv, G = _check_count("h_q", h_q), _check_count("h_kv", h_kv), _check_count("num_shards", num_shards)
    if h_q % h_kv:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
    group = h_q // h_kv
    if G <= h_kv:
        cuts = [h_kv * g // G for g in range(G + 1)]
        return [HeadShard(cuts[g] * group, cuts[g + 1] * group, cuts[g], cuts[g + 1]) for g in range(G)]
    shards = []
    kv_of = [g * h_kv // G for g in range(G)]  # each group gets at least one shard
    for g in range(G):
        kv = kv_of[g]
        mates = [x for x in range(G) if kv_of[x] == kv]
        t, n = mates.index(g), len(mates)
        lo, hi = kv * group + group * t // n, kv * group + group * (t + 1) // n
        shards.append(HeadShard(lo, hi, kv, kv + 1))
    return shards


def _even_head_shards(h_q: int, h_kv: int, num_shards: int) -> list[HeadShard]:
    """shard_heads, required to be the same size on every rank (all-gather needs equal buffers)."""
    shards = shard_heads(h_q, h_kv, num_shards)
    sizes = {s.num_heads for s in shards}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"head parallel over {num_shards} ranks needs every rank to get the same number of query "
                         f"heads; h_q = {h_q}, h_kv = {h_kv} gives {[s.num_heads for s in shards]}")
    return shards


def head_parallel_decode_simulated(q, k_cache, block_table, cache_seqlens, head_dim_v: int, num_shards: int, *,
                                   causal: bool = False, softmax_scale=None, is_fp8_kvcache: bool = False,
                                   backend: str = "numpy"):
    """Head-parallel decode with the shards run one after another, results concatenated by head."""
    b, s_q, h_q, _ = q.shape
    xp = _xp(q)
    outs, lses = [], []
    for s in shard_heads(h_q, int(k_cache.shape[2]), num_shards):
        if s.num_heads == 0:
            continue
        out, lse = flash_mla_with_kvcache(q[:, :, s.q_lo : s.q_hi], k_cache[:, :, s.kv_lo : s.kv_hi], block_table,
                                          cache_seqlens, head_dim_v, softmax_scale=softmax_scale, causal=causal,
                                          is_fp8_kvcache=is_fp8_kvcache, backend=backend)
        outs.append(out)
        lses.append(lse)
    return xp.concatenate(outs, axis=2), xp.concatenate(lses, axis=1)


# ----------------------------------------------------------------------------------------------
# the rank-side steps (any group with all_gather; NCCL on the GPUs)


class NcclGroup:
    """``all_gather`` for one rank over a ``cupy.cuda.nccl.NcclCommunicator`` (on the current stream)."""

    def __init__(self, comm, world_size: int):
        self.comm, self.size = comm, int(world_size)

    def all_gather(self, x):
        """x (any dtype, any shape) from every rank -> [world_size, *x.shape], rank order."""
        import cupy as cp
        from cupy.cuda import nccl

        x = _copy_contiguous(x)
        out = cp.empty((self.size,) + tuple(x.shape), dtype=x.dtype)
        if x.nbytes:  # a pure copy: bytes travel as uint8, so bfloat16 needs no NCCL type
            self.comm.allGather(x.data.ptr, out.data.ptr, x.nbytes, nccl.NCCL_UINT8, cp.cuda.get_current_stream().ptr)
        return out


def run_context_parallel(group, shard: ContextShard, q, head_dim_v: int, *, causal: bool = False, softmax_scale=None,
                         is_fp8_kvcache: bool = False, plan=(None, None), backend: str = "auto",
                         validate: bool = True):
    """One context-parallel decode step on this rank: partial over the shard, all-gather, merge.

    Every rank gets the full (out [b, s_q, h_q, d_v] in q's dtype, lse float32 [b, h_q, s_q]).
    """
    o, lse = shard_partial(q, shard, head_dim_v, causal=causal, softmax_scale=softmax_scale,
                           is_fp8_kvcache=is_fp8_kvcache, backend=backend, plan=plan, validate=validate)
    return _merge_stacked(group.all_gather(o), group.all_gather(lse), q.dtype)


def run_head_parallel(group, q_local, k_cache_local, block_table, cache_seqlens, head_dim_v: int, *,
                      causal: bool = False, softmax_scale=None, is_fp8_kvcache: bool = False, plan=(None, None),
                      backend: str = "auto", validate: bool = True):
    """One head-parallel decode step on this rank: its heads q_local [b, s_q, h_q / G, d] over
    k_cache_local (the KV heads they read), all-gather, heads concatenated in rank order."""
    out, lse = flash_mla_with_kvcache(q_local, k_cache_local, block_table, cache_seqlens, head_dim_v, plan[0],
                                      plan[1], softmax_scale=softmax_scale, causal=causal,
                                      is_fp8_kvcache=is_fp8_kvcache, backend=backend, validate=validate)
    xp = _xp(out)
    out_all, lse_all = group.all_gather(out), group.all_gather(lse)  # [G, b, s_q, h, d_v], [G, b, h, s_q]
    G, b, s_q, h, d_v = out_all.shape
    out = _copy_contiguous(xp.moveaxis(out_all, 0, 2)).reshape(b, s_q, G * h, d_v)
    lse = xp.ascontiguousarray(xp.moveaxis(lse_all, 0, 1)).reshape(b, G * h, s_q)
    return out, lse


# ----------------------------------------------------------------------------------------------
# one process per GPU


@dataclass
class RunConfig:
    """The problem and the run of ``python -m mla.distributed`` (every rank builds the same problem)."""

    mode: str = "context"
    b: int = 1
    s_k: int = 1 << 20
    s_q: int = 1
    h_q: int = 128
    h_kv: int = 1
    d: int = 576
    d_v: int = 512
    page: int = 64
    dtype: str = "bfloat16"
    causal: bool = False
    varlen: bool = False
    how: str = "range"
    seed: int = 0
    reps: int = 20
    warmup: int = 3
    check: bool = True


def _random_normal(xp, shape, seed):
    if xp is np:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return xp.random.RandomState(seed).standard_normal(shape, dtype=xp.float32)


def make_case(cfg: RunConfig, xp=np):
    """The seeded decode problem of ``cfg`` in ``xp`` (numpy or cupy), the same on every rank.

    Lengths s_k (varlen: uniform in [0, s_k], one of them 0); physical blocks shuffled; cache slots
    past each length, the spare block and table entries past the used pages poisoned.
    Returns a ``mla.testing.DecodeCase``.
    """
    from .testing import DecodeCase

    rng = np.random.default_rng(cfg.seed)
    lengths = np.full(cfg.b, cfg.s_k, dtype=np.int64)
    if cfg.varlen:
        lengths = rng.integers(0, cfg.s_k + 1, size=cfg.b)
        if cfg.b > 1:
            lengths[rng.integers(cfg.b)] = 0
    pages = -(-lengths // cfg.page)
    num_blocks = int(pages.sum()) + 1  # one spare, poisoned
    physical = rng.permutation(num_blocks).astype(np.int32)
    table = np.full((cfg.b, int(pages.max(initial=0)) + 1), 2**30 - 1, dtype=np.int32)  # garbage past the used pages
    cache = _random_normal(xp, (num_blocks, cfg.page, cfg.h_kv, cfg.d), cfg.seed)
    start = 0
    for i in range(cfg.b):
        P, L = int(pages[i]), int(lengths[i])
        table[i, :P] = physical[start : start + P]
        start += P
        if L % cfg.page:
            cache[int(table[i, P - 1]), L % cfg.page :] = np.nan
    cache[int(physical[-1])] = np.nan
    dtype = _arrays.resolve_dtype(cfg.dtype)
    q = _random_normal(xp, (cfg.b, cfg.s_q, cfg.h_q, cfg.d), cfg.seed + 1)
    return DecodeCase(q=_cast(q, dtype), k_cache=_cast(cache, dtype), block_table=xp.asarray(table),
                      cache_seqlens=xp.asarray(lengths.astype(np.int32)), head_dim_v=cfg.d_v, causal=cfg.causal)


def _time_ms(fn, reps: int, warmup: int, xp) -> float:
    """Median ms of fn() over reps calls after warmup calls: CUDA events on the device, a clock on the host."""
    for _ in range(warmup):
        fn()
    times = []
    if xp is np:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(times)) if times else float("nan")
    xp.cuda.Device().synchronize()
    start, stop = xp.cuda.Event(), xp.cuda.Event()
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(xp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times)) if times else float("nan")


def _compare(out, lse, single_out, single_lse, case) -> dict:
    """Rank 0's check of the parallel (out, lse) (DESIGN §6 tolerances, ``mla.testing``).

    Three comparisons, all must hold: the parallel result against the NumPy reference on the full
    problem (the contract every backend meets), the single-GPU result against the same reference,
    and parallel against single-GPU within twice the output tolerances. The two GPU results are
    rounded to bf16 from different float32 sums (other split boundaries, and the parallel path
    rounds each rank's partial once before the merge), so near-cancelling outputs may differ by up
    to the sum of their two distances to the reference: the triangle bound, not one tolerance.
    Max differences are reported against the single-GPU result (``max_abs_out`` / ``max_abs_lse``)
    and against the reference (``max_abs_out_ref`` / ``max_abs_lse_ref``).
    """
    from .reference import flash_mla_reference
    from .testing import LSE_ATOL, LSE_RTOL, OUT_RTOL, assert_close, out_atol

    atol = out_atol(case)  # unit-normal values: DESIGN §6's 8e-4 scaled to them (the Hopper kernels round bf16 P once)

    host = [_arrays.asnumpy(a) for a in case.args()[:4]]
    ref_out, ref_lse = flash_mla_reference(*host, case.head_dim_v, causal=case.causal)
    as64 = lambda a: _arrays.asnumpy(a).astype(np.float64)
    o, so, r = as64(out), as64(single_out), as64(ref_out)
    ls, sl, rl = as64(lse), as64(single_lse), as64(ref_lse)

    def max_abs(x, y, finite_only=False):
        if finite_only:
            fin = np.isfinite(x) & np.isfinite(y)
            x, y = x[fin], y[fin]
        return float(np.nanmax(np.abs(x - y), initial=0.0))

    result = {"max_abs_out": max_abs(o, so), "max_abs_lse": max_abs(ls, sl, True),
              "max_abs_out_ref": max_abs(o, r), "max_abs_lse_ref": max_abs(ls, rl, True), "ok": True}
    checks = [("parallel vs reference", lambda: assert_close(o, ls, r, rl, out_atol=atol)),
              ("single-GPU vs reference", lambda: assert_close(so, sl, r, rl, out_atol=atol)),
              ("parallel vs single-GPU (2x tolerances)",
               lambda: assert_close(o, ls, so, sl, 2 * atol, 2 * OUT_RTOL, 2 * LSE_ATOL, 2 * LSE_RTOL))]
    for what, check in checks:
        try:
            check()
        except AssertionError as exc:
            result.update(ok=False, mismatch=f"{what}: {str(exc)[:2000]}")
            break
    return result


def _rank_main(rank: int, world_size: int, cfg: RunConfig, group, xp) -> dict:
    """What every rank runs: build the problem, take its part, decode, check (rank 0), time."""
    case = make_case(cfg, xp)
    b, s_q, h_q, _ = case.q.shape
    h_kv, d_v = cfg.h_kv, cfg.d_v

    def plan_for(seqlens, heads, kv_heads):
        return get_mla_metadata(seqlens, s_q * heads // kv_heads, kv_heads)

    if cfg.mode == "context":
        shard = context_shard(case.k_cache, case.block_table, case.cache_seqlens, world_size, rank, cfg.how, s_q=s_q)
        plan = plan_for(shard.cache_seqlens, h_q, h_kv)
        step = lambda: run_context_parallel(group, shard, case.q, d_v, causal=cfg.causal, plan=plan, validate=False)
    elif cfg.mode == "head":
        hs = _even_head_shards(h_q, h_kv, world_size)[rank]
        q_local = xp.ascontiguousarray(case.q[:, :, hs.q_lo : hs.q_hi])
        k_local = case.k_cache if (hs.kv_lo, hs.kv_hi) == (0, h_kv) else xp.ascontiguousarray(
            case.k_cache[:, :, hs.kv_lo : hs.kv_hi])
        plan = plan_for(case.cache_seqlens, hs.num_heads, hs.kv_hi - hs.kv_lo)
        step = lambda: run_head_parallel(group, q_local, k_local, case.block_table, case.cache_seqlens, d_v,
                                         causal=cfg.causal, plan=plan, validate=False)
    else:
        raise ValueError(f"mode must be 'context' or 'head', got {cfg.mode!r}")
    result = {"rank": rank, "world_size": world_size}
    if rank != 0:
        case.k_cache = None  # the full cache is only needed for rank 0's single-GPU check
    out, lse = step()
    if rank == 0:
        plan1 = plan_for(case.cache_seqlens, h_q, h_kv)
        single = lambda: flash_mla_with_kvcache(*case.args(), *plan1, causal=cfg.causal, validate=False)
        if cfg.check:
            result.update(_compare(out, lse, *single(), case))
    result["parallel_ms"] = _time_ms(step, cfg.reps, cfg.warmup, xp)  # every rank: the collectives pair up
    if rank == 0:
        result["single_ms"] = _time_ms(single, cfg.reps, cfg.warmup, xp)
    return result


def _worker(rank: int, world_size: int, cfg: dict, uid_conns, results) -> None:
    """Process entry of one rank: NCCL id over the pipes, communicator, ``_rank_main``, result to the queue."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off, before NCCL is initialised
    try:
        import cupy as cp
        from cupy.cuda import nccl

        cp.cuda.Device(rank).use()
        if rank == 0:
            uid = nccl.get_unique_id()
            for conn in uid_conns:
                conn.send(uid)
                conn.close()
        else:
            uid = uid_conns[0].recv()
        comm = nccl.NcclCommunicator(world_size, uid, rank)
        try:
            result = _rank_main(rank, world_size, RunConfig(**cfg), NcclGroup(comm, world_size), cp)
            cp.cuda.Device().synchronize()
        finally:
            comm.destroy()
        results.put((rank, result))
    except BaseException:
        results.put((rank, {"rank": rank, "error": traceback.format_exc()}))


def launch(cfg: RunConfig, world_size: int, timeout: float = 900.0) -> list[dict]:
    """Run ``cfg`` on ``world_size`` GPUs, one spawned process each; returns every rank's result dict.

    Rank 0's dict has ``ok`` / ``max_abs_out`` / ``max_abs_lse`` (the check against a single-GPU run,
    when cfg.check) and ``single_ms``; every rank has ``parallel_ms``. Raises RuntimeError with the
    rank's traceback when a rank fails (the others are then terminated), TimeoutError after timeout s.
    """
    import multiprocessing as mp

    world_size = _check_count("world_size", world_size)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by every rank
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size - 1)]  # (recv end, send end): uid to rank r
    procs = []
    for rank in range(world_size):
        conns = [send for _, send in pipes] if rank == 0 else [pipes[rank - 1][0]]
        proc = ctx.Process(target=_worker, args=(rank, world_size, dataclasses.asdict(cfg), conns, results),
                           name=f"mla-rank{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    for recv, send in pipes:  # the children hold their own ends now
        recv.close()
        send.close()
    got, failed = {}, True
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            try:
                rank, res = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} died without a result (exit codes "
                                       f"{[p.exitcode for p in procs]})") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no result from ranks {sorted(set(range(world_size)) - set(got))} "
                                       f"after {timeout:.0f} s") from None
                continue
            if "error" in res:
                raise RuntimeError(f"rank {rank} failed:\n{res['error']}")
            got[rank] = res
        failed = False
    finally:
        for proc in procs:
            if failed and proc.is_alive():
                proc.terminate()
            proc.join(timeout=60)
    return [got[r] for r in range(world_size)]


def _gpu_count() -> int:
    cp = _arrays.cupy_module()
    if cp is None:
        return 0
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def _nccl_status() -> tuple[bool, str]:
    """(usable, reason): CuPy with NCCL and at least one GPU."""
    cp = _arrays.cupy_module()
    if cp is None:
        return False, "CuPy is not installed"
    try:
        with warnings.catch_warnings():  # CuPy warns when libnccl is missing; the reason is returned instead
            warnings.simplefilter("ignore")
            from cupy.cuda import nccl
    except Exception as exc:
        return False, f"cupy.cuda.nccl cannot be imported ({exc})"
    if not getattr(nccl, "available", False):
        return False, "NCCL is not available to CuPy (install nvidia-nccl-cu12 / -cu13 to match CuPy)"
    return True, ""


def _parse_args(argv):
    d = RunConfig()
    p = argparse.ArgumentParser(prog="python -m mla.distributed",
                                description="Multi-GPU MLA decode over NCCL: check against one GPU and time it.")
    p.add_argument("--mode", choices=("context", "head"), default=d.mode,
                   help="context: pages split over GPUs, partials merged; head: query heads split")
    p.add_argument("--gpus", type=int, nargs="+", default=[2], help="GPU counts to run, e.g. 1 2 4 (default 2)")
    p.add_argument("--b", type=int, default=d.b)
    p.add_argument("--s-k", type=int, default=d.s_k, help="keys per sequence (the maximum with --varlen)")
    p.add_argument("--s-q", type=int, default=d.s_q)
    p.add_argument("--h-q", type=int, default=d.h_q)
    p.add_argument("--h-kv", type=int, default=d.h_kv)
    p.add_argument("--d", type=int, default=d.d)
    p.add_argument("--d-v", type=int, default=d.d_v)
    p.add_argument("--page", type=int, default=d.page)
    p.add_argument("--dtype", default=d.dtype, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--causal", action="store_true")
    p.add_argument("--varlen", action="store_true", help="lengths uniform in [0, s_k], one of them 0")
    p.add_argument("--how", choices=HOW, default=d.how, help="context mode: page placement")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the single-GPU comparison")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for all ranks, per GPU count")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in vars(args).items() if k in fields})
    return args, cfg


def main(argv=None) -> int:
    """``python -m mla.distributed``: one row per GPU count; exit 1 if a check fails, 2 if it cannot run."""
    args, cfg = _parse_args(argv)
    ok, why = _nccl_status()
    have, need = _gpu_count(), max(args.gpus)
    if not ok or have < need:
        print(f"mla.distributed: cannot run: {why or f'needs {need} GPUs, this machine has {have}'}", file=sys.stderr)
        return 2
    print(f"mode={cfg.mode} how={cfg.how} b={cfg.b} s_k={cfg.s_k}{' (varlen)' if cfg.varlen else ''} s_q={cfg.s_q} "
          f"h_q={cfg.h_q} h_kv={cfg.h_kv} d={cfg.d} d_v={cfg.d_v} page={cfg.page} {cfg.dtype} causal={cfg.causal}; "
          f"median of {cfg.reps} CUDA-event-timed steps (decode + all-gather + merge) after {cfg.warmup} warm-up")
    print("| GPUs | single-GPU ms | parallel ms (rank 0) | slowest rank ms | speedup | efficiency "
          "| max abs dout vs 1 GPU | max abs dout vs reference | max abs dlse vs 1 GPU | check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows, all_ok = [], True
    for G in args.gpus:
        res = launch(cfg, G, timeout=args.timeout)
        r0 = res[0]
        slowest = max(r["parallel_ms"] for r in res)
        check = "skipped" if not cfg.check else ("ok" if r0["ok"] else "FAIL")
        all_ok &= (not cfg.check) or bool(r0["ok"])
        speedup = r0["single_ms"] / r0["parallel_ms"] if r0["parallel_ms"] > 0 else math.nan
        print(f"| {G} | {r0['single_ms']:.3f} | {r0['parallel_ms']:.3f} | {slowest:.3f} | {speedup:.2f} | "
              f"{speedup / G:.0%} | {r0.get('max_abs_out', math.nan):.2e} | "
              f"{r0.get('max_abs_out_ref', math.nan):.2e} | {r0.get('max_abs_lse', math.nan):.2e} | {check} |",
              flush=True)
        if cfg.check and not r0["ok"]:
            print(r0.get("mismatch", ""), file=sys.stderr)
        rows.append({"gpus": G, "config": dataclasses.asdict(cfg), "ranks": res})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
