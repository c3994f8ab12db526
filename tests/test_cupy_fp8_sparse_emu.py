"""The CuPy FP8-cache and sparse decode kernels (mla_decode_fp8.cu, mla_decode_sparse.cu, and the
combines) *run* on the CPU emulator (tests/_cuda_emu.py) against the NumPy reference.

These kernels were verified on an H100 on 2026-11-25 (tests/test_cupy_fp8_sparse_gpu.py); this file
checked them before that and still runs without a GPU. The emulator executes the real .cu source
(each CUDA thread a fiber; ldmatrix / mma.sync / cp.async per the PTX spec; checked on the
GPU-verified portable decode kernel in tests/test_prefill_compile.py), through the backend's own
launch list (``cupy_sparse_fp8.prepare``) with NumPy standing in for CuPy: tiling choice,
arguments, partial buffers, combine. Outputs are poisoned with NaN before the launch, unused cache
slots hold NaN (FP8: NaN codes), plans are forced to split sequences so the combines run. What the
emulator cannot show: data races it does not schedule, timing, and device-specific rounding of
exp2 (host exp2 here); the GPU tests (tests/test_cupy_fp8_sparse_gpu.py) cover those.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

import mla
from mla import _arrays, api, testing
from mla.backends import _nvrtc, cupy_backend, cupy_sparse_fp8

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, any import mode
import _cuda_emu  # noqa: E402

pytestmark = pytest.mark.skipif(_cuda_emu.compiler() is None, reason="the CPU emulator needs g++")

BF16 = _arrays.BFLOAT16
H100_SMEM = 232448


@pytest.fixture
def emulated(monkeypatch):
    """cupy_sparse_fp8.prepare with NumPy as the array module and the emulator as the compiler."""
    modules = {}
    timing = {"eager": False, "schedule": "lockstep"}  # tests may change it before running

    def load_function(name, fn, defines=None, arch=None):
        key = (name, tuple(sorted((defines or {}).items())))
        if key not in modules:
            if name == "mla_decode_hopper.cu":  # the Hopper kernels: with the wgmma model of test_hopper_compile.py
                import test_hopper_compile as th

                monkeypatch.setattr(_cuda_emu, "EMULATED", set(_cuda_emu.EMULATED) | th.MODELLED)
                modules[key] = _cuda_emu.EmuModule(name, {"MLA_HAS_WGMMA": 1, **(defines or {})},
                                                   source=th.WGMMA_MODEL + _nvrtc.read_source(name))
            else:
                modules[key] = _cuda_emu.EmuModule(name, defines)
        modules[key].configure(timing["eager"], timing["schedule"])
        return modules[key].get_function(fn)

    fake_cp = types.SimpleNamespace(asarray=np.asarray, ascontiguousarray=np.ascontiguousarray, empty=np.empty,
                                    uint16=np.uint16, float32=np.float32, int32=np.int32, nan=np.nan,
                                    full=np.full, zeros=np.zeros)
    monkeypatch.setattr(cupy_sparse_fp8._arrays, "cupy_module", lambda: fake_cp)
    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: (9, 0))
    monkeypatch.setattr(cupy_backend, "_max_smem", lambda dev: H100_SMEM)
    monkeypatch.setattr(_nvrtc, "load_function", load_function)
    monkeypatch.setattr(cupy_backend, "POISON_OUTPUTS", True)
    monkeypatch.setenv("MLA_CUPY_FP8_KERNEL", "portable")  # the mma.sync kernels (Hopper: test_hopper_compile.py)
    monkeypatch.setenv("MLA_CUPY_SPARSE_KERNEL", "portable")
    yield timing
    for module in modules.values():
        module.configure(False, "lockstep")


def _run(case, num_sms, indices=None, topk_length=None, attn_sink=None):
    """Plan (a few workers: sequences split), prepare, launch on the emulator; (out, lse) NumPy."""
    args = case.args()
    problem = api._validate(*args, None, case.causal, case.is_fp8_kvcache, indices, topk_length, attn_sink, True)
    if indices is not None:
        sched, splits = mla.get_mla_metadata(np.zeros(problem.b, np.int32), problem.s_q * problem.h_q, 1,
                                             topk=int(indices.shape[-1]), num_sms=num_sms)
    else:
        sched, splits = mla.get_mla_metadata(case.cache_seqlens, problem.s_q * problem.h_q, 1, num_sms=num_sms)
    launches, out, lse = cupy_sparse_fp8.prepare(problem, sched, splits, 0)
    for fn, grid, block, fargs, smem in launches:
        fn.max_dynamic_shared_size_bytes = max(smem, 48 * 1024)
        fn(grid, block, fargs, shared_mem=smem)
    if out.dtype == np.uint16:
        out = out.view(case.q.dtype)
    return out, lse, splits


def _reference(case, indices=None, topk_length=None, attn_sink=None):
    return mla.flash_mla_with_kvcache(*case.args(), causal=case.causal, is_fp8_kvcache=case.is_fp8_kvcache,
                                      indices=indices, topk_length=topk_length, attn_sink=attn_sink,
                                      backend="numpy")


@pytest.mark.parametrize("s_q,h_q,seqlens,causal,num_sms", [
    (1, 16, [150, 0, 64], False, 16),  # sequence 0 in two splits: partials + combine
    (2, 16, [200, 7], True, 8),        # causal s_q = 2, two splits
    (1, 32, [129], False, 1),          # one split: the decode kernel writes out / lse itself
])
def test_fp8_dense_decode_emulated(emulated, s_q, h_q, seqlens, causal, num_sms):
    rng = np.random.default_rng(len(seqlens) * 100 + h_q + s_q)
    case = testing.make_decode_case(rng, b=len(seqlens), s_q=s_q, h_q=h_q, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=seqlens, dtype=BF16, causal=causal, fp8=True)
    out, lse, splits = _run(case, num_sms)
    want, lse_want = _reference(case)
    assert (int(np.diff(splits).max()) > 1) == (num_sms > 1)  # the combine path is (not) exercised
    testing.assert_close(out, lse, want, lse_want)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("sink", [None, "finite", "inf"])
def test_sparse_decode_emulated(emulated, fp8, sink):
    rng = np.random.default_rng(7 + fp8 * 10 + (sink is not None))
    b, s_q, h_q, topk = 2, 2, 16, 96
    case = testing.make_decode_case(rng, b=b, s_q=s_q, h_q=h_q, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[300, 90], dtype=BF16, fp8=fp8)
    indices = testing.make_sparse_indices(rng, case, topk, invalid_ratio=0.4)
    indices[1, 1, :] = -1  # a row with no valid index: out 0, lse +inf
    topk_length = np.array([topk, 50], np.int32)
    indices[1, 0, 50:] = (case.cache_seqlens[1] + 5)  # past topk_length: would read NaN slots if used
    attn_sink = None
    if sink == "finite":
        attn_sink = rng.standard_normal(h_q).astype(np.float32)
    elif sink == "inf":
        attn_sink = np.where(np.arange(h_q) % 2 == 0, np.inf, -np.inf).astype(np.float32)
    out, lse, splits = _run(case, 16, indices=indices, topk_length=topk_length, attn_sink=attn_sink)
    assert int(np.diff(splits).max()) > 1  # index lists split over workers: partials + combine
    want, lse_want = _reference(case, indices, topk_length, attn_sink)
    testing.assert_close(out, lse, want, lse_want, lse_atol=4e-6)
    assert (np.asarray(out[1, 1], np.float32) == 0).all() and np.isposinf(lse[1, :, 1]).all()


@pytest.mark.parametrize("fp8,sink,h_q,h_kv", [(False, None, 64, 1), (True, "finite", 64, 1), (True, None, 128, 2),
                                              (False, "inf", 128, 1)])
def test_hopper_sparse_decode_emulated(emulated, monkeypatch, fp8, sink, h_q, h_kv):
    """The wide Hopper kernel's sparse build (mla_decode_hopper_sparse; taken for h_q / h_kv % 64 == 0 on an
    H100): -1 indices, topk_length, an empty row, sinks, splits + the sink combine."""
    monkeypatch.setenv("MLA_CUPY_SPARSE_KERNEL", "hopper")
    rng = np.random.default_rng(70 + fp8 * 10 + h_q)
    b, s_q, topk = 2, 2, 150
    case = testing.make_decode_case(rng, b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=[300, 90], dtype=BF16, fp8=fp8)
    indices = testing.make_sparse_indices(rng, case, topk, invalid_ratio=0.4)
    indices[1, 1, :] = -1  # a row with no valid index: out 0, lse +inf
    topk_length = np.array([topk, 70], np.int32)
    attn_sink = None
    if sink == "finite":
        attn_sink = rng.standard_normal(h_q).astype(np.float32)
    elif sink == "inf":
        attn_sink = np.where(np.arange(h_q) % 2 == 0, np.inf, -np.inf).astype(np.float32)
    problem = api._validate(*case.args(), None, False, fp8, indices, topk_length, attn_sink, True)
    from mla.backends import cupy_hopper

    assert cupy_hopper.sparse_ok(problem, 0)
    out, lse, splits = _run(case, 16, indices=indices, topk_length=topk_length, attn_sink=attn_sink)
    if h_q == 64:  # 128 rows and 16 SMs: 4 workers for 2 lists of 3 tiles, no split there
        assert int(np.diff(splits).max()) > 1
    want, lse_want = _reference(case, indices, topk_length, attn_sink)
    testing.assert_close(out, lse, want, lse_want, lse_atol=4e-6, out_atol=testing.out_atol(case))
    assert (np.asarray(out[1, 1], np.float32) == 0).all()


@pytest.mark.parametrize("eager,schedule", [(True, "skewed"), (False, "reverse"), (True, "reverse")])
@pytest.mark.parametrize("kind", ["fp8_dense", "sparse_fp8_sink"])
def test_other_warp_schedules_and_copy_timings(emulated, kind, eager, schedule):
    """Warps run at different speeds and cp.async lands at the issue instead of the wait: a missing
    barrier or a buffer refilled while another warp still reads it changes the result (shared memory
    starts as NaN bytes)."""
    emulated.update(eager=eager, schedule=schedule)
    rng = np.random.default_rng(31)
    if kind == "fp8_dense":
        case = testing.make_decode_case(rng, b=2, s_q=2, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                        seqlens=[200, 7], dtype=BF16, causal=True, fp8=True)
        out, lse, _ = _run(case, 8)
        want, lse_want = _reference(case)
        testing.assert_close(out, lse, want, lse_want)
        return
    case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[300, 90], dtype=BF16, fp8=True)
    indices = testing.make_sparse_indices(rng, case, 160, invalid_ratio=0.3)
    sink = rng.standard_normal(16).astype(np.float32)
    out, lse, _ = _run(case, 16, indices=indices, attn_sink=sink)
    want, lse_want = _reference(case, indices, None, sink)
    testing.assert_close(out, lse, want, lse_want, lse_atol=4e-6)
