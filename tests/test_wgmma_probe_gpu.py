"""GPU probes of the Hopper decode kernel's building blocks (kernels/wgmma_probe.cu), run with ``pytest -m gpu``.

Run these FIRST on an H100, before tests/test_cupy_gpu.py -k hopper: each checks one piece of
kernels/mla_wgmma.cuh (the very functions mla_decode_hopper.cu calls) against NumPy on exact-integer
inputs, so a failure names the piece:

* tile layout  -- the cp.async tile copy + wg_tile_offset (no tensor cores involved);
* acc map      -- wg_acc_row / wg_acc_col on the device equal the documented formula;
* scores       -- S = Q K^T (m64n32k16, K-major A and B descriptors, the accumulator map, the warpgroup
                  exchange), on structured inputs (S[r][n] = r + 64 n: a misplaced value names its true
                  cell) and random ones, 1 k-step and all 36;
* pv           -- O = P V (register A fragments from fp32 P, N-major B descriptor with imm-trans-b,
                  the m64n256k16 accumulator map), structured and random, with and without the bf16
                  P = P_hi + P_lo split (exact on dyadic P only with the split).

When a descriptor check fails, the message says whether the probe passes with LBO / SBO exchanged
(-DMLA_WG_DIAG_SWAP_K / -DMLA_WG_DIAG_SWAP_MN), i.e. which constant in mla_wgmma.cuh to change.
"""

from __future__ import annotations

import numpy as np
import pytest

from mla import _arrays
from mla.backends import _nvrtc

BF16 = _arrays.BFLOAT16
DTYPES = [pytest.param(BF16, id="bf16"), pytest.param(np.float16, id="fp16")]
SMEM = 155648  # PROBE_SMEM_BYTES in kernels/wgmma_probe.cu
D = 576


def _gpu_reason():
    cp = _arrays.cupy_module()
    if cp is None:
        return "CuPy is not installed"
    if not _arrays.gpu_available():
        return "no CUDA GPU is visible"
    cc = cp.cuda.Device().compute_capability
    if cc != "90":
        return f"wgmma probes need compute capability 9.0 (sm_90a), this GPU is {cc[:-1]}.{cc[-1]}"
    return None


_REASON = _gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]


class _GpuBackend:
    """How the probes run: NVRTC for sm_90a + CuPy. (tests/test_hopper_compile.py swaps in the CPU emulator
    with its wgmma model, to check these tests' own expectations without a GPU.)"""

    def __init__(self):
        self.xp = _arrays.cupy_module()

    def function(self, name, defines):
        fn = _nvrtc.load_function("wgmma_probe.cu", name, defines, arch="sm_90a")
        if fn.max_dynamic_shared_size_bytes < SMEM:
            fn.max_dynamic_shared_size_bytes = SMEM
        return fn

    def sync(self):
        self.xp.cuda.Device().synchronize()


BACKEND = None  # None: the GPU


def _backend():
    global BACKEND
    if BACKEND is None:
        BACKEND = _GpuBackend()
    return BACKEND


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _fn(name, dtype, extra=None):
    return _backend().function(name, {"MLA_FP16": int(np.dtype(dtype) == np.float16), **(extra or {})})


def _dev16(x, dtype):
    """float array (exactly representable) -> device array of its 16-bit bits"""
    x = np.asarray(x, np.float32)
    y = x.astype(dtype)
    assert np.array_equal(y.astype(np.float32), x), "probe inputs must be exact in the 16-bit type"
    return _backend().xp.asarray(np.ascontiguousarray(y).view(np.uint16))


def _launch(fn, args):
    fn((1,), (256,), args, shared_mem=SMEM)
    _backend().sync()


def _scores(q, k, dtype, k1=False, extra=None):
    """S [2 warpgroups][64][64] from wgmma_probe_scores[_k1]; q, k: float [64][576]"""
    xp = _backend().xp
    s = xp.full((2, 64, 64), np.nan, dtype=xp.float32)
    _launch(_fn("wgmma_probe_scores_k1" if k1 else "wgmma_probe_scores", dtype, extra),
            (_dev16(q, dtype), _dev16(k, dtype), s))
    return _host(s)


