"""CPU-only checks of the Hopper (sm_90a, wgmma) decode kernel: kernels/mla_decode_hopper.cu, mla_wgmma.cuh,
wgmma_probe.cu and their launcher mla/backends/cupy_hopper.py. NO GPU NEEDED.

* NVRTC: the decode kernel (bf16 with and without the P split, fp16) and the probe kernels compile for
  sm_90a with ``-Xptxas -v``: no spills, no local-memory stack, <= 255 registers; with nvcc and cuobjdump
  at hand, the SASS holds the expected HGMMA instructions (36 x 64x32x16, 8 or 4 x 64x256x16 N-major B).
* The decode kernel *runs* on the CPU through tests/_cuda_emu.py (each CUDA thread a fiber) with a model
  of wgmma written here from the PTX ISA (descriptor decoding of the canonical no-swizzle layouts, the
  m64nNk16 register fragments, commit / wait groups carried out at the wait or at the issue), named
  barriers (bar.arrive / bar.sync), against the NumPy reference: DeepSeek dims, varlen with empty
  sequences, splits + combine, causal s_q > 1, h_q up to 128 (two row tiles), h_kv = 2, bf16 and fp16,
  poisoned outputs and caches, several warp schedules and cp.async / wgmma timings (a missing barrier,
  an early buffer refill or a read of an unfinished wgmma shows).
  What this does NOT check: that the hardware agrees with this reading of the PTX ISA (descriptor
  fields, fragment maps) -- tests/test_wgmma_probe_gpu.py checks that on an H100.
* The dispatch: no gate, shape / device reasons, "auto" / "hopper" / MLA_HOPPER_VARIANT choices.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest

from mla import _arrays
from mla.backends import _nvrtc, cupy_hopper

BF16 = _arrays.BFLOAT16




needs_nvrtc = pytest.mark.skipif(_nvrtc.unavailable_reason() is not None,
                                 reason=str(_nvrtc.unavailable_reason()))

_FP8_BUILDS = [{"MLA_FP16": 0, "MLA_FP8": 1}, {"MLA_FP16": 0, "MLA_FP8": 1, "MLA_P_SPLIT": 1}]  # (MLA_CUPY_PSPLIT=1)
COMPILE_CASES = (
    [(src, d) for src in (cupy_hopper.SOURCE, cupy_hopper.NARROW_SOURCE)
     for d in cupy_hopper.compile_variants() + _FP8_BUILDS]
    + [(cupy_hopper.NARROW_SOURCE, {**d, "MLA_NQ": 32}) for d in cupy_hopper.compile_variants() + _FP8_BUILDS]
    + [(cupy_hopper.SOURCE, {"MLA_FP16": f, "MLA_SPARSE": 1}) for f in (0, 1)]
    + [(cupy_hopper.SOURCE, {"MLA_FP16": 0, "MLA_SPARSE": 1, "MLA_P_SPLIT": 1})]
    + [(cupy_hopper.SOURCE, {"MLA_FP16": 0, "MLA_SPARSE": 1, "MLA_FP8": 1, "MLA_P_SPLIT": p}) for p in (0, 1)]
    + [(cupy_hopper.SEESAW_SOURCE, d) for d in cupy_hopper.compile_variants()]
    # the builds that merge their own split sequences (cooperative launches: cupy_hopper.prepare's fused_fn)
    + [(src, {**d, "MLA_FUSED": 1}) for src in (cupy_hopper.NARROW_SOURCE, cupy_hopper.SEESAW_SOURCE)
       for d in cupy_hopper.compile_variants()]
    + [(cupy_hopper.NARROW_SOURCE, {**d, "MLA_NQ": 32, "MLA_FUSED": 1}) for d in cupy_hopper.compile_variants()]
    + [(cupy_hopper.NARROW_SOURCE, {"MLA_FP16": 0, "MLA_NARROW_TRACE": 1})]  # (benchmarks/narrow_trace.py)
    + [(cupy_hopper.FP8_REGS_SOURCE, {"MLA_FP16": 0})]
    + [("wgmma_probe.cu", {"MLA_FP16": 0}), ("wgmma_probe.cu", {"MLA_FP16": 1})])


def _ptxas_check(log, arch="sm_90a"):
    reports = _nvrtc.parse_ptxas(log)
    assert reports, f"no ptxas -v report in the log:\n{log}"
    for rep in reports:
        assert rep["arch"] == arch
        assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, f"register spills: {rep}\n{log}"
        assert rep["stack"] == 0, f"local-memory stack frame: {rep}\n{log}"
        assert rep["registers"] is not None and rep["registers"] <= 255, rep
    return reports


@needs_nvrtc
@pytest.mark.parametrize("name,defines", COMPILE_CASES,
                         ids=[f"{n}-" + "-".join(f"{k}{v}" for k, v in d.items()) for n, d in COMPILE_CASES])
def test_sm90a_compiles_without_spills(name, defines):
    cubin, log = _nvrtc.compile_cubin(name, "sm_90a", defines)
    assert len(cubin) > 0
    reports = _ptxas_check(log)
    assert "serialized" not in log, f"ptxas serialises the wgmma pipeline:\n{log}"
    if name == "mla_decode_hopper.cu":
        want = "mla_decode_hopper_sparse" if defines.get("MLA_SPARSE") else "mla_decode_hopper"
        assert [r["function"] for r in reports] == [want]


@needs_nvrtc
@pytest.mark.parametrize("name", ["mla_decode_hopper.cu", "mla_decode_hopper_narrow.cu", "mla_decode_seesaw.cu",
                                  "mla_decode_fp8_regs.cu", "wgmma_probe.cu"])
def test_sm80_builds_are_trapping_stubs(name):
    """tests/test_cupy_compile.py builds every source for sm_80 too: wgmma code is compiled out there."""
    _, log = _nvrtc.compile_cubin(name, "sm_80", {})
    _ptxas_check(log, "sm_80")


def test_smem_budget_matches_the_kernel():
    src = _nvrtc.read_source("mla_decode_hopper.cu")
    assert "2 K tiles 147456 B" in src and f"= {cupy_hopper.SMEM_BYTES} B" in src
    assert cupy_hopper.SMEM_BYTES == 229376 <= 232448  # the H100's opt-in limit a block
    seesaw = _nvrtc.read_source(cupy_hopper.SEESAW_SOURCE)
    assert f"SMEM_BYTES == {cupy_hopper.seesaw_smem_bytes()}" in seesaw
    assert cupy_hopper.seesaw_smem_bytes() == 230560 <= 232448
    regs = _nvrtc.read_source(cupy_hopper.FP8_REGS_SOURCE)
    assert f"SMEM_BYTES == {cupy_hopper.FP8_REGS_SMEM_BYTES}" in regs
    assert cupy_hopper.FP8_REGS_SMEM_BYTES == 203664 <= 232448


@pytest.mark.parametrize("defines,n_pv", [({"MLA_FP16": 0}, 16), ({"MLA_FP16": 0, "MLA_P_SPLIT": 1}, 32),
                                          ({"MLA_FP16": 1}, 16)])
def test_seesaw_sass_holds_hgmma(tmp_path, defines, n_pv):
    """The seesaw kernel: per warpgroup branch 36 HGMMA.64x64x16 (S of its block) and, for its own and the other
    block, P V as HGMMA.64x256x16 (x 2 with the bf16 P split), none serialised."""
    sass, log = _sass(tmp_path, cupy_hopper.SEESAW_SOURCE, defines)
    assert "serialized" not in log, log
    assert _hgmma_counts(sass) == {"64x64x16": 72, "64x256x16": n_pv}
    pv = [line for line in sass.splitlines() if "HGMMA.64x256x16" in line]
    assert all(".tnspB" in line for line in pv), pv[:2]


def _sass_tools():
    nvcc = shutil.which("nvcc") or (shutil.which("/usr/local/bin/nvcc"))
    cuobjdump = shutil.which("cuobjdump") or shutil.which("/tmp/cuobj/nvidia/cu13/bin/cuobjdump")
    return nvcc, cuobjdump


def _sass(tmp_path, source, defines):
    """(SASS text, ptxas -v log) of kernels/``source`` built by nvcc for sm_90a with ``defines`` (the NVRTC
    cubin is the same code but this cuobjdump does not read it); skips without nvcc / cuobjdump."""
    nvcc, cuobjdump = _sass_tools()
    if nvcc is None or cuobjdump is None:
        pytest.skip("nvcc / cuobjdump not found (SASS check only)")
    src = tmp_path / "kernel.cu"
    src.write_text(_nvrtc.read_source(source))
    cubin = tmp_path / "kernel.cubin"
    cmd = [nvcc, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-o", str(cubin), str(src),
           "-Xptxas", "-v"]
    cmd += [f"-D{k}={v}" for k, v in defines.items()]
    log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    env = None
    nvdisasm = shutil.which("nvdisasm") or "/tmp/nvdis/nvidia/cu13/bin/nvdisasm"
    if shutil.which(nvdisasm):
        import os

        env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True,
                          env=env).stdout
    return sass, log


def _hgmma_counts(sass):
    shapes = re.findall(r"HGMMA\.(\d+x\d+x\d+)\.F32", sass)  # .F32.BF16 for bf16, .F32 for fp16
    return {k: shapes.count(k) for k in set(shapes)}


@pytest.mark.parametrize("defines,n_pv", [({"MLA_FP16": 0}, 4), ({"MLA_FP16": 0, "MLA_P_SPLIT": 1}, 8),
                                          ({"MLA_FP16": 1}, 4), ({"MLA_FP16": 0, "MLA_FP8": 1}, 4),
                                          ({"MLA_FP16": 0, "MLA_SPARSE": 1}, 4),
                                          ({"MLA_FP16": 0, "MLA_SPARSE": 1, "MLA_FP8": 1}, 4),
                                          ({"MLA_FP16": 0, "MLA_SPARSE": 1, "MLA_FP8": 1, "MLA_P_SPLIT": 1}, 8)])
def test_sass_holds_hgmma(tmp_path, defines, n_pv):
    """The wide kernel (every build): 36 HGMMA.64x32x16 (S) and n_pv HGMMA.64x256x16 (P V) a tile, none
    serialised."""
    sass, log = _sass(tmp_path, "mla_decode_hopper.cu", defines)
    assert "serialized" not in log, log
    assert _hgmma_counts(sass) == {"64x32x16": 36, "64x256x16": n_pv}
    pv = [line for line in sass.splitlines() if "HGMMA.64x256x16" in line]
    assert all(".tnspB" in line for line in pv), pv[:2]  # imm-trans-b = 1: B (= V) read N-major
    assert sass.count("WARPGROUP.DEPBAR") == 2  # one wait for S, one for P V: the batches are not serialised


@pytest.mark.parametrize("defines,st_shape,pv_shape", [
    ({"MLA_FP16": 0}, "64x16x16", "64x16x16"), ({"MLA_FP16": 0, "MLA_P_SPLIT": 1}, "64x16x16", "64x32x16"),
    ({"MLA_FP16": 1}, "64x16x16", "64x16x16"), ({"MLA_FP16": 0, "MLA_FP8": 1}, "64x16x16", "64x16x16"),
    ({"MLA_FP16": 0, "MLA_NQ": 32}, "64x32x16", "64x32x16"), ({"MLA_FP16": 0, "MLA_NQ": 32, "MLA_P_SPLIT": 1},
                                                              "64x32x16", "64x64x16"),
    ({"MLA_FP16": 1, "MLA_NQ": 32}, "64x32x16", "64x32x16")])
def test_narrow_sass_holds_unserialised_hgmma(tmp_path, defines, st_shape, pv_shape):
    """The narrow kernel: 18 HGMMA for a warpgroup's half of S^T and 16 for its 4 channel blocks of P V a
    tile, and exactly two waits: ptxas did not serialise the wgmma (it does when the warpgroup index looks
    divergent to it, and then NVRTC's log does not say so)."""
    sass, log = _sass(tmp_path, cupy_hopper.NARROW_SOURCE, defines)
    assert "serialized" not in log, log
    want = {st_shape: 18}
    want[pv_shape] = want.get(pv_shape, 0) + 16
    assert _hgmma_counts(sass) == want
    assert sass.count("WARPGROUP.DEPBAR") == 2


# ---- the dispatch and the gate (no GPU)


def _problem(d=576, dv=512, dtype=BF16, h_kv=1):
    import mla
    from mla import api, testing

    del mla
    case = testing.make_decode_case(np.random.default_rng(0), b=2, s_q=1, h_q=16, h_kv=h_kv, d=d, head_dim_v=dv,
                                    page_block_size=64, seqlens=[5, 70], dtype=dtype)
    return api._validate(*case.args(), None, False, False, None, None, None, True)


def test_no_gate_kernel_choice(monkeypatch):
    """The Hopper kernels passed their GPU tests (2026-11-26): forcing them needs no MLA_CUPY_UNVERIFIED, and
    "auto" (the default) is chosen per problem in _prepare."""
    from mla.backends import cupy_backend

    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    monkeypatch.delenv("MLA_CUPY_KERNEL", raising=False)
    assert cupy_backend._pick_kernel("hopper") == "hopper"
    assert cupy_backend._pick_kernel(None) == "auto"
    monkeypatch.setenv("MLA_CUPY_KERNEL", "portable")
    assert cupy_backend._pick_kernel(None) == "portable"
    with pytest.raises(ValueError, match="MLA_CUPY_KERNEL"):
        cupy_backend._pick_kernel("nonsense")
    assert not any(hasattr(cupy_hopper, n) for n in ("check_gate", "gate_open", "gate_reason"))


def _rows_problem(s_q, h_q, h_kv=1):
    import types

    return types.SimpleNamespace(s_q=s_q, h_q=h_q, h_kv=h_kv)


@pytest.mark.parametrize("s_q,h_q,h_kv,want", [(1, 16, 1, "narrow"), (1, 1, 1, "narrow"), (2, 64, 8, "narrow"),
                                               (2, 16, 1, "narrow"), (1, 33, 1, "seesaw"), (1, 64, 1, "seesaw"),
                                               (2, 128, 1, "seesaw")])
def test_variants(monkeypatch, s_q, h_q, h_kv, want):
    """Rows a KV head (s_q h_q / h_kv): the narrow kernel up to 32 (nq 16 up to 16 rows, else 32), the seesaw
    one above (WIDE_MIN_ROWS = 33); MLA_HOPPER_VARIANT overrides."""
    monkeypatch.delenv("MLA_HOPPER_VARIANT", raising=False)
    p = _rows_problem(s_q, h_q, h_kv)
    assert cupy_hopper.WIDE_MIN_ROWS == 33
    assert cupy_hopper.narrow_nq(p) == (16 if s_q * h_q // h_kv <= 16 else 32)
    assert cupy_hopper.variant(p) == want
    for v in ("narrow", "wide", "seesaw"):
        monkeypatch.setenv("MLA_HOPPER_VARIANT", v)
        assert cupy_hopper.variant(p) == v
    monkeypatch.setenv("MLA_HOPPER_VARIANT", "bogus")
    with pytest.raises(ValueError, match="MLA_HOPPER_VARIANT"):
        cupy_hopper.variant(p)


def test_shape_reasons():
    assert cupy_hopper.shape_reason(_problem()) is None
    assert cupy_hopper.shape_reason(_problem(h_kv=2)) is None
    assert "d = 576, d_v = 512" in cupy_hopper.shape_reason(_problem(d=64, dv=48))
    assert "bfloat16 and float16" in cupy_hopper.shape_reason(_problem(dtype=np.float32))


def test_device_reasons(monkeypatch):
    from mla.backends import cupy_backend

    monkeypatch.setattr(cupy_backend, "_max_smem", lambda dev: 232448)
    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: (9, 0))
    assert cupy_hopper.device_reason(0) is None
    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: (8, 0))
    assert "compute capability 9.0" in cupy_hopper.device_reason(0)
    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: (10, 0))
    assert "compute capability 9.0" in cupy_hopper.device_reason(0)
    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: (9, 0))
    monkeypatch.setattr(cupy_backend, "_max_smem", lambda dev: 101376)
    assert "shared memory" in cupy_hopper.device_reason(0)


