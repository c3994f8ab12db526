"""MLA decode with an FP8 KV cache and/or token-level sparse (DSA) key lists, in Numba CUDA.

What it computes (``mla.reference.split_partials`` then ``combine_splits`` with ``attn_sink``)::

    q           [b, s_q, h_q, d]                query (f32 / f16 / bf16 as its uint16 bits)
    k_cache     [num_blocks, page, h_kv, d]     f32 / f16 / bf16 cache, V = its first d_v channels
                uint32 [num_blocks, page, h_kv, 164]  the FP8 cache (``mla.fp8``, 656 bytes a token,
                                                seen as 164 little-endian words; d = 576, d_v = 512)
    block_table int32 [b, max_blocks]           dense mode only
    indices     int32 [b, s_q, topk]            sparse mode: token = block * page + offset, -1 = invalid
    topk_length int32 [b]       (optional)      only the first topk_length[i] entries of a row count
    attn_sink   f32 [h_q]       (optional)      out *= 1 / (1 + exp(sink_h - lse)); lse unchanged
    o_part      f32 [b + num_workers, s_q, h_q, d_v]   one partial per split (normalised by its own l)
    lse_part    f32 [b + num_workers, s_q, h_q]        -inf for an empty split
    out         [b, s_q, h_q, d_v] (q's dtype), lse f32 [b, h_q, s_q]   after ``combine``

Key lists. Query row (i, r) of KV head g sees, in the plan's piece [start, stop) of positions:
  dense:  key j at token block_table[i, j // page] * page + j % page, for j < L_i (and, causal,
          j <= L_i - s_q + r);
  sparse: key p at token indices[i, r, p], for p < topk_length[i], skipped when the index is -1
          (or anything outside [0, num_blocks * page): treated as -1, never read; the API raises
          on such values unless validate=False). The plan (``mla.scheduler``) then splits the index
          list 0..topk of every sequence, as the CuPy kernel and the reference do.
Then, for every query head h of the group of g, online over tiles of BN keys:
    s_n = scale * q_h . k_n ;  m' = max(m, max_n s_n) ;  alpha = exp(m - m') ;
    p_n = exp(s_n - m') ;  l = l alpha + sum_n p_n ;  acc = acc alpha + sum_n p_n v_n
and the piece writes o = acc / l, lse = m + log l (empty: o = 0, lse = -inf).

FP8 tokens are dequantised on the load, exactly as ``mla.fp8.dequantize_kv_fp8`` does: latent
channel c = float(e4m3 byte c) * scale[c // 128] (the scale is the float32 in word 128 + c // 128),
RoPE channel 512 + j = the bf16 in bytes 528 + 2j. ``e4m3_to_f32`` decodes a code with integer
arithmetic (subnormals and NaN included), so the kernel needs no float8 type.

Layout (one version, in the spirit of numba_decode's v1: generic over shapes, plain Python
operations only, so it runs under the CUDA simulator; no warp intrinsics, no inline PTX, no LLVM
intrinsics: bit casts go through a one-element local array's ``.view``, which NVVM turns into a
register move). One CTA per (plan worker, query row r, KV head g, tile of BH heads of g); NT
threads. A key row is loaded (and dequantised) once into shared memory as f32 and reused by the
BH heads, the improvement over v1 (which re-reads every key per head):

    sQ [BH][DQ]  sK [BN][d]  red [BH][BN][TPH]  sP [BH][BN]  sM, sL, sA [BH]  sBlk, sOff [BN] (int32)
    acc: per thread BH x CPT f32, channels tid + NT k of every head of the tile
    (DQ = d rounded up to 32, plus TPH: the TPH threads of neighbouring heads hit different banks)

Per tile: key slots -> (block, offset) | load + dequantise -> sK | partial dots: TPH threads a head,
each over channels lane, lane + TPH, ... for all BN keys at once (one q read, BN FMAs) | per head:
tile max, rescale, p | acc += P V; five barriers, and tiles with no valid key (sparse, -1 entries)
are skipped after the second. BH = min(group, 16), TPH = NT / BH (<= 32), BN = the largest of
8/4/2/1 whose shared memory fits 48 KB (DeepSeek: BH 16, TPH 8, BN 4, 49120 bytes). The loops over
BN, BH and CPT have constant trip counts, so NVVM unrolls them and keeps acc (64 floats for DeepSeek)
in registers: ptxas (sm_90) reports 240 registers, no spills, i.e. 2 CTAs an SM.

Not measured: written and checked under the simulator without a GPU (the GPU tests are in
tests/test_numba_sparse_fp8_gpu.py). It does ~BH x fewer cache reads and barriers per (key, head)
than v1, but runs on the CUDA cores in fp32 (no tensor cores): expect v1-v3-like speed, far from
the CuPy kernels.

combine: one CTA per output row (i, r, h), threads over d_v channels; lse = log sum_s exp(lse_s),
out = sum_s exp(lse_s - lse) o_s * f with f = 1 / (1 + exp(sink_h - lse)) (1 without a sink;
computed without overflow); empty rows: out 0, lse +inf.

Run ``python -m mla.kernels.numba_sparse_fp8`` to check it against the reference (and time it on
a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy
from numba import cuda, float32, int32, int64, uint16, uint32

# numba_decode puts numpy.row_stack back for numba-cuda on NumPy 2.5 (DESIGN.md §7) at import,
# i.e. before any kernel here is compiled (compilation is lazy, at the first launch)
from . import numba_decode as _nd

SIMULATOR = _nd.SIMULATOR
NEG_INF = _nd.NEG_INF
KINDS = _nd.KINDS
FP8_WORDS = 164
"""uint32 words per FP8 token (656 bytes)."""
FP8_SCALE_WORD = 128
"""Word of the first float32 scale (byte 512)."""
FP8_ROPE_WORD = 132
"""Word of the first two bf16 RoPE values (byte 528)."""
SMEM_LIMIT = 48 * 1024
"""Static shared memory per CTA without an opt-in."""
MAX_BH = 16
_E4M3_UNIT = 2.0**-10


# ----------------------------------------------------------------------------------------------
# bit-level helpers (plain operations: they run in the simulator and compile to register moves)


@cuda.jit(device=True, inline=True)
def f32_from_bits(bits):
    """The float32 whose bit pattern is ``bits`` (an integer in [0, 2**32))."""
    word = cuda.local.array(1, uint32)
    word[0] = bits
    return word.view(numpy.float32)[0]


@cuda.jit(device=True, inline=True)
def f32_to_bits(x):
    """The bit pattern of the float32 ``x``, as uint32."""
    value = cuda.local.array(1, float32)
    value[0] = x
    return value.view(numpy.uint32)[0]


@cuda.jit(device=True, inline=True)
def bf16_bits_to_f32(bits):
    """bfloat16 bit pattern (uint16) -> float32 (exact: bf16 is the top half of an f32)."""
    return f32_from_bits(int64(bits) << 16)


@cuda.jit(device=True, inline=True)
def f32_to_bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (as ml_dtypes); NaN -> 0x7FC0."""
    if x != x:
        return uint16(0x7FC0)
    bits = int64(f32_to_bits(x))
    bits += 0x7FFF + ((bits >> 16) & 1)
    return uint16((bits >> 16) & 0xFFFF)


