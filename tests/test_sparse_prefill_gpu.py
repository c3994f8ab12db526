"""GPU tests of the CuPy sparse prefill kernel (``flash_mla_sparse_fwd``, issue #5; ``pytest -m gpu``).

kernels/mla_sparse_prefill.cu first ran on a GPU through this file: 74 passed on an H100 on
2026-11-25, and the two compute-sanitizer tests (memcheck, racecheck) passed, after which the
MLA_CUPY_UNVERIFIED gate was removed. Every test runs with that variable unset and poisons the
outputs with NaN before each launch (``cupy_backend.POISON_OUTPUTS``). Inputs come from
``make_case`` (tests/test_sparse_prefill_cupy_cpu.py): kv rows no counted index points to hold NaN,
entries past topk_length point at such rows. Reference: ``mla.sparse.sparse_prefill_reference`` in
float64; tolerances DESIGN §6 (out abs 8e-4 / rel 2.01/128; lse and max_logits rel 8.01/65536, abs
4e-6: fp32 accumulation over d = 576 near zero). ``MLA_GPU_EXAMPLES`` sets the hypothesis example
count (default 100).
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_sparse_prefill_cupy_cpu import BF16, assert_results_close, make_case, reference

import mla
from mla import _arrays
from mla.backends import BackendUnavailable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, any import mode
from _sanitizer import check_compute_sanitizer  # noqa: E402

cupy_backend = pytest.importorskip("mla.backends.cupy_backend")
_ok, _why = cupy_backend.available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _ok, reason=f"CuPy backend unavailable: {_why}")]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)  # no gate: the kernel is an ordinary path
    monkeypatch.setattr(cupy_backend, "POISON_OUTPUTS", True)


def _device(args):
    cp = _arrays.cupy_module()
    return {k: cp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}


def _run(args, on_device=True, backend="cupy", rows=None):
    """Kernel vs reference; ``rows`` limits the reference to a subset of query rows (large cases)."""
    got = mla.flash_mla_sparse_fwd(**(_device(args) if on_device else args), backend=backend)
    cp = _arrays.cupy_module()
    kind = cp.ndarray if on_device else np.ndarray
    assert all(isinstance(x, kind) for x in got), [type(x) for x in got]
    s_q, h_q = args["q"].shape[:2]
    assert got[0].shape == (s_q, h_q, args["d_v"]) and got[1].shape == got[2].shape == (s_q, h_q)
    if rows is not None:
        got = tuple(_arrays.asnumpy(x)[rows] for x in got)
        args = dict(args, q=args["q"][rows], indices=args["indices"][rows],
                    topk_length=None if args["topk_length"] is None else args["topk_length"][rows])
    assert_results_close(got, reference(args))
    return got


# ---- the matrix: DeepSeek dims, h_q in {16, 64, 128}, topk in {64, 512, 2048}, invalid 0 / 0.5 / 1


@pytest.mark.parametrize("invalid", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("topk", [64, 512, 2048])
@pytest.mark.parametrize("h_q", [16, 64, 128])
def test_matrix(h_q, topk, invalid):
    rng = np.random.default_rng(h_q * 1000 + topk + int(invalid * 10))
    _run(make_case(rng, s_q=3, h_q=h_q, s_kv=4096, topk=topk, invalid=invalid))


@pytest.mark.parametrize("sink", [None, "finite", "+inf", "-inf", "mixed"])
@pytest.mark.parametrize("dtype", [BF16, np.float16])
@pytest.mark.parametrize("h_q", [16, 128])
def test_topk_length_and_sink(h_q, dtype, sink):
    rng = np.random.default_rng(h_q + len(str(sink)) + (dtype == BF16))
    _run(make_case(rng, s_q=8, h_q=h_q, s_kv=3000, topk=512, invalid=0.25, dtype=dtype, topk_length=True,
                   sink=sink))


def test_topk_length_zero_and_full():
    rng = np.random.default_rng(7)
    args = make_case(rng, s_q=4, h_q=64, s_kv=500, topk=100, sink="finite")
    args["topk_length"] = np.array([0, 100, 1, 99], np.int32)
    out, ml, lse = _run(args)
    assert (_arrays.asnumpy(out)[0].astype(np.float32) == 0).all() and np.isposinf(_arrays.asnumpy(lse)[0]).all()
    assert np.isneginf(_arrays.asnumpy(ml)[0]).all()


def test_first_and_last_rows_and_duplicates():
    """Index 0 and s_kv - 1 (the bounds of the gather), repeated indices (each counts as a key)."""
    rng = np.random.default_rng(8)
    args = make_case(rng, s_q=2, h_q=16, s_kv=257, topk=48)
    kv = args["kv"].astype(np.float32)
    kv[[0, 256]] = rng.standard_normal((2, 1, 576))
    args["kv"] = kv.astype(BF16)
    args["indices"][0, 0, :4] = [0, 256, 0, 256]
    args["indices"][1, 0, :] = 256
    _run(args)


@pytest.mark.parametrize("scale", [0.05, 3.0])
def test_flat_and_peaked_softmax(scale):
    rng = np.random.default_rng(int(scale * 100))
    _run(make_case(rng, s_q=4, h_q=64, s_kv=3000, topk=2048, scale=scale, sink="finite"))


# ---- generic shapes: other d / d_v, h_kv > 1, groups that do not fill a 16-row tile


@pytest.mark.parametrize("d,d_v,h_q,h_kv", [(64, 48, 8, 1), (40, 33, 9, 3), (128, 128, 6, 2), (16, 16, 1, 1),
                                           (576, 512, 128, 2), (576, 512, 20, 1), (192, 128, 96, 1)])
@pytest.mark.parametrize("dtype", [BF16, np.float16])
def test_generic_shapes(d, d_v, h_q, h_kv, dtype):
    rng = np.random.default_rng(d + d_v + h_q + h_kv)
    _run(make_case(rng, s_q=5, h_q=h_q, h_kv=h_kv, s_kv=200, d=d, d_v=d_v, topk=70, invalid=0.3, dtype=dtype,
                   topk_length=True, sink="mixed"))


# ---- large: the benchmark's shape on a subset of rows


def test_deepseek_large():
    rng = np.random.default_rng(11)
    s_q, s_kv, topk = 256, 65536, 2048
    args = make_case(rng, s_q=s_q, h_q=128, s_kv=s_kv, topk=topk, invalid=0.1)
    _run(args, rows=np.array([0, 1, 77, 128, 200, 255]))


# ---- array kinds, dispatch, layout


def test_host_inputs_give_host_outputs():
    args = make_case(np.random.default_rng(12), s_q=3, h_q=16, s_kv=300, topk=64, sink="finite")
    _run(args, on_device=False)


def test_auto_uses_the_kernel_for_device_inputs(monkeypatch):
    from mla import sparse

    def boom(*a, **k):
        raise AssertionError("auto used the reference")

    args = make_case(np.random.default_rng(13), s_q=2, h_q=64, s_kv=300, topk=64)
    ref = reference(args)
    monkeypatch.setattr(sparse, "sparse_prefill_reference", boom)
    got = mla.flash_mla_sparse_fwd(**_device(args))
    assert_results_close(got, ref)


def test_no_gate_on_gpu(monkeypatch):
    """MLA_CUPY_UNVERIFIED unset or "0": backend="cupy" and "auto" both run the kernel on device inputs."""
    from mla import sparse

    def boom(*a, **k):
        raise AssertionError("the reference ran instead of the kernel")

    args = _device(make_case(np.random.default_rng(14), s_q=2, h_q=16, s_kv=100, topk=16))
    ref = reference(args)
    monkeypatch.setattr(sparse, "sparse_prefill_reference", boom)
    cp = _arrays.cupy_module()
    for gate in (None, "0"):
        if gate is None:
            monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
        else:
            monkeypatch.setenv("MLA_CUPY_UNVERIFIED", gate)
        for backend in ("cupy", "auto"):
            got = mla.flash_mla_sparse_fwd(**args, backend=backend)
            assert all(isinstance(x, cp.ndarray) for x in got)
            assert_results_close(got, ref)


def test_float32_on_device_falls_back_or_raises():
    args = _device(make_case(np.random.default_rng(15), s_q=2, h_q=16, s_kv=100, d=64, d_v=64, topk=16,
                             dtype=np.float32))
    with pytest.raises(BackendUnavailable, match="float32"):
        mla.flash_mla_sparse_fwd(**args, backend="cupy")
    assert_results_close(mla.flash_mla_sparse_fwd(**args), reference(args))


def test_non_contiguous_and_offset_inputs():
    """Views (strided q, kv starting 8 bytes into an allocation) are copied to aligned operands."""
    cp = _arrays.cupy_module()
    args = make_case(np.random.default_rng(16), s_q=3, h_q=16, s_kv=120, d=64, d_v=64, topk=40)
    dev = _device(args)
    wide = cp.zeros((3, 16, 128), dtype=cp.uint16)  # built from the raw bits
    wide[:, :, :64] = dev["q"].view(cp.uint16)
    flat = cp.zeros(dev["kv"].size + 4, dtype=cp.uint16)
    flat[4:] = dev["kv"].view(cp.uint16).ravel()
    dev["q"] = wide[:, :, :64].view(dev["q"].dtype)
    dev["kv"] = flat[4:].reshape(dev["kv"].shape).view(dev["kv"].dtype)
    assert not dev["q"].flags.c_contiguous and dev["kv"].data.ptr % 16
    got = mla.flash_mla_sparse_fwd(**dev, backend="cupy")
    assert_results_close(got, reference(args))


def test_out_of_range_index_is_an_error_on_device():
    args = make_case(np.random.default_rng(17), s_q=2, h_q=16, s_kv=100, topk=16)
    args["indices"][1, 0, 3] = 100
    with pytest.raises(ValueError, match=r"indices must be in \[-1, s_kv\)"):
        mla.flash_mla_sparse_fwd(**_device(args), backend="cupy")


def test_empty_query():
    args = make_case(np.random.default_rng(18), s_q=1, h_q=16, s_kv=50, topk=8)
    args.update(q=args["q"][:0], indices=args["indices"][:0])
    out, ml, lse = mla.flash_mla_sparse_fwd(**_device(args), backend="cupy")
    assert out.shape == (0, 16, 512) and ml.shape == lse.shape == (0, 16)


# ---- hypothesis: small random shapes

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=int(os.environ.get("MLA_GPU_EXAMPLES", "100")), deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(seed=st.integers(0, 2**31 - 1), s_q=st.integers(1, 6), h_kv=st.integers(1, 3),
           group=st.sampled_from([1, 3, 16, 17, 40, 64, 128]),
           dims=st.sampled_from([(16, 16), (40, 33), (64, 48), (576, 512)]), s_kv=st.integers(1, 400),
           topk=st.integers(1, 300), invalid=st.sampled_from([0.0, 0.3, 1.0]), use_tl=st.booleans(),
           sink=st.sampled_from([None, "finite", "mixed"]), fp16=st.booleans())
    def test_hypothesis_random_shapes(seed, s_q, h_kv, group, dims, s_kv, topk, invalid, use_tl, sink, fp16):
        d, d_v = dims
        rng = np.random.default_rng(seed)
        _run(make_case(rng, s_q=s_q, h_q=group * h_kv, h_kv=h_kv, s_kv=s_kv, d=d, d_v=d_v, topk=topk,
                       invalid=invalid, dtype=np.float16 if fp16 else BF16, topk_length=use_tl, sink=sink))


# ---- compute-sanitizer: no out-of-bounds access, no shared-memory race

_SANITIZE = textwrap.dedent("""
    import numpy as np, cupy as cp, mla
    from mla.backends import cupy_backend
    cupy_backend.POISON_OUTPUTS = True
    rng = np.random.default_rng(0)
    for h_q, d, d_v, topk in ((128, 576, 512, 300), (16, 576, 512, 100), (9, 40, 33, 50)):
        s_kv = 257
        q = cp.asarray(rng.standard_normal((3, h_q, d)).astype(mla.bfloat16))
        kv = cp.asarray(rng.standard_normal((s_kv, 1, d)).astype(mla.bfloat16))
        idx = rng.integers(-1, s_kv, size=(3, 1, topk)).astype(np.int32)
        idx[0, 0, :2] = [0, s_kv - 1]
        tl = cp.asarray(np.array([topk, topk // 2, 0], np.int32))
        mla.flash_mla_sparse_fwd(q, kv, cp.asarray(idx), d ** -0.5, d_v, attn_sink=cp.zeros(h_q, cp.float32),
                                 topk_length=tl, backend='cupy')[0].get()
    print('SANITIZE-DONE')
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    check_compute_sanitizer(tool, _SANITIZE)
