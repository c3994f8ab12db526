"""The seesaw kernel's TMA build under racecheck, one problem, every hazard printed with its shared-memory address
(issue #4, 2026-11-26, eighth session: which accesses does the report name?).

    compute-sanitizer --tool racecheck --racecheck-report hazard python3 benchmarks/seesaw_tma_racecheck.py
    python3 benchmarks/seesaw_tma_racecheck.py --cubin seesaw_tma.cubin   # the NVRTC cubin (to disassemble)

Shared memory of the kernel (mla_decode_seesaw.cu): Q [0, 73728), K buffers [73728, 221184), then the kernel's small
arrays and mbarriers (the addresses racecheck prints are offsets in the CTA's shared window).
"""

import os
import sys

import numpy as np

import mla
from mla import testing
from mla.backends import cupy_backend

os.environ["MLA_HOPPER_VARIANT"] = "seesaw"
os.environ["MLA_SEESAW_LOADS"] = "tma"

if len(sys.argv) > 2 and sys.argv[1] == "--cubin":
    from mla.backends import _nvrtc, cupy_hopper

    cubin, _ = _nvrtc.compile_cubin(cupy_hopper.SEESAW_SOURCE, "sm_90a", {**cupy_hopper.defines(False),
                                                                          "MLA_SEESAW_TMA": 1})
    open(sys.argv[2], "wb").write(cubin)
    sys.exit(0)

cupy_backend.POISON_OUTPUTS = True
rng = np.random.default_rng(0)
case = testing.make_decode_case(rng, b=2, s_q=1, h_q=128, d=576, head_dim_v=512, page_block_size=64,
                                seqlens=[300, 64], dtype=mla._arrays.BFLOAT16)
c = testing.to_device(case)
out, lse = mla.flash_mla_with_kvcache(*c.args(), backend="cupy", **c.kwargs())
out.get()
print("SANITIZE-DONE")
