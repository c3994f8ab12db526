"""Prefill attention (NumPy reference): block-wise forward/backward vs brute force and finite
differences, varlen, causal, GQA, dropout RNG, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import mla.prefill as P
from mla.prefill import (
    attention_naive,
    attention_naive_backward,
    dropout_keep_mask,
    flash_attn_varlen_backward,
    flash_attn_varlen_forward,
    flash_attn_varlen_func,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, any import mode
from _prefill_check import problem  # noqa: E402


def make(lens_q, lens_k, h=4, h_k=4, d=24, d_v=16, seed=0, dtype=np.float64):
    return problem(lens_q, lens_k, h, h_k, d, d_v, dtype, seed)


CASES = [
    ([5, 140, 0, 37], [5, 140, 3, 37], 4, 4),      # self-attention shapes, an empty sequence
    ([3, 60], [70, 200], 6, 2),                    # L_q < L_k (chunked prefill), GQA
    ([9, 1], [4, 0], 2, 1),                        # L_q > L_k: causal rows with nothing visible
]


@pytest.mark.parametrize("lens_q,lens_k,h,h_k", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_forward_backward_match_brute_force(lens_q, lens_k, h, h_k, causal, dropout_p):
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, h, h_k)
    kw = dict(dropout_p=dropout_p, causal=causal, seed=123)
    out, lse = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, **kw)
    out_n, lse_n = attention_naive(q, k, v, cu_q, cu_k, **kw)
    np.testing.assert_allclose(out, out_n, rtol=1e-12, atol=1e-13)
    assert np.array_equal(np.isinf(lse), np.isinf(lse_n)) and (lse[np.isinf(lse)] > 0).all()
    finite = np.isfinite(lse)
    np.testing.assert_allclose(lse[finite], lse_n[finite], rtol=1e-13)
    assert not np.isnan(out).any()
    dout = np.random.default_rng(1).standard_normal(out.shape)
    grads = flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **kw)
    for g, g_n in zip(grads, attention_naive_backward(dout, q, k, v, cu_q, cu_k, **kw)):
        np.testing.assert_allclose(g, g_n, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("causal,dropout_p", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_gradients_finite_differences(causal, dropout_p):
    """dq, dk, dv against central differences (float64) along random directions and per element."""
    q, k, v, cu_q, cu_k = make([6, 11], [6, 13], h=4, h_k=2, d=8, d_v=8, seed=2)
    kw = dict(dropout_p=dropout_p, causal=causal, seed=9, softmax_scale=0.4)
    rng = np.random.default_rng(3)
    out, lse = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, **kw)
    r = rng.standard_normal(out.shape)
    grads = flash_attn_varlen_backward(r, q, k, v, out, lse, cu_q, cu_k, **kw)

    def loss(qq, kk, vv):
        return float((flash_attn_varlen_forward(qq, kk, vv, cu_q, cu_k, **kw)[0] * r).sum())

    eps = 1e-6
    args = [q, k, v]
    for i, g in enumerate(grads):
        direction = rng.standard_normal(args[i].shape)
        up = [a + eps * direction if j == i else a for j, a in enumerate(args)]
        down = [a - eps * direction if j == i else a for j, a in enumerate(args)]
        fd = (loss(*up) - loss(*down)) / (2 * eps)
        assert float((g * direction).sum()) == pytest.approx(fd, rel=1e-7, abs=1e-9)
        for flat in rng.choice(args[i].size, 4, replace=False):       # a few single entries
            e = np.zeros(args[i].size)
            e[flat] = eps
            e = e.reshape(args[i].shape)
            up = [a + e if j == i else a for j, a in enumerate(args)]
            down = [a - e if j == i else a for j, a in enumerate(args)]
            fd = (loss(*up) - loss(*down)) / (2 * eps)
            assert g.reshape(-1)[flat] == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_block_size_does_not_matter(monkeypatch):
    q, k, v, cu_q, cu_k = make([50, 77], [50, 77], seed=4)
    out, lse = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, causal=True)
    dout = np.ones_like(out)
    grads = flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True)
    monkeypatch.setattr(P, "BLOCK_N", 16)
    out2, lse2 = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, causal=True)
    np.testing.assert_allclose(out2, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse2, lse, rtol=1e-13)
    for a, b in zip(flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True), grads):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------------------------------- dropout


def test_dropout_zero_equals_no_dropout():
    q, k, v, cu_q, cu_k = make([20, 33], [20, 33], dtype=np.float32)
    a = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    b = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, return_lse=True, dropout_p=0.0, seed=77)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[0].dtype == np.float32 and a[1].dtype == np.float32 and a[1].shape == (4, 53)


def test_dropout_mask_bits_and_rate():
    # golden values pin the hash: the CUDA kernel computes the same function
    m = dropout_keep_mask(2024, np.arange(2)[:, None, None], np.arange(3)[None, :, None],
                          np.arange(4)[None, None, :], 0.5)
    assert m.shape == (2, 3, 4)
    assert np.packbits(m.ravel()).tolist() == [162, 4, 210]

    def mix(x):  # the kernel's C code, in Python integers
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    for head, row, col in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        x = mix(mix(mix(mix(2024 ^ 0x9E3779B9) ^ head) ^ row) ^ col)
        assert m[head, row, col] == ((x >> 8) >= round(0.5 * 2 ** 24))
    rows, cols = np.meshgrid(np.arange(300), np.arange(300), indexing="ij")
    for p in (0.1, 0.5, 0.9):
        keep = dropout_keep_mask(5, 3, rows, cols, p)
        assert abs(keep.mean() - (1 - p)) < 0.01
    a = dropout_keep_mask(5, 3, rows, cols, 0.5)
    assert 0.4 < (a == dropout_keep_mask(6, 3, rows, cols, 0.5)).mean() < 0.6       # seeds differ
    assert 0.4 < (a == dropout_keep_mask(5, 4, rows, cols, 0.5)).mean() < 0.6       # heads differ
    assert dropout_keep_mask(5, 3, rows, cols, 0.0).all()


def test_dropout_mean_scaling():
    """E[out with dropout] = out without dropout (the 1/(1-p) scaling), over many seeds."""
    q, k, v, cu_q, cu_k = make([8], [8], h=2, h_k=2, d=8, d_v=8, seed=5)
    base = flash_attn_varlen_func(q, k, v, cu_q, cu_k)
    outs = np.mean([flash_attn_varlen_func(q, k, v, cu_q, cu_k, dropout_p=0.3, seed=s) for s in range(400)],
                   axis=0)
    assert np.abs(outs - base).max() < 0.12
    assert np.abs(outs - base).mean() < 0.03


def test_dropout_forward_backward_masks_agree():
    """With v = identity rows, out reveals P*Z/(1-p); dv from backward reveals the same mask."""
    n, h = 12, 2
    q, k, _, cu_q, cu_k = make([n], [n], h=h, h_k=h, d=8, d_v=n, seed=6)
    v = np.broadcast_to(np.eye(n)[:, None, :], (n, h, n)).copy()
    p = 0.4
    out, lse = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, dropout_p=p, seed=31)
    dropped_fwd = out == 0
    # backward with dout = e_r e_c: dv[c] gets P[r, c] Z[r, c] / (1 - p)
    dout = np.zeros_like(out)
    dout[:, :, 0] = 1.0
    _, _, dv = flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, dropout_p=p, seed=31)
    # dv[c, h, 0] = sum_r Pz[r, c] ; column sums of the dropped matrix from the forward
    np.testing.assert_allclose(dv[:, :, 0], out.sum(axis=0).T, rtol=1e-12)
    zeros = dropout_keep_mask(31, np.arange(h)[None, :, None], np.arange(n)[:, None, None],
                              np.arange(n)[None, None, :], p)
    np.testing.assert_array_equal(dropped_fwd, ~zeros)


# ---------------------------------------------------------------------------------------- misc


def test_low_precision_inputs():
    import ml_dtypes
    q, k, v, cu_q, cu_k = make([30, 10], [30, 10], d=16, d_v=8)
    want, lse_w = attention_naive(q, k, v, cu_q, cu_k, causal=True)
    for dt, tol in ((np.float32, 1e-5), (np.float16, 3e-3), (ml_dtypes.bfloat16, 3e-2)):
        out, lse = flash_attn_varlen_func(q.astype(dt), k.astype(dt), v.astype(dt), cu_q, cu_k, causal=True,
                                          return_lse=True)
        assert out.dtype == dt and lse.dtype == np.float32
        np.testing.assert_allclose(out.astype(np.float64), want, atol=tol * 4, rtol=tol)


def test_errors():
    q, k, v, cu_q, cu_k = make([4], [4])
    with pytest.raises(ValueError, match="backend"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, backend="torch")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        flash_attn_varlen_func(q, k, v, np.array([0, 3], np.int32), cu_k)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, dropout_p=1.0)
    with pytest.raises(ValueError, match="k.shape"):
        flash_attn_varlen_func(q, k[..., :3], v, cu_q, cu_k)
    with pytest.raises(ValueError, match="multiple"):
        flash_attn_varlen_func(q[:, :3], k, v, cu_q, cu_k)
    with pytest.raises(TypeError, match="dtype"):
        flash_attn_varlen_func(q, k.astype(np.float32), v, cu_q, cu_k)
    with pytest.raises(ValueError, match="max_seqlen"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q=2)
    with pytest.raises(ValueError, match="cupy"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, backend="cupy")
    out, lse = flash_attn_varlen_forward(q, k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="lse"):
        flash_attn_varlen_backward(out, q, k, v, out, lse[:, :2], cu_q, cu_k)


# ---------------------------------------------------------------------------------------- kernel source


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


@pytest.mark.skipif(_nvrtc() is None, reason="NVRTC is not usable here (pip install cupy-cuda13x nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("kind,d,d_v", [(2, 192, 128), (0, 32, 16)])
def test_kernel_compiles_with_nvrtc(kind, d, d_v):
    """kernels/prefill_fwd_bwd.cu compiles for sm_90a (no GPU needed); what the GPU would JIT."""
    from mla.backends.prefill_cupy import kernel_source
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(kernel_source(), "prefill_fwd_bwd.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["--gpu-architecture=sm_90a", "-std=c++17", f"-DELEM_KIND={kind}",
                                    f"-DQK_DIM={d}", f"-DV_DIM={d_v}"])
    except Exception as exc:
        pytest.fail(f"{exc}\n{nvrtc.getProgramLog(prog)}")
