"""Split-KV tile scheduler: how a batch of sequences is cut into equal pieces of work.

Decoding reads every sequence's cache once. With few or uneven sequences, one CTA per sequence
leaves most multiprocessors idle, so the keys of each sequence are cut into *splits* and the
splits are dealt out so that every worker (a CTA, i.e. roughly one SM) gets the same number of
key tiles. Each split produces a partial result (o, lse); a combine step merges the partials of a
sequence by their lse (``mla.reference.combine_splits``).

The idea is FlashMLA's tile scheduler: walk the sequences in order, give each worker a budget of
``payload`` tiles, and charge every piece a worker touches a fixed overhead (loading the query
tile, writing a partial, the combine), so that splitting is not free. Optionally (``plan``'s
``tight``, MLA_PLAN_TIGHT=1) the payload is the smallest with which the workers still cover every
sequence: FlashMLA's ``ceil(total / workers) + overhead`` can leave workers idle.

Plan format (shared by every backend; all int32)
------------------------------------------------
``tile_scheduler_metadata [num_workers, 8]``, one row per worker::

    [begin_b, begin_token, end_b, end_token, begin_split, 0, 0, 0]

Worker ``w`` handles the sequences ``begin_b ..= end_b`` (none if ``begin_b > end_b``). For
sequence ``i`` in that range it processes key positions ``[start, stop)`` with::

    start = begin_token if i == begin_b else 0
    stop  = end_token   if i == end_b   else L_i          (L_i = cache_seqlens[i], or topk)
    split = begin_split if i == begin_b else 0

Tokens are counted in sequence order (logical positions, before the block table), and split
boundaries fall on multiples of ``block_n`` tokens (64), so a page-64 kernel sees whole pages.

Words 5-7 are 0. During a decode by the CuPy narrow / seesaw kernels' fused builds (kernels/mla_fused_combine.cuh)
words 5 and 6 of a split sequence's first worker count its CTAs' arrivals and departures; the last CTA sets them back
to 0, so the plan is unchanged after the call -- but two decodes must not share one plan at the same time.

``num_splits [b + 1]``: cumulative split counts; sequence ``i`` has
``n_i = num_splits[i+1] - num_splits[i] >= 1`` splits, and its split ``s`` is partial number
``num_splits[i] + s`` (of ``num_splits[b]`` in total, never more than ``b + num_workers``).
Every sequence has at least one split, also when ``L_i == 0`` (its partial is empty: lse = -inf).
"""

from __future__ import annotations

import os

import numpy as np

BLOCK_N = 64
"""Tokens per scheduling tile; split boundaries are multiples of this."""

FIXED_OVERHEAD_TILES = 5
"""Cost of one split (query load, partial write, combine), in tiles of ``BLOCK_N`` keys."""

TIGHT_PAYLOAD = False
"""Whether ``plan`` (and the device plan, kernels/mla_metadata.cu) deals with the smallest payload that covers every
sequence (see ``plan``); MLA_PLAN_TIGHT=0/1 overrides it (``tight_payload``). Off by default: on the H100
(benchmarks/BENCHMARKS.md, 2026-11-26) it gained 2.4% at 8 sequences of 8192 keys, 16 heads (9 tiles a piece on 116
workers -> 8 on 128; decode + combine 0.0548 -> 0.0535 ms) and changed no other timed shape's plan, but it tries up to
fixed_overhead + 1 payloads, one whole deal each: the host plan of 128 sequences on 132 workers takes 0.66 ms instead
of 0.095 ms (the device plan walks as often; not timed), which costs more than it gains when lengths change every
step."""


def tight_payload() -> bool:
    """TIGHT_PAYLOAD, or MLA_PLAN_TIGHT (0 / 1) when set."""
    value = os.environ.get("MLA_PLAN_TIGHT", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"MLA_PLAN_TIGHT must be 0 or 1, got {value!r}")
    return TIGHT_PAYLOAD if value == "" else value == "1"

DEFAULT_NUM_SMS = 132
"""SM count used when no GPU is visible (an H100 SXM has 132)."""

METADATA_WIDTH = 8


