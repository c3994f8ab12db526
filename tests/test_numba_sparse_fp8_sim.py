"""The Numba FP8-cache / sparse (DSA) decode under the CUDA simulator (CPU CI), issue #5.

Like test_numba_sim.py, the simulator must be on before numba.cuda is first imported, so every case
runs in one subprocess with NUMBA_ENABLE_CUDASIM=1 and each test checks its case's result. Every
decode case is fresh random data compared with ``mla.reference.flash_mla_reference`` (FP8: the
reference dequantises the same bytes, i.e. runs on the dequantised cache), with the backend's
POISON_OUTPUTS hook on (outputs and partials NaN before the launch) and NaN in every unused cache
slot (0xFF bytes for FP8). Dims are tiny (FP8 fixes d = 576, so those cases have few keys) and the
plans use a few workers (num_sms): the simulator runs every thread in Python.

Also here, without the simulator: ``numba_backend.supports`` accepts FP8 / sparse / attn_sink
problems and still declines what it cannot do, with a reason.
"""

from __future__ import annotations

import json
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

from mla import _arrays, api, testing  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, any import mode
from _subprocess import run_python, simulator_results  # noqa: E402

BF16 = _arrays.BFLOAT16

# name: (kind of check, parameters)
CASES = {
    # bit-level helpers, exhaustively
    "e4m3_all_256_codes": ("e4m3", {}),
    "bf16_every_exponent": ("bf16_widen", {}),
    "bf16_rounding": ("bf16_narrow", {}),
    "fp8_token_dequant": ("fp8_tokens", {}),
    # decode: sparse, bf16/f16/f32 caches
    "sparse_bf16_invalid_topk_length_sink": ("decode", dict(
        b=3, s_q=2, h_q=4, h_kv=2, d=12, dv=8, page=4, seqlens=[9, 0, 30], dtype="bfloat16", topk=20,
        invalid=0.4, topk_length=[20, 5, 7], sink=[0.5, -np.inf, np.inf, 2.0], num_sms=4)),
    "sparse_f32_splits_nan_tail": ("decode", dict(
        b=2, s_q=1, h_q=2, h_kv=1, d=8, dv=8, page=16, seqlens=[500, 300], dtype="float32", topk=400,
        invalid=0.3, topk_length=[400, 260], poison_tail=True, num_sms=16, expect_splits=True)),
    "sparse_f16_head_tiles_no_block_table": ("decode", dict(
        b=2, s_q=3, h_q=10, h_kv=1, d=8, dv=6, page=3, seqlens=[11, 4], dtype="float16", topk=9,
        invalid=0.3, no_block_table=True, num_sms=2)),
    "sparse_all_invalid_rows": ("decode", dict(
        b=2, s_q=2, h_q=2, h_kv=1, d=8, dv=8, page=4, seqlens=[10, 6], dtype="bfloat16", topk=12,
        invalid=1.0, sink=[1.0, -1.0], num_sms=2, expect_empty=True)),
    "sparse_topk_length_zero_rows": ("decode", dict(
        b=2, s_q=1, h_q=2, h_kv=1, d=8, dv=4, page=4, seqlens=[10, 6], dtype="float32", topk=12,
        invalid=0.0, topk_length=[0, 12], poison_tail=True, num_sms=2)),
    "sparse_out_of_range_validate_false": ("decode", dict(
        b=2, s_q=2, h_q=2, h_kv=1, d=8, dv=8, page=4, seqlens=[10, 6], dtype="float32", topk=12,
        invalid=0.2, out_of_range=True, num_sms=2)),
    # decode: dense with attn_sink (not FP8) goes to the new kernel too
    "dense_bf16_sink_causal": ("decode", dict(
        b=2, s_q=2, h_q=3, h_kv=1, d=8, dv=8, page=4, seqlens=[13, 0], dtype="bfloat16", causal=True,
        sink=[0.0, np.inf, -3.0], num_sms=2)),
    # decode: FP8 cache (d = 576, d_v = 512), every q dtype
    "fp8_dense_causal_bf16q": ("decode", dict(
        b=3, s_q=2, h_q=2, h_kv=1, d=576, dv=512, page=4, seqlens=[6, 0, 3], dtype="bfloat16", fp8=True,
        causal=True, num_sms=2)),
    "fp8_dense_f32q_sink_hkv2": ("decode", dict(
        b=1, s_q=1, h_q=2, h_kv=2, d=576, dv=512, page=2, seqlens=[5], dtype="float32", fp8=True,
        sink=[0.3, -0.7], num_sms=2)),
    "fp8_sparse_f16q_invalid_topk_length_sink": ("decode", dict(
        b=2, s_q=2, h_q=2, h_kv=1, d=576, dv=512, page=4, seqlens=[9, 4], dtype="float16", fp8=True, topk=6,
        invalid=0.3, topk_length=[4, 6], poison_tail=True, sink=[np.inf, 0.25], num_sms=2)),
}