@pytest.mark.parametrize("cc,d,dv,h_q,want_hopper,want_auto", [
    ((9, 0), 576, 512, 16, "hopper-narrow", "hopper-narrow"), ((9, 0), 576, 512, 32, "hopper-narrow", "hopper-narrow"),
    ((9, 0), 576, 512, 64, "hopper-seesaw", "hopper-seesaw"), ((9, 0), 64, 48, 16, "portable", "portable"),
    ((8, 0), 576, 512, 16, "portable", "portable"), ((10, 0), 576, 512, 64, "portable", "portable")])
def test_prepare_dispatch(monkeypatch, cc, d, dv, h_q, want_hopper, want_auto):
    """cupy_backend._prepare: "hopper" takes a Hopper kernel where it applies, "auto" where it was measured
    faster, else (and for "portable") the portable kernel."""
    from mla import api, testing
    from mla.backends import cupy_backend

    monkeypatch.delenv("MLA_HOPPER_VARIANT", raising=False)
    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: cc)
    monkeypatch.setattr(cupy_backend, "_max_smem", lambda dev: 232448)
    monkeypatch.setattr(cupy_backend, "_prepare_portable", lambda *a: "portable")
    monkeypatch.setattr(cupy_hopper, "prepare", lambda *a: f"hopper-{a[-1]}")
    case = testing.make_decode_case(np.random.default_rng(0), b=2, s_q=1, h_q=h_q, d=d, head_dim_v=dv,
                                    page_block_size=64, seqlens=[5, 70], dtype=BF16)
    problem = api._validate(*case.args(), None, False, False, None, None, None, True)
    assert cupy_backend._prepare(None, problem, None, None, 0, "hopper") == want_hopper
    assert cupy_backend._prepare(None, problem, None, None, 0, "auto") == want_auto
    assert cupy_backend._prepare(None, problem, None, None, 0, "portable") == "portable"


def test_seesaw_loads_choice(monkeypatch):
    """The seesaw kernel's loads: by default the TMA build where a tensor map can describe the cache (page a
    multiple of 64, 16-byte aligned) and the driver can encode one, cp.async elsewhere; MLA_SEESAW_LOADS=cpasync
    forces cp.async, =tma the TMA build (a ValueError that says why where it cannot)."""
    from mla.backends import _tma

    k64 = np.zeros((4, 64, 1, 576), dtype=np.uint16)
    k16 = np.zeros((4, 16, 1, 576), dtype=np.uint16)
    monkeypatch.setattr(_tma, "driver_reason", lambda: None)  # (this machine may have no libcuda)
    monkeypatch.delenv("MLA_SEESAW_LOADS", raising=False)
    assert cupy_hopper.seesaw_loads(k64) == "tma" and cupy_hopper.seesaw_loads(k16) == "cpasync"
    monkeypatch.setattr(_tma, "driver_reason", lambda: "cuTensorMapEncodeTiled unavailable")
    assert cupy_hopper.seesaw_loads(k64) == "cpasync"
    monkeypatch.setenv("MLA_SEESAW_LOADS", "tma")
    with pytest.raises(ValueError, match="cuTensorMapEncodeTiled unavailable"):
        cupy_hopper.seesaw_loads(k64)
    monkeypatch.setattr(_tma, "driver_reason", lambda: None)
    monkeypatch.setenv("MLA_SEESAW_LOADS", "cpasync")
    assert cupy_hopper.seesaw_loads(k64) == "cpasync"
    monkeypatch.setenv("MLA_SEESAW_LOADS", "tma")
    assert cupy_hopper.seesaw_loads(k64) == "tma"
    with pytest.raises(ValueError, match="page size 16 is not a multiple of 64"):
        cupy_hopper.seesaw_loads(k16)
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        cupy_hopper.seesaw_loads(np.zeros(4 * 64 * 576 + 1, dtype=np.uint16)[1:].reshape(4, 64, 1, 576))
    monkeypatch.setenv("MLA_SEESAW_LOADS", "bulk")
    with pytest.raises(ValueError, match="MLA_SEESAW_LOADS must be one of"):
        cupy_hopper.seesaw_loads(k64)
    assert _tma.kv_map_reason(0, 10, 128, 2, 576) is None
    assert "2^31" in _tma.kv_map_reason(0, 2**26, 64, 1, 576)


def test_seesaw_has_no_fp8_build(monkeypatch):
    """An FP8 cache asked of the seesaw kernel is a ValueError that says which kernels take it, before any launch
    (the seesaw kernel has no FP8 build; fp8_variant never names it)."""
    from mla import api, testing
    from mla.backends import cupy_backend

    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: (9, 0))
    monkeypatch.setattr(cupy_backend, "_max_smem", lambda dev: 232448)
    case = testing.make_decode_case(np.random.default_rng(0), b=2, s_q=2, h_q=64, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=[5, 70], dtype=BF16, fp8=True)
    problem = api._validate(*case.args(), None, False, True, None, None, None, True)
    with pytest.raises(ValueError, match="seesaw kernel has no FP8 build"):
        cupy_hopper.prepare(None, problem, None, None, 0, "seesaw")


