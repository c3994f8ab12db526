"""GPU: the CuPy prefill kernels (forward + backward) against the NumPy reference, and the MLA layer
on CuPy arrays. Run on the GPU machine with ``pytest -m gpu``."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mla import _arrays

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, any import mode
from _prefill_check import check_against_reference, problem  # noqa: E402
from _sanitizer import check_compute_sanitizer  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _arrays.gpu_available(), reason="needs a CUDA GPU and CuPy (run with -m gpu there)"),
]

BF16 = _arrays.BFLOAT16


_case = problem  # random varlen (q, k, v, cu_q, cu_k), shared with the CPU emulator tests


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
def test_prefill_gpu_matches_reference(monkeypatch, lens_q, lens_k, h, h_k, causal, dtype, dropout_p):
    """The fp32 SIMT kernels (prefill_fwd_bwd.cu), forced with MLA_PREFILL_KERNEL=simt."""
    import cupy as cp
    monkeypatch.setenv("MLA_PREFILL_KERNEL", "simt")

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


# ------------------------------------------------------------------------------------------ tensor-core kernels
# kernels/prefill_mma.cu, verified here on an H100 on 2026-11-25 (63 passed, 8 skipped by design; the two
# compute-sanitizer tests passed), needs no MLA_CUPY_UNVERIFIED gate any more. Every test forces
# MLA_PREFILL_KERNEL=mma (so a silent fallback to the SIMT kernel cannot pass), and every output the mma
# path allocates is poisoned with NaN before the launch. Tolerances: see
# tests/_prefill_check.py (bf16: out 2e-2, gradients 4e-2 of the largest |value|; fp16: 4e-3, 8e-3).


@pytest.fixture
def mma(monkeypatch):
    from mla.backends import prefill_cupy
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)  # no gate
    monkeypatch.setenv("MLA_PREFILL_KERNEL", "mma")
    monkeypatch.setattr(prefill_cupy, "POISON_OUTPUTS", True)
    prefill_cupy.last_choice.clear()
    return prefill_cupy


def _check_mma(prefill_cupy, lens_q, lens_k, h, h_k, d, d_v, dtype, causal, dropout_p):
    import cupy as cp

    from mla.prefill import flash_attn_varlen_backward, flash_attn_varlen_forward

    def forward(*args, **kw):
        return flash_attn_varlen_forward(*args, backend="cupy", **kw)

    def backward(*args, **kw):
        return flash_attn_varlen_backward(*args, backend="cupy", **kw)

    check_against_reference(forward, backward, lens_q, lens_k, h, h_k, d, d_v, dtype, causal, dropout_p,
                            asnumpy=cp.asnumpy, xp=cp)
    assert prefill_cupy.last_choice["fwd"][0] == "mma" and prefill_cupy.last_choice["bwd"][0] == "mma"


MMA_CASES = [
    # lens_q, lens_k, h, h_k
    ([128, 300, 0, 77, 1, 6], [128, 300, 5, 77, 1, 0], 16, 16),  # varlen, L_q = 0, L_k = 0, a 1-token sequence
    ([65, 200], [65, 200], 128, 128),                              # 128 heads
    ([40, 130], [100, 260], 16, 4),                                # L_q < L_k (chunked prefill), GQA
    ([300, 9], [70, 4], 16, 16),                                   # L_q > L_k: causal rows that see nothing
]


@pytest.mark.parametrize("lens_q,lens_k,h,h_k", MMA_CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_mma_matches_reference(mma, lens_q, lens_k, h, h_k, causal, dtype, dropout_p):
    if dropout_p and h == 128:
        pytest.skip("dropout covered at 16 heads (keeps the run short)")
    _check_mma(mma, lens_q, lens_k, h, h_k, 192, 128, dtype, causal, dropout_p)


def test_mma_long_sequences(mma):
    """Many tiles a CTA (16 key tiles), heaviest-first scheduling, dropout, 16 heads."""
    _check_mma(mma, [1024, 333], [1024, 333], 16, 16, 192, 128, BF16, True, 0.1)


@pytest.mark.parametrize("d,d_v", [(64, 64), (128, 128), (256, 128), (96, 32)])
def test_mma_other_head_dims(mma, d, d_v):
    _check_mma(mma, [100, 37], [100, 90], 4, 2, d, d_v, BF16, True, 0.0)


def test_mma_four_warp_forward(mma, monkeypatch):
    """The 64-row forward tiling (what GPUs with less shared memory get)."""
    monkeypatch.setenv(mma.FWD_WARPS_ENV, "4")
    _check_mma(mma, [150, 70], [150, 200], 16, 16, 192, 128, np.float16, True, 0.2)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_mma_dropout_bits_equal_simt_and_numpy(mma, monkeypatch, p):
    """v = identity (n keys = d_v): out[r, h, c] != 0 reveals the keep bit of (h, r, c); the tensor-core
    kernel, the SIMT kernel and mla.prefill.dropout_keep_mask must agree bit for bit."""
    import cupy as cp

    from mla.prefill import dropout_keep_mask, flash_attn_varlen_forward
    n, h = 128, 2
    q, k, _, cu_q, cu_k = _case([n], [n], h, h, 64, 64, BF16, seed=3)
    v = np.ascontiguousarray(np.broadcast_to(np.eye(n, dtype=np.float32)[:, None, :], (n, h, n))).astype(BF16)
    args = [cp.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    keep = dropout_keep_mask(99, np.arange(h)[None, :, None], np.arange(n)[:, None, None],
                             np.arange(n)[None, None, :], p)
    masks = {}
    for kernel in ("mma", "simt"):
        monkeypatch.setenv("MLA_PREFILL_KERNEL", kernel)
        out, _ = flash_attn_varlen_forward(*args, dropout_p=p, seed=99, backend="cupy")
        assert mma.last_choice["fwd"][0] == kernel
        masks[kernel] = cp.asnumpy(out).astype(np.float32) != 0
    np.testing.assert_array_equal(masks["mma"], keep)
    np.testing.assert_array_equal(masks["simt"], keep)


def test_mma_unaligned_views(mma):
    """Inputs that are contiguous views 2 bytes off a 16-byte boundary (cp.async needs 16): copied."""
    import cupy as cp

    from mla.prefill import flash_attn_varlen_forward
    q, k, v, cu_q, cu_k = _case([70], [70], 4, 4, 192, 128, BF16)
    want, _ = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, causal=True, backend="numpy")

    def shifted(x):
        flat = cp.empty(x.size + 1, dtype=x.dtype)
        view = flat[1:].reshape(x.shape)
        view[...] = cp.asarray(x)
        assert view.data.ptr % 16
        return view

    out, _ = flash_attn_varlen_forward(shifted(q), shifted(k), shifted(v), cp.asarray(cu_q), cp.asarray(cu_k),
                                       causal=True, backend="cupy")
    _close(cp.asnumpy(out).astype(np.float32), want.astype(np.float32), 2e-2)


def test_mma_is_the_default_without_gate(monkeypatch):
    """With MLA_CUPY_UNVERIFIED unset and MLA_PREFILL_KERNEL unset ("auto"), bf16 forward and backward run
    the tensor-core kernel and agree with the SIMT kernel; float32 runs the SIMT kernel."""
    import cupy as cp

    from mla.backends import prefill_cupy
    from mla.prefill import flash_attn_varlen_backward, flash_attn_varlen_forward
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    monkeypatch.delenv("MLA_PREFILL_KERNEL", raising=False)
    prefill_cupy.last_choice.clear()
    q, k, v, cu_q, cu_k = _case([33], [33], 2, 2, 192, 128, BF16)
    args = [cp.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    out, lse = flash_attn_varlen_forward(*args, causal=True, backend="cupy")
    flash_attn_varlen_backward(out, *args[:3], out, lse, *args[3:], causal=True, backend="cupy")
    assert prefill_cupy.last_choice == {"fwd": ("mma", "tensor cores (mma.sync)"),
                                        "bwd": ("mma", "tensor cores (mma.sync)")}
    monkeypatch.setenv("MLA_PREFILL_KERNEL", "simt")
    out_simt, _ = flash_attn_varlen_forward(*args, causal=True, backend="cupy")
    assert prefill_cupy.last_choice["fwd"][0] == "simt"
    _close(cp.asnumpy(out).astype(np.float32), cp.asnumpy(out_simt).astype(np.float32), 2e-2)
    monkeypatch.delenv("MLA_PREFILL_KERNEL")
    flash_attn_varlen_forward(*(x.astype(np.float32) if x.dtype == BF16 else x for x in args), backend="cupy")
    assert prefill_cupy.last_choice["fwd"][0] == "simt"


_SANITIZE = textwrap.dedent("""
    import os
    os.environ['MLA_PREFILL_KERNEL'] = 'mma'
    import numpy as np, cupy as cp
    import mla
    from mla.backends import prefill_cupy
    from mla.prefill import flash_attn_varlen_backward, flash_attn_varlen_forward
    prefill_cupy.POISON_OUTPUTS = True
    rng = np.random.default_rng(0)
    lens_q, lens_k, h, h_k = [70, 0, 100, 5], [90, 3, 100, 0], 2, 1
    cu_q = cp.asarray(np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32))
    cu_k = cp.asarray(np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32))
    def rand(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(mla.bfloat16)
    q, k, v = rand(sum(lens_q), h, 192), rand(sum(lens_k), h_k, 192), rand(sum(lens_k), h_k, 128)
    out, lse = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, causal=True, dropout_p=0.2, seed=1)
    grads = flash_attn_varlen_backward(out, q, k, v, out, lse, cu_q, cu_k, causal=True, dropout_p=0.2, seed=1)
    [g.get() for g in grads]
    print('SANITIZE-DONE')
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_mma_compute_sanitizer(tool):
    check_compute_sanitizer(tool, _SANITIZE)


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
