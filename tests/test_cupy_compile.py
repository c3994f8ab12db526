"""CPU-only: every CUDA source in kernels/ compiles with NVRTC for sm_90a and sm_80, without spills.

Sources without an entry in VARIANTS compile once per architecture with their default -D values.

Needs the NVRTC library (pip: cupy-cuda13x + nvidia-cuda-nvrtc), not a GPU. The tilings compiled
are the ones ``mla.backends.cupy_backend`` picks for the DeepSeek shapes on an H100 (227 KiB of
shared memory a block), an A100 (163 KiB) and Ada (99 KiB), plus a small generic shape.
"""

from __future__ import annotations

import pytest

from mla.backends import _nvrtc, cupy_backend, cupy_sparse_fp8, cupy_sparse_prefill

pytestmark = pytest.mark.skipif(_nvrtc.unavailable_reason() is not None,
                                 reason=str(_nvrtc.unavailable_reason()))

ARCHS = ("sm_90a", "sm_80")
SMEM = {"sm_90a": 232448, "sm_80": 166912}


def _portable_variants(arch):
    seen = []
    shapes = [(576, 512, 16), (576, 512, 32), (576, 512, 128), (64, 48, 8)]
    for smem in (SMEM[arch], 101376):
        for d, dv, rows in shapes:
            cfg = cupy_backend.portable_config(d, dv, rows, smem)
            assert cfg is not None, (d, dv, rows, smem)
            block_m, warps, block_n, stages = cfg
            for fp16 in (0, 1) if (d, rows) == (576, 128) else (0,):
                defines = {"MLA_D": d, "MLA_DV": dv, "MLA_BLOCK_M": block_m, "MLA_BLOCK_N": block_n,
                           "MLA_NWARPS": warps, "MLA_STAGES": stages, "MLA_FP16": fp16}
                if defines not in seen:
                    seen.append(defines)
    return seen


VARIANTS = {
    "mla_decode_portable.cu": {arch: _portable_variants(arch) for arch in ARCHS},
    "mla_combine.cu": {arch: [{"MLA_DV": 512, "MLA_FP16": 0}, {"MLA_DV": 512, "MLA_FP16": 0, "MLA_COMBINE_PARTS": 4},
                              {"MLA_DV": 512, "MLA_FP16": 0, "MLA_COMBINE_PARTS": 16},
                              {"MLA_DV": 512, "MLA_FP16": 1, "MLA_COMBINE_PARTS": 16, "MLA_OUT_F32": 1},
                              {"MLA_DV": 33, "MLA_FP16": 1},
                              {"MLA_DV": 512, "MLA_FP16": 0, "MLA_OUT_F32": 1}]
                       for arch in ARCHS},
    "mla_metadata.cu": {arch: [{}] for arch in ARCHS},
    # issue #5 (FP8 / sparse, verified on an H100 2026-11-25): the tilings cupy_sparse_fp8 picks on H100 / A100 / Ada
    "mla_decode_fp8.cu": {arch: cupy_sparse_fp8.compile_variants(arch, (SMEM[arch], 101376))["mla_decode_fp8.cu"]
                          for arch in ARCHS},
    "mla_decode_sparse.cu": {arch: cupy_sparse_fp8.compile_variants(arch, (SMEM[arch], 101376))[
        "mla_decode_sparse.cu"] for arch in ARCHS},
    # issue #5 sparse prefill (flash_mla_sparse_fwd, verified on an H100): groups of 16 / 32 / 64 / 128 heads
    "mla_sparse_prefill.cu": {arch: cupy_sparse_prefill.compile_variants(arch, (SMEM[arch], 101376))
                              for arch in ARCHS},
}


# every other source (kernels added later, other backends' .cu) compiles with its own defaults
for _name in _nvrtc.sources():
    VARIANTS.setdefault(_name, {arch: [{}] for arch in ARCHS})


def test_every_source_is_covered():
    assert set(_nvrtc.sources()) <= set(VARIANTS)
    assert {"mla_decode_portable.cu", "mla_combine.cu", "mla_metadata.cu"} <= set(_nvrtc.sources())


def test_include_inlining():
    src = _nvrtc.read_source("mla_decode_portable.cu")
    assert '#include "mla_common.cuh"' not in src and "mma16816" in src


CASES = [(name, arch, defines) for name, per_arch in VARIANTS.items() for arch, lst in per_arch.items()
         for defines in lst]


@pytest.mark.parametrize("name,arch,defines", CASES,
                         ids=[f"{n}-{a}-{'-'.join(str(v) for v in d.values())}" for n, a, d in CASES])
def test_compiles_without_spills(name, arch, defines):
    cubin, log = _nvrtc.compile_cubin(name, arch, defines)
    assert len(cubin) > 0
    reports = _nvrtc.parse_ptxas(log)
    assert reports, f"no ptxas -v report in the log:\n{log}"
    for rep in reports:
        assert rep["arch"] == arch
        assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, f"register spills: {rep}\n{log}"
        assert rep["stack"] == 0, f"local-memory stack frame: {rep}\n{log}"
        assert rep["registers"] is not None and rep["registers"] <= 255, rep


def test_parse_ptxas():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert _nvrtc.parse_ptxas(log) == [{"function": "k", "arch": "sm_90a", "registers": 255, "stack": 8,
                                        "spill_stores": 4, "spill_loads": 4}]