@cuda.jit(device=True, inline=True)
def e4m3_to_f32(code):
    """float8_e4m3fn code (0..255) -> float32.

    Bits s eeee mmm, bias 7, no infinities: e = 0 is subnormal, m * 2**-9 = (2 m) * 2**-10;
    otherwise (8 + m) * 2**(e - 10) = (1 + m/8) * 2**(e - 7); e = 15 with m = 7 is NaN
    (0x7F, 0xFF); 0x80 is -0. Every magnitude is an integer below 2**19 times 2**-10: exact.
    """
    c = int64(code)
    e = (c >> 3) & 15
    m = c & 7
    if e == 15 and m == 7:
        return float32(math.nan)
    mag = ((8 + m) << e) if e > 0 else (m << 1)
    v = float32(mag) * float32(_E4M3_UNIT)
    return -v if c & 0x80 else v


@cuda.jit(device=True, inline=True)
def _widen_f(x):
    return float32(x)


_WIDEN = {"f32": _widen_f, "f16": _widen_f, "bf16": bf16_bits_to_f32}
_NARROW = {"f32": _nd._narrow_plain, "f16": _nd._narrow_plain, "bf16": f32_to_bf16_bits}


@cuda.jit(device=True, inline=True)
def _fp8_channel(k, blk, off, g, c):
    """Channel c of an FP8 token (k: uint32 words [.., 164]), dequantised to float32."""
    if c < 512:
        word = int64(k[blk, off, g, c >> 2])
        code = (word >> ((c & 3) * 8)) & 0xFF
        return e4m3_to_f32(code) * f32_from_bits(k[blk, off, g, FP8_SCALE_WORD + (c >> 7)])
    j = c - 512
    word = int64(k[blk, off, g, FP8_ROPE_WORD + (j >> 1)])
    if j & 1:
        return f32_from_bits(word & 0xFFFF0000)
    return f32_from_bits((word & 0xFFFF) << 16)