@pytest.mark.parametrize("s_q,h_q,forced,want", [
    (1, 16, None, "regs"), (2, 8, None, "regs"), (1, 3, None, "regs"), (2, 16, None, "narrow"), (1, 32, None, "narrow"),
    (1, 64, None, "wide"), (2, 128, None, "wide"), (1, 16, "wide", "wide"), (1, 16, "narrow", "narrow"),
    (2, 128, "narrow", "narrow"), (2, 128, "regs", "regs"), (1, 16, "portable", None)])
def test_fp8_variant(monkeypatch, s_q, h_q, forced, want):
    """Dense FP8 on an H100: the FP8 register kernel up to 16 rows a KV head, the narrow kernel's FP8 build up to
    32, the wide one's above, the mma.sync kernel (None) when forced; never for sparse problems, fp16 q, other dims
    or other GPUs."""
    import types

    monkeypatch.setattr(cupy_hopper, "device_reason", lambda dev: None)
    if forced:
        monkeypatch.setenv("MLA_CUPY_FP8_KERNEL", forced)
    else:
        monkeypatch.delenv("MLA_CUPY_FP8_KERNEL", raising=False)
    p = types.SimpleNamespace(s_q=s_q, h_q=h_q, h_kv=1, is_sparse=False, is_fp8_kvcache=True, q=np.zeros(1, BF16),
                              d=576, head_dim_v=512)
    assert cupy_hopper.fp8_variant(p, 0) == want
    assert cupy_hopper.fp8_variant(types.SimpleNamespace(**{**vars(p), "is_sparse": True}), 0) is None
    assert cupy_hopper.fp8_variant(types.SimpleNamespace(**{**vars(p), "q": np.zeros(1, np.float16)}), 0) is None
    monkeypatch.setattr(cupy_hopper, "device_reason", lambda dev: "not an H100")
    assert cupy_hopper.fp8_variant(p, 0) is None
    monkeypatch.setenv("MLA_CUPY_FP8_KERNEL", "bogus")
    with pytest.raises(ValueError, match="MLA_CUPY_FP8_KERNEL"):
        cupy_hopper.fp8_variant(p, 0)


def test_psplit_define(monkeypatch):
    monkeypatch.delenv("MLA_CUPY_PSPLIT", raising=False)
    assert cupy_hopper.defines(False) == {"MLA_FP16": 0}
    monkeypatch.setenv("MLA_CUPY_PSPLIT", "1")
    assert cupy_hopper.defines(False) == {"MLA_FP16": 0, "MLA_P_SPLIT": 1}
    assert cupy_hopper.p_split(cupy_hopper.defines(False)) and not cupy_hopper.p_split({"MLA_FP16": 0})


