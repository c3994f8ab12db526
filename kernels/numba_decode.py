"""MLA split-KV decode over a paged KV cache, in Numba CUDA: versions side by side (llm.c style).

What it computes (``mla.reference.split_partials`` then ``combine_splits``)::

    q        [b, s_q, h_q, d]            query (DeepSeek: d = 576 = 512 latent + 64 RoPE)
    k_cache  [num_blocks, page, h_kv, d] paged cache; V is its first d_v channels
    o_part   f32 [b + num_workers, s_q, h_q, d_v]  one partial per split (normalised by its own l)
    lse_part f32 [b + num_workers, s_q, h_q]       -inf for an empty split
    out      [b, s_q, h_q, d_v] (q's dtype), lse f32 [b, h_q, s_q]  after ``combine``

For query row (r, h) of sequence i, the worker's piece [start, stop) of keys, KV head g:
    s_j = scale * q . k_j ;  m = max_j s_j ;  l = sum_j exp(s_j - m)
    o   = sum_j exp(s_j - m) v_j / l ;  lse = m + log l
computed *online*, one key tile at a time: m_new = max(m, max_tile s), acc *= exp(m - m_new),
acc += exp(s - m_new) v, l = l exp(m - m_new) + sum exp(s - m_new).
The scheduler plan (``mla.scheduler``; the same arrays every backend uses) says which worker
(grid column) handles which [start, stop) of which sequence and which partial it writes;
``combine`` then merges each sequence's partials:  lse = log sum_s exp(lse_s),
out = sum_s exp(lse_s - lse) o_s  (empty rows: out = 0, lse = +inf).

Dtypes: float32 / float16 as they are; bfloat16 arrives as its uint16 bit pattern and is widened
in-register (f32 bits = bf16 bits << 16). Accumulation is float32 everywhere.

Versions (measured on an H100 80GB HBM3, b=128, s_q=1, h_q=16, h_kv=1, d=576, d_v=512, page 64,
s_k=8192, bf16; the numbers come from ``benchmarks/bench_decode.py``, see benchmarks/NOTES.md):

  v1  straightforward: one CTA per (worker, query row), one thread per output channel, fp32,
      every key's score reduced through shared memory (a barrier per key). Generic over every
      shape and runs in the CUDA simulator (no warp intrinsics).
      79.6 ms, 15 GB/s, 0.5 TFLOP/s (0.2x the naive CuPy baseline).
  v2  tiled: one CTA per (worker, group of 16 query rows of one KV head). The query tile and a
      tile of BLOCK_N keys live in shared memory as fp32 (widened once, on the load); every
      key is reused by all 16 heads. 16-byte loads (bf16/fp16 x8) from global and 16-byte shared
      reads; scores by 4x4 register micro-tiles with the d-reduction split over thread slices;
      warp-shuffle softmax; P.V by 4-channel x 8-head micro-tiles.
      4.47 ms (BLOCK_N=32), 272 GB/s, 8.2 TFLOP/s, 9% of copy, 3.8x naive.
  v3  v2 + the next key tile prefetched into registers while the current one is computed
      (double-buffered page loads: global latency hidden behind the math).
      3.80 ms (BLOCK_N=32), 319 GB/s, 9.6 TFLOP/s, 11% of copy, 4.5x naive (16.9 ms).
      (default BLOCK_N=16, the one the GPU tests cover: 3.83 ms.) Target was 40% of copy: not
      reached; see benchmarks/NOTES.md for the analysis.

  v4  tensor cores: mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate), ldmatrix(.trans) and
      cp.async as inline-PTX intrinsics (kernels/numba_ptx.py); 64-key tiles double-buffered in
      shared memory as 16-bit values; 4 warps x 16 rows; P = P_hi + P_lo for bf16 (one bf16
      rounding of P misses the output tolerance on a few near-zero outputs).
      1.236 ms, 981 GB/s, 34% of copy, 13.9x naive.
  v5  v4 with 8 warps (2 per scheduler: ncu showed v4 issue-bound at 1 warp per scheduler).
      1.113 ms, 1089 GB/s, 38% of copy, 15.5x naive.  (default for bf16/fp16 DeepSeek shapes)
  v6  v5 with a cheaper key loader (load_keys_flat): v5 walks its 8 rows of each tile one after
      another, each waiting on its own block-table read before its cp.async copies issue; SASS
      (cuobjdump) shows ~1.8k of v5's ~3.3k instructions per warp per tile in that loader. v6's
      lanes read the 8 rows' blocks at once and shuffle the offsets; ~1.7k instructions per tile.
      Predicted 0.65-0.8 ms (45-55% of copy); measured on the H100 (2026-11-26, benchmarks/BENCHMARKS.md):
      0.622 ms a call at 128,1,16,8192 (66% of copy; 86% for calls in a loop).

  combine: one CTA per output row (i, r, h), threads over d_v channels.

Why v1-v3 cannot reach the memory roof: a 16-head group does 16 x (d + d_v) FMAs per key it
reads (1.1 M per 64-key page) on the CUDA cores (fp32 FMA, 67 TFLOP/s on an H100); at 3 TB/s the
memory-bound shape needs 91 TFLOP/s of it. Hence v4/v5 on the tensor cores. (v1-v3 numbers:
first table of benchmarks/BENCHMARKS.md and benchmarks/numba_decode_h100.md; v4/v5: second.)

Run ``python -m mla.kernels.numba_decode`` to check every version against the reference and
time them.
"""

from __future__ import annotations

import math
import os

import numpy

# numba-cuda <= 0.30 calls numpy.row_stack, which NumPy 2.5 removed; every @cuda.jit then fails
# with "module 'numpy' has no attribute 'row_stack'" (DESIGN.md §7). Put the alias back, only
# when it is missing, before the first compile.
if not hasattr(numpy, "row_stack"):
    numpy.row_stack = numpy.vstack

from numba import cuda, float32, int32, int64, types, uint32  # noqa: E402
from numba.core.extending import intrinsic  # noqa: E402

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
KINDS = ("f32", "f16", "bf16")
VERSIONS = (1, 2, 3, 4, 5, 6)
TENSOR_CORE_VERSIONS = (4, 5, 6)  # mma.sync + cp.async: 16-bit dtypes, v4_supported shapes
NEG_INF = -math.inf
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# register-level helpers (intrinsics: plain LLVM bitcasts and vector loads; not for the simulator)


@intrinsic
def _as_f32(typingctx, x):
    """The float32 whose bits are the uint32 x (no conversion)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def _as_u32(typingctx, x):
    """The bits of the float32 x, as uint32."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return sig, codegen