# ----------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class Geometry:
    """Tile sizes of one compiled decode kernel (see the module docstring)."""

    nt: int  # threads a CTA
    bh: int  # query heads a CTA (of one KV head's group)
    bn: int  # keys a tile
    tph: int  # threads a head in the score phase
    cpt: int  # output channels per thread and head (ceil(d_v / nt))
    dq: int  # row stride of sQ (floats)
    smem: int  # shared bytes


def _q_stride(d, tph):
    return -(-int(d) // 32) * 32 + tph % 32


def _smem_bytes(d, bh, bn, tph):
    return 4 * (bh * _q_stride(d, tph) + bn * d + bh * bn * tph + bh * bn + 3 * bh) + 8 * bn


def geometry(d: int, d_v: int, group: int, threads: int | None = None) -> Geometry | None:
    """The tiling for head dim d, value dim d_v and ``group`` = h_q / h_kv query heads a KV head,
    or None when even one head and one key do not fit 48 KB of shared memory (d > ~6000)."""
    nt = int(threads or (8 if SIMULATOR else 128))
    for cap in (MAX_BH, 8, 4, 2, 1):
        bh = max(1, min(int(group), cap, nt))
        tph = max(1, min(32, nt // bh))
        for bn in (8, 4, 2, 1):
            smem = _smem_bytes(d, bh, bn, tph)
            if smem <= SMEM_LIMIT:
                return Geometry(nt=nt, bh=bh, bn=bn, tph=tph, cpt=-(-int(d_v) // nt), dq=_q_stride(d, tph),
                                smem=smem)
    return None


# ----------------------------------------------------------------------------------------------
# decode: one CTA per (worker, query row r, KV head g, tile of BH heads)


def _make_decode(kind, fp8, sparse, has_topk_length, d, d_v, geo: Geometry):
    widen = _WIDEN[kind]
    D, DV, DQ = int(d), int(d_v), geo.dq
    NT, BH, BN, TPH, CPT = geo.nt, geo.bh, geo.bn, geo.tph, geo.cpt
    PAIRS = BH * BN
    # array sizes must be plain constants
    SQ_N = BH * DQ
    SK_N = BN * D
    RED_N = PAIRS * TPH
    ACC_N = BH * CPT
    SCORE_THREADS = BH * TPH
    FP8, SPARSE, HAS_TL = bool(fp8), bool(sparse), bool(has_topk_length)

    @cuda.jit
    def mla_decode_sparse_fp8(q, k_cache, block_table, seqlens, plan_lens, indices, topk_length, metadata,
                              num_splits, o_part, lse_part, scale, causal):
        """grid (num_workers, s_q * h_kv * ceil(group / BH)), block NT; static shared memory."""
        w = cuda.blockIdx.x
        y = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        s_q, h_q = q.shape[1], q.shape[2]
        num_blocks, page, h_kv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
        group = h_q // h_kv
        tiles = (group + BH - 1) // BH
        r = y // (tiles * h_kv)
        g = (y // tiles) % h_kv
        h0 = g * group + (y % tiles) * BH  # first query head of this CTA
        nh = min(BH, group - (y % tiles) * BH)  # heads in this tile
        num_tokens = num_blocks * page

        sQ = cuda.shared.array(SQ_N, float32)
        sK = cuda.shared.array(SK_N, float32)
        red = cuda.shared.array(RED_N, float32)
        sP = cuda.shared.array(PAIRS, float32)
        sM = cuda.shared.array(BH, float32)
        sL = cuda.shared.array(BH, float32)
        sA = cuda.shared.array(BH, float32)
        sBlk = cuda.shared.array(BN, int32)
        sOff = cuda.shared.array(BN, int32)
        acc = cuda.local.array(ACC_N, float32)
        part = cuda.local.array(BN, float32)
        vk = cuda.local.array(BN, float32)
        hq = tid // TPH  # score phase: this thread sums channels lane, lane + TPH, ... of head hq
        lane = tid % TPH

        for i in range(metadata[w, 0], metadata[w, 2] + 1):
            start, stop, p = _nd._piece(metadata, num_splits, plan_lens, w, i)
            limit = stop
            if SPARSE:
                if HAS_TL:
                    limit = min(stop, topk_length[i])  # only the first topk_length[i] entries count
            elif causal:
                limit = min(stop, seqlens[i] - s_q + r + 1)  # row r sees keys j <= L - s_q + r
            for e in range(tid, BH * D, NT):
                hh = e // D
                c = e % D
                sQ[hh * DQ + c] = widen(q[i, r, h0 + hh, c]) if hh < nh else float32(0.0)
            for hh in range(tid, BH, NT):
                sM[hh] = NEG_INF
                sL[hh] = 0.0
            for x in range(ACC_N):
                acc[x] = 0.0

            for j0 in range(start, limit, BN):
                cuda.syncthreads()  # the previous tile's readers of sK / sP / sBlk are done (and sQ is written)
                # ---- key slots of the tile -> (block, offset); -1 = not a key of this row
                if tid < BN:
                    j = j0 + tid
                    blk = -1
                    off = 0
                    if j < limit:
                        if SPARSE:
                            tok = indices[i, r, j]
                            if tok >= 0 and tok < num_tokens:
                                blk = tok // page
                                off = tok % page
                        else:
                            phys = block_table[i, j // page]
                            if phys >= 0 and phys < num_blocks:
                                blk = phys
                                off = j % page
                    sBlk[tid] = blk
                    sOff[tid] = off
                cuda.syncthreads()
                any_valid = False
                for n in range(BN):
                    if sBlk[n] >= 0:
                        any_valid = True
                if any_valid:  # the same for every thread (read after the barrier)
                    # ---- load the keys (dequantised) -> sK as f32; invalid slots are 0 and never read
                    for e in range(tid, BN * D, NT):
                        n = e // D
                        c = e % D
                        blk = sBlk[n]
                        v = float32(0.0)
                        if blk >= 0:
                            if FP8:
                                v = _fp8_channel(k_cache, blk, sOff[n], g, c)
                            else:
                                v = widen(k_cache[blk, sOff[n], g, c])
                        sK[e] = v  # = sK[n * D + c]
                    cuda.syncthreads()
                    # ---- partial dots q_hq . k_n over channels lane, lane + TPH, ..., for all BN keys
                    if tid < SCORE_THREADS and hq < nh:
                        for n in range(BN):
                            part[n] = 0.0
                        for c in range(lane, D, TPH):
                            qv = sQ[hq * DQ + c]
                            for n in range(BN):
                                part[n] += qv * sK[n * D + c]
                        for n in range(BN):
                            red[(hq * BN + n) * TPH + lane] = part[n]
                    cuda.syncthreads()
                    # ---- online softmax, one thread per head: m' = max(m, max_n s_n), alpha = exp(m - m')
                    for hh in range(tid, nh, NT):
                        m_old = sM[hh]
                        m_new = m_old
                        for n in range(BN):
                            if sBlk[n] >= 0:
                                s = float32(0.0)
                                for t in range(TPH):
                                    s += red[(hh * BN + n) * TPH + t]
                                s *= scale
                                sP[hh * BN + n] = s
                                m_new = max(m_new, s)
                        alpha = math.exp(m_old - m_new)  # 0 while m_old = -inf; m_new is finite here
                        total = float32(0.0)
                        for n in range(BN):
                            pn = float32(0.0)
                            if sBlk[n] >= 0:
                                pn = math.exp(sP[hh * BN + n] - m_new)
                            sP[hh * BN + n] = pn
                            total += pn
                        sL[hh] = sL[hh] * alpha + total
                        sM[hh] = m_new
                        sA[hh] = alpha
                    cuda.syncthreads()
                    # ---- acc = acc alpha + sum_n p_n v_n for this thread's channels of every head
                    for kk in range(CPT):
                        c = tid + kk * NT
                        if c < DV:
                            for n in range(BN):
                                vk[n] = sK[n * D + c]
                            for hh in range(BH):
                                if hh < nh:
                                    a = acc[hh * CPT + kk] * sA[hh]
                                    for n in range(BN):
                                        a += sP[hh * BN + n] * vk[n]
                                    acc[hh * CPT + kk] = a

            cuda.syncthreads()  # sM / sL final (also when the piece had no key)
            for kk in range(CPT):
                c = tid + kk * NT
                if c < DV:
                    for hh in range(BH):
                        if hh < nh:
                            ll = sL[hh]
                            o_part[p, r, h0 + hh, c] = acc[hh * CPT + kk] / ll if ll > 0 else float32(0.0)
            for hh in range(tid, nh, NT):
                ll = sL[hh]
                lse_part[p, r, h0 + hh] = sM[hh] + math.log(ll) if ll > 0 else NEG_INF
            cuda.syncthreads()  # sQ / sM / sL are rewritten by the next sequence

    return mla_decode_sparse_fp8


# ----------------------------------------------------------------------------------------------
# combine with attn_sink


def _make_combine(kind, has_sink):
    narrow = _NARROW[kind]
    HAS_SINK = bool(has_sink)

    @cuda.jit
    def mla_combine_sink(o_part, lse_part, num_splits, attn_sink, out, lse):
        """grid (b * s_q * h_q), block NT. out [b, s_q, h_q, d_v]; lse [b, h_q, s_q]."""
        tid = cuda.threadIdx.x
        i, r, h = _nd.combine_row(out)
        lo = num_splits[i]
        hi = num_splits[i + 1]
        m, total = _nd.split_weights(lse_part, lo, hi, r, h)
        inv = float32(0.0)
        row_lse = NEG_INF
        if total > 0:
            row_lse = m + math.log(total)
            inv = 1.0 / total
            if HAS_SINK:
                # exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(z)), z = sink - lse, without overflow
                z = attn_sink[h] - row_lse
                if z > 0:
                    ez = math.exp(-z)
                    inv *= ez / (1.0 + ez)
                else:
                    inv *= 1.0 / (1.0 + math.exp(z))
        for c in range(tid, out.shape[3], cuda.blockDim.x):
            o = _nd.merged_channel(o_part, lse_part, lo, hi, r, h, c, m, inv) if total > 0 else float32(0.0)
            out[i, r, h, c] = narrow(o)
        if tid == 0:
            lse[i, h, r] = row_lse if total > 0 else math.inf

    return mla_combine_sink


# ----------------------------------------------------------------------------------------------
# launchers (arrays are Numba device arrays, or host arrays under the simulator)


class SparseFP8Launch:
    """The decode kernel compiled for one problem shape and flags, with its launch geometry."""

    def __init__(self, kind, fp8, sparse, has_topk_length, s_q, h_q, h_kv, d, d_v, num_workers, threads=None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if fp8 and (d != 576 or d_v != 512):
            raise ValueError(f"the FP8 layout needs d = 576 and d_v = 512, got {d}, {d_v}")
        group = h_q // h_kv
        geo = geometry(d, d_v, group, threads)
        if geo is None:
            raise ValueError(f"d = {d} is too large for the sparse/FP8 Numba kernel (one key row and one query "
                             f"row must fit {SMEM_LIMIT} bytes of shared memory)")
        self.geometry = geo
        key = ("sparse_fp8", kind, bool(fp8), bool(sparse), bool(has_topk_length), int(d), int(d_v), geo)
        self.kernel = _nd._kernel(key, lambda: _make_decode(kind, fp8, sparse, has_topk_length, d, d_v, geo))
        self.grid = (int(num_workers), int(s_q) * int(h_kv) * -(-group // geo.bh))
        self.block = geo.nt
        self._launchers: dict = {}

    def __call__(self, q, k_cache, block_table, seqlens, plan_lens, indices, topk_length, metadata, num_splits,
                 o_part, lse_part, scale, causal, stream=0):
        """q, k_cache (typed; FP8 as uint32 words), block_table, seqlens (cache_seqlens), plan_lens
        (what the plan split: cache_seqlens, or topk for every sequence), indices, topk_length,
        metadata, num_splits, partial buffers; arrays a mode does not use may be any 1-element
        int32 arrays of the right rank."""
        launch = _nd.configured(self._launchers, self.kernel, self.grid, self.block, stream, 0)
        launch(q, k_cache, block_table, seqlens, plan_lens, indices, topk_length, metadata, num_splits,
               o_part, lse_part, float32(scale), bool(causal))


class SinkCombineLaunch:
    """The combine kernel (with or without attn_sink), one CTA per output row."""

    def __init__(self, kind, has_sink, b, s_q, h_q, threads=None):
        self.kernel = _nd._kernel(("combine_sink", kind, bool(has_sink)), lambda: _make_combine(kind, has_sink))
        self.grid = max(int(b) * int(s_q) * int(h_q), 1)
        self.block = threads or (8 if SIMULATOR else 128)
        self._launchers: dict = {}

    def __call__(self, o_part, lse_part, num_splits, attn_sink, out, lse, stream=0):
        launch = _nd.configured(self._launchers, self.kernel, self.grid, self.block, stream, 0)
        launch(o_part, lse_part, num_splits, attn_sink, out, lse)


# ----------------------------------------------------------------------------------------------
# python -m mla.kernels.numba_sparse_fp8: check against the reference, then time on a GPU


def main():
    import time

    import mla
    from mla import _arrays, reference, testing

    rng = numpy.random.default_rng(0)
    bf16 = _arrays.BFLOAT16
    if SIMULATOR:
        checks = [dict(b=2, s_q=2, h_q=2, h_kv=1, d=16, head_dim_v=8, page_block_size=4, seqlens=[9, 0],
                       dtype=bf16, fp8=False)]
    else:
        checks = [dict(b=3, s_q=2, h_q=h_q, h_kv=1, d=576, head_dim_v=512, page_block_size=64,
                       seqlens=[0, 300, 1500], dtype=bf16, fp8=fp8) for fp8 in (False, True) for h_q in (16, 128)]
    for kw in checks:
        for sparse in (False, True):
            if not sparse and not kw["fp8"]:
                continue
            case = testing.make_decode_case(rng, **kw)
            if sparse:
                case.indices = testing.make_sparse_indices(rng, case, 40 if SIMULATOR else 777, invalid_ratio=0.3)
                case.attn_sink = rng.standard_normal(kw["h_q"]).astype(numpy.float32)
            out, lse = mla.flash_mla_with_kvcache(*case.args(), backend="numba", **case.kwargs())
            testing.assert_close(out, lse, *reference.flash_mla_reference(*case.args(), **case.kwargs()),
                                 lse_atol=4e-6)
            print(f"fp8={kw['fp8']} sparse={sparse} h_q={kw['h_q']}: matches the reference")
    if SIMULATOR:
        return
    import cupy as cp

    b, s_q, h_q, topk, s_k, page = 128, 2, 128, 2048, 8192, 64
    blocks = b * s_k // page
    k8 = mla.quantize_kv_fp8(cp.random.standard_normal((blocks, page, 1, 576), dtype=cp.float32))  # on the device
    q = cp.asarray(rng.standard_normal((b, s_q, h_q, 576)).astype(bf16))
    indices = cp.asarray(rng.permutation(blocks * page)[: b * s_q * topk].reshape(b, s_q, topk).astype(numpy.int32))
    sched, splits = mla.get_mla_metadata(cp.zeros(b, cp.int32), s_q * h_q, 1, topk=topk)

    def run():
        return mla.flash_mla_with_kvcache(q, k8, None, None, 512, sched, splits, is_fp8_kvcache=True, indices=indices,
                                          backend="numba", validate=False)

    run()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        cp.cuda.Device().synchronize()
        times.append(time.perf_counter() - t0)
    t = float(numpy.median(times))
    flops = 2 * b * s_q * h_q * topk * (576 + 512)
    print(f"sparse FP8 b={b} s_q={s_q} h_q={h_q} topk={topk}: {t * 1e3:.2f} ms, {flops / t / 1e12:.2f} TFLOP/s")


if __name__ == "__main__":
    main()
