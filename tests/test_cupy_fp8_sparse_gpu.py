"""GPU tests of the CuPy FP8-cache and sparse (DSA) decode kernels, issue #5 (``pytest -m gpu``).

These kernels first ran on a GPU through this file: 95 passed on an H100 on 2026-11-25, and the two
compute-sanitizer tests (memcheck, racecheck) passed, after which the MLA_CUPY_UNVERIFIED gate was
removed; the tests run with that variable unset. FlashMLA's test style as in test_cupy_gpu.py:
poisoned caches (NaN / 0xFF bytes past each length and in unused blocks, garbage block ids, shuffled
blocks), outputs poisoned with NaN before each launch, DESIGN §6 tolerances. The reference is
``fast_reference`` (tests/test_cupy_fp8_sparse_cpu.py checks it equals ``mla.reference``), on the
dequantised cache for FP8. ``MLA_GPU_EXAMPLES`` sets the hypothesis example count (default 150).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cupy_fp8_sparse_cpu import dequantize_kv_fp8, fast_reference

import mla
from mla import _arrays, testing
from mla.backends import BackendUnavailable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, any import mode
import _sparse_fp8_gpu as shared  # noqa: E402
from _sanitizer import check_compute_sanitizer  # noqa: E402

cupy_backend = pytest.importorskip("mla.backends.cupy_backend")
_ok, _why = cupy_backend.available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _ok, reason=f"CuPy backend unavailable: {_why}")]

BF16 = _arrays.BFLOAT16


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)  # no gate: these kernels are ordinary paths
    monkeypatch.setattr(cupy_backend, "POISON_OUTPUTS", True)


def _run(case, on_device=True, plan="arrays", lse_atol=testing.LSE_ATOL, block_table=True):
    """Through backend="cupy" against fast_reference."""
    # the Hopper builds round bf16 P once (FlashMLA's numerics): DESIGN §6's 8e-4 scaled to these unit-normal values
    shared.run(case, "cupy", on_device=on_device, plan=plan, block_table=block_table, lse_atol=lse_atol,
               out_atol=testing.out_atol(case))


# ---- FP8 dense: DeepSeek dims, bf16 q, h_q in {16, 64, 128}, varlen with empty sequences


# every dense FP8 test runs as "auto" dispatches (on an H100: the FP8 register kernel up to 16 rows a KV head, the
# narrow kernel's FP8 build up to 32, the wide one's above) and with the register kernel and the narrow build forced
# (both take any row count, 16 a CTA)
FP8_DENSE_KERNELS = pytest.mark.parametrize("fp8_kernel", ["auto", "regs", "narrow"])


@pytest.fixture
def fp8_kernel(request, monkeypatch):
    monkeypatch.setenv("MLA_CUPY_FP8_KERNEL", request.param)
    return request.param


@FP8_DENSE_KERNELS
@pytest.mark.parametrize("h_q", [16, 64, 128])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True)])
def test_fp8_dense_matrix(h_q, s_q, causal, fp8_kernel):
    _run(shared.fp8_dense_matrix_case(h_q, s_q, causal))


@FP8_DENSE_KERNELS
@pytest.mark.parametrize("b,seqlen,h_q", [(1, 20000, 16), (64, 300, 16), (2, 4097, 128)])
def test_fp8_dense_splits(b, seqlen, h_q, fp8_kernel):
    """One long sequence (many splits + combine), many short ones (direct writes)."""
    _run(shared.fp8_dense_splits_case(b, seqlen, h_q))


@FP8_DENSE_KERNELS
@pytest.mark.parametrize("plan", ["arrays", "lazy", "none"])
@pytest.mark.parametrize("on_device", [True, False], ids=["cupy-in", "numpy-in"])
def test_fp8_dense_plans_kinds_and_heads(plan, on_device, fp8_kernel):
    rng = np.random.default_rng(5)
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=32, h_kv=2, d=576, head_dim_v=512, page_block_size=16,
                                    seqlens=[0, 900, 130], dtype=BF16, causal=True, fp8=True)
    _run(case, on_device=on_device, plan=plan)


@FP8_DENSE_KERNELS
@pytest.mark.parametrize("page,seqlens", [(32, [333, 1, 64]), (128, [1000, 129, 0]), (256, [700, 300])])
def test_fp8_dense_pages(page, seqlens, fp8_kernel):
    """Page sizes other than 64 (a 64-key tile spans pages, or a page holds several tiles), 16 rows."""
    rng = np.random.default_rng(page)
    case = testing.make_decode_case(rng, b=len(seqlens), s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=page,
                                    seqlens=seqlens, dtype=BF16, fp8=True)
    _run(case)


@FP8_DENSE_KERNELS
@pytest.mark.parametrize("q_scale", [2.0 ** -60, 2.0 ** 30, 0.0])
def test_fp8_dense_q_range(q_scale, fp8_kernel):
    """Query rows of tiny, huge and zero values beside ordinary ones (the FP8 register kernel scales each Q row by a
    power of two; exact)."""
    rng = np.random.default_rng(23)
    case = testing.make_decode_case(rng, b=3, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[700, 65, 1], dtype=BF16, fp8=True)
    q = case.q.astype(np.float32)
    q[:, :, ::2] *= np.float32(q_scale)
    case.q = q.astype(BF16)
    _run(case)


@FP8_DENSE_KERNELS
def test_fp8_dense_large_values(fp8_kernel):
    """Scales far from 1 (x 2^-20 and x 2^16): both paths of the dequantisation (scale < 2^8, >= 2^8)."""
    for case in shared.fp8_rescaled_cases():  # the stored fp32 scales times a power of two (exact, q unchanged)
        _run(case)


def test_fp8_float16_q_is_declined():
    rng = np.random.default_rng(0)
    case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[10, 70], dtype=np.float16, fp8=True)
    c = testing.to_device(case)
    with pytest.raises(BackendUnavailable, match="bfloat16"):
        mla.flash_mla_with_kvcache(*c.args(), is_fp8_kvcache=True, backend="cupy")


def test_auto_picks_cupy_without_gate():
    """No MLA_CUPY_UNVERIFIED: "auto" on device arrays runs these kernels (CuPy outputs), as backend="cupy" does."""
    from mla import api, backends

    rng = np.random.default_rng(0)
    case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[10, 70], dtype=BF16, fp8=True)
    c = testing.to_device(case)
    problem = api._validate(*c.args(), None, False, True, None, None, None, True)
    assert backends.select("auto", problem) is cupy_backend
    want = fast_reference(*case.args(), is_fp8_kvcache=True)
    for backend in ("cupy", "auto"):
        out, lse = mla.flash_mla_with_kvcache(*c.args(), is_fp8_kvcache=True, backend=backend)
        assert _arrays.is_device_array(out)
        testing.assert_close(out, lse, *want, out_atol=testing.out_atol(case))


# ---- the dequantisation, bit for bit: one key holding every non-NaN e4m3 code


def _every_code_token_case(scales, h_q, seed=3):
    """One sequence of one key whose 512 codes run through every non-NaN e4m3 code (twice, and a bit more), with
    the four 128-channel scales ``scales``; the rest of the cache is poisoned as usual."""
    rng = np.random.default_rng(seed)
    case = testing.make_decode_case(rng, b=1, s_q=1, h_q=h_q, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[1], dtype=BF16, fp8=True)
    codes = [c for c in range(256) if c & 0x7F != 0x7F]
    token = case.k_cache[int(case.block_table[0, 0]), 0, 0]  # a view: the sequence's only key
    token[:512] = np.array((codes * 3)[:512], np.uint8)
    token[512:528] = np.array(scales, np.float32).view(np.uint8)
    return case, dequantize_kv_fp8(token[None].copy(), dtype=BF16)[0, :512]


EVERY_CODE_SCALES = {"pow2": (2.0**-100, 2.0**-9, 1.0, 2.0**7),            # the fast path's domain, both ends
                     "other": (2.0**8, 1.5, 2.0**-101, 3 * 2.0**-20)}      # dequant8 (any scale)


@pytest.mark.parametrize("scales", list(EVERY_CODE_SCALES), ids=list(EVERY_CODE_SCALES))
@pytest.mark.parametrize("kernel,h_q", [("narrow", 16), ("regs", 16), ("wide", 64), ("sparse", 64)])
def test_fp8_every_code_is_exact(monkeypatch, kernel, h_q, scales):
    """With a single key P = 1 and l = 1, so every head's out is that key's dequantised value channels: the
    kernels' dequantisation (the fast path's prmt / shift / mask and bf16x2 multiply, E = 0 codes arriving as
    bf16 subnormals; dequant8 for other scales) must equal mla.fp8's bit for bit."""
    case, want = _every_code_token_case(EVERY_CODE_SCALES[scales], h_q)
    c = testing.to_device(case)
    if kernel == "sparse":
        idx = np.full((1, 1, 64), -1, np.int32)
        idx[0, 0, 5] = int(case.block_table[0, 0]) * 64  # the key, among invalid entries
        out, _ = mla.flash_mla_with_kvcache(c.q, c.k_cache, None, None, 512, is_fp8_kvcache=True,
                                           indices=_arrays.cupy_module().asarray(idx), backend="cupy")
    else:
        monkeypatch.setenv("MLA_CUPY_FP8_KERNEL", kernel)
        out, _ = mla.flash_mla_with_kvcache(*c.args(), is_fp8_kvcache=True, backend="cupy")
    got = _arrays.asnumpy(out).reshape(h_q, 512).astype(np.float32)
    for h in range(h_q):  # values (out = 1 * V + 0 * ..., so -0 codes come out +0)
        np.testing.assert_array_equal(got[h], want.astype(np.float32), err_msg=f"head {h}")