_SCRIPT = textwrap.dedent(
    """
    import json, sys, traceback
    import ml_dtypes
    import numpy as np
    from numba import cuda
    import mla
    from mla import reference, testing, _arrays
    from mla.backends import numba_backend
    from mla.fp8 import dequantize_kv_fp8, quantize_kv_fp8
    from mla.kernels import numba_sparse_fp8 as nsf

    numba_backend.POISON_OUTPUTS = True
    BF16 = _arrays.BFLOAT16

    def elementwise(device_fn):
        # a one-block kernel: out[e] = device_fn(src[e]) for every e
        @cuda.jit
        def kernel(src, out):
            for e in range(cuda.threadIdx.x, src.shape[0], cuda.blockDim.x):
                out[e] = device_fn(src[e])
        return kernel

    k_e4m3 = elementwise(nsf.e4m3_to_f32)
    k_bf16_widen = elementwise(nsf.bf16_bits_to_f32)
    k_bf16_narrow = elementwise(nsf.f32_to_bf16_bits)

    @cuda.jit
    def k_fp8_tokens(words, out):
        for e in range(cuda.threadIdx.x, out.shape[0] * 576, cuda.blockDim.x):
            out[e // 576, e % 576] = nsf._fp8_channel(words, e // 576, 0, 0, e % 576)

    def same_bits(got, want):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN positions differ"
        ok = ~np.isnan(want)
        bad = np.flatnonzero(got[ok].view(np.uint32) != want[ok].view(np.uint32))
        assert bad.size == 0, f"{bad.size} values differ, first: got {got[ok][bad[:4]]} want {want[ok][bad[:4]]}"

    def check_e4m3(rng, p):
        codes = np.arange(256, dtype=np.uint8)
        out = np.full(256, 7.0, np.float32)
        k_e4m3[1, 16](codes, out)
        want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        same_bits(out, want)  # subnormals (0x01..0x07), -0 (0x80), 448, NaN (0x7F, 0xFF) included
        assert np.isnan(out[[0x7F, 0xFF]]).all() and out[0x7E] == 448 and np.signbit(out[0x80])
        return 256

    def check_bf16_widen(rng, p):
        # every sign + exponent (zeros, subnormals, normals, inf, NaN) with 4 mantissas; the simulator
        # runs each call in Python (~ms), so not all 65536 patterns
        bits = ((np.arange(512, dtype=np.uint32)[:, None] << 7) | np.array([0, 1, 0x40, 0x7F], np.uint32)).ravel()
        bits = bits.astype(np.uint16)
        out = np.zeros(bits.size, np.float32)
        k_bf16_widen[1, 16](bits, out)
        same_bits(out, bits.view(BF16).astype(np.float32))
        return int(bits.size)

    def check_bf16_narrow(rng, p):
        x = rng.standard_normal(600).astype(np.float32) * np.float32(2.0) ** rng.integers(-140, 120, 600)
        ties = (rng.integers(0, 2**16, 200).astype(np.uint32) << 16 | 0x8000).view(np.float32)  # exact halves
        special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45, 1.1754942e-38],
                           np.float32)
        x = np.concatenate([x, ties[np.isfinite(ties)], special]).astype(np.float32)
        out = np.zeros(x.shape, np.uint16)
        k_bf16_narrow[1, 16](x, out)
        want = x.astype(BF16).view(np.uint16)
        nan = np.isnan(x)
        assert np.array_equal(out[~nan], want[~nan]), "bf16 rounding differs from ml_dtypes"
        assert np.isnan(out[nan].view(BF16).astype(np.float32)).all()
        return int(x.size)

    def check_fp8_tokens(rng, p):
        kv = rng.standard_normal((6, 576)).astype(np.float32)
        kv[1] *= 2.0**-30
        kv[2] *= 2.0**40
        kv[3, :128] = 0.0  # an all-zero tile (scale 1)
        kv[4, 128:256] *= 1e-3  # subnormal e4m3 codes next to large values
        raw = quantize_kv_fp8(kv)
        words = raw.reshape(6, 1, 1, 656).view(np.uint32)
        out = np.zeros((6, 576), np.float32)
        k_fp8_tokens[1, 16](words, out)
        same_bits(out, dequantize_kv_fp8(raw))
        return 6

    def check_decode(rng, p):
        dtype = {"bfloat16": BF16, "float16": np.float16, "float32": np.float32}[p["dtype"]]
        case = testing.make_decode_case(rng, b=p["b"], s_q=p["s_q"], h_q=p["h_q"], h_kv=p["h_kv"], d=p["d"],
                                        head_dim_v=p["dv"], page_block_size=p["page"], seqlens=p["seqlens"],
                                        dtype=dtype, causal=p.get("causal", False), fp8=p.get("fp8", False))
        b, topk = p["b"], p.get("topk")
        kwargs = {}
        if topk:
            case.indices = testing.make_sparse_indices(rng, case, topk, invalid_ratio=p["invalid"])
            if p.get("topk_length"):
                case.topk_length = np.array(p["topk_length"], np.int32)
            if p.get("poison_tail"):  # entries past topk_length point at NaN slots: must never be read
                testing.poison_sparse_tail(rng, case)
        if p.get("sink"):
            case.attn_sink = np.array(p["sink"], np.float32)
        indices_ref = case.indices
        if p.get("out_of_range"):  # validate=False: the kernel treats them as -1, never reads them
            limit = case.k_cache.shape[0] * case.k_cache.shape[1]
            bad = rng.random(case.indices.shape) < 0.3
            wild = np.where(rng.random(case.indices.shape) < 0.5, limit + rng.integers(0, 99, case.indices.shape),
                            -2 - rng.integers(0, 99, case.indices.shape)).astype(np.int32)
            case.indices = np.where(bad, wild, case.indices).astype(np.int32)
            indices_ref = np.where(bad, -1, case.indices).astype(np.int32)
            kwargs["validate"] = False
        sched, splits = mla.get_mla_metadata(case.cache_seqlens, p["s_q"] * p["h_q"] // p["h_kv"], p["h_kv"],
                                             topk=topk, num_sms=p["num_sms"])
        args = list(case.args())
        if p.get("no_block_table"):
            args[2] = args[3] = None
        kw = case.kwargs()
        kw["attn_sink"] = case.attn_sink  # DecodeCase.kwargs passes the sink in sparse mode only
        out, lse = mla.flash_mla_with_kvcache(*args, sched, splits, backend="numba", **kw, **kwargs)
        kw["indices"] = indices_ref
        ref_out, ref_lse = reference.flash_mla_reference(*case.args(), **kw)
        testing.assert_close(out, lse, ref_out, ref_lse)
        assert out.dtype == case.q.dtype and lse.dtype == np.float32 and isinstance(out, np.ndarray)
        empty = np.isinf(ref_lse)  # [b, h_q, s_q]
        assert np.all(np.asarray(out, np.float32)[empty.transpose(0, 2, 1)] == 0), "empty rows must be 0"
        if p.get("expect_empty"):
            assert empty.all() and np.all(lse == np.inf)
        else:
            assert not empty.all(), "case has no non-empty row"
        if p.get("expect_splits"):
            assert int(splits[-1]) > b + 2, f"expected several splits a sequence, got {int(splits[-1])}"
        return int(splits[-1])

    checks = dict(e4m3=check_e4m3, bf16_widen=check_bf16_widen, bf16_narrow=check_bf16_narrow,
                  fp8_tokens=check_fp8_tokens, decode=check_decode)
    cases = json.loads(sys.argv[1])
    results = {}
    for name, (what, params) in cases.items():
        try:
            rng = np.random.default_rng(sum(map(ord, name)))
            results[name] = ["ok", checks[what](rng, params)]
        except Exception:
            results[name] = ["fail", traceback.format_exc()]
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def sim_results():
    return simulator_results(_SCRIPT, CASES, timeout=900, MLA_NUMBA_VERSION=None)


@pytest.mark.parametrize("name", list(CASES))
def test_numba_sparse_fp8_simulator(sim_results, name):
    status = sim_results[name]
    assert status[0] == "ok", status[1]


# ---------------------------------------------------------------------------------------------
# supports(): what the Numba backend now accepts, and what it still declines (no simulator needed)


def _problem(rng, fp8=False, sparse=False, sink=False, dtype=BF16, d=576, dv=512, h_q=16, h_kv=1):
    case = testing.make_decode_case(rng, b=2, s_q=1, h_q=h_q, h_kv=h_kv, d=d, head_dim_v=dv, page_block_size=16,
                                    seqlens=[5, 20], dtype=dtype, fp8=fp8)
    indices = testing.make_sparse_indices(rng, case, 8) if sparse else None
    attn_sink = np.zeros(h_q, np.float32) if sink else None
    return api._validate(case.q, case.k_cache, case.block_table, case.cache_seqlens, dv, None, False, fp8, indices,
                         None, attn_sink, True)


def test_supports_fp8_sparse_and_sink():
    from mla.backends import numba_backend

    rng = np.random.default_rng(0)
    for kw in (dict(fp8=True), dict(fp8=True, sparse=True), dict(fp8=True, dtype=np.float16),
               dict(fp8=True, dtype=np.float32, sink=True), dict(sparse=True), dict(sparse=True, dtype=np.float32),
               dict(sparse=True, sink=True, d=40, dv=33, h_q=6, h_kv=3), dict(sink=True, dtype=np.float16)):
        problem = _problem(rng, **kw)
        assert numba_backend.supports(problem) == (True, ""), kw
        assert numba_backend._uses_sparse_fp8(problem), kw
    dense = _problem(rng)
    assert numba_backend.supports(dense) == (True, "")
    assert not numba_backend._uses_sparse_fp8(dense), "dense bf16 keeps the numba_decode path"


def test_supports_declines_with_reason():
    from mla.backends import numba_backend

    rng = np.random.default_rng(1)
    huge = _problem(rng, sparse=True, d=8192, dv=64, h_q=2)  # a key row and a query row exceed 48 KB
    ok, reason = numba_backend.supports(huge)
    assert not ok and "too large" in reason and "d = 8192" in reason
    dense_huge = _problem(rng, d=8192, dv=64, h_q=2)  # dense: numba_decode's v1 handles it (dynamic shared)
    assert numba_backend.supports(dense_huge) == (True, "")
    fake = types.SimpleNamespace(q=np.zeros((1, 1, 1, 8), np.float64), is_fp8_kvcache=False, indices=None,
                                 attn_sink=None, is_sparse=False)
    ok, reason = numba_backend.supports(fake)
    assert not ok and "float64" in reason
    fp8_wrong_dims = types.SimpleNamespace(q=np.zeros((1, 1, 1, 64), BF16), is_fp8_kvcache=True, indices=None,
                                           attn_sink=None, is_sparse=False, d=64, head_dim_v=48, h_q=1, h_kv=1,
                                           out_float32=False)
    ok, reason = numba_backend.supports(fp8_wrong_dims)
    assert not ok and "d = 576" in reason


def test_poison_sparse_tail_points_at_unused_slots():
    """mla.testing.unused_positions / poison_sparse_tail (the cases' poison_tail above, the GPU tests): the unused
    slots hold NaN (0xFF bytes in FP8), entries past topk_length then point at them, those before are unchanged."""
    rng = np.random.default_rng(2)
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=2, d=8, head_dim_v=8, page_block_size=4, seqlens=[9, 0, 13])
    free = testing.unused_positions(case)
    assert free.dtype == np.int32 and free.size == 3 * 4  # spare_blocks=3 blocks of page 4
    slots = case.k_cache.reshape(-1, *case.k_cache.shape[2:])
    assert np.isnan(slots[free]).all()
    case.indices = testing.make_sparse_indices(rng, case, 10)
    assert not np.isin(case.indices, free).any()
    case.topk_length = np.array([10, 0, 4], np.int32)
    before = case.indices.copy()
    testing.poison_sparse_tail(rng, case)
    for i, n in enumerate(case.topk_length):
        assert np.array_equal(case.indices[i, :, :n], before[i, :, :n])
        assert np.isin(case.indices[i, :, n:], free).all()
    fp8 = testing.make_decode_case(rng, b=1, s_q=1, h_q=1, d=576, head_dim_v=512, page_block_size=2, seqlens=[3],
                                   fp8=True)
    assert (fp8.k_cache.reshape(-1, fp8.k_cache.shape[-1])[testing.unused_positions(fp8)] == 0xFF).all()
    full = testing.make_decode_case(rng, b=1, page_block_size=4, seqlens=[8], spare_blocks=0)
    full.indices, full.topk_length = testing.make_sparse_indices(rng, full, 4), np.array([2], np.int32)
    assert testing.unused_positions(full).size == 0
    with pytest.raises(ValueError, match="no unused slots"):
        testing.poison_sparse_tail(rng, full)


# ---------------------------------------------------------------------------------------------
# the real-GPU code path compiles (NVVM -> PTX for sm_90, and ptxas when present), no GPU needed

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, re, shutil, subprocess, sys, tempfile, types as pytypes
    import numba.cuda.dispatcher as dispatcher
    if not hasattr(dispatcher, "get_current_device"):
        print("SKIP numba-cuda changed: dispatcher.get_current_device is gone"); sys.exit(0)
    # device functions ask the current device for its compute capability; there is none here
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
    from numba import cuda, types
    from mla.kernels import numba_sparse_fp8 as nsf

    def arr(dt, nd, layout="C"):
        return types.Array(dt, nd, layout)

    i32, f32 = types.int32, types.float32
    elem = {"bf16": types.uint16, "f16": types.float16, "f32": types.float32}
    report = []
    variants = [("bf16", True, True, True, 576, 512, 128), ("bf16", True, False, False, 576, 512, 16),
                ("f16", False, True, False, 576, 512, 64), ("f32", False, False, False, 64, 48, 3)]
    for kind, fp8, sparse, tl, d, dv, group in variants:
        geo = nsf.geometry(d, dv, group)
        kernel = nsf._make_decode(kind, fp8, sparse, tl, d, dv, geo)
        sig = (arr(elem[kind], 4, "A"), arr(types.uint32 if fp8 else elem[kind], 4), arr(i32, 2), arr(i32, 1),
               arr(i32, 1), arr(i32, 3), arr(i32, 1), arr(i32, 2), arr(i32, 1), arr(f32, 4), arr(f32, 3), f32,
               types.boolean)
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        except Exception as exc:
            if "nvvm" in repr(exc).lower():
                print("SKIP NVVM (libnvvm) is not available: " + repr(exc)[:200]); sys.exit(0)
            raise
        combine = nsf._make_combine(kind, True)
        cuda.compile_ptx(combine.py_func, (arr(f32, 4), arr(f32, 3), arr(i32, 1), arr(f32, 1), arr(elem[kind], 4),
                                           arr(f32, 3)), cc=(9, 0))
        entry = {"variant": [kind, fp8, sparse, tl, d, dv, group], "smem_expected": geo.smem}
        ptxas = shutil.which("ptxas")
        if ptxas:
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
                fh.write(ptx)
            info = subprocess.run([ptxas, "-arch=sm_90", "-v", fh.name, "-o", "/dev/null"], capture_output=True,
                                  text=True)
            text = info.stdout + info.stderr
            assert info.returncode == 0, text[-2000:]
            entry["spills"] = sum(int(x) for x in re.findall(r"(\\d+) bytes spill", text))
            entry["smem"] = int(re.findall(r"(\\d+) bytes smem", text)[-1])
            entry["registers"] = int(re.findall(r"Used (\\d+) registers", text)[-1])
        report.append(entry)
    print("RESULT" + json.dumps(report))
    """
)


def test_gpu_path_compiles_for_sm90():
    """NVVM compiles the decode (4 variants) and combine kernels for sm_90 without a GPU; with ptxas on
    PATH: no spills and the static shared memory the geometry planned (<= 48 KB)."""
    proc = run_python(_COMPILE_SCRIPT, timeout=600, NUMBA_ENABLE_CUDASIM="0")
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip()[5:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for entry in json.loads(lines[-1][len("RESULT"):]):
        if "spills" in entry:
            assert entry["spills"] == 0, entry
            assert entry["smem"] == entry["smem_expected"] <= 48 * 1024, entry