@intrinsic
def _half_bits_to_f32(typingctx, x):
    """float16 bit pattern (low 16 bits of the uint32 x) -> float32 (one cvt.f32.f16)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        h = builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType())
        return builder.fpext(h, ir.FloatType())

    return sig, codegen


def _vector_pointer(context, builder, arrty, arr, index, n):
    """Pointer to arr.flat[index] as an <n x element> vector pointer."""
    from llvmlite import ir

    ary = context.make_array(arrty)(context, builder, arr)
    lty = context.get_value_type(arrty.dtype)
    space = ary.data.type.addrspace
    if index.type.width < 64:
        index = builder.sext(index, ir.IntType(64))
    ptr = builder.gep(builder.bitcast(ary.data, lty.as_pointer(space)), [index])
    return builder.bitcast(ptr, ir.VectorType(lty, n).as_pointer(space))


@intrinsic
def _ld4(typingctx, arr, idx):
    """arr.flat[idx : idx + 4] as ONE 16-byte load (ld.v4): idx a flat element index, the array
    C-contiguous and 4-byte typed, arr.flat[idx] 16-byte aligned."""
    sig = types.UniTuple(arr.dtype, 4)(arr, idx)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        vec = builder.load(_vector_pointer(context, builder, signature.args[0], args[0], args[1], 4), align=16)
        vals = [builder.extract_element(vec, ir.Constant(ir.IntType(32), k)) for k in range(4)]
        return context.make_tuple(builder, signature.return_type, vals)

    return sig, codegen


@intrinsic
def _st4(typingctx, arr, idx, a, b, c, d):
    """arr.flat[idx : idx + 4] = (a, b, c, d) as ONE 16-byte store (st.v4)."""
    sig = types.void(arr, idx, arr.dtype, arr.dtype, arr.dtype, arr.dtype)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        lty = context.get_value_type(signature.args[0].dtype)
        vec = ir.Constant(ir.VectorType(lty, 4), None)
        for k in range(4):
            vec = builder.insert_element(vec, args[2 + k], ir.Constant(ir.IntType(32), k))
        builder.store(vec, _vector_pointer(context, builder, signature.args[0], args[0], args[1], 4), align=16)
        return context.get_dummy_value()

    return sig, codegen


# scalar widening of one element (q loads, v1) and narrowing of one result (combine)


@cuda.jit(device=True, inline=True)
def _widen_plain(x):
    return float32(x)


@cuda.jit(device=True, inline=True)
def _widen_bf16(x):
    return _as_f32(uint32(x) << uint32(16))


@cuda.jit(device=True, inline=True)
def _narrow_plain(x):
    return x


@cuda.jit(device=True, inline=True)
def _narrow_bf16(x):
    """float32 -> bfloat16 bits, round to nearest even (NaN stays NaN)."""
    bits = _as_u32(x)
    if x != x:
        return types.uint16(0x7FC0)
    bits += uint32(0x7FFF) + ((bits >> uint32(16)) & uint32(1))
    return types.uint16(bits >> uint32(16))


_WIDEN = {"f32": _widen_plain, "f16": _widen_plain, "bf16": _widen_bf16}
_NARROW = {"f32": _narrow_plain, "f16": _narrow_plain, "bf16": _narrow_bf16}


@cuda.jit(device=True, inline=True)
def _piece(metadata, num_splits, seqlens, w, i):
    """(start, stop, partial index) of sequence i in worker w's range (see mla.scheduler)."""
    begin_b = metadata[w, 0]
    end_b = metadata[w, 2]
    start = metadata[w, 1] if i == begin_b else 0
    stop = metadata[w, 3] if i == end_b else seqlens[i]
    split = metadata[w, 4] if i == begin_b else 0
    return start, stop, num_splits[i] + split


# ----------------------------------------------------------------------------------------------
# version 1: straightforward. One CTA per (worker, query row), one thread per output channel.