def num_sm_parts(num_sms: int, num_q_tokens_per_head_k: int, num_heads_k: int, block_h: int = 64) -> int:
    """Number of workers: the SMs shared among KV heads and query tiles of ``block_h`` rows.

    A CTA handles up to ``block_h`` query rows (heads x query tokens) of one KV head, so a
    problem with more rows runs several CTAs per split and needs fewer splits to fill the GPU.
    """
    q_tiles = max(1, -(-int(num_q_tokens_per_head_k) // block_h))
    return max(int(num_sms) // max(int(num_heads_k), 1) // q_tiles, 1)


def plan(
    seqlens: np.ndarray,
    num_workers: int,
    block_n: int = BLOCK_N,
    fixed_overhead: int = FIXED_OVERHEAD_TILES,
    tight: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deal the key tiles of all sequences out to ``num_workers`` workers.

    seqlens: int [b], number of keys of each sequence (``cache_seqlens``, or ``topk`` in sparse mode).
    tight: deal with the smallest payload (tiles + overheads a worker) with which the deal still covers every
    sequence, instead of FlashMLA's ``ceil(total / num_workers) + fixed_overhead`` (which always covers them but
    can leave workers idle: 8 sequences of 128 tiles on 132 workers get 9 tiles a piece on 116 workers instead
    of 8 on 128). None: ``TIGHT_PAYLOAD``.
    Returns (tile_scheduler_metadata int32 [num_workers, 8], num_splits int32 [b + 1]).
    """
    seqlens = np.asarray(seqlens, dtype=np.int64).reshape(-1)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if block_n < 1:
        raise ValueError(f"block_n must be >= 1, got {block_n}")
    if tight is None:
        tight = tight_payload()
    b = seqlens.shape[0]
    num_tiles = -(-seqlens // block_n)  # ceil
    total = int(num_tiles.sum()) + b * fixed_overhead
    loose = -(-total // num_workers) + fixed_overhead  # every worker can always make progress: always covers
    # below ceil(total / num_workers) the workers cannot hold the total; from there up the first payload that covers
    for payload in range(-(-total // num_workers), loose + 1) if tight else (loose,):
        result = _deal(seqlens, num_tiles, num_workers, block_n, fixed_overhead, payload)
        if result is not None:
            return result
    raise AssertionError("scheduler left sequences unassigned")  # cannot happen: `loose` covers the total


def _deal(seqlens, num_tiles, num_workers: int, block_n: int, fixed_overhead: int, payload: int):
    """The plan dealing each worker ``payload`` (tiles + fixed_overhead a piece), in sequence order; None when
    the workers run out before the sequences do."""
    b = seqlens.shape[0]
    metadata = np.zeros((num_workers, METADATA_WIDTH), dtype=np.int32)
    num_splits = np.zeros(b + 1, dtype=np.int32)
    seq, tile, split = 0, 0, 0  # where the next worker starts: sequence, tile within it, its split
    cum_splits = 0
    for w in range(num_workers):
        begin_b, begin_token, begin_split = seq, tile * block_n, split
        budget = payload
        while seq < b:
            remaining = int(num_tiles[seq]) - tile
            if budget >= remaining + fixed_overhead:  # the rest of this sequence fits
                cum_splits += split + 1
                num_splits[seq + 1] = cum_splits
                budget -= remaining + fixed_overhead
                seq, tile, split = seq + 1, 0, 0
            else:  # take what the budget allows and stop; the next worker continues
                if budget > fixed_overhead:
                    tile += budget - fixed_overhead
                    split += 1
                break
        if tile > 0:
            end_b, end_token = seq, tile * block_n
        else:
            end_b = seq - 1
            end_token = int(seqlens[end_b]) if end_b >= 0 else 0
        metadata[w, :5] = (begin_b, begin_token, end_b, end_token, begin_split)
    if seq < b:
        return None
    return metadata, num_splits


def worker_pieces(metadata_row, num_splits, seqlens):
    """Yield (i, start, stop, partial_index) for the pieces one worker handles (host-side helper).

    This is the loop every kernel runs at the top of a CTA; the reference and tests use it too.
    """
    begin_b, begin_token, end_b, end_token, begin_split = (int(x) for x in metadata_row[:5])
    for i in range(begin_b, end_b + 1):
        start = begin_token if i == begin_b else 0
        stop = end_token if i == end_b else int(seqlens[i])
        split = begin_split if i == begin_b else 0
        yield i, start, stop, int(num_splits[i]) + split