def _pv(p, v, dtype, split, extra=None):
    """O [64][512] from wgmma_probe_pv[_split]; p: float32 [64][64], v: float [64][576]"""
    xp = _backend().xp
    o = xp.full((64, 512), np.nan, dtype=xp.float32)
    _launch(_fn("wgmma_probe_pv_split" if split else "wgmma_probe_pv", dtype, extra),
            (xp.asarray(np.ascontiguousarray(p, np.float32)), _dev16(v, dtype), o))
    return _host(o)


def _tile_offset(row, col):
    """mla_wgmma.cuh wg_tile_offset: channel group, then row group, then the 8 x 8 core matrix"""
    return (col // 8) * 512 + (row // 8) * 64 + (row % 8) * 8 + (col % 8)


def _diagnose(run, want):
    """Which descriptor variant reproduces `want` (a hint for the failure message)."""
    hints = []
    for extra in ({"MLA_WG_DIAG_SWAP_K": 1}, {"MLA_WG_DIAG_SWAP_MN": 1},
                  {"MLA_WG_DIAG_SWAP_K": 1, "MLA_WG_DIAG_SWAP_MN": 1}):
        try:
            ok = np.array_equal(run(extra), want)
        except Exception as exc:  # a variant may fault; say so
            ok = f"error {type(exc).__name__}"
        hints.append(f"{extra}: {'MATCHES numpy' if ok is True else ok if isinstance(ok, str) else 'no match'}")
    return "; ".join(hints)


def _misplaced(got, want, cols):
    """For structured outputs value = row + 64 * col: where did the first few wrong cells' values come from"""
    bad = np.argwhere(got != want)
    lines = []
    for r, c in bad[:6]:
        v = got[r, c]
        src = f"(row {int(v) % 64}, col {int(v) // 64})" if np.isfinite(v) and v == int(v) else "not a cell value"
        lines.append(f"[{r}][{c}] = {v} {src}")
    return f"{len(bad)} of {got.size} cells wrong over {cols} columns; " + ", ".join(lines)


# ---- no tensor cores: the loader and the maps


def test_tile_layout_of_the_cp_async_copy():
    xp = _backend().xp
    bits = (np.arange(64 * D, dtype=np.int64).reshape(64, D) % 65521).astype(np.uint16)  # distinct bit patterns
    dump = xp.zeros(64 * D, dtype=xp.uint16)
    _launch(_fn("wgmma_probe_tile_layout", BF16), (xp.asarray(bits), dump))
    rows, cols = np.meshgrid(np.arange(64), np.arange(D), indexing="ij")
    want = np.zeros(64 * D, np.uint16)
    want[_tile_offset(rows, cols).ravel()] = bits.ravel()
    got = _host(dump)
    assert np.array_equal(got, want), f"{int((got != want).sum())} of {got.size} tile elements misplaced"


def test_accumulator_map_on_the_device():
    xp = _backend().xp
    rows, cols = xp.full(128 * 128, -1, xp.int32), xp.full(128 * 128, -1, xp.int32)
    _launch(_fn("wgmma_probe_acc_map", BF16), (rows, cols))
    t, i = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
    assert np.array_equal(_host(rows).reshape(128, 128), 16 * (t >> 5) + ((t & 31) >> 2) + 8 * ((i >> 1) & 1))
    assert np.array_equal(_host(cols).reshape(128, 128), 8 * (i >> 2) + 2 * (t & 3) + (i & 1))


# ---- S = Q K^T (K-major descriptors, m64n32k16, exchange)


@pytest.mark.parametrize("k1", [True, False], ids=["kstep1", "ksteps36"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_structured(dtype, k1):
    q = np.zeros((64, D), np.float32)
    k = np.zeros((64, D), np.float32)
    q[:, 0] = np.arange(64)
    q[:, 1] = 1
    k[:, 0] = 1
    k[:, 1] = 64 * np.arange(64)  # S[r][n] = r + 64 n
    want = np.arange(64)[:, None] + 64.0 * np.arange(64)[None, :]
    s = _scores(q, k, dtype, k1)
    for wg in range(2):
        assert np.array_equal(s[wg], want), (
            f"warpgroup {wg}: {_misplaced(s[wg], want, 64)}; "
            f"variants: {_diagnose(lambda e, wg=wg: _scores(q, k, dtype, k1, e)[wg], want)}")


@pytest.mark.parametrize("k1", [True, False], ids=["kstep1", "ksteps36"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_random(dtype, k1):
    rng = np.random.default_rng(1)
    q = rng.integers(-2, 3, size=(64, D)).astype(np.float32)
    k = rng.integers(-2, 3, size=(64, D)).astype(np.float32)
    n = 16 if k1 else D
    want = q[:, :n].astype(np.float64) @ k[:, :n].T.astype(np.float64)
    s = _scores(q, k, dtype, k1)
    assert np.array_equal(s[0], want), (
        f"{int((s[0] != want).sum())} wrong; variants: {_diagnose(lambda e: _scores(q, k, dtype, k1, e)[0], want)}")
    assert np.array_equal(s[1], s[0]), "the two warpgroups' S tiles differ (exchange)"


# ---- O = P V (register A, N-major B, m64n256k16)


@pytest.mark.parametrize("split", [False, True], ids=["P", "Phi+Plo"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pv_structured(dtype, split):
    p = np.zeros((64, 64), np.float32)
    v = np.zeros((64, D), np.float32)
    p[:, 0] = np.arange(64)
    p[:, 1] = 1
    p[:, 2] = 1
    c = np.arange(D)
    v[0] = 1
    v[1] = 64 * (c % 256)
    v[2] = 16384 * (c // 256 % 2)  # O[r][c] = r + 64 (c % 256) + 16384 (c // 256)
    cc = np.arange(512)
    want = np.arange(64)[:, None] + 64.0 * (cc % 256)[None, :] + 16384.0 * (cc // 256)[None, :]
    o = _pv(p, v, dtype, split)
    if not np.array_equal(o, want):
        hint = _diagnose(lambda e: _pv(p, v, dtype, split, e), want)
        bad = np.argwhere(o != want)[:6]
        cells = ", ".join(f"[{r}][{c}] = {o[r, c]}" for r, c in bad)
        raise AssertionError(f"{int((o != want).sum())} of {o.size} wrong ({cells}; value = r + 64 (c % 256) + "
                             f"16384 (c // 256)); variants: {hint}")


@pytest.mark.parametrize("split", [False, True], ids=["P", "Phi+Plo"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pv_random(dtype, split):
    rng = np.random.default_rng(2)
    p = rng.integers(-3, 4, size=(64, 64)).astype(np.float32)
    v = rng.integers(-2, 3, size=(64, D)).astype(np.float32)
    want = p.astype(np.float64) @ v[:, :512].astype(np.float64)
    o = _pv(p, v, dtype, split)
    assert np.array_equal(o, want), (
        f"{int((o != want).sum())} wrong; variants: {_diagnose(lambda e: _pv(p, v, dtype, split, e), want)}")


def test_pv_split_recovers_bf16_rounding():
    """P = k / 512 needs 9 significant bits: bf16 P alone rounds it, P_hi + P_lo is exact."""
    rng = np.random.default_rng(3)
    p = (rng.integers(0, 513, size=(64, 64)) / 512).astype(np.float32)
    v = rng.integers(-2, 3, size=(64, D)).astype(np.float32)
    want = p.astype(np.float64) @ v[:, :512].astype(np.float64)
    exact = _pv(p, v, BF16, True)
    rounded = _pv(p, v, BF16, False)
    assert np.array_equal(exact, want), float(np.abs(exact - want).max())
    assert not np.array_equal(rounded, want)
    p_bf16 = p.astype(BF16).astype(np.float64)
    np.testing.assert_allclose(rounded, p_bf16 @ v[:, :512].astype(np.float64), rtol=0, atol=1e-4)
