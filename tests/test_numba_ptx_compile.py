"""CPU-only: the Numba tensor-core kernels (v4, v5, v6) compile for sm_90 without a GPU, and
ptxas assembles them without register spills or local memory.

The simulator cannot run inline PTX (mma.sync, ldmatrix, cp.async), so these versions are checked
for correctness only on a GPU (tests/test_numba_gpu.py); this catches typing and code-generation
regressions (a fully unrolled score loop, a run-time-indexed register array) in CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

pytest.importorskip("numba")
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compile_ptx needs the real numba.cuda (NUMBA_ENABLE_CUDASIM=1 is set)", allow_module_level=True)

from mla.kernels import numba_decode as nd  # noqa: E402
from numba import cuda, types  # noqa: E402

WARPS = {4: 4, 5: 8, 6: 8}


def _signature():
    u16_4 = types.Array(types.uint16, 4, "C")
    i32_2 = types.Array(types.int32, 2, "C")
    i32_1 = types.Array(types.int32, 1, "C")
    return (u16_4, u16_4, i32_2, i32_1, i32_2, i32_1, types.Array(types.float32, 4, "C"),
            types.Array(types.float32, 3, "C"), types.float32, types.boolean, types.int32, types.int32)


def _ptx(version, kind, page):
    kernel = nd._make_v4(kind, 576, 512, WARPS[version], page, version == 6)
    try:
        ptx, _ = cuda.compile_ptx(kernel.py_func, _signature(), cc=(9, 0))
    except Exception as exc:  # no NVVM in this environment
        pytest.skip(f"numba.cuda.compile_ptx is unavailable here: {exc}")
    return ptx


@pytest.mark.parametrize("version", sorted(WARPS))
@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_tensor_core_versions_compile(version, kind, tmp_path):
    ptx = _ptx(version, kind, 64)
    assert "mma.sync.aligned.m16n8k16" in ptx and "cp.async.cg.shared.global" in ptx
    assert "ldmatrix.sync.aligned" in ptx
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas is not on PATH: PTX checked, register report not")
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    res = subprocess.run([ptxas, "-arch=sm_90", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr)]
    stack = [int(x) for x in re.findall(r"(\d+) bytes stack frame", res.stderr)]
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", res.stderr)]
    assert spills and not any(spills) and not any(stack), res.stderr
    assert regs and max(regs) * 32 * WARPS[version] <= 65536, res.stderr  # the CTA fits one SM


def test_v6_loader_has_no_block_table_read_per_copy():
    """v6's key loader reads each tile row's block once (lanes in parallel) and shuffles the row
    offset to the copying lanes: its PTX has shfl.sync, v5's does not."""
    assert "shfl.sync.idx" in _ptx(6, "bf16", 64)
    assert "shfl.sync.idx" not in _ptx(5, "bf16", 64)
