"""Random decode problems for tests, benchmarks and notebooks (FlashMLA's test style).

Every case is *poisoned*: cache slots past each sequence's length and every unused block hold
NaN, block-table entries past the used pages hold garbage (huge and negative ids), and the
physical blocks are shuffled, so a kernel that reads anything it should not shows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from . import _arrays
from .fp8 import quantize_kv_fp8

__all__ = ["DecodeCase", "make_decode_case", "make_sparse_indices", "unused_positions", "poison_sparse_tail",
           "to_device", "assert_close", "out_atol", "run_compute_sanitizer"]

# DESIGN.md §6 (FlashMLA's test tolerances). FlashMLA's tests draw q from clip(N(0, 1), -1, 1) and the cache from
# clip(N(0, 0.1^2), -1, 1) (``values="flashmla"``): its absolute out tolerance is meant for cache values of that size.
OUT_ATOL, OUT_RTOL = 8e-4, 2.01 / 128
LSE_ATOL, LSE_RTOL = 1e-6, 8.01 / 65536
FLASHMLA_VALUE_STD = 0.1


def out_atol(case) -> float:
    """The absolute out tolerance for a kernel that rounds bf16 P once (FlashMLA's numerics: the Hopper kernels'
    default) on ``case``: DESIGN §6's 8e-4 scaled to the case's cache values (``case.value_std``) when q is
    bfloat16 -- 8e-4 for FlashMLA's inputs (standard deviation 0.1), 8e-3 for this module's default unit-normal
    ones. An absolute error of out = P V grows with V, so FlashMLA's 8e-4 on ten times larger values would be a ten
    times stricter test than the one FlashMLA's own kernels pass. float16 / float32 q (P in fp16 or fp32) keep the
    unscaled 8e-4, and so do the kernels that split bf16 P (portable, Numba): their tests use ``OUT_ATOL``
    (docs/decisions.md, 2026-11-26 ninth session)."""
    if np.dtype(case.q.dtype) != _arrays.BFLOAT16:
        return OUT_ATOL
    return OUT_ATOL * max(1.0, float(case.value_std) / FLASHMLA_VALUE_STD)


@dataclass
class DecodeCase:
    """One decode problem: the arguments of ``mla.flash_mla_with_kvcache`` (shapes as there:
    q [b, s_q, h_q, d], k_cache [num_blocks, page, h_kv, d] or uint8 [..., 656], block_table int32
    [b, max_blocks], cache_seqlens int32 [b], indices int32 [b, s_q, topk] in sparse mode)."""

    q: np.ndarray
    k_cache: np.ndarray
    block_table: np.ndarray
    cache_seqlens: np.ndarray
    head_dim_v: int
    causal: bool = False
    is_fp8_kvcache: bool = False
    indices: np.ndarray | None = None
    topk_length: np.ndarray | None = None
    attn_sink: np.ndarray | None = None
    value_std: float = 1.0  # standard deviation of the cache values before clipping / rounding (``out_atol``)

    def args(self):
        return (self.q, self.k_cache, self.block_table, self.cache_seqlens, self.head_dim_v)

    def kwargs(self):
        kw = dict(causal=self.causal, is_fp8_kvcache=self.is_fp8_kvcache)
        if self.indices is not None:
            kw.update(indices=self.indices, topk_length=self.topk_length, attn_sink=self.attn_sink)
        return kw


def make_decode_case(
    rng: np.random.Generator,
    b: int = 2,
    s_q: int = 1,
    h_q: int = 4,
    h_kv: int = 1,
    d: int = 64,
    head_dim_v: int = 48,
    page_block_size: int = 16,
    seqlens=None,
    max_seqlen: int = 100,
    dtype=np.float32,
    causal: bool = False,
    fp8: bool = False,
    spare_blocks: int = 3,
    extra_table_cols: int = 2,
    scale: float = 1.0,
    values: str = "normal",
) -> DecodeCase:
    """A random paged decode problem, poisoned everywhere a kernel must not look.

    seqlens: explicit lengths [b] (zeros allowed), else uniform in [0, max_seqlen].
    fp8: build the cache in the 656-byte FP8 layout (then d must be 576 and head_dim_v 512).
    values: "normal" (q and cache N(0, scale^2): scores of standard deviation ~scale^2, a sharp softmax) or
    "flashmla" (FlashMLA's test inputs: q clip(N(0, 1), -1, 1), cache clip(N(0, 0.1^2), -1, 1); scale ignored).
    The case's ``value_std`` says which (``out_atol``).
    """
    if values not in ("normal", "flashmla"):
        raise ValueError(f"values must be 'normal' or 'flashmla', got {values!r}")
    flashmla = values == "flashmla"
    dtype = _arrays.resolve_dtype(dtype)
    if seqlens is None:
        seqlens = rng.integers(0, max_seqlen + 1, size=b)
    seqlens = np.asarray(seqlens, dtype=np.int32).reshape(b)
    pages = -(-seqlens // page_block_size)
    max_pages = int(pages.max(initial=0)) + extra_table_cols
    num_blocks = int(pages.sum()) + spare_blocks
    num_blocks = max(num_blocks, 1)
    physical = rng.permutation(num_blocks).astype(np.int32)

    block_table = rng.integers(num_blocks, 2**30, size=(b, max(max_pages, 1))).astype(np.int32)
    block_table[rng.random(block_table.shape) < 0.5] = -12345  # garbage past the used pages
    cache = np.full((num_blocks, page_block_size, h_kv, d), np.nan, dtype=np.float32)
    next_block = 0
    for i in range(b):
        for j in range(int(pages[i])):
            blk = physical[next_block]
            next_block += 1
            block_table[i, j] = blk
            n = min(page_block_size, int(seqlens[i]) - j * page_block_size)
            kv = rng.standard_normal((n, h_kv, d))
            cache[blk, :n] = np.clip(kv * FLASHMLA_VALUE_STD, -1, 1) if flashmla else kv * scale
    q = rng.standard_normal((b, s_q, h_q, d))
    q = (np.clip(q, -1, 1) if flashmla else q * scale).astype(np.float32)

    case = DecodeCase(q=q.astype(dtype), k_cache=None, block_table=block_table, cache_seqlens=seqlens,
                      head_dim_v=head_dim_v, causal=causal,
                      value_std=FLASHMLA_VALUE_STD if flashmla else abs(float(scale)))
    if fp8:
        if d != 576 or head_dim_v != 512:
            raise ValueError("fp8 cases need d = 576 and head_dim_v = 512")
        finite = np.nan_to_num(cache, nan=0.0)
        k8 = quantize_kv_fp8(finite)
        k8[np.isnan(cache[..., 0])] = 0xFF  # poison unused slots again (0xFF bytes decode to NaN)
        case.k_cache, case.is_fp8_kvcache = k8, True
    else:
        case.k_cache = cache.astype(dtype)
    return case


def make_sparse_indices(rng, case: DecodeCase, topk: int, invalid_ratio: float = 0.0, s_q: int | None = None):
    """indices int32 [b, s_q, topk]: random valid token positions of each sequence (physical
    block * page + offset), a fraction set to -1. Rows of a zero-length sequence are all -1."""
    b = case.q.shape[0]
    s_q = case.q.shape[1] if s_q is None else s_q
    page = case.k_cache.shape[1]
    out = np.full((b, s_q, topk), -1, dtype=np.int32)
    for i in range(b):
        L = int(case.cache_seqlens[i])
        if L == 0:
            continue
        for r in range(s_q):
            pos = rng.integers(0, L, size=topk)
            phys = case.block_table[i, pos // page].astype(np.int64) * page + pos % page
            keep = rng.random(topk) >= invalid_ratio
            out[i, r] = np.where(keep, phys, -1)
    return out


def unused_positions(case: DecodeCase) -> np.ndarray:
    """Token positions, int32 [n_free_blocks * page] (physical block * page + offset), of every block that
    no sequence of the case uses: ``make_decode_case`` fills them with NaN (0xFF bytes in an FP8 cache)."""
    page = case.k_cache.shape[1]
    used = set()
    for i, L in enumerate(case.cache_seqlens):
        used.update(int(x) for x in case.block_table[i, : -(-int(L) // page)])
    free = [blk for blk in range(case.k_cache.shape[0]) if blk not in used]
    return np.array([blk * page + o for blk in free for o in range(page)], np.int32)


def poison_sparse_tail(rng, case: DecodeCase) -> None:
    """Point the index-list entries past each sequence's ``topk_length`` (``case.indices`` int32
    [b, s_q, topk], ``case.topk_length`` int32 [b]; in place) at random ``unused_positions``: a kernel
    that reads past topk_length then gives NaN. Raises ValueError when the case has no unused block
    (spare_blocks=0)."""
    free = unused_positions(case)
    if not free.size:
        raise ValueError("no unused slots to point at")
    for i in range(case.q.shape[0]):
        tail = case.indices[i, :, case.topk_length[i]:]
        tail[...] = rng.choice(free, size=tail.shape)


def to_device(case: DecodeCase) -> DecodeCase:
    """A copy of the case with every array on the GPU (CuPy)."""
    cp = _arrays.cupy_module()
    moved = {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in vars(case).items()}
    return DecodeCase(**moved)


def assert_close(out, lse, out_ref, lse_ref, out_atol=OUT_ATOL, out_rtol=OUT_RTOL, lse_atol=LSE_ATOL,
                 lse_rtol=LSE_RTOL):
    """FlashMLA-style comparison: inf/NaN positions must match exactly, then abs + rel tolerances."""
    out = _arrays.asnumpy(out).astype(np.float64)
    lse = _arrays.asnumpy(lse).astype(np.float64)
    out_ref = np.asarray(out_ref).astype(np.float64)
    lse_ref = np.asarray(lse_ref).astype(np.float64)
    assert out.shape == out_ref.shape, (out.shape, out_ref.shape)
    assert lse.shape == lse_ref.shape, (lse.shape, lse_ref.shape)
    assert not np.isnan(out).any(), f"out has {int(np.isnan(out).sum())} NaN (unwritten or poisoned reads)"
    assert not np.isnan(lse).any(), f"lse has {int(np.isnan(lse).sum())} NaN"
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_ref), err_msg="lse inf positions differ")
    finite = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[finite], lse_ref[finite], atol=lse_atol, rtol=lse_rtol, err_msg="lse")
    np.testing.assert_allclose(out, out_ref, atol=out_atol, rtol=out_rtol, err_msg="out")


def run_compute_sanitizer(tool: str, script: str, marker: str = "SANITIZE-DONE"):
    """Run ``python -c script`` under ``compute-sanitizer --tool tool``.

    Returns (ok, report): ok when the script printed ``marker``, the sanitizer exited 0 and reported
    no errors / hazards; report is the tail of its output. None when compute-sanitizer is not on PATH.
    """
    import shutil
    import subprocess
    import sys

    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return None
    proc = subprocess.run([exe, "--tool", tool, "--error-exitcode", "3", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=600)
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    clean = "ERROR SUMMARY: 0 errors" in proc.stdout or "0 hazards" in proc.stdout
    ok = marker in proc.stdout and ((proc.returncode == 0 and clean) or _only_driver_probe_errors(proc.stdout))
    return ok, report


_PROBE = re.compile(r"Program hit CUDA_ERROR_INVALID_VALUE \(error 1\) due to \"invalid argument\" on CUDA API call "
                    r"to cuGetProcAddress")
_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")


def _only_driver_probe_errors(sanitizer_stdout: str) -> bool:
    """True when every error memcheck counted is a failed ``cuGetProcAddress`` symbol probe.

    numba-cuda's driver binding asks the driver for entry points it may not have while it
    initialises; memcheck reports each refusal as an API error (34 on the H100 of 2026-11-26)
    although nothing ran on the device yet. Those are the only errors forgiven: any kernel error
    (invalid read/write, misaligned access, hardware exception) or other failed API call makes
    the count differ and the check fail.
    """
    totals = [int(n) for n in _SUMMARY.findall(sanitizer_stdout)]
    probes = len(_PROBE.findall(sanitizer_stdout))
    return len(totals) == 1 and totals[0] > 0 and totals[0] == probes
