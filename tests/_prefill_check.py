"""Shared by tests/test_prefill_compile.py (CPU emulator) and tests/test_prefill_gpu.py (GPU): random
varlen prefill problems and the check of a forward / backward pair against the NumPy reference."""

from __future__ import annotations

import numpy as np

from mla import _arrays


def problem(lens_q, lens_k, h, h_k, d, d_v, dtype, seed=0):
    rng = np.random.default_rng(seed)
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], h, d)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], h_k, d)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], h_k, d_v)).astype(dtype)
    return q, k, v, cu_q, cu_k


# Tolerances (max |got - want| / max |want|): the kernel rounds P (forward), P and dS (backward) to the
# 16-bit type before the tensor-core products and its results once more at the end; bf16 keeps 8
# mantissa bits (2^-9 = 0.2% a rounding, errors of a sum of many rounded terms average out), fp16 11.
# Measured on the emulator: about one unit in the last place of the largest output (0.4-0.8% bf16).
TOL = {"bfloat16": (2e-2, 4e-2), "float16": (4e-3, 8e-3)}  # (out, gradients)


def rel_err(got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)


def check_against_reference(forward, backward, lens_q, lens_k, h, h_k, d, d_v, dtype, causal, dropout_p,
                            asnumpy=np.asarray, xp=np):
    """forward(q, k, v, cu_q, cu_k, **kw) -> (out, lse); backward(dout, q, k, v, out, lse, cu_q, cu_k, **kw)
    -> (dq, dk, dv), against the NumPy reference."""
    from mla.prefill import flash_attn_varlen_backward, flash_attn_varlen_forward
    q, k, v, cu_q, cu_k = problem(lens_q, lens_k, h, h_k, d, d_v, dtype)
    kw = dict(causal=causal, dropout_p=dropout_p, seed=1234, softmax_scale=d ** -0.5)
    out_ref, lse_ref = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, backend="numpy", **kw)
    dev = [xp.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    out, lse = forward(*dev, **kw)
    assert out.dtype == q.dtype and out.shape == out_ref.shape and lse.dtype == np.float32
    out_h, lse_h = asnumpy(out), asnumpy(lse)
    assert not np.isnan(out_h.astype(np.float32)).any() and not np.isnan(lse_h).any()
    tol_out, tol_grad = TOL[_arrays.dtype_name(dtype)]
    assert rel_err(out_h, out_ref) < tol_out
    assert np.array_equal(np.isinf(lse_h), np.isinf(lse_ref)) and (lse_h[np.isinf(lse_h)] > 0).all()
    fin = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse_h[fin], lse_ref[fin], rtol=1e-5, atol=1e-4)
    dout = np.random.default_rng(2).standard_normal(out_ref.shape).astype(dtype)
    # the reference backward from the kernel's own forward results (the same dropout bits by construction)
    want = flash_attn_varlen_backward(dout, q, k, v, out_h, lse_h, cu_q, cu_k, backend="numpy", **kw)
    got = backward(xp.asarray(dout), *dev[:3], out, lse, *dev[3:], **kw)
    for g, w, name in zip(got, want, ("dq", "dk", "dv")):
        g = asnumpy(g)
        assert g.dtype == q.dtype and g.shape == w.shape, name
        assert not np.isnan(g.astype(np.float32)).any(), name
        err = rel_err(g, w)
        assert err < tol_grad, f"{name}: max error {err:.3g} of max |want| >= {tol_grad}"


