"""GPU: the CuPy prefill kernels (forward + backward) against the NumPy reference, and the MLA layer
on CuPy arrays. Run on the GPU machine with ``pytest -m gpu``."""

from __future__ import annotations

import numpy as np
import pytest

from mla import _arrays

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _arrays.gpu_available(), reason="needs a CUDA GPU and CuPy (run with -m gpu there)"),
]

BF16 = _arrays.BFLOAT16


def _case(lens_q, lens_k, h, h_k, d, d_v, dtype, seed=0):
    rng = np.random.default_rng(seed)
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], h, d)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], h_k, d)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], h_k, d_v)).astype(dtype)
    return q, k, v, cu_q, cu_k


def _close(got, want, rel):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    scale = max(np.abs(want).max(), 1e-6)
    err = np.abs(got - want).max() / scale
    assert err < rel, f"max error {err:.3g} (relative to max |want| {scale:.3g}) >= {rel}"


CASES = [
    # lens_q, lens_k, h, h_k
    ([128, 300, 0, 77, 1], [128, 300, 5, 77, 1], 16, 16),        # varlen, an empty sequence, a 1-token one
    ([65, 200], [65, 200], 128, 128),                              # 128 heads
    ([40, 130], [100, 260], 16, 4),                                # L_q < L_k (chunked prefill), GQA
]


@pytest.mark.parametrize("lens_q,lens_k,h,h_k", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.15])
def test_prefill_gpu_matches_reference(lens_q, lens_k, h, h_k, causal, dtype, dropout_p):
    import cupy as cp

    from mla.prefill import flash_attn_varlen_backward, flash_attn_varlen_forward
    if dropout_p and h == 128:
        pytest.skip("dropout covered at 16 heads (keeps the run short)")
    q, k, v, cu_q, cu_k = _case(lens_q, lens_k, h, h_k, 192, 128, dtype)
    kw = dict(causal=causal, dropout_p=dropout_p, seed=1234, softmax_scale=192 ** -0.5)
    out_ref, lse_ref = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, backend="numpy", **kw)
    dq_, dk_, dv_ = (cp.asarray(x) for x in (q, k, v))
    out, lse = flash_attn_varlen_forward(dq_, dk_, dv_, cp.asarray(cu_q), cp.asarray(cu_k), backend="cupy", **kw)
    assert isinstance(out, cp.ndarray) and out.dtype == q.dtype and lse.dtype == np.float32
    rel = 1e-4 if dtype == np.float32 else 2e-2
    _close(cp.asnumpy(out).astype(np.float32), out_ref.astype(np.float32), rel)
    lse_h = cp.asnumpy(lse)
    assert np.array_equal(np.isinf(lse_h), np.isinf(lse_ref))
    fin = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse_h[fin], lse_ref[fin], rtol=1e-5, atol=1e-4)
    dout = np.random.default_rng(2).standard_normal(out_ref.shape).astype(dtype)
    # the reference backward from the GPU's own forward results (identical dropout bits)
    want = flash_attn_varlen_backward(dout, q, k, v, cp.asnumpy(out), lse_h, cu_q, cu_k, backend="numpy", **kw)
    got = flash_attn_varlen_backward(cp.asarray(dout), dq_, dk_, dv_, out, lse, cp.asarray(cu_q),
                                     cp.asarray(cu_k), backend="cupy", **kw)
    for g, w, name in zip(got, want, ("dq", "dk", "dv")):
        assert g.dtype == q.dtype, name
        _close(cp.asnumpy(g).astype(np.float32), w.astype(np.float32), 2 * rel)


def test_prefill_gpu_small_dims_and_auto_backend():
    import cupy as cp

    from mla.prefill import flash_attn_varlen_backward, flash_attn_varlen_func
    q, k, v, cu_q, cu_k = _case([33, 7], [33, 7], 4, 4, 32, 16, np.float32)
    out_ref, lse_ref = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    out, lse = flash_attn_varlen_func(*(cp.asarray(x) for x in (q, k, v, cu_q, cu_k)), causal=True,
                                      return_lse=True)
    _close(cp.asnumpy(out), out_ref, 1e-5)
    dout = np.ones_like(out_ref)
    want = flash_attn_varlen_backward(dout, q, k, v, out_ref, lse_ref, cu_q, cu_k, causal=True)
    got = flash_attn_varlen_backward(cp.asarray(dout), *(cp.asarray(x) for x in (q, k, v)), out, lse,
                                     cp.asarray(cu_q), cp.asarray(cu_k), causal=True)
    for g, w in zip(got, want):
        _close(cp.asnumpy(g), w, 1e-4)