def _make_v1(kind):
    widen = _WIDEN[kind]

    @cuda.jit
    def mla_decode_v1(q, k_cache, block_table, seqlens, metadata, num_splits, o_part, lse_part,
                      scale, causal):
        """grid (num_workers, s_q * h_q), block NT (power of 2); dynamic shared (d + d_v + NT) f32."""
        w = cuda.blockIdx.x
        row = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        s_q, h_q, d = q.shape[1], q.shape[2], q.shape[3]
        page, h_kv = k_cache.shape[1], k_cache.shape[2]
        d_v = o_part.shape[3]
        r = row // h_q
        h = row % h_q
        g = h // (h_q // h_kv)
        smem = cuda.shared.array(0, float32)
        q_s = smem[:d]
        acc = smem[d:d + d_v]
        red = smem[d + d_v:d + d_v + nt]

        for i in range(metadata[w, 0], metadata[w, 2] + 1):
            start, stop, p = _piece(metadata, num_splits, seqlens, w, i)
            L = seqlens[i]
            limit = stop
            if causal:
                limit = min(stop, L - s_q + r + 1)  # row r sees keys j <= L - s_q + r
            for c in range(tid, d, nt):
                q_s[c] = widen(q[i, r, h, c])
            for c in range(tid, d_v, nt):
                acc[c] = 0.0
            m = NEG_INF
            l = float32(0.0)
            cuda.syncthreads()
            for j in range(start, limit):
                blk = block_table[i, j // page]
                off = j % page
                # s_j = scale * q . k_j: each thread a strided part of d, then a tree reduction
                part = float32(0.0)
                for c in range(tid, d, nt):
                    part += q_s[c] * widen(k_cache[blk, off, g, c])
                red[tid] = part
                cuda.syncthreads()
                stride = nt // 2
                while stride > 0:
                    if tid < stride:
                        red[tid] += red[tid + stride]
                    cuda.syncthreads()
                    stride //= 2
                s = red[0] * scale
                cuda.syncthreads()  # everyone has read red[0] before it is overwritten
                # online softmax: every thread keeps the same (m, l)
                m_new = max(m, s)
                alpha = math.exp(m - m_new)
                pj = math.exp(s - m_new)
                l = l * alpha + pj
                m = m_new
                for c in range(tid, d_v, nt):
                    acc[c] = acc[c] * alpha + pj * widen(k_cache[blk, off, g, c])
            inv = 1.0 / l if l > 0 else 0.0
            for c in range(tid, d_v, nt):
                o_part[p, r, h, c] = acc[c] * inv
            if tid == 0:
                lse_part[p, r, h] = m + math.log(l) if l > 0 else NEG_INF
            cuda.syncthreads()  # q_s / acc are rewritten by the next sequence

    return mla_decode_v1


# ----------------------------------------------------------------------------------------------
# versions 2 and 3: tiled. One CTA per (group of BLOCK_H query rows of one KV head, worker).
#
# Shared memory (fp32, rows padded by 4 floats so that 16-byte reads of neighbouring rows fall
# in different banks):  sQ [BLOCK_H][DP]  sK [BLOCK_N][DP]  red [NSL][BLOCK_H][BLOCK_N]
# sP [BLOCK_N][BLOCK_H]  sM, sL, sA [BLOCK_H]      (DP = d + 4)
#
# scores S = Q K^T  [BLOCK_H x BLOCK_N]: thread = (slice, 4x4 micro-tile); heads hq + 4i, keys
#   kq + (BLOCK_N/4) k; the d-reduction is split over NSL = NT / BLOCK_N slices (interleaved
#   float4 chunks), summed through `red`.
# softmax: half/whole warp per row, shuffles.
# O += P V  [BLOCK_H x d_v]: thread = (8 heads, 4-channel quads cq + 128 u).

NT = 256
BLOCK_H = 16
PAD = 4


def _tiled_geometry(d, d_v, block_n, kind):
    esize = 4 if kind == "f32" else 2
    dp = d + PAD
    cpr = d * esize // 16  # 16-byte chunks per key row
    return dict(
        DP=dp,
        EPC=16 // esize,  # elements per chunk
        CPR=cpr,
        CHUNKS_PER_THREAD=-(-(block_n * cpr) // NT),
        NSL=NT // block_n,
        TPS=block_n,
        CQ=-(-(d_v // 4) // (NT // 2)),
        SMEM_FLOATS=BLOCK_H * dp + block_n * dp + (NT // block_n) * BLOCK_H * block_n + block_n * BLOCK_H
        + 3 * BLOCK_H,
    )


def tiled_supported(d, d_v, kind):
    """Shapes the tiled versions handle (else v1): 16-byte rows and 4-channel quads."""
    esize = 4 if kind == "f32" else 2
    return (d * esize) % 16 == 0 and d_v % 4 == 0 and d_v <= d


def _make_tiled(kind, d, d_v, block_n, prefetch):
    widen = _WIDEN[kind]
    geo = _tiled_geometry(d, d_v, block_n, kind)
    DP, EPC, CPR, CPT = geo["DP"], geo["EPC"], geo["CPR"], geo["CHUNKS_PER_THREAD"]
    NSL, TPS, CQ = geo["NSL"], geo["TPS"], geo["CQ"]
    BN = block_n
    ACC_N = CQ * 32  # local-array sizes must be plain constants, not expressions
    PRE_N = CPT * 4
    KQ = BN // 4  # key quads
    D4 = d // 4
    DV4 = d_v // 4
    u32_per_row = d * (4 if kind == "f32" else 2) // 4
    off_k = BLOCK_H * DP
    off_red = off_k + BN * DP
    off_p = off_red + NSL * BLOCK_H * BN
    off_m = off_p + BN * BLOCK_H
    is16 = kind != "f32"
    is_bf16 = kind == "bf16"

    @cuda.jit(device=True, inline=True)
    def widen_store(smem, base, x0, x1, x2, x3):
        """Four uint32 of one 16-byte chunk -> fp32 in sK at base (8 values, or 4 for fp32)."""
        if is16:
            if is_bf16:
                m = uint32(0xFFFF0000)
                _st4(smem, base, _as_f32(x0 << uint32(16)), _as_f32(x0 & m), _as_f32(x1 << uint32(16)),
                     _as_f32(x1 & m))
                _st4(smem, base + 4, _as_f32(x2 << uint32(16)), _as_f32(x2 & m), _as_f32(x3 << uint32(16)),
                     _as_f32(x3 & m))
            else:
                _st4(smem, base, _half_bits_to_f32(x0), _half_bits_to_f32(x0 >> uint32(16)),
                     _half_bits_to_f32(x1), _half_bits_to_f32(x1 >> uint32(16)))
                _st4(smem, base + 4, _half_bits_to_f32(x2), _half_bits_to_f32(x2 >> uint32(16)),
                     _half_bits_to_f32(x3), _half_bits_to_f32(x3 >> uint32(16)))
        else:
            _st4(smem, base, _as_f32(x0), _as_f32(x1), _as_f32(x2), _as_f32(x3))

    @cuda.jit(device=True, inline=True)
    def chunk_address(kflat, block_table, i, g, h_kv, page, tile0, stop, idx):
        """u32 index of 16-byte chunk idx of the key tile, or -1 past stop (never read)."""
        n = idx // CPR
        pos = tile0 + n
        if pos >= stop:
            return -1
        blk = block_table[i, pos // page]
        return ((blk * page + pos % page) * h_kv + g) * u32_per_row + (idx % CPR) * 4

    @cuda.jit(device=True, inline=True)
    def load_tile(smem, kflat, block_table, i, g, h_kv, page, tile0, stop, tid):
        """Global -> registers -> widened fp32 sK (v2: loads and stores in one pass)."""
        for idx in range(tid, BN * CPR, NT):
            a = chunk_address(kflat, block_table, i, g, h_kv, page, tile0, stop, idx)
            base = off_k + (idx // CPR) * DP + (idx % CPR) * EPC
            if a >= 0:
                x0, x1, x2, x3 = _ld4(kflat, a)
            else:
                x0 = x1 = x2 = x3 = uint32(0)  # keys past stop: zeros, masked in the softmax
            widen_store(smem, base, x0, x1, x2, x3)

    @cuda.jit(device=True, inline=True)
    def tile_math(smem, tid, lane, warp, tile0, stop, limit0, s_q_rows_causal, scale_log2, acc):
        """Scores, online softmax and O += P V for the key tile in sK (see the layout above)."""
        # ---- S = Q K^T: 4x4 micro-tile over this thread's slice of d
        sl = tid // TPS
        lt = tid % TPS
        hq = lt % 4
        kq = lt // 4
        s = cuda.local.array(16, float32)
        for x in range(16):
            s[x] = 0.0
        for c4 in range(sl, D4, NSL):
            qa = cuda.local.array(16, float32)
            for a in range(4):
                qa[4 * a], qa[4 * a + 1], qa[4 * a + 2], qa[4 * a + 3] = _ld4(smem, (hq + 4 * a) * DP + 4 * c4)
            for k in range(4):
                k0, k1, k2, k3 = _ld4(smem, off_k + (kq + KQ * k) * DP + 4 * c4)
                for a in range(4):
                    s[4 * a + k] += qa[4 * a] * k0 + qa[4 * a + 1] * k1 + qa[4 * a + 2] * k2 + qa[4 * a + 3] * k3
        for a in range(4):
            for k in range(4):
                smem[off_red + (sl * BLOCK_H + hq + 4 * a) * BN + kq + KQ * k] = s[4 * a + k]
        cuda.syncthreads()  # all slices written
        for o in range(tid, BLOCK_H * BN, NT):
            tot = float32(0.0)
            for x in range(NSL):
                tot += smem[off_red + x * BLOCK_H * BN + o]
            smem[off_red + o] = tot * scale_log2  # slice 0 now holds S (log2 units)
        cuda.syncthreads()
        # ---- online softmax: BN lanes per row, 2 rows per warp
        for ps in range(2 * BN // 32):
            hrow = 2 * warp + ps * (32 // BN) + lane // BN
            key = lane % BN
            pos = tile0 + key
            lim = stop
            if s_q_rows_causal[hrow] < lim:
                lim = s_q_rows_causal[hrow]
            sv = smem[off_red + hrow * BN + key] if pos < lim else NEG_INF
            mt = sv
            off = BN // 2
            while off > 0:
                mt = max(mt, cuda.shfl_xor_sync(0xFFFFFFFF, mt, off))
                off //= 2
            m_old = smem[off_m + hrow]
            m_new = max(m_old, mt)
            if m_new == NEG_INF:
                alpha = float32(1.0)
                pv = float32(0.0)
            else:
                alpha = math.exp2(m_old - m_new)
                pv = math.exp2(sv - m_new) if pos < lim else float32(0.0)
            lt_sum = pv
            off = BN // 2
            while off > 0:
                lt_sum += cuda.shfl_xor_sync(0xFFFFFFFF, lt_sum, off)
                off //= 2
            smem[off_p + key * BLOCK_H + hrow] = pv
            if key == 0:
                smem[off_m + hrow] = m_new
                smem[off_m + BLOCK_H + hrow] = smem[off_m + BLOCK_H + hrow] * alpha + lt_sum
                smem[off_m + 2 * BLOCK_H + hrow] = alpha
        cuda.syncthreads()
        # ---- O = O * alpha + P V: 8 heads x 4 channels per quad
        hh = tid // (NT // 2)
        cq = tid % (NT // 2)
        for a in range(8):
            al = smem[off_m + 2 * BLOCK_H + 8 * hh + a]
            for u in range(CQ):
                for e in range(4):
                    acc[(u * 8 + a) * 4 + e] *= al
        for n in range(BN):
            p0, p1, p2, p3 = _ld4(smem, off_p + n * BLOCK_H + 8 * hh)
            p4, p5, p6, p7 = _ld4(smem, off_p + n * BLOCK_H + 8 * hh + 4)
            for u in range(CQ):
                c4 = cq + (NT // 2) * u
                if c4 < DV4:
                    v0, v1, v2, v3 = _ld4(smem, off_k + n * DP + 4 * c4)
                    b = u * 32
                    acc[b + 0] += p0 * v0
                    acc[b + 1] += p0 * v1
                    acc[b + 2] += p0 * v2
                    acc[b + 3] += p0 * v3
                    acc[b + 4] += p1 * v0
                    acc[b + 5] += p1 * v1
                    acc[b + 6] += p1 * v2
                    acc[b + 7] += p1 * v3
                    acc[b + 8] += p2 * v0
                    acc[b + 9] += p2 * v1
                    acc[b + 10] += p2 * v2
                    acc[b + 11] += p2 * v3
                    acc[b + 12] += p3 * v0
                    acc[b + 13] += p3 * v1
                    acc[b + 14] += p3 * v2
                    acc[b + 15] += p3 * v3
                    acc[b + 16] += p4 * v0
                    acc[b + 17] += p4 * v1
                    acc[b + 18] += p4 * v2
                    acc[b + 19] += p4 * v3
                    acc[b + 20] += p5 * v0
                    acc[b + 21] += p5 * v1
                    acc[b + 22] += p5 * v2
                    acc[b + 23] += p5 * v3
                    acc[b + 24] += p6 * v0
                    acc[b + 25] += p6 * v1
                    acc[b + 26] += p6 * v2
                    acc[b + 27] += p6 * v3
                    acc[b + 28] += p7 * v0
                    acc[b + 29] += p7 * v1
                    acc[b + 30] += p7 * v2
                    acc[b + 31] += p7 * v3

    @cuda.jit
    def mla_decode_tiled(q, kflat, block_table, seqlens, metadata, num_splits, o_part, lse_part,
                         scale_log2, causal, h_kv, page):
        """grid (h_kv * row_tiles, num_workers), block NT; dynamic shared SMEM_FLOATS f32.

        kflat: the cache as flat uint32 (bf16/fp16 pairs or fp32 bits)."""
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        w = cuda.blockIdx.y
        s_q, h_q = q.shape[1], q.shape[2]
        group = h_q // h_kv
        rows = s_q * group
        row_tiles = (rows + BLOCK_H - 1) // BLOCK_H
        g = cuda.blockIdx.x // row_tiles
        row0 = (cuda.blockIdx.x % row_tiles) * BLOCK_H
        smem = cuda.shared.array(0, float32)
        limits = cuda.shared.array(BLOCK_H, int32)
        acc = cuda.local.array(ACC_N, float32)
        pre = cuda.local.array(PRE_N, uint32)
        hh = tid // (NT // 2)
        cq = tid % (NT // 2)

        for i in range(metadata[w, 0], metadata[w, 2] + 1):
            start, stop, p = _piece(metadata, num_splits, seqlens, w, i)
            L = seqlens[i]
            # query tile -> sQ (fp32); padding rows are zeros; stats reset
            for x in range(tid, BLOCK_H * d, NT):
                hr = x // d
                c = x % d
                R = row0 + hr
                val = float32(0.0)
                if R < rows:
                    val = widen(q[i, R // group, g * group + R % group, c])
                smem[hr * DP + c] = val
            if tid < BLOCK_H:
                R = row0 + tid
                lim = stop
                if causal and R < rows:
                    lim = L - s_q + R // group + 1  # row r sees keys j <= L - s_q + r
                limits[tid] = lim
                smem[off_m + tid] = NEG_INF
                smem[off_m + BLOCK_H + tid] = 0.0
            for x in range(ACC_N):
                acc[x] = 0.0
            cuda.syncthreads()
            tile0 = start
            if prefetch:
                for k in range(CPT):
                    a = chunk_address(kflat, block_table, i, g, h_kv, page, tile0, stop, tid + k * NT)
                    if a >= 0 and tid + k * NT < BN * CPR:
                        pre[4 * k], pre[4 * k + 1], pre[4 * k + 2], pre[4 * k + 3] = _ld4(kflat, a)
                    else:
                        pre[4 * k] = pre[4 * k + 1] = pre[4 * k + 2] = pre[4 * k + 3] = uint32(0)
            while tile0 < stop:
                if prefetch:
                    # registers (loaded one tile ago) -> sK, then start loading the next tile
                    for k in range(CPT):
                        idx = tid + k * NT
                        if idx < BN * CPR:
                            widen_store(smem, off_k + (idx // CPR) * DP + (idx % CPR) * EPC,
                                        pre[4 * k], pre[4 * k + 1], pre[4 * k + 2], pre[4 * k + 3])
                    nxt = tile0 + BN
                    if nxt < stop:
                        for k in range(CPT):
                            a = chunk_address(kflat, block_table, i, g, h_kv, page, nxt, stop, tid + k * NT)
                            if a >= 0 and tid + k * NT < BN * CPR:
                                pre[4 * k], pre[4 * k + 1], pre[4 * k + 2], pre[4 * k + 3] = _ld4(kflat, a)
                            else:
                                pre[4 * k] = pre[4 * k + 1] = pre[4 * k + 2] = pre[4 * k + 3] = uint32(0)
                else:
                    load_tile(smem, kflat, block_table, i, g, h_kv, page, tile0, stop, tid)
                cuda.syncthreads()  # sK complete
                tile_math(smem, tid, lane, warp, tile0, stop, 0, limits, scale_log2, acc)
                cuda.syncthreads()  # sK, sP, red free for the next tile
                tile0 += BN
            # o = acc / l, lse = (m + log2 l) ln 2  (-inf for an empty row)
            for a in range(8):
                hr = 8 * hh + a
                R = row0 + hr
                if R < rows:
                    r = R // group
                    h = g * group + R % group
                    lsum = smem[off_m + BLOCK_H + hr]
                    inv = 1.0 / lsum if lsum > 0 else 0.0
                    for u in range(CQ):
                        c4 = cq + (NT // 2) * u
                        if c4 < DV4:
                            for e in range(4):
                                o_part[p, r, h, 4 * c4 + e] = acc[(u * 8 + a) * 4 + e] * inv
                    if cq == 0:
                        lse_part[p, r, h] = (smem[off_m + hr] + math.log2(lsum)) * LN2 if lsum > 0 else NEG_INF
            cuda.syncthreads()  # sQ and the stats are rewritten by the next sequence

    return mla_decode_tiled


# ----------------------------------------------------------------------------------------------
# version 4: tensor cores. One CTA (4 warps) per (16 query rows of one KV head, worker), like v2,
# but both products run on mma.sync (bf16/fp16 in, fp32 accumulate) and the pages arrive by
# cp.async, two tiles deep, straight into shared memory as 16-bit values (kernels/numba_ptx.py).
#
# Shared memory (16-bit elements; rows padded by 8 elements = 16 bytes, so the 8 row addresses of
# an ldmatrix fall in 8 different 4-bank groups):
#   sQ [16][DP]   sK [2][BN][DP]   sP [16][PP]          DP = d + 8, PP = BN + 8, BN = 64 keys
# S = Q K^T [16 x 64]: warp w owns keys 16w..16w+15 (two n-tiles of 8), d/16 k-steps.
# softmax: the tile max crosses warps through `red`; each thread keeps its own partial row sums l
#   (rescaled by the CTA-wide alpha, so they add up at the end); P -> sP as 16-bit.
# O += P V [16 x d_v]: warp w owns channels w*d_v/4 .. (w+1)*d_v/4 (d_v/32 n-tiles, fp32 registers);
#   V fragments by ldmatrix.trans from the same sK tile (V is the first d_v channels of K).

V4_WARPS = 4
V4_NT = 32 * V4_WARPS
V4_BH = 16
V4_BN = 64
V4_COMPILED_PAGES = (64,)


def v4_supported(d, d_v, kind, warps=V4_WARPS):
    """Shapes the tensor-core versions handle: 16-bit dtypes, d a multiple of 32, d_v a multiple of
    16 * warps (each warp owns d_v / warps output channels, loaded 16 at a time): 64 for v4's 4
    warps, 128 for v5/v6's 8. (d_v = 64 with 8 warps gave each warp 8 channels, none of which the
    P.V loop touched: out = 0 -- found by the GPU hypothesis run of 2026-11-26.)"""
    return kind in ("bf16", "f16") and d % 32 == 0 and d_v % (16 * warps) == 0 and d_v <= d


def version_warps(version):
    """Warps a CTA of a tensor-core version: v4 4, v5/v6 8."""
    return 4 if version == 4 else 8


def v4_shared_bytes(d):
    dp = d + 8
    return 2 * (V4_BH * dp + 2 * V4_BN * dp + 2 * V4_BH * (V4_BN + 8))


def _make_v4(kind, d, d_v, warps=V4_WARPS, page_const=0, flat_loader=False):
    from . import numba_ptx as ptx

    mma = ptx.MMA[kind]
    pack2 = ptx.PACK2[kind]
    ldsm = ptx.ldmatrix_x4
    ldsm_t = ptx.ldmatrix_x4_trans
    cp16 = ptx.cp_async_16
    DP = d + 8
    PP = V4_BN + 8
    BN = V4_BN
    CPR = d // 8  # 16-byte chunks per row
    WARPS = warps
    KW = BN // warps  # keys per warp in S = Q K^T: 16 (two n-tiles, 4 warps) or 8 (one n-tile, 8 warps)
    CH_W = d_v // warps  # output channels per warp
    NPAIRS = CH_W // 16  # ldmatrix.trans x4 loads two n-tiles of 8 channels
    if not v4_supported(d, d_v, kind, warps):
        raise ValueError(f"the tensor-core kernel with {warps} warps needs bf16/fp16, d % 32 == 0 and "
                         f"d_v % {16 * warps} == 0, got {kind}, d={d}, d_v={d_v}")
    ACC_N = CH_W // 8 * 4
    OFF_K = V4_BH * DP * 2  # byte offsets in shared memory
    STAGE = BN * DP * 2
    OFF_P = OFF_K + 2 * STAGE
    OFF_P_LO = OFF_P + V4_BH * PP * 2
    SPLIT_P = kind == "bf16"  # P = P_hi + P_lo: ~16 mantissa bits of P instead of 8 (see store_p)
    NT = 32 * warps
    PAGE = int(page_const)  # > 0: the page size compiled in (divisions become shifts); 0: read at run time
    FLAT = bool(flat_loader)  # v6: load_keys_flat instead of load_keys
    LANE_COPIES = -(-CPR // 32)  # 16-byte copies per lane per row in load_keys_flat (3 for d = 576)

    @cuda.jit(device=True, inline=True)
    def store_p(smem, at, x, y):
        """P pair (x, y) -> sP[at] as 16-bit; for bf16 also the rounding residual -> sP_lo[at]."""
        hi = pack2(x, y)
        smem[(OFF_P + at * 2) // 4] = hi
        if SPLIT_P:
            lo = pack2(x - _as_f32(hi << uint32(16)), y - _as_f32(hi & uint32(0xFFFF0000)))
            smem[(OFF_P_LO + at * 2) // 4] = lo

    @cuda.jit(device=True, inline=True)
    def load_keys(dst, k_cache, block_table, i, g, h_kv, page, tile0, stop, warp, lane):
        """cp.async the key tile at positions tile0.. into shared memory at dst: warp w copies rows
        16w..16w+15, one block-table lookup per row, its 32 lanes along the row (coalesced).
        Rows at or past stop are zero-filled, never read (they may hold NaN)."""
        for rr in range(KW):
            row = KW * warp + rr
            pos = tile0 + row
            src = 0
            nbytes = uint32(0)
            if pos < stop:
                blk = block_table[i, pos // page]  # one lookup per row (page is a run-time value)
                src = ((blk * page + pos % page) * h_kv + g) * d
                nbytes = uint32(16)
            for cc in range(lane, CPR, 32):
                cp16(dst + uint32(row * DP * 2 + cc * 16), k_cache, src + cc * 8, nbytes)

    @cuda.jit(device=True, inline=True)
    def load_keys_flat(dst, k_cache, block_table, i, g, h_kv, page, tile0, stop, warp, lane):
        """v6's loader, same result as load_keys. load_keys walks its KW rows one after another,
        each waiting for its block-table read before its copies issue (SASS: ~230 instructions
        and one dependent global load per row, ~1.8k instructions per warp per tile, more than
        the mma work). Here lanes 0..KW-1 read the KW rows' blocks at once; then, row by row
        (constant loops the compiler unrolls), the row's offset comes from its lane by shuffle
        and the 32 lanes copy its CPR 16-byte chunks."""
        row0 = KW * warp
        my_src = int64(0)  # element offset of row row0 + lane in k_cache (lanes < KW)
        if lane < KW and tile0 + row0 + lane < stop:
            pos = tile0 + row0 + lane
            blk = block_table[i, pos // page]
            my_src = ((int64(blk) * page + pos % page) * h_kv + g) * d
        for rr in range(KW):
            src = cuda.shfl_sync(0xFFFFFFFF, my_src, rr)
            nbytes = uint32(16) if tile0 + row0 + rr < stop else uint32(0)
            row_dst = dst + uint32((row0 + rr) * DP * 2)
            for t in range(LANE_COPIES):
                col = lane + 32 * t
                if col < CPR:
                    cp16(row_dst + uint32(col * 16), k_cache, src + col * 8, nbytes)

    @cuda.jit(device=True, inline=True)
    def load_tile(dst, k_cache, block_table, i, g, h_kv, page, tile0, stop, warp, lane):
        if FLAT:
            load_keys_flat(dst, k_cache, block_table, i, g, h_kv, page, tile0, stop, warp, lane)
        else:
            load_keys(dst, k_cache, block_table, i, g, h_kv, page, tile0, stop, warp, lane)

    @cuda.jit
    def mla_decode_v4(q, k_cache, block_table, seqlens, metadata, num_splits, o_part, lse_part,
                      scale_log2, causal, qk_steps, pv_steps):
        """grid (h_kv * row_tiles, num_workers), block 128; dynamic shared v4_shared_bytes(d).

        q [b, s_q, h_q, d], k_cache [blocks, page, h_kv, d]: 16-bit, C-contiguous (bf16 as uint16).
        qk_steps = d / 16 and pv_steps = 64 / 16 come in at run time on purpose: with constant
        bounds NVVM unrolls those loops completely, hoists every ldmatrix and spills registers."""
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        gid = lane // 4  # fragment row
        tig = lane % 4  # fragment column pair
        w = cuda.blockIdx.y
        s_q, h_q = q.shape[1], q.shape[2]
        page = PAGE if PAGE > 0 else k_cache.shape[1]
        h_kv = k_cache.shape[2]
        group = h_q // h_kv
        rows = s_q * group
        row_tiles = (rows + V4_BH - 1) // V4_BH
        g = cuda.blockIdx.x // row_tiles
        row0 = (cuda.blockIdx.x % row_tiles) * V4_BH
        smem = cuda.shared.array(0, uint32)
        red = cuda.shared.array(128, float32)  # [warp][row]
        base = ptx.shared_address(smem)
        acc = cuda.local.array(ACC_N, float32)
        # ldmatrix lane roles: A tiles (sQ, sP) and the K tile of the scores, V tile of P.V
        a_row = lane % 8 + 8 * ((lane // 8) % 2)
        a_col = 8 * (lane // 16)
        if KW == 16:  # x4 = (n-tile 0, k 0-7), (n-tile 0, k 8-15), (n-tile 1, k 0-7), (n-tile 1, k 8-15)
            kb_key = 16 * warp + lane % 8 + 8 * (lane // 16)
            kb_col = 8 * ((lane // 8) % 2)
        else:  # x4 = one n-tile, k 0-7, 8-15, 16-23, 24-31: two k-steps
            kb_key = 8 * warp + lane % 8
            kb_col = 8 * (lane // 8)
        v_key = lane % 8 + 8 * ((lane // 8) % 2)
        v_ch = CH_W * warp + 8 * (lane // 16)
        ninf = float32(NEG_INF)  # keep the softmax in fp32 (a Python float would promote to fp64)
        one = float32(1.0)
        zero = float32(0.0)

        for i in range(metadata[w, 0], metadata[w, 2] + 1):
            start, stop, p = _piece(metadata, num_splits, seqlens, w, i)
            L = seqlens[i]
            # the rows this thread's fragments hold (gid, gid + 8): their last visible key + 1
            lim0 = 0
            lim1 = 0
            R = row0 + gid
            if R < rows:
                lim0 = stop
                if causal:
                    lim0 = min(stop, L - s_q + R // group + 1)  # row r sees j <= L - s_q + r
            R = row0 + gid + 8
            if R < rows:
                lim1 = stop
                if causal:
                    lim1 = min(stop, L - s_q + R // group + 1)
            m0 = ninf
            m1 = ninf
            l0 = float32(0.0)
            l1 = float32(0.0)
            for x in range(ACC_N):
                acc[x] = 0.0
            # query tile (rows past `rows` are zero-filled) and the first key tile, asynchronously
            if start < stop:
                for c in range(tid, V4_BH * CPR, NT):
                    hr = c // CPR
                    R = row0 + hr
                    src = 0
                    nbytes = 0
                    if R < rows:
                        src = ((i * s_q + R // group) * h_q + g * group + R % group) * d + (c % CPR) * 8
                        nbytes = 16
                    cp16(base + uint32(hr * DP * 2 + (c % CPR) * 16), q, src, uint32(nbytes))
                load_tile(base + uint32(OFF_K), k_cache, block_table, i, g, h_kv, page, start, stop, warp, lane)
            stage = 0
            tile0 = start
            while tile0 < stop:
                ptx.cp_async_wait_all()
                cuda.syncthreads()  # tile `stage` is in sK for everyone; the other stage is free
                nxt = tile0 + BN
                if nxt < stop:  # next tile into the other stage while this one is computed
                    load_tile(base + uint32(OFF_K + (1 - stage) * STAGE), k_cache, block_table, i, g, h_kv, page,
                              nxt, stop, warp, lane)
                    ptx.cp_async_commit()
                sk = base + uint32(OFF_K + stage * STAGE)
                # ---- S = Q K^T for this warp's 16 keys: two n-tiles, d/16 k-steps
                # two k-steps per iteration into two accumulator sets: half the mma dependency chain
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
                t00 = t01 = t02 = t03 = t10 = t11 = t12 = t13 = zero
                for ks in range(0, qk_steps if KW == 8 else 0, 2):
                    a0, a1, a2, a3 = ldsm(base + uint32((a_row * DP + 16 * ks + a_col) * 2))
                    e0, e1, e2, e3 = ldsm(base + uint32((a_row * DP + 16 * ks + 16 + a_col) * 2))
                    b0, b1, b2, b3 = ldsm(sk + uint32((kb_key * DP + 16 * ks + kb_col) * 2))
                    s00, s01, s02, s03 = mma(a0, a1, a2, a3, b0, b1, s00, s01, s02, s03)
                    t00, t01, t02, t03 = mma(e0, e1, e2, e3, b2, b3, t00, t01, t02, t03)
                for ks in range(0, qk_steps if KW == 16 else 0, 2):
                    a0, a1, a2, a3 = ldsm(base + uint32((a_row * DP + 16 * ks + a_col) * 2))
                    b0, b1, b2, b3 = ldsm(sk + uint32((kb_key * DP + 16 * ks + kb_col) * 2))
                    e0, e1, e2, e3 = ldsm(base + uint32((a_row * DP + 16 * ks + 16 + a_col) * 2))
                    f0, f1, f2, f3 = ldsm(sk + uint32((kb_key * DP + 16 * ks + 16 + kb_col) * 2))
                    s00, s01, s02, s03 = mma(a0, a1, a2, a3, b0, b1, s00, s01, s02, s03)
                    s10, s11, s12, s13 = mma(a0, a1, a2, a3, b2, b3, s10, s11, s12, s13)
                    t00, t01, t02, t03 = mma(e0, e1, e2, e3, f0, f1, t00, t01, t02, t03)
                    t10, t11, t12, t13 = mma(e0, e1, e2, e3, f2, f3, t10, t11, t12, t13)
                s00 += t00
                s01 += t01
                s02 += t02
                s03 += t03
                s10 += t10
                s11 += t11
                s12 += t12
                s13 += t13
                # ---- online softmax (log2 units); keys past a row's limit are -inf
                kpos = tile0 + KW * warp + 2 * tig
                v00 = s00 * scale_log2 if kpos < lim0 else ninf
                v01 = s01 * scale_log2 if kpos + 1 < lim0 else ninf
                v10 = s10 * scale_log2 if KW == 16 and kpos + 8 < lim0 else ninf
                v11 = s11 * scale_log2 if KW == 16 and kpos + 9 < lim0 else ninf
                v02 = s02 * scale_log2 if kpos < lim1 else ninf
                v03 = s03 * scale_log2 if kpos + 1 < lim1 else ninf
                v12 = s12 * scale_log2 if KW == 16 and kpos + 8 < lim1 else ninf
                v13 = s13 * scale_log2 if KW == 16 and kpos + 9 < lim1 else ninf
                t0 = max(max(v00, v01), max(v10, v11))
                t1 = max(max(v02, v03), max(v12, v13))
                t0 = max(t0, cuda.shfl_xor_sync(0xFFFFFFFF, t0, 1))
                t0 = max(t0, cuda.shfl_xor_sync(0xFFFFFFFF, t0, 2))
                t1 = max(t1, cuda.shfl_xor_sync(0xFFFFFFFF, t1, 1))
                t1 = max(t1, cuda.shfl_xor_sync(0xFFFFFFFF, t1, 2))
                if tig == 0:
                    red[warp * 16 + gid] = t0
                    red[warp * 16 + gid + 8] = t1
                cuda.syncthreads()
                n0 = m0
                n1 = m1
                for x in range(WARPS):
                    n0 = max(n0, red[x * 16 + gid])
                    n1 = max(n1, red[x * 16 + gid + 8])
                al0 = one
                al1 = one
                if n0 != ninf:
                    al0 = math.exp2(m0 - n0)
                    v00 = math.exp2(v00 - n0)
                    v01 = math.exp2(v01 - n0)
                    v10 = math.exp2(v10 - n0)
                    v11 = math.exp2(v11 - n0)
                else:
                    v00 = v01 = v10 = v11 = zero
                if n1 != ninf:
                    al1 = math.exp2(m1 - n1)
                    v02 = math.exp2(v02 - n1)
                    v03 = math.exp2(v03 - n1)
                    v12 = math.exp2(v12 - n1)
                    v13 = math.exp2(v13 - n1)
                else:
                    v02 = v03 = v12 = v13 = zero
                m0 = n0
                m1 = n1
                l0 = l0 * al0 + (v00 + v01 + v10 + v11)
                l1 = l1 * al1 + (v02 + v03 + v12 + v13)
                # P (16-bit) -> sP[row][key]: the fragment's pairs are adjacent keys
                pk = KW * warp + 2 * tig
                store_p(smem, gid * PP + pk, v00, v01)
                store_p(smem, (gid + 8) * PP + pk, v02, v03)
                if KW == 16:
                    store_p(smem, gid * PP + pk + 8, v10, v11)
                    store_p(smem, (gid + 8) * PP + pk + 8, v12, v13)
                for x in range(ACC_N // 4):
                    acc[4 * x] *= al0
                    acc[4 * x + 1] *= al0
                    acc[4 * x + 2] *= al1
                    acc[4 * x + 3] *= al1
                cuda.syncthreads()  # sP complete; red may be rewritten
                # ---- O += P V: 4 k-steps of 16 keys, this warp's d_v/4 channels
                for kk in range(pv_steps):
                    a0, a1, a2, a3 = ldsm(base + uint32(OFF_P + (a_row * PP + 16 * kk + a_col) * 2))
                    if SPLIT_P:
                        e0, e1, e2, e3 = ldsm(base + uint32(OFF_P_LO + (a_row * PP + 16 * kk + a_col) * 2))
                    for pr in range(NPAIRS):
                        b0, b1, b2, b3 = ldsm_t(sk + uint32(((16 * kk + v_key) * DP + v_ch + 16 * pr) * 2))
                        x = 8 * pr
                        acc[x], acc[x + 1], acc[x + 2], acc[x + 3] = mma(
                            a0, a1, a2, a3, b0, b1, acc[x], acc[x + 1], acc[x + 2], acc[x + 3])
                        acc[x + 4], acc[x + 5], acc[x + 6], acc[x + 7] = mma(
                            a0, a1, a2, a3, b2, b3, acc[x + 4], acc[x + 5], acc[x + 6], acc[x + 7])
                        if SPLIT_P:
                            acc[x], acc[x + 1], acc[x + 2], acc[x + 3] = mma(
                                e0, e1, e2, e3, b0, b1, acc[x], acc[x + 1], acc[x + 2], acc[x + 3])
                            acc[x + 4], acc[x + 5], acc[x + 6], acc[x + 7] = mma(
                                e0, e1, e2, e3, b2, b3, acc[x + 4], acc[x + 5], acc[x + 6], acc[x + 7])
                stage = 1 - stage
                tile0 = nxt
            # ---- finish: l summed over the quad and the warps; o = acc / l; lse = (m + log2 l) ln 2
            l0 += cuda.shfl_xor_sync(0xFFFFFFFF, l0, 1)
            l0 += cuda.shfl_xor_sync(0xFFFFFFFF, l0, 2)
            l1 += cuda.shfl_xor_sync(0xFFFFFFFF, l1, 1)
            l1 += cuda.shfl_xor_sync(0xFFFFFFFF, l1, 2)
            cuda.syncthreads()  # the last tile's readers of red are done
            if tig == 0:
                red[warp * 16 + gid] = l0
                red[warp * 16 + gid + 8] = l1
            cuda.syncthreads()
            l0 = float32(0.0)
            l1 = float32(0.0)
            for x in range(WARPS):
                l0 += red[x * 16 + gid]
                l1 += red[x * 16 + gid + 8]
            inv0 = one / l0 if l0 > 0 else zero
            inv1 = one / l1 if l1 > 0 else zero
            R = row0 + gid
            if R < rows:
                r = R // group
                h = g * group + R % group
                for nt in range(ACC_N // 4):
                    ch = CH_W * warp + 8 * nt + 2 * tig
                    o_part[p, r, h, ch] = acc[4 * nt] * inv0
                    o_part[p, r, h, ch + 1] = acc[4 * nt + 1] * inv0
                if warp == 0 and tig == 0:
                    lse_part[p, r, h] = (m0 + math.log2(l0)) * LN2 if l0 > 0 else ninf
            R = row0 + gid + 8
            if R < rows:
                r = R // group
                h = g * group + R % group
                for nt in range(ACC_N // 4):
                    ch = CH_W * warp + 8 * nt + 2 * tig
                    o_part[p, r, h, ch] = acc[4 * nt + 2] * inv1
                    o_part[p, r, h, ch + 1] = acc[4 * nt + 3] * inv1
                if warp == 0 and tig == 0:
                    lse_part[p, r, h] = (m1 + math.log2(l1)) * LN2 if l1 > 0 else ninf
            cuda.syncthreads()  # red and sQ are rewritten by the next sequence

    return mla_decode_v4


# ----------------------------------------------------------------------------------------------
# combine: merge each sequence's partials by their lse (the reference's combine_splits).


@cuda.jit(device=True, inline=True)
def split_weights(lse_part, lo, hi, r, h):
    """(m, total) of row (r, h) over its partials lo .. hi - 1: m = max_s lse_s, total = sum_s exp(lse_s - m)
    (empty partials, lse -inf, skipped; total 0 when all are empty). Shared by the combine kernels."""
    m = NEG_INF
    for sp in range(lo, hi):
        m = max(m, lse_part[sp, r, h])
    total = float32(0.0)
    if m != NEG_INF:
        for sp in range(lo, hi):
            ls = lse_part[sp, r, h]
            if ls != NEG_INF:
                total += math.exp(ls - m)
    return m, total


@cuda.jit(device=True, inline=True)
def combine_row(out):
    """(i, r, h) of the output row this CTA merges: grid b * s_q * h_q, out [b, s_q, h_q, d_v]."""
    x = cuda.blockIdx.x
    s_q, h_q = out.shape[1], out.shape[2]
    return x // (s_q * h_q), (x // h_q) % s_q, x % h_q


@cuda.jit(device=True, inline=True)
def merged_channel(o_part, lse_part, lo, hi, r, h, c, m, weight):
    """sum_s exp(lse_s - m) * weight * o_s[c] over the row's non-empty partials (an empty split's o_s
    may hold anything)."""
    o = float32(0.0)
    for sp in range(lo, hi):
        ls = lse_part[sp, r, h]
        if ls != NEG_INF:
            o += math.exp(ls - m) * weight * o_part[sp, r, h, c]
    return o


def _make_combine(kind):
    narrow = _NARROW[kind]

    @cuda.jit
    def mla_combine(o_part, lse_part, num_splits, out, lse):
        """grid (b * s_q * h_q), block NT. out [b, s_q, h_q, d_v]; lse [b, h_q, s_q]."""
        tid = cuda.threadIdx.x
        i, r, h = combine_row(out)
        lo = num_splits[i]
        hi = num_splits[i + 1]
        m, total = split_weights(lse_part, lo, hi, r, h)
        inv = 1.0 / total if total > 0 else 0.0
        for c in range(tid, out.shape[3], cuda.blockDim.x):
            o = merged_channel(o_part, lse_part, lo, hi, r, h, c, m, inv) if total > 0 else float32(0.0)
            out[i, r, h, c] = narrow(o)
        if tid == 0:
            lse[i, h, r] = m + math.log(total) if total > 0 else math.inf

    return mla_combine


# ----------------------------------------------------------------------------------------------
# launchers (arrays are Numba device arrays, or host arrays under the simulator)

_KERNELS: dict = {}


def _kernel(key, make):
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = make()
    return k


def configured(launchers: dict, kernel, grid, block, stream, smem):
    """``kernel[grid, block, stream, smem]``, configured once per stream (``launchers`` caches them by
    stream handle). A configured launcher keeps its stream: caching only the first one would put every
    later call on the first call's stream, off the caller's current stream (a race with the caller's
    stream order, and launches missing from a CUDA graph being captured on another stream)."""
    key = stream if isinstance(stream, int) else int(stream)  # numba Stream.__int__: its handle
    got = launchers.get(key)
    if got is None:
        got = launchers[key] = kernel[grid, block, stream, smem]
    return got


def default_block_n() -> int:
    """Keys per tile of the tiled versions (env MLA_NUMBA_BLOCK_N: 16 or 32)."""
    return int(os.environ.get("MLA_NUMBA_BLOCK_N", "16"))


class DecodeLaunch:
    """One decode version compiled for one problem shape, with its launch geometry (cached by the
    backend so that a decode step costs no re-dispatch)."""

    def __init__(self, version, kind, s_q, h_q, h_kv, d, d_v, page, num_workers, block_n=None,
                 threads=None):
        self.version, self.kind, self.page, self.h_kv = version, kind, int(page), int(h_kv)
        if version == 1:
            nt = threads or (8 if SIMULATOR else 128)
            self.kernel = _kernel(("v1", kind), lambda: _make_v1(kind))
            self.grid = (num_workers, s_q * h_q)
            self.block = nt
            self.smem = (d + d_v + nt) * 4
        elif version in (2, 3):
            if not tiled_supported(d, d_v, kind):
                raise ValueError(f"v{version} needs d * itemsize % 16 == 0 and d_v % 4 == 0, got d={d}, "
                                 f"d_v={d_v}")
            bn = int(block_n or default_block_n())
            if bn not in (16, 32):
                raise ValueError(f"block_n must be 16 or 32, got {bn}")
            prefetch = version == 3
            self.kernel = _kernel(("tiled", kind, d, d_v, bn, prefetch),
                                  lambda: _make_tiled(kind, d, d_v, bn, prefetch))
            rows = s_q * (h_q // h_kv)
            self.grid = (h_kv * -(-rows // BLOCK_H), num_workers)
            self.block = NT
            self.smem = _tiled_geometry(d, d_v, bn, kind)["SMEM_FLOATS"] * 4
        elif version in TENSOR_CORE_VERSIONS:
            warps = version_warps(version)
            if not v4_supported(d, d_v, kind, warps):
                raise ValueError(f"v{version} needs bf16/fp16, d % 32 == 0 and d_v % {16 * warps} == 0, got {kind}, "
                                 f"d={d}, d_v={d_v}")
            flat = version == 6
            # DeepSeek's page size is compiled in (measured: 1.21 ms vs 1.92 ms for v4 with a run-time
            # page on b=128, h_q=16, s_k=8192); other page sizes share one kernel with a run-time page
            page_const = int(page) if int(page) in V4_COMPILED_PAGES else 0
            self.kernel = _kernel(("v4", kind, d, d_v, warps, page_const, flat),
                                  lambda: _make_v4(kind, d, d_v, warps, page_const, flat))
            rows = s_q * (h_q // h_kv)
            self.grid = (h_kv * -(-rows // V4_BH), num_workers)
            self.block = 32 * warps
            self.smem = v4_shared_bytes(d)
        else:
            raise ValueError(f"unknown version {version}; versions are {VERSIONS}")
        self._launchers: dict = {}

    def args(self, q, k_cache, k_u32, block_table, seqlens, metadata, num_splits, o_part, lse_part,
             scale, causal):
        if self.version == 1:
            return (q, k_cache, block_table, seqlens, metadata, num_splits, o_part, lse_part,
                    float32(scale), bool(causal))
        if self.version in TENSOR_CORE_VERSIONS:
            return (q, k_cache, block_table, seqlens, metadata, num_splits, o_part, lse_part,
                    float32(scale * LOG2E), bool(causal), int32(q.shape[3] // 16), int32(V4_BN // 16))
        return (q, k_u32, block_table, seqlens, metadata, num_splits, o_part, lse_part,
                float32(scale * LOG2E), bool(causal), int32(self.h_kv), int32(self.page))

    def __call__(self, *arrays, stream=0):
        """arrays: q, k_cache (typed), k_u32 (flat uint32 view; tiled versions), block_table,
        seqlens, metadata, num_splits, o_part, lse_part, scale, causal."""
        args = self.args(*arrays)
        if not self._launchers and self.smem > 48 * 1024 and not SIMULATOR:
            self._opt_in_shared(args)
        configured(self._launchers, self.kernel, self.grid, self.block, stream, self.smem)(*args)

    def _opt_in_shared(self, args):
        """Kernels may use > 48 KB of dynamic shared memory (up to 227 KB on an H100) only after
        cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES); Numba has no option for it, so compile
        first and set the attribute on the compiled function (as Numba's own carveout setter does)."""
        from numba import typeof
        from numba.cuda.cudadrv import driver as _driver
        from numba.cuda.cudadrv.driver import binding

        sig = tuple(typeof(a) for a in args)
        self.kernel.compile(sig)
        attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        for overload in self.kernel.overloads.values():
            cufunc = overload._codelibrary.get_cufunc()
            _driver.driver.cuKernelSetAttribute(attr, int(self.smem), cufunc.handle, cufunc.device.id)


class CombineLaunch:
    """The combine kernel with its geometry (one CTA per output row)."""

    def __init__(self, kind, b, s_q, h_q, threads=None):
        self.kernel = _kernel(("combine", kind), lambda: _make_combine(kind))
        self.grid = max(b * s_q * h_q, 1)
        self.block = threads or (8 if SIMULATOR else 128)
        self._launchers: dict = {}

    def __call__(self, o_part, lse_part, num_splits, out, lse, stream=0):
        launch = configured(self._launchers, self.kernel, self.grid, self.block, stream, 0)
        launch(o_part, lse_part, num_splits, out, lse)


# ----------------------------------------------------------------------------------------------
# python -m mla.kernels.numba_decode: check every version against the reference, then time them


def main():
    import time

    import mla
    from mla import reference, testing
    from mla.backends import numba_backend  # noqa: F401  (the backend the API dispatches to)

    rng = numpy.random.default_rng(0)
    small = dict(b=3, s_q=2, h_q=16, h_kv=1, d=576, head_dim_v=512, page_block_size=64, seqlens=[0, 100, 700],
                 dtype="bfloat16", causal=True)
    if SIMULATOR:
        small = dict(b=2, s_q=1, h_q=2, h_kv=1, d=16, head_dim_v=8, page_block_size=8, seqlens=[5, 20],
                     dtype="float16")
    case = testing.make_decode_case(rng, **small)
    ref_out, ref_lse = reference.flash_mla_reference(*case.args(), causal=case.causal)
    versions = (1,) if SIMULATOR else VERSIONS
    for version in versions:
        os.environ["MLA_NUMBA_VERSION"] = str(version)
        out, lse = mla.flash_mla_with_kvcache(*case.args(), causal=case.causal, backend="numba")
        testing.assert_close(out, lse, ref_out, ref_lse)
        print(f"v{version}: matches the reference")
    if SIMULATOR:
        return
    import cupy as cp

    b, s_k = 128, 8192
    dev = testing.to_device(testing.make_decode_case(rng, b=b, s_q=1, h_q=16, h_kv=1, d=576, head_dim_v=512,
                                                     page_block_size=64, seqlens=[s_k] * b, dtype="bfloat16"))
    sched, splits = mla.get_mla_metadata(dev.cache_seqlens, 16, 1)
    nbytes = b * (16 * 576 * 2 + s_k * 576 * 2 + 16 * 512 * 2)
    for version in versions:
        os.environ["MLA_NUMBA_VERSION"] = str(version)
        run = lambda: mla.flash_mla_with_kvcache(*dev.args(), sched, splits, backend="numba",  # noqa: E731
                                                 validate=False)
        run()
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(3 if version == 1 else 20):
            t0 = time.perf_counter()
            run()
            cp.cuda.Device().synchronize()
            times.append(time.perf_counter() - t0)
        ms = 1e3 * float(numpy.median(times))
        print(f"v{version}: b={b} h_q=16 s_k={s_k} bf16: {ms:.3f} ms, {nbytes / ms / 1e6:.0f} GB/s")
    os.environ.pop("MLA_NUMBA_VERSION", None)


if __name__ == "__main__":
    main()