# ---- sparse: b x s_q x h_q x topk x invalid ratio x cache kind


@pytest.mark.parametrize("k,fp8,h_q,s_q,topk", shared.SPARSE_PARAMS, ids=shared.SPARSE_IDS)
def test_sparse_matrix(k, fp8, h_q, s_q, topk):
    _run(shared.sparse_matrix_case(k, fp8, h_q, s_q, topk))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("b,topk", [(1, 8192), (2, 300), (64, 2048)])
def test_sparse_topk_length_and_sink(fp8, b, topk):
    """topk_length (incl. 0 and topk) and attn_sink (incl. +-inf); one long list (many splits)."""
    _run(shared.topk_length_and_sink_case(fp8, b, topk))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_sparse_sink_only_and_topk_length_only(fp8):
    rng = np.random.default_rng(21)
    case = shared.sparse_case(rng, 2, 1, 16, 512, 0.0, fp8)
    case.attn_sink = rng.standard_normal(16).astype(np.float32)
    _run(case)
    case.attn_sink = None
    case.topk_length = np.array([100, 3], np.int32)
    _run(case)


@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d,dv,page,h_kv", shared.GENERIC_SHAPES)
def test_sparse_generic_shapes(dtype, d, dv, page, h_kv):
    _run(shared.generic_shape_case(dtype, d, dv, page, h_kv))


@pytest.mark.parametrize("plan", ["arrays", "lazy", "none"])
@pytest.mark.parametrize("on_device", [True, False], ids=["cupy-in", "numpy-in"])
def test_sparse_plans_kinds_no_block_table(plan, on_device):
    _run(shared.plans_case(), on_device=on_device, plan=plan, block_table=(plan != "none"))


# ---- hypothesis: random sparse shapes

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=int(os.environ.get("MLA_GPU_EXAMPLES", "150")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(**shared.random_sparse_strategies(["fp8", "bf16", "bf16-small", "fp16-small"], group=st.integers(1, 70)))
    def test_hypothesis_random_sparse(kind, b, s_q, h_kv, group, page, max_len, topk, invalid, use_tl, use_sink,
                                      seed):
        case = shared.random_sparse_case(kind, b, s_q, h_kv, group, page, max_len, topk, invalid, use_tl, use_sink,
                                         seed)
        # lse atol 4e-6 as in test_cupy_gpu.py: with 1-2 keys lse is one fp32 dot product of 576 terms
        _run(case, lse_atol=4e-6)


# ---- compute-sanitizer on a representative subset

_SANITIZE = shared.sanitize_script("cupy")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    check_compute_sanitizer(tool, _SANITIZE)