def test_dropout_bits_match_numpy():
    """p = 0.5, v = identity: the kernel's output reveals its keep bits, which must equal NumPy's."""
    import cupy as cp

    from mla.prefill import dropout_keep_mask, flash_attn_varlen_forward
    n, h = 96, 2
    q, k, _, cu_q, cu_k = _case([n], [n], h, h, 16, 16, np.float32, seed=3)
    v = np.ascontiguousarray(np.broadcast_to(np.eye(n, dtype=np.float32)[:, None, :], (n, h, n)))
    out, _ = flash_attn_varlen_forward(*(cp.asarray(x) for x in (q, k, v, cu_q, cu_k)), dropout_p=0.5, seed=99,
                                       backend="cupy")
    keep = dropout_keep_mask(99, np.arange(h)[None, :, None], np.arange(n)[:, None, None],
                             np.arange(n)[None, None, :], 0.5)
    np.testing.assert_array_equal(cp.asnumpy(out) != 0, keep)


# ------------------------------------------------------------------------------------------ the layer on GPU


def _small_config(**kw):
    from mla.config import MLAConfig
    fields = dict(hidden_size=64, num_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                  v_head_dim=16, q_lora_rank=24, page_block_size=16, max_seq_len=512, dtype="float32")
    fields.update(kw)
    return MLAConfig(**fields)


def test_layer_absorbed_decode_equals_naive_on_gpu():
    import cupy as cp

    from mla.layer import MultiHeadLatentAttention
    layer = MultiHeadLatentAttention.random(_small_config(), seed=1, xp=cp)
    host = layer.to("numpy")
    ca, cn, ch = layer.new_cache(16), layer.new_cache(16), host.new_cache(16)
    prompt = np.random.default_rng(0).standard_normal((2, 37, 64)).astype(np.float32)
    want = host.prefill(prompt, ch, [0, 1])
    got = layer.prefill(cp.asarray(prompt), ca, [0, 1])
    layer.prefill(cp.asarray(prompt), cn, [0, 1])
    _close(cp.asnumpy(got), want, 1e-4)
    for step in range(4):
        x = np.random.default_rng(10 + step).standard_normal((2, 64)).astype(np.float32)
        a = layer.decode(cp.asarray(x), ca, [0, 1], absorbed=True)
        b = layer.decode(cp.asarray(x), cn, [0, 1], absorbed=False)
        c = host.decode(x, ch, [0, 1])
        _close(cp.asnumpy(a), cp.asnumpy(b), 1e-4)
        _close(cp.asnumpy(a), c, 1e-4)


def test_layer_backward_and_checkpoint_on_gpu():
    import cupy as cp

    from mla.layer import MultiHeadLatentAttention
    layer = MultiHeadLatentAttention.random(_small_config(), seed=2, xp=cp)
    host = layer.to("numpy")
    x = np.random.default_rng(1).standard_normal((2, 50, 64)).astype(np.float32)
    r = np.random.default_rng(2).standard_normal((2, 50, 64)).astype(np.float32)
    out_h, ctx_h = host.forward(x, dropout_p=0.1, seed=5)
    dx_h, g_h = host.backward(r, ctx_h)
    for checkpoint in (False, True):
        out, ctx = layer.forward(cp.asarray(x), dropout_p=0.1, seed=5, checkpoint=checkpoint)
        dx, g = layer.backward(cp.asarray(r), ctx)
        _close(cp.asnumpy(out), out_h, 1e-4)
        _close(cp.asnumpy(dx), dx_h, 1e-3)
        for name in g_h:
            _close(cp.asnumpy(g[name]), g_h[name], 1e-3)


def test_generate_on_gpu_matches_numpy():
    import cupy as cp

    from mla.layer import MultiHeadLatentAttention, generate
    cfg = _small_config()
    layers = [MultiHeadLatentAttention.random(cfg, seed=s, xp=cp) for s in range(2)]
    prompt = np.random.default_rng(4).standard_normal((2, 9, 64)).astype(np.float32)
    _, hidden, _ = generate(layers, cp.asarray(prompt), steps=8)
    _, hidden_h, _ = generate([layer.to("numpy") for layer in layers], prompt, steps=8)
    _close(cp.asnumpy(hidden), hidden_h, 1e-3)