def test_header_worked_example():
    """mla_wgmma.cuh's worked example: K[key 9][channel 130] is byte 16532 of a tile, read there both by the
    K-major descriptor of S (k-step 8) and by the N-major descriptor of P V (k-step 0)."""
    def tile_offset(row, col):
        return (col // 8) * 512 + (row // 8) * 64 + (row % 8) * 8 + col % 8

    def kmajor(start, lbo, sbo, mn, k):  # PTX canonical no-swizzle K-major, bytes
        return start + (mn % 8) * 16 + (mn // 8) * sbo + (k % 8) * 2 + (k // 8) * lbo

    def mnmajor(start, lbo, sbo, mn, k):  # PTX canonical no-swizzle MN-major, bytes
        return start + (mn % 8) * 2 + (mn // 8) * sbo + (k % 8) * 16 + (k // 8) * lbo

    assert 2 * tile_offset(9, 130) == 16532
    assert kmajor(8 * 2048, 1024, 128, 9, 130 - 8 * 16) == 16532      # S: wg 0, k-step 8, n = key 9
    assert mnmajor(0 * 256, 128, 1024, 130, 9) == 16532               # P V: wg 0, k-step 0, n = channel 130
    rows, cols = np.meshgrid(np.arange(64), np.arange(576), indexing="ij")
    off = 2 * tile_offset(rows, cols)
    for s in range(36):  # every k-step of S, both warpgroups' key halves
        for wg in range(2):
            k = np.arange(16)[None, :]
            n = np.arange(32)[:, None]
            got = kmajor(s * 2048 + wg * 512, 1024, 128, n, k)
            assert np.array_equal(got, off[32 * wg + n, 16 * s + k])
    for kk in range(4):  # every k-step of P V, both warpgroups' channel halves
        for wg in range(2):
            k = np.arange(16)[:, None]
            n = np.arange(256)[None, :]
            got = mnmajor(wg * 32768 + kk * 256, 128, 1024, n, k)
            assert np.array_equal(got, off[16 * kk + k, 256 * wg + n])


def test_accumulator_map_is_a_bijection():
    """The fragment map the kernel writes O with (mla_wgmma.cuh wg_acc_row / wg_acc_col, mirrored here):
    the 128 threads x 128 registers of a warpgroup cover its 64 x 256 block once."""
    t, i = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
    row = 16 * (t >> 5) + ((t & 31) >> 2) + 8 * ((i >> 1) & 1)
    col = 8 * (i >> 2) + 2 * (t & 3) + (i & 1)
    cells = row * 256 + col
    assert np.array_equal(np.sort(cells.ravel()), np.arange(64 * 256))


# ---- the decode kernel on the CPU emulator, with a wgmma model

WGMMA_MODEL = r"""
// ---- a model of wgmma, named barriers and the async-proxy fence for the CPU emulator
// (tests/test_hopper_compile.py), written from the PTX ISA, independent of kernels/mla_wgmma.cuh.
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

namespace wgemu {
constexpr int OP_WG = 100, OP_NAMED = 200;
struct Op {
  int kind;  // 0: m64n32k16, A and B from K-major descriptors; 1: m64n256k16, A from registers, B N-major;
             // 2: m64n16k16, A and B K-major; 3: m64n16k16, A and B MN-major (imm-trans 1, 1); 4: m64n32k16 likewise;
             // 5: m64n64k16 likewise; 6: m64n64k16, A and B K-major; 7: m64n256k16, A K-major from shared memory,
             // B N-major; 8: m64n16k16, A from registers, B K-major; 9: m64n16k16, A from registers, B MN-major
  u64 da, db;
  bool accumulate;
  u32 a[128][4];
  float* d[128];
};
struct Slot {
  float* d;
  u64 da, db;
  int acc, kind;
  u32 a[4];
};
struct WG {
  emu::Barrier bar;
  Slot slot[128];
  std::vector<Op> open;
  std::vector<std::vector<Op>> groups;
};
// static, not inline: g++ makes inline variables GNU-unique symbols that the dynamic linker shares between
// all loaded emulator libraries; this state must belong to one library.
static WG wgs[2];
static emu::Barrier named[16];
static bool eager = false;  // carry a wgmma out at its issue (earliest) instead of at wgmma.wait_group (latest)
static bool swap_k = false, swap_mn = false;  // read LBO / SBO the other way round (a "wrong hardware" model)
static long executed = 0;

inline int wg_index() {
  if (emu::bdim.x != 256) emu::fail("the wgmma model expects 256-thread CTAs");
  return (int)(emu::tid.x >> 7);
}
inline int wg_thread() { return (int)(emu::tid.x & 127); }
inline void rendezvous(int op) { emu::barrier_wait(wgs[wg_index()].bar, 128, op); }

inline float smem_elem(u32 addr) {
  unsigned short h;
  std::memcpy(&h, emu::smem_at(addr, 2, 2), 2);
  return emu::e2f(h);
}
struct Desc {
  u32 start, lbo, sbo;
  bool sw128;  // layout type 1: 128B swizzle (bits 4-6 of the byte address ^= bits 7-9)
};
// Matrix Descriptor Format: start address bits 0-13, LBO 16-29, SBO 32-45 (each >> 4), base offset 49-51,
// swizzle 62-63; the other bits are reserved.
inline Desc decode_desc(u64 d) {
  const u64 mode = d >> 62;
  if (mode != 0 && mode != 1) emu::fail("wgmma descriptor: a swizzle mode other than none / 128B");
  if ((d >> 49) & 7) emu::fail("wgmma descriptor: base offset set (not modelled)");
  if (d & 0x3FFFC000C000C000ull & ~(7ull << 49)) emu::fail("wgmma descriptor: reserved bits set");
  return Desc{(u32)(d & 0x3FFF) << 4, (u32)((d >> 16) & 0x3FFF) << 4, (u32)((d >> 32) & 0x3FFF) << 4, mode == 1};
}
// 128B swizzle (PTX "Shared Memory Matrix Layout", swizzle atom 8 rows x 128 bytes; CUTLASS Swizzle<3,4,3>):
// the canonical (unswizzled) byte address a is read at a ^ (((a >> 7) & 7) << 4), on absolute addresses.
// Canonical 128B layouts, 16-bit elements (64 a 128-byte row), in bytes:
//   K-major  (mn, k) -> start + (mn % 8) * 128 + (mn / 8) * SBO + k * 2             (k < 64 - start % 128 / 2)
//   MN-major (mn, k) -> start + (k % 8) * 128 + (k / 8) * SBO + (mn % 64) * 2 + (mn / 64) * LBO
inline u32 sw128(u32 a) { return a ^ (((a >> 7) & 7) << 4); }
// Canonical no-swizzle layouts (T = 8 16-bit elements = 16 bytes), in bytes:
//   K-major  ((8,m),(T,2k)):((1T,SBO),(1,LBO)):    (mn, k) -> (mn%8)*16 + (mn/8)*SBO + (k%8)*2 + (k/8)*LBO
//   MN-major ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)): (mn, k) -> (mn%8)*2 + (mn/8)*SBO + (k%8)*16 + (k/8)*LBO
inline u32 kmajor(const Desc& d, int mn, int k) {
  if (d.sw128) {
    if ((d.start % 128) / 2 + k >= 64) emu::fail("SW128 K-major: a k-step crosses the 128-byte row");
    return sw128(d.start + (mn % 8) * 128 + (mn / 8) * d.sbo + k * 2);
  }
  return d.start + (mn % 8) * 16 + (mn / 8) * d.sbo + (k % 8) * 2 + (k / 8) * d.lbo;
}
inline u32 mnmajor(const Desc& d, int mn, int k) {
  if (d.sw128) return sw128(d.start + (k % 8) * 128 + (k / 8) * d.sbo + (mn % 64) * 2 + (mn / 64) * d.lbo);
  return d.start + (mn % 8) * 2 + (mn / 8) * d.sbo + (k % 8) * 16 + (k / 8) * d.lbo;
}
// m64nNk16 fragments: warp w of the warpgroup owns rows 16 w..; lane l: group g = l / 4, quad q = l % 4.
// D register i: row 16 w + g + 8 ((i / 2) % 2), col 8 (i / 4) + 2 q + i % 2.
// A register r (two 16-bit elements, the lower k in the low half): row 16 w + g + 8 (r % 2), k 2 q + 8 (r / 2).
inline int d_row(int t, int i) { return 16 * (t / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2); }
inline int d_col(int t, int i) { return 8 * (i / 4) + 2 * (t % 4) + i % 2; }

inline void execute(const Op& op) {
  static float A[64][16], B[256][16];  // B[n][k]
  const int n = (op.kind == 1 || op.kind == 7) ? 256 : (op.kind == 2 || op.kind == 3 || op.kind >= 8) ? 16
                : (op.kind == 5 || op.kind == 6) ? 64 : 32;
  const bool b_kmajor = op.kind == 0 || op.kind == 2 || op.kind == 6 || op.kind == 8;
  Desc db = decode_desc(op.db);
  if ((b_kmajor && swap_k) || (!b_kmajor && swap_mn)) std::swap(db.lbo, db.sbo);
  if (op.kind == 6 || op.kind == 7) {  // A K-major from shared memory; B K-major (6) or N-major (7)
    Desc da = decode_desc(op.da);
    if (swap_k) std::swap(da.lbo, da.sbo);
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m][k] = smem_elem(kmajor(da, m, k));
    for (int c = 0; c < n; ++c)
      for (int k = 0; k < 16; ++k) B[c][k] = smem_elem(b_kmajor ? kmajor(db, c, k) : mnmajor(db, c, k));
  } else if (op.kind >= 2 && op.kind < 8) {  // both operands from shared memory, K-major (2) or MN-major (3, 4, 5)
    Desc da = decode_desc(op.da);
    const bool mn = op.kind >= 3;
    if ((mn && swap_mn) || (!mn && swap_k)) std::swap(da.lbo, da.sbo);
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m][k] = smem_elem(mn ? mnmajor(da, m, k) : kmajor(da, m, k));
    for (int c = 0; c < n; ++c)
      for (int k = 0; k < 16; ++k) B[c][k] = smem_elem(mn ? mnmajor(db, c, k) : kmajor(db, c, k));
  } else if (op.kind == 0) {
    Desc da = decode_desc(op.da);
    if (swap_k) std::swap(da.lbo, da.sbo);
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m][k] = smem_elem(kmajor(da, m, k));
    for (int c = 0; c < n; ++c)
      for (int k = 0; k < 16; ++k) B[c][k] = smem_elem(kmajor(db, c, k));
  } else {  // A from registers (1, 8, 9)
    for (int t = 0; t < 128; ++t)
      for (int r = 0; r < 4; ++r) {
        const int row = 16 * (t / 32) + (t % 32) / 4 + 8 * (r % 2), k = 2 * (t % 4) + 8 * (r / 2);
        A[row][k] = lo_f(op.a[t][r]);
        A[row][k + 1] = hi_f(op.a[t][r]);
      }
    for (int c = 0; c < n; ++c)
      for (int k = 0; k < 16; ++k) B[c][k] = smem_elem(b_kmajor ? kmajor(db, c, k) : mnmajor(db, c, k));
  }
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < n / 2; ++i) {
      const int row = d_row(t, i), col = d_col(t, i);
      float acc = op.accumulate ? op.d[t][i] : 0.f;
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[col][k];
      op.d[t][i] = acc;
    }
  ++executed;
}

inline void issue(int kind, float* d, u64 da, u64 db, int acc, u32 a0, u32 a1, u32 a2, u32 a3) {
  WG& W = wgs[wg_index()];
  const int t = wg_thread();
  W.slot[t] = Slot{d, da, db, acc, kind, {a0, a1, a2, a3}};
  rendezvous(OP_WG + kind);
  if (t == 0) {
    Op op;
    op.kind = kind, op.da = da, op.db = db, op.accumulate = acc != 0;
    for (int x = 0; x < 128; ++x) {
      const Slot& s = W.slot[x];
      if (s.kind != kind || s.da != da || s.db != db || s.acc != acc)
        emu::fail("wgmma: the threads of a warpgroup disagree on the shape / descriptors / scale-d");
      op.d[x] = s.d;
      for (int r = 0; r < 4; ++r) op.a[x][r] = s.a[r];
    }
    if (eager) execute(op);
    else W.open.push_back(op);
  }
  rendezvous(OP_WG + kind);
}
}  // namespace wgemu

inline void fence_proxy_async() {}
inline void wg_fence() { wgemu::rendezvous(wgemu::OP_WG + 10); }
inline void wg_commit() {
  wgemu::rendezvous(wgemu::OP_WG + 11);
  if (wgemu::wg_thread() == 0) {
    auto& W = wgemu::wgs[wgemu::wg_index()];
    W.groups.push_back(std::move(W.open));
    W.open.clear();
  }
  wgemu::rendezvous(wgemu::OP_WG + 11);
}
template <int N>
inline void wg_wait() {
  wgemu::rendezvous(wgemu::OP_WG + 12);
  if (wgemu::wg_thread() == 0) {
    auto& W = wgemu::wgs[wgemu::wg_index()];
    while ((int)W.groups.size() > N) {
      for (const auto& op : W.groups.front()) wgemu::execute(op);
      W.groups.erase(W.groups.begin());
    }
  }
  wgemu::rendezvous(wgemu::OP_WG + 12);
}
template <int N>
inline void wg_fence_operands(float (&)[N]) {}
inline void wg_mma_m64n32k16_ss(float (&d)[16], u64 desc_a, u64 desc_b, int accumulate) {
  wgemu::issue(0, d, desc_a, desc_b, accumulate, 0, 0, 0, 0);
}
inline void wg_mma_m64n256k16_rs_nmajor(float (&d)[128], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b) {
  wgemu::issue(1, d, 0, desc_b, 1, a0, a1, a2, a3);
}
inline void wg_mma_m64n16k16_ss(float (&d)[8], u64 desc_a, u64 desc_b, int accumulate) {
  wgemu::issue(2, d, desc_a, desc_b, accumulate, 0, 0, 0, 0);
}
inline void wg_mma_m64n16k16_ss_tt(float (&d)[8], u64 desc_a, u64 desc_b) {
  wgemu::issue(3, d, desc_a, desc_b, 1, 0, 0, 0, 0);
}
inline void wg_mma_m64n32k16_ss_tt(float (&d)[16], u64 desc_a, u64 desc_b) {
  wgemu::issue(4, d, desc_a, desc_b, 1, 0, 0, 0, 0);
}
inline void wg_mma_m64n64k16_ss_tt(float (&d)[32], u64 desc_a, u64 desc_b) {
  wgemu::issue(5, d, desc_a, desc_b, 1, 0, 0, 0, 0);
}
inline void wg_mma_m64n64k16_ss(float (&d)[32], u64 desc_a, u64 desc_b, int accumulate) {
  wgemu::issue(6, d, desc_a, desc_b, accumulate, 0, 0, 0, 0);
}
inline void wg_mma_m64n256k16_ss_nmajor(float (&d)[128], u64 desc_a, u64 desc_b) {
  wgemu::issue(7, d, desc_a, desc_b, 1, 0, 0, 0, 0);
}
inline void wg_mma_m64n16k16_rs(float (&d)[8], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b, int accumulate) {
  wgemu::issue(8, d, 0, desc_b, accumulate, a0, a1, a2, a3);
}
inline void wg_mma_m64n16k16_rs_t(float (&d)[8], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b) {
  wgemu::issue(9, d, 0, desc_b, 1, a0, a1, a2, a3);
}
inline void named_bar_sync(int id, int n) {
  if (id <= 0 || id >= 16) emu::fail("named barrier id");
  emu::barrier_wait(wgemu::named[id], n, wgemu::OP_NAMED + id);
}
static int named_or[16][2];  // barrier.red.or: the OR of generation g's predicates in [id][g % 2]
inline bool named_bar_red_or(int id, int n, bool pred) {
  if (id <= 0 || id >= 16) emu::fail("named barrier id");
  emu::Barrier& b = wgemu::named[id];
  const long g = b.gen;
  if (b.count == 0) named_or[id][g & 1] = 0;  // the generation's first arrival (g + 2 starts after all read g's)
  named_or[id][g & 1] |= pred ? 1 : 0;
  emu::barrier_wait(b, n, wgemu::OP_NAMED + id);
  return named_or[id][g & 1] != 0;
}
inline void named_bar_arrive(int id, int n) {  // counts towards the barrier, does not wait
  if (id <= 0 || id >= 16) emu::fail("named barrier id");
  emu::Barrier& b = wgemu::named[id];
  if (b.count == 0) b.op = wgemu::OP_NAMED + id;
  else if (b.op != wgemu::OP_NAMED + id) emu::fail("divergent named barrier");
  ++emu::progress;
  if (++b.count == n) {
    b.count = 0;
    ++b.gen;
    ++emu::progress;
  }
}

// ---- mbarriers and bulk tensor copies (the seesaw kernel's TMA build). An mbarrier (keyed by its shared-memory
// address) counts arrivals and transaction bytes; its phase completes when both reach zero. A copy is carried out at
// its issue when cp.async copies are eager (the earliest moment: a buffer refilled while a wgmma still reads it
// shows), else when a waiter finds the phase's arrivals done (the latest). The tensor map is the emulator's own
// (tests: _emu_tensor_map): [0] address, [1..3] dims (channels, heads, rows), [4] head / [5] row stride in bytes,
// [6..8] box, [9] swizzle (3: 128 B), [10] element bytes; outside the dims the copy writes zeros.
namespace tmaemu {
struct Copy3 {  // a tensor copy (map) or a 1-D bulk copy (src, bytes)
  u32 dst;
  const u64* map;
  int c0, c1, c2;
  const unsigned char* src = nullptr;
  u32 bytes = 8192;
};
struct MBar {
  int count = 0, pending = 0;
  long long tx = 0;
  u32 phase = 0;
  std::vector<Copy3> copies;
};
static std::map<u32, MBar> bars;
static long leftover = 0;  // barriers re-initialised (or never waited for) in the middle of a phase
inline MBar& at(u32 a) {
  emu::smem_at(a, 8, 8);
  auto it = bars.find(a);
  if (it == bars.end()) emu::fail("mbarrier used before mbarrier.init");
  return it->second;
}
inline void perform(const Copy3& c) {
  if (c.src != nullptr) {
    std::memcpy(emu::smem_at(c.dst, c.bytes, 16), c.src, c.bytes);
    return;
  }
  const u64* m = c.map;
  if (m[6] != 64 || m[7] != 1 || m[8] != 64 || m[9] != 3 || m[10] != 2)
    emu::fail("tensor map: only the (64, 1, 64) box of 16-bit elements with the 128-byte swizzle is modelled");
  unsigned char* dst = emu::smem_at(c.dst, 8192, 1024);
  for (int r = 0; r < 64; ++r)
    for (int x = 0; x < 64; ++x) {
      const long long ch = (long long)c.c0 + x, hd = c.c1, row = (long long)c.c2 + r;
      unsigned short v = 0;
      if (ch >= 0 && ch < (long long)m[1] && hd >= 0 && hd < (long long)m[2] && row >= 0 && row < (long long)m[3])
        std::memcpy(&v, reinterpret_cast<const unsigned char*>(m[0]) + row * m[5] + hd * m[4] + ch * 2, 2);
      const u32 off = 128 * r + 2 * x;
      std::memcpy(dst + (off ^ (((off >> 7) & 7) << 4)), &v, 2);
    }
}
inline void complete(MBar& b) {
  if (b.pending == 0 && b.tx == 0 && b.copies.empty()) {
    b.phase ^= 1u;
    b.pending = b.count;
    ++emu::progress;
  }
}
}  // namespace tmaemu
inline void mbar_init(u32 bar, u32 count) {
  emu::smem_at(bar, 8, 8);
  auto it = tmaemu::bars.find(bar);
  if (it != tmaemu::bars.end() && (it->second.pending != it->second.count || !it->second.copies.empty()))
    ++tmaemu::leftover;
  tmaemu::bars[bar] = tmaemu::MBar{(int)count, (int)count, 0, 0, {}};
}
inline void fence_mbar_init() {}
inline void tensormap_acquire(const void*) {}
inline void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
  tmaemu::MBar& b = tmaemu::at(bar);
  if (b.pending == 0) emu::fail("mbarrier: more arrivals than its count in a phase");
  b.tx += bytes;
  --b.pending;
  ++emu::progress;
  tmaemu::complete(b);
}
inline void tma_load_3d(u32 dst, const void* map, int c0, int c1, int c2, u32 bar) {
  tmaemu::MBar& b = tmaemu::at(bar);
  emu::smem_at(dst, 8192, 1024);
  const tmaemu::Copy3 c{dst, static_cast<const u64*>(map), c0, c1, c2};
  ++emu::progress;
  if (emu::eager_copies) {
    tmaemu::perform(c);
    b.tx -= 8192;
    tmaemu::complete(b);
  } else {
    b.copies.push_back(c);
  }
}
inline void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
  tmaemu::MBar& b = tmaemu::at(bar);
  if (bytes % 16 || dst % 16 || reinterpret_cast<unsigned long long>(src) % 16) emu::fail("bulk copy: 16-byte rule");
  emu::smem_at(dst, bytes, 16);
  tmaemu::Copy3 c{dst, nullptr, 0, 0, 0, static_cast<const unsigned char*>(src), bytes};
  ++emu::progress;
  if (emu::eager_copies) {
    tmaemu::perform(c);
    b.tx -= bytes;
    tmaemu::complete(b);
  } else {
    b.copies.push_back(c);
  }
}
inline void mbar_arrive(u32 bar) {
  tmaemu::MBar& b = tmaemu::at(bar);
  if (b.pending == 0) emu::fail("mbarrier: more arrivals than its count in a phase");
  --b.pending;
  ++emu::progress;
  tmaemu::complete(b);
}
inline unsigned long long narrow_globaltimer() {  // (the narrow kernel's trace build, GPU only)
  emu::fail("MLA_NARROW_TRACE is a GPU diagnostic, not emulated");
}
// The fused merge (kernels/mla_fused_combine.cuh) has the CTAs of a sequence wait for each other; the emulator runs
// one CTA at a time, so it cannot: the emulated launches never set MLA_MODE_FUSED (GPU-tested: test_cupy_gpu.py)
inline void mla_fused_arrive(int*) { emu::fail("the fused merge needs every CTA resident: GPU only, not emulated"); }
inline void mla_fused_wait(const int*, int) { emu::fail("the fused merge is GPU only, not emulated"); }
inline void mla_fused_depart(int*, int) { emu::fail("the fused merge is GPU only, not emulated"); }
inline bool mbar_try_wait(u32 bar, u32 parity) {
  tmaemu::MBar& b = tmaemu::at(bar);
  if ((b.phase & 1u) != parity) return true;
  if (b.pending == 0 && !b.copies.empty()) {  // the latest moment: the copies land now
    for (const auto& c : b.copies) {
      tmaemu::perform(c);
      b.tx -= c.bytes;
    }
    b.copies.clear();
    tmaemu::complete(b);
    if ((b.phase & 1u) != parity) return true;
  }
  emu::yield();
  return false;
}

extern "C" void wgemu_config(int eager) { wgemu::eager = eager != 0; }
extern "C" void wgemu_model(int swap_k, int swap_mn) {
  wgemu::swap_k = swap_k != 0;
  wgemu::swap_mn = swap_mn != 0;
}
extern "C" long wgemu_executed() { return wgemu::executed; }
extern "C" int wgemu_pending() {
  int n = 0;
  for (auto& W : wgemu::wgs) n += (int)W.open.size() + (int)W.groups.size();
  for (auto& b : wgemu::named) n += b.count;
  n += (int)tmaemu::leftover;
  for (auto& kv : tmaemu::bars) n += (kv.second.count - kv.second.pending) + (int)kv.second.copies.size();
  return n;
}
extern "C" void wgemu_reset() {
  for (auto& W : wgemu::wgs) {
    W.open.clear();
    W.groups.clear();
    W.bar = emu::Barrier();
  }
  for (auto& b : wgemu::named) b = emu::Barrier();
  tmaemu::bars.clear();
  tmaemu::leftover = 0;
}
"""

MODELLED = {"fence_proxy_async", "named_bar_sync", "named_bar_arrive", "wg_fence", "wg_commit", "wg_wait",
            "wg_fence_operands", "wg_mma_m64n32k16_ss", "wg_mma_m64n256k16_rs_nmajor", "wg_mma_m64n16k16_ss",
            "wg_mma_m64n16k16_ss_tt", "wg_mma_m64n32k16_ss_tt", "wg_mma_m64n64k16_ss_tt", "wg_mma_m64n64k16_ss",
            "wg_mma_m64n256k16_ss_nmajor", "mbar_init", "fence_mbar_init", "mbar_arrive_expect_tx", "mbar_try_wait",
            "tensormap_acquire", "tma_load_3d", "narrow_globaltimer", "wg_mma_m64n16k16_rs",
            "wg_mma_m64n16k16_rs_t", "bulk_load", "mbar_arrive", "named_bar_red_or", "mla_fused_arrive",
            "mla_fused_wait", "mla_fused_depart"}


try:
    import _cuda_emu  # tests/_cuda_emu.py (pytest puts tests/ on sys.path: rootdir-relative test modules)
except ImportError:  # pragma: no cover
    _cuda_emu = None


def _emu():
    return _cuda_emu


needs_gxx = pytest.mark.skipif(_cuda_emu is None or _cuda_emu.compiler() is None,
                               reason="the CPU emulator (tests/_cuda_emu.py) needs g++")
_MODULES: dict = {}


def _emu_modules(monkeypatch, defines, source_edit=None, out_float32=False, narrow=False, parts=4, seesaw=False,
                 regs=False):
    """(decode module, combine function) for the emulator, compiled once per define set.
    narrow: kernels/mla_decode_hopper_narrow.cu instead of the 64-row mla_decode_hopper.cu; regs: the FP8 register
    kernel (kernels/mla_decode_fp8_regs.cu)."""
    emu = _emu()
    name = (cupy_hopper.FP8_REGS_SOURCE if regs else cupy_hopper.NARROW_SOURCE if narrow
            else cupy_hopper.SEESAW_SOURCE if seesaw else cupy_hopper.SOURCE)
    key = (tuple(sorted(defines.items())), source_edit, out_float32, narrow, parts, seesaw, regs)
    if key not in _MODULES:
        monkeypatch.setattr(emu, "EMULATED", set(emu.EMULATED) | MODELLED)
        src = _nvrtc.read_source(name)
        if source_edit is not None:
            old, new = source_edit
            assert old in src, old
            src = src.replace(old, new)
        mod = emu.EmuModule(name, {"MLA_HAS_WGMMA": 1, **defines}, source=WGMMA_MODEL + src)
        comb = emu.EmuModule("mla_combine.cu", {"MLA_DV": 512, "MLA_FP16": defines.get("MLA_FP16", 0),
                                                "MLA_COMBINE_PARTS": parts,
                                                "MLA_OUT_F32": int(out_float32)})
        _MODULES[key] = (mod, comb.get_function("mla_combine"))
    return _MODULES[key]


def _emu_tensor_map(k_cache):
    """The emulator's stand-in for the seesaw kernel's tensor map of ``k_cache`` [blocks, page, h_kv, d] (read by
    tma_load_3d in WGMMA_MODEL): address, dims (d, h_kv, rows), head and row strides in bytes, box, swizzle, element
    bytes. The real one (mla/backends/_tma.py, the driver's encoding) is checked on the GPU."""
    blocks, page, h_kv, d = k_cache.shape
    words = [k_cache.ctypes.data, d, h_kv, blocks * page, 2 * d, 2 * d * h_kv, 64, 1, 64, 3, 2]
    return np.array(words + [0] * (16 - len(words)), dtype=np.uint64)


def _run_emulated(monkeypatch, case, num_sms, eager_copies=False, schedule="lockstep", eager_wgmma=False,
                  psplit=None, source_edit=None, extra_defines=None, device_plan=False, out_float32=False,
                  narrow=False, fp8=False, nq=16, seesaw=False, seesaw_loads="tma", regs=False):
    """Run the emulated decode (+ combine) through cupy_hopper.assemble on NumPy arrays, outputs poisoned.
    narrow: the narrow kernel (16 query rows a CTA, any row count: several row tiles when more).
    regs: the FP8 register kernel (FP8 caches, the narrow kernel's grid and arguments).
    seesaw: the seesaw kernel, its K pieces by bulk tensor copies (seesaw_loads "tma": the TMA build with the
    emulator's tensor map, _emu_tensor_map) or by cp.async ("cpasync").
    device_plan: allocate partials as for a plan on the device (bound b + workers, combine always run).
    out_float32: the API's out_dtype=float32 (every piece a partial, float32 out)."""
    import mla
    from mla import api

    h_kv, s_q, h_q = case.k_cache.shape[2], case.q.shape[1], case.q.shape[2]
    fp16 = case.q.dtype == np.float16
    defines = {"MLA_FP16": int(fp16)}
    if psplit is not None:
        defines["MLA_P_SPLIT"] = int(psplit)
    if fp8 and not regs:
        defines["MLA_FP8"] = 1
    narrow = narrow or regs
    if nq != 16:
        defines["MLA_NQ"] = nq
    tma = seesaw and seesaw_loads == "tma"
    if tma:
        defines["MLA_SEESAW_TMA"] = 1
    defines.update(extra_defines or {})
    from mla.backends import cupy_backend

    mod, comb = _emu_modules(monkeypatch, defines, source_edit, out_float32, narrow,
                             cupy_backend.combine_parts(512, case.q.shape[0] * s_q * h_q), seesaw, regs)
    mod.configure(eager_copies, schedule)
    lib = mod._lib
    lib.wgemu_config(int(eager_wgmma))
    lib.wgemu_model(0, 0)
    lib.wgemu_reset()
    lib.wgemu_executed.restype = ctypes.c_long
    fn = mod.get_function(cupy_hopper.FP8_REGS_FUNCTION if regs else cupy_hopper.NARROW_FUNCTION if narrow
                          else cupy_hopper.SEESAW_FUNCTION if seesaw else cupy_hopper.FUNCTION)
    smem = (cupy_hopper.FP8_REGS_SMEM_BYTES if regs else cupy_hopper.narrow_smem_bytes(cupy_hopper.p_split(defines), nq)
            if narrow
            else cupy_hopper.seesaw_smem_bytes() if seesaw else cupy_hopper.wide_smem_bytes(fp8))
    fn.max_dynamic_shared_size_bytes = smem
    sched, splits = mla.get_mla_metadata(case.cache_seqlens, s_q * h_q // h_kv, h_kv, num_sms=num_sms)
    problem = api._validate(*case.args(), None, case.causal, fp8, None, None, None, True)
    if out_float32:
        problem.out_dtype = np.dtype(np.float32)
    arrays = [np.ascontiguousarray(case.q), np.ascontiguousarray(case.k_cache),
              np.ascontiguousarray(case.block_table, np.int32), np.ascontiguousarray(case.cache_seqlens, np.int32),
              np.ascontiguousarray(sched, np.int32), np.ascontiguousarray(splits, np.int32)]
    from mla.backends import _tma

    assert not tma or _tma.kv_map_reason(arrays[1].ctypes.data, *arrays[1].shape) is None
    k_map = _emu_tensor_map(arrays[1]) if tma else None
    launches, out, lse = cupy_hopper.assemble(np, fn, comb, problem, *arrays,
                                              host_splits=None if device_plan else arrays[-1], poison=True,
                                              narrow=narrow, smem=smem, nq=nq, seesaw=bool(seesaw), k_map=k_map)
    before = lib.wgemu_executed()
    for f, grid, block, args, smem in launches:
        f(grid, block, args, shared_mem=smem)
    assert lib.wgemu_pending() == 0, "wgmma groups or named-barrier arrivals left over at the end of a CTA"
    return out, lse, splits, lib.wgemu_executed() - before


# (b, s_q, h_q, h_kv, seqlens, causal, dtype, num_sms, eager copies, schedule, eager wgmma, device plan)
EMU_CASES = [
    (2, 1, 16, 1, [70, 130], False, BF16, 2, False, "lockstep", False, False),        # 2 pieces on a worker
    (3, 1, 16, 1, [0, 300, 1], False, BF16, 9, False, "skewed", False, False),        # splits + combine, L = 0
    (2, 2, 16, 1, [3, 200], True, np.float16, 4, True, "reverse", False, False),      # causal s_q 2, fp16
    (1, 4, 32, 1, [130], True, BF16, 1, True, "skewed", True, False),                 # 128 rows: 2 row tiles
    (2, 1, 128, 1, [64, 65], False, np.float16, 1, False, "reverse", True, False),    # tile edges
    (2, 2, 12, 2, [90, 7], True, BF16, 2, False, "lockstep", True, False),            # h_kv = 2, group 6
    (2, 2, 128, 1, [300, 1000], True, BF16, 16, False, "skewed", False, False),       # 4 row tiles, splits
    (4, 1, 64, 1, [0, 1, 63, 64], False, np.float16, 3, True, "lockstep", True, False),
    (1, 1, 16, 1, [2000], False, BF16, 16, False, "reverse", False, True),            # many splits, device plan
    (2, 4, 8, 1, [2, 3], True, np.float16, 2, True, "skewed", False, False),          # rows with no key
    (2, 2, 126, 2, [65, 129], True, BF16, 2, False, "reverse", True, True),           # 126 rows a KV head
    (3, 1, 9, 3, [0, 77, 5], False, BF16, 3, True, "lockstep", False, False),         # h_kv = 3, group 3
]


@needs_gxx
@pytest.mark.parametrize("narrow,nq,seesaw", [(False, 16, False), (True, 16, False), (True, 32, False),
                                              (False, 16, "tma"), (False, 16, "cpasync")],
                         ids=["wide", "narrow", "narrow32", "seesaw", "seesaw-cpasync"])
@pytest.mark.parametrize("b,s_q,h_q,h_kv,seqlens,causal,dtype,num_sms,eager,schedule,eager_wgmma,device_plan",
                         EMU_CASES, ids=[f"case{i}" for i in range(len(EMU_CASES))])
def test_decode_kernel_emulated_matches_reference(monkeypatch, b, s_q, h_q, h_kv, seqlens, causal, dtype, num_sms,
                                                  eager, schedule, eager_wgmma, device_plan, narrow, nq, seesaw):
    from mla import reference, testing

    rng = np.random.default_rng(b * 100 + h_q + s_q)
    case = testing.make_decode_case(rng, b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=seqlens, dtype=dtype, causal=causal)
    out, lse, splits, n_wgmma = _run_emulated(monkeypatch, case, num_sms, eager, schedule, eager_wgmma,
                                              device_plan=device_plan, narrow=narrow, nq=nq, seesaw=bool(seesaw),
                                              seesaw_loads=seesaw or "tma")
    out_ref, lse_ref = reference.flash_mla_reference(case.q, case.k_cache, case.block_table, case.cache_seqlens,
                                                     512, causal=causal)
    testing.assert_close(out, lse, out_ref, lse_ref, lse_atol=4e-6, out_atol=testing.out_atol(case))
    assert n_wgmma > 0 or max(seqlens) == 0
    from mla import scheduler

    if scheduler.num_sm_parts(num_sms, s_q * h_q // h_kv, h_kv) > b and max(seqlens) > 256:
        assert int(splits[-1]) > b, "meant to exercise the split + combine path"


@needs_gxx
@pytest.mark.parametrize("page,seqlens,num_sms,eager", [(128, [300, 0, 129], 16, False), (256, [700, 64], 16, True)])
def test_seesaw_tma_emulated_on_larger_pages(monkeypatch, page, seqlens, num_sms, eager):
    """The seesaw kernel's TMA build (the default on page sizes that are multiples of 64) where a page holds several
    64-key tiles: the copy's row is the block's first row plus the tile's offset in the page; tails, an empty
    sequence, splits (NaN in the unused slots)."""
    from mla import reference, testing

    rng = np.random.default_rng(page)
    case = testing.make_decode_case(rng, b=len(seqlens), s_q=2, h_q=64, h_kv=1, d=576, head_dim_v=512,
                                    page_block_size=page, seqlens=seqlens, dtype=BF16, causal=True)
    out, lse, splits, _ = _run_emulated(monkeypatch, case, num_sms, eager, "skewed", seesaw=True, seesaw_loads="tma")
    out_ref, lse_ref = reference.flash_mla_reference(*case.args(), causal=True)
    testing.assert_close(out, lse, out_ref, lse_ref, lse_atol=4e-6, out_atol=testing.out_atol(case))
    assert int(splits[-1]) > len(seqlens), "meant to split a sequence inside a page"


FP8_CASES = [  # (b, s_q, h_q, h_kv, seqlens, causal, num_sms, schedule, eager copies, odd scales, rows a CTA)
    (3, 1, 16, 1, [150, 0, 64], False, 8, "lockstep", False, False, 16),   # splits + combine, an empty sequence
    (2, 2, 16, 2, [200, 7], True, 4, "skewed", True, False, 16),          # causal s_q 2, h_kv 2 (8 rows a KV head)
    (1, 1, 3, 1, [129], False, 1, "reverse", False, True, 16),            # one split: direct write, 3 heads
    (1, 2, 32, 1, [90], True, 2, "lockstep", True, False, 16),            # 64 rows: 4 row tiles (forced narrow)
    (2, 1, 16, 1, [70, 260], False, 3, "skewed", False, True, 16),        # scales not powers of two / tiny / huge
    (2, 2, 16, 1, [300, 5], True, 4, "reverse", False, False, 32),        # 32 rows a CTA (MLA_NQ=32), causal
    (1, 1, 24, 1, [100], False, 1, "skewed", True, True, 32),             # 24 of 32 rows, direct write
    (2, 2, 64, 1, [150, 66], True, 4, "lockstep", False, False, 0),       # the wide kernel's FP8 build (nq 0)
    (3, 1, 128, 2, [0, 300, 64], False, 3, "reverse", True, True, 0),     # wide, h_kv 2, odd scales, empty seq
    (1, 1, 16, 1, [600], False, 1, "skewed", False, False, 16),           # 10 tiles a piece: the register stages
    (1, 1, 32, 1, [330], True, 1, "reverse", False, True, 32),            # ... rotate (two a tile, and one)
    (1, 1, 64, 1, [400], False, 1, "skewed", False, False, 0),            # ... the wide kernel's one stage
]


@needs_gxx
@pytest.mark.parametrize("b,s_q,h_q,h_kv,seqlens,causal,num_sms,schedule,eager,odd,nq", FP8_CASES,
                         ids=[f"fp8case{i}" for i in range(len(FP8_CASES))])
def test_hopper_fp8_emulated_matches_reference(monkeypatch, b, s_q, h_q, h_kv, seqlens, causal, num_sms, schedule,
                                               eager, odd, nq):
    """The Hopper kernels' FP8 builds (MLA_FP8=1; nq 16 or 32: narrow, 0: wide; raw 656-byte rows, exact
    dequantisation into the SW128 bf16 tile) against the NumPy backend on the same FP8 cache (which
    dequantises it), NaN in the unused slots.
    odd: some scales are not powers of two, or outside [2^-100, 2^100] (dequant8's path instead of the fast one)."""
    import mla
    from mla import testing

    rng = np.random.default_rng(b * 10 + h_q + s_q)
    case = testing.make_decode_case(rng, b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=seqlens, dtype=BF16, causal=causal, fp8=True)
    if odd:  # scale *= 1.5 on odd pages' tokens, 2^-110 / 2^+110 factors on a few (codes kept: values change)
        scales = case.k_cache[..., 512:528].view(np.float32)  # [blocks, page, h_kv, 4], a view
        scales[1::2] *= np.float32(1.5)
        scales[::3, :4] *= np.float32(2.0 ** -110)
        scales[::5, 4:6] *= np.float32(2.0 ** 100)
    out, lse, splits, n_wgmma = _run_emulated(monkeypatch, case, num_sms, eager, schedule, narrow=nq > 0, fp8=True,
                                              nq=max(nq, 16))
    assert np.isfinite(out.astype(np.float32)).all()
    want, lse_want = mla.flash_mla_with_kvcache(*case.args(), causal=causal, is_fp8_kvcache=True, backend="numpy")
    testing.assert_close(out, lse, want, lse_want, lse_atol=4e-6, out_atol=testing.out_atol(case))
    assert n_wgmma > 0


# (b, s_q, h_q, h_kv, page, seqlens, causal, num_sms, schedule, eager copies, odd scales)
FP8_REGS_CASES = [
    (3, 1, 16, 1, 64, [150, 0, 64], False, 8, "lockstep", False, False),  # splits + combine, an empty sequence
    (2, 2, 16, 2, 64, [200, 7], True, 4, "skewed", True, False),          # causal s_q 2, h_kv 2 (8 rows a KV head)
    (1, 1, 3, 1, 64, [129], False, 1, "reverse", False, True),            # one split: direct write, 3 heads
    (1, 2, 32, 1, 64, [90], True, 2, "lockstep", True, False),            # 64 rows: 4 row tiles
    (2, 1, 16, 1, 64, [70, 260], False, 3, "skewed", False, True),        # scales not powers of two / tiny / huge
    (1, 1, 16, 1, 64, [600], False, 1, "skewed", False, False),           # 10 tiles a piece: stages refilled
    (3, 1, 16, 1, 64, [65, 300, 129], True, 1, "reverse", True, False),   # one worker, 3 pieces: odd tile counts
    (2, 1, 16, 1, 32, [333, 45], False, 2, "lockstep", False, True),      # page 32: a tile spans two pages
    (2, 2, 8, 1, 128, [700, 131], True, 5, "skewed", True, False),        # page 128, splits inside pages
]


@needs_gxx
@pytest.mark.parametrize("b,s_q,h_q,h_kv,page,seqlens,causal,num_sms,schedule,eager,odd", FP8_REGS_CASES,
                         ids=[f"regs{i}" for i in range(len(FP8_REGS_CASES))])
def test_fp8_regs_emulated_matches_reference(monkeypatch, b, s_q, h_q, h_kv, page, seqlens, causal, num_sms, schedule,
                                             eager, odd):
    """The FP8 register kernel (kernels/mla_decode_fp8_regs.cu: raw rows by bulk copies, codes dequantised into
    wgmma's A registers, alternate tiles a warpgroup) against the NumPy backend on the same FP8 cache, NaN in the
    unused slots, outputs poisoned. odd: scales off the fast path, as in test_hopper_fp8_emulated_matches_reference."""
    import mla
    from mla import testing

    rng = np.random.default_rng(b * 10 + h_q + s_q + page)
    case = testing.make_decode_case(rng, b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, d=576, head_dim_v=512,
                                    page_block_size=page, seqlens=seqlens, dtype=BF16, causal=causal, fp8=True)
    if odd:
        scales = case.k_cache[..., 512:528].view(np.float32)
        scales[1::2] *= np.float32(1.5)
        scales[::3, :4] *= np.float32(2.0 ** -110)
        scales[::5, 4:6] *= np.float32(2.0 ** 100)
    out, lse, splits, n_wgmma = _run_emulated(monkeypatch, case, num_sms, eager, schedule, fp8=True, regs=True)
    assert np.isfinite(out.astype(np.float32)).all()
    want, lse_want = mla.flash_mla_with_kvcache(*case.args(), causal=causal, is_fp8_kvcache=True, backend="numpy")
    testing.assert_close(out, lse, want, lse_want, lse_atol=4e-6, out_atol=testing.out_atol(case))
    assert n_wgmma > 0


@needs_gxx
@pytest.mark.parametrize("q_scale", [2.0 ** -60, 2.0 ** 30, 0.0])
def test_fp8_regs_emulated_q_range(monkeypatch, q_scale):
    """The FP8 register kernel stores each Q row times a power of two that brings its largest |q| to [2^14, 2^15)
    (S^T's codes are code * 2^-120): rows of tiny, huge and zero q against the NumPy backend."""
    import mla
    from mla import testing

    rng = np.random.default_rng(17)
    case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, h_kv=1, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[130, 70], dtype=BF16, causal=False, fp8=True)
    q = case.q.astype(np.float32)
    q[:, :, ::2] *= np.float32(q_scale)  # every other head (the rest unscaled: rows of different ranges in one CTA)
    case.q = q.astype(BF16)
    out, lse, _, _ = _run_emulated(monkeypatch, case, 2, False, "skewed", fp8=True, regs=True)
    want, lse_want = mla.flash_mla_with_kvcache(*case.args(), is_fp8_kvcache=True, backend="numpy")
    testing.assert_close(out, lse, want, lse_want, lse_atol=4e-6, out_atol=testing.out_atol(case))


@needs_gxx
@pytest.mark.parametrize("device_plan", [False, True])
def test_emulated_out_float32_is_the_unrounded_output(monkeypatch, device_plan):
    """out_dtype=float32 (force_partials + the MLA_OUT_F32 combine): every row, single-split ones
    included, comes out float32, and rounding it to q's dtype gives the default output bit for bit."""
    from mla import reference, testing

    case = testing.make_decode_case(np.random.default_rng(11), b=3, s_q=2, h_q=16, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=[0, 70, 700], dtype=BF16, causal=True)
    out16, lse16, splits, _ = _run_emulated(monkeypatch, case, 4, device_plan=device_plan)
    out32, lse32, _, _ = _run_emulated(monkeypatch, case, 4, device_plan=device_plan, out_float32=True)
    assert out32.dtype == np.float32 and not np.isnan(out32).any()
    d = np.diff(np.asarray(splits))
    assert (d == 1).any() and (d > 1).any(), "meant to hold single- and multi-split sequences"
    np.testing.assert_array_equal(out32.astype(BF16).view(np.uint16), out16.view(np.uint16))
    np.testing.assert_array_equal(lse32, lse16)
    out_ref, lse_ref = reference.flash_mla_reference(*case.args(), causal=True)
    testing.assert_close(out32, lse32, out_ref, lse_ref, lse_atol=4e-6, out_atol=testing.out_atol(case))
    assert np.abs(out32 - out32.astype(BF16).astype(np.float32)).max() > 0  # not rounded on the way


@needs_gxx
def test_emulated_bf16_p_split_matters(monkeypatch):
    """The bf16 P = P_hi + P_lo split is live: without it the result moves by ~bf16 rounding of P."""
    from mla import reference, testing

    case = testing.make_decode_case(np.random.default_rng(5), b=1, s_q=1, h_q=16, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=[40], dtype=BF16)
    out_ref, _ = reference.flash_mla_reference(*case.args())
    errs = {}
    for psplit in (0, 1):
        out, _, _, _ = _run_emulated(monkeypatch, case, 1, psplit=psplit)
        errs[psplit] = float(np.abs(out.astype(np.float64) - out_ref.astype(np.float64)).max())
    assert errs[1] < errs[0], errs


@needs_gxx
@pytest.mark.parametrize("seesaw", [True, False], ids=["seesaw", "narrow"])
def test_emulated_numerics_meet_design_tolerance(monkeypatch, seesaw):
    """DESIGN §6's unscaled tolerance (out abs 8e-4) both ways: the default build (bf16 P rounded once, FlashMLA's
    numerics) on FlashMLA's inputs, and the P split build (MLA_CUPY_PSPLIT=1) on unit-normal inputs, ten times
    larger values, short sequences (where rounding P costs most)."""
    from mla import reference, testing

    for values, psplit in (("flashmla", None), ("normal", 1)):
        case = testing.make_decode_case(np.random.default_rng(3), b=3, s_q=1, h_q=64, d=576, head_dim_v=512,
                                        page_block_size=64, seqlens=[2, 40, 130], dtype=BF16, values=values)
        out, lse, _, _ = _run_emulated(monkeypatch, case, 2, psplit=psplit, seesaw=seesaw, narrow=not seesaw)
        out_ref, lse_ref = reference.flash_mla_reference(*case.args())
        testing.assert_close(out, lse, out_ref, lse_ref, lse_atol=4e-6)


@needs_gxx
def test_emulator_catches_a_missing_barrier(monkeypatch):
    """Self-test of the harness: without the barrier that ends a tile (both warpgroups done reading the
    K buffer) the next-but-one tile's cp.async overwrites a buffer the other warpgroup still reads."""
    from mla import reference, testing

    barrier = "__syncthreads();  // both warpgroups are done with this K buffer (and the exchange buffer)"
    case = testing.make_decode_case(np.random.default_rng(9), b=1, s_q=1, h_q=16, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=[300], dtype=BF16)
    out_ref, lse_ref = reference.flash_mla_reference(*case.args())
    out, lse, _, _ = _run_emulated(monkeypatch, case, 1, eager_copies=True, schedule="skewed",
                                   source_edit=(barrier, "// (barrier removed by the test)"))
    with pytest.raises(AssertionError):
        testing.assert_close(out, lse, out_ref, lse_ref, out_atol=testing.out_atol(case))


def _sensitivity_case():
    from mla import testing

    return testing.make_decode_case(np.random.default_rng(9), b=1, s_q=1, h_q=16, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=[300], dtype=BF16)


@needs_gxx
@pytest.mark.parametrize("swap", ["MLA_WG_DIAG_SWAP_K", "MLA_WG_DIAG_SW_SWAP_MN"])
def test_emulator_catches_a_wrong_descriptor(monkeypatch, swap):
    """Self-test of the wgmma model: with LBO and SBO exchanged (Q's K-major descriptor in S, or the
    swizzled V's MN-major one in P V) the emulated kernel is wrong, so the passing runs above do test the
    kernel's descriptors."""
    from mla import reference, testing

    case = _sensitivity_case()
    out_ref, lse_ref = reference.flash_mla_reference(*case.args())
    out, lse, _, _ = _run_emulated(monkeypatch, case, 1, extra_defines={swap: 1})
    with pytest.raises(AssertionError):
        testing.assert_close(out, lse, out_ref, lse_ref, out_atol=testing.out_atol(case))


@needs_gxx
def test_emulator_catches_a_missing_exchange_barrier(monkeypatch):
    """Self-test: warpgroup 0 reading the exchange buffer before waiting for warpgroup 1's values (the
    barrier moved after the read, so the arrival counts still match)."""
    from mla import reference, testing

    wait = "named_bar_sync(1, 256);\n    wg_xchg_load(sx, t, other);"
    case = _sensitivity_case()
    out_ref, lse_ref = reference.flash_mla_reference(*case.args())
    with pytest.raises(AssertionError):
        out, lse, _, _ = _run_emulated(monkeypatch, case, 1, schedule="lockstep",
                                       source_edit=(wait, "wg_xchg_load(sx, t, other);\n    named_bar_sync(1, 256);"))
        testing.assert_close(out, lse, out_ref, lse_ref, out_atol=testing.out_atol(case))


NARROW_EDITS = {
    "end barrier": "__syncthreads();  // both warpgroups are done with this K buffer, the S^T swap area and P^T",
    "swap barrier": "sX[(wg * SREG + k) * 128 + t] = s[k];\n        __syncthreads();",
}


@needs_gxx
@pytest.mark.parametrize("edit", ["MLA_WG_DIAG_SW_SWAP_MN", "end barrier", "swap barrier"])
def test_emulator_catches_narrow_kernel_bugs(monkeypatch, edit):
    """Self-test for the narrow kernel: a wrong descriptor (V^T's SW128 LBO / SBO exchanged) or a missing barrier (the
    next tile's copies overwriting a buffer still read; a warpgroup reading the other's S^T half before it
    is stored) makes the emulated result wrong, so the passing narrow runs do test these."""
    from mla import reference, testing

    case = _sensitivity_case()
    out_ref, lse_ref = reference.flash_mla_reference(*case.args())
    kw = {"extra_defines": {edit: 1}} if edit.startswith("MLA_") else {
        "source_edit": (NARROW_EDITS[edit], NARROW_EDITS[edit].replace("__syncthreads();", "")),
        "eager_copies": True, "schedule": "skewed"}
    out, lse, _, _ = _run_emulated(monkeypatch, case, 1, narrow=True, **kw)
    with pytest.raises(AssertionError):
        testing.assert_close(out, lse, out_ref, lse_ref, out_atol=testing.out_atol(case))


REGS_EDITS = {  # planted bugs the emulator must catch in the FP8 register kernel: (old, new) source text, replace-all
    "a V^T register from the other channel": ("fp8_pair_sel(j))", "fp8_pair_sel(j ^ 1))"),
    "P^T copy of the wrong channel block": ("dp + (((mb >> 1) * P_EL * 2) >> 4)",
                                            "dp + ((((mb >> 1) ^ 1) * P_EL * 2) >> 4)"),
    "Q's row factor not undone": ("cfac[j] = scale_log2 * sQfac[colof(c2, j)]", "cfac[j] = scale_log2"),
    "O's 2^-8 not undone": ("* inv * O_UNBIAS, e_other = (wg ? e0 : e1) * inv * O_UNBIAS",
                            "* inv, e_other = (wg ? e0 : e1) * inv"),
    "a block's scale not applied in S^T": ("if (B < 4) v = one_step ?", "if (B < 3) v = one_step ?"),
}
# (Not here: the refill's wait for the stage's readers. The emulator, like the hardware, makes all 4 warps of a
# warpgroup meet at each wgmma, and warp 0 issues the refill after the next tile's first one, so no reader can lag;
# the mbarrier makes that order explicit for the memory model and for racecheck.)


@needs_gxx
@pytest.mark.parametrize("edit", list(REGS_EDITS))
def test_emulator_catches_fp8_regs_bugs(monkeypatch, edit):
    """Self-test for the FP8 register kernel: each planted bug (a wrong fragment byte, the wrong block's P^T copy, a
    scale factor left out) makes the emulated result wrong, so the passing runs test these."""
    import mla
    from mla import testing

    rng = np.random.default_rng(9)
    case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, h_kv=1, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[700, 300], dtype=BF16, causal=False, fp8=True)
    want, lse_want = mla.flash_mla_with_kvcache(*case.args(), is_fp8_kvcache=True, backend="numpy")
    out, lse, _, _ = _run_emulated(monkeypatch, case, 1, True, "skewed", fp8=True, regs=True,
                                   source_edit=REGS_EDITS[edit])
    with pytest.raises(AssertionError):
        testing.assert_close(out, lse, want, lse_want, out_atol=testing.out_atol(case))


SEESAW_EDITS = {  # planted bugs the emulator must catch in the seesaw kernel: (edit, loads, eager copies, P split)
    "P_A' lo written before P_A V_AL is done (split build)": (
        ("          wg_wait<0>();  // P_A V_AL done", "          // P_A V_AL done"), "tma", False, 1),
    "O_L rescaled before P_A V_AL is done": (
        ("          wg_wait<0>();  // P_A V_AL done", "          // P_A V_AL done"), "tma", False, None),
    "P_A not rescaled to m_B": (("          for (int k = 0; k < 32; ++k) s[k] *= ((k >> 1) & 1) ? sb1 : sb0;",
                                 "          for (int k = 0; k < 32; ++k) s[k] *= 1.f;"), "cpasync", False, None),
    "buffer 0 refilled before warpgroup 1 is done with it": (
        ("          named_bar_sync(BAR_AFREE, 256);\n          SEESAW_MARK(5);\n#if MLA_SEESAW_TMA\n"
         "          copy_pieces(ta + 2, 0, 0x1F1u, nxt);  // blocks 0, 4-8 (P_A' lo, V_AR, P_A' hi)\n",
         "          copy_pieces(ta + 2, 0, 0x1F1u, nxt);\n          named_bar_sync(BAR_AFREE, 256);\n"
         "          SEESAW_MARK(5);\n#if MLA_SEESAW_TMA\n"), "tma", True, None),
    "tail rows past the sequence not zeroed": (("          zero_tail(ta, sK);\n", "\n"), "tma", False, None),
}


@needs_gxx
@pytest.mark.parametrize("edit", list(SEESAW_EDITS))
def test_emulator_catches_seesaw_bugs(monkeypatch, edit):
    """Self-test for the seesaw kernel: warpgroup 0 overwriting block 0 of buffer 0 (with P_A' lo, the split build)
    while its own P V still reads it, or rescaling O_L under that P V (the default build; wgmma carried out at the
    wait, the latest moment), P_A handed to warpgroup 1 in the wrong scale, a refill too early or the tail not zeroed
    makes the emulated result wrong (at the tolerance the kernel meets: ``testing.out_atol``)."""
    from mla import reference, testing

    rng = np.random.default_rng(5)
    case = testing.make_decode_case(rng, b=2, s_q=2, h_q=64, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[300, 450], dtype=BF16, causal=True)
    source_edit, loads, eager, psplit = SEESAW_EDITS[edit]
    out, lse, _, _ = _run_emulated(monkeypatch, case, 2, eager_copies=eager, schedule="lockstep", seesaw=True,
                                   seesaw_loads=loads, source_edit=source_edit, psplit=psplit)
    out_ref, lse_ref = reference.flash_mla_reference(case.q, case.k_cache, case.block_table, case.cache_seqlens, 512,
                                                     causal=True)
    with pytest.raises(AssertionError):
        testing.assert_close(out, lse, out_ref, lse_ref, lse_atol=4e-6, out_atol=testing.out_atol(case))


# ---- the GPU probe tests (tests/test_wgmma_probe_gpu.py) on the emulator: their expectations and their
# failure diagnosis are right, so on the H100 a failure means the hardware reads wgmma differently.

_PROBE_MODULES: dict = {}


class _EmuProbeBackend:
    xp = np

    def __init__(self, monkeypatch, model=(0, 0)):
        self.monkeypatch, self.model = monkeypatch, model

    def function(self, name, defines):
        key = tuple(sorted(defines.items()))
        if key not in _PROBE_MODULES:
            self.monkeypatch.setattr(_cuda_emu, "EMULATED", set(_cuda_emu.EMULATED) | MODELLED)
            decl = "extern __shared__ __align__(128) unsigned char probe_smem[];"
            src = _nvrtc.read_source("wgmma_probe.cu")
            assert decl in src
            src = src.replace(decl, "#define probe_smem (emu::smem_base)")  # file-scope: bind at run time
            _PROBE_MODULES[key] = _cuda_emu.EmuModule("wgmma_probe.cu", {"MLA_HAS_WGMMA": 1, **defines},
                                                      source=WGMMA_MODEL + src)
        module = _PROBE_MODULES[key]
        module._lib.wgemu_config(0)
        module._lib.wgemu_model(*self.model)
        module._lib.wgemu_reset()
        fn = module.get_function(name)
        fn.max_dynamic_shared_size_bytes = 155648
        return fn

    def sync(self):
        pass


def _probe_tests():
    import test_wgmma_probe_gpu as probes

    return probes


PROBE_CASES = [("test_tile_layout_of_the_cp_async_copy", {}), ("test_accumulator_map_on_the_device", {}),
               ("test_scores_structured", {"dtype": BF16, "k1": True}),
               ("test_scores_structured", {"dtype": np.float16, "k1": False}),
               ("test_scores_random", {"dtype": BF16, "k1": False}),
               ("test_scores_random", {"dtype": np.float16, "k1": True}),
               ("test_pv_structured", {"dtype": BF16, "split": True}),
               ("test_pv_structured", {"dtype": np.float16, "split": False}),
               ("test_pv_random", {"dtype": BF16, "split": False}),
               ("test_pv_random", {"dtype": np.float16, "split": True}),
               ("test_pv_split_recovers_bf16_rounding", {})]


@needs_gxx
@pytest.mark.parametrize("name,kwargs", PROBE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PROBE_CASES)])
def test_probe_tests_pass_on_the_emulator(monkeypatch, name, kwargs):
    probes = _probe_tests()
    monkeypatch.setattr(probes, "BACKEND", _EmuProbeBackend(monkeypatch))
    getattr(probes, name)(**kwargs)


@needs_gxx
@pytest.mark.parametrize("model,define,test,kwargs",
                         [((1, 0), "MLA_WG_DIAG_SWAP_K", "test_scores_random", {"dtype": BF16, "k1": False}),
                          ((0, 1), "MLA_WG_DIAG_SWAP_MN", "test_pv_structured", {"dtype": BF16, "split": False})],
                         ids=["K-major", "MN-major"])
def test_probe_failure_names_the_descriptor_fix(monkeypatch, model, define, test, kwargs):
    """Were the hardware to read LBO / SBO the other way round (the model swaps them here), the probe fails
    and its message names the define under which it passes (so: swap those constants in mla_wgmma.cuh)."""
    probes = _probe_tests()
    monkeypatch.setattr(probes, "BACKEND", _EmuProbeBackend(monkeypatch, model))
    with pytest.raises(AssertionError, match=re.escape(f"{{'{define}': 1}}: MATCHES numpy")):
        getattr(probes, test)(**kwargs)
