"""Smoke run of the FP8 register kernel (kernels/mla_decode_fp8_regs.cu) on a GPU: one small dense FP8 decode forced
through it (two sequences, a split and a tail tile), against the NumPy backend; prints the largest error and exits
non-zero when it exceeds the tests' tolerance. The first GPU step of a device call that brings a new kernel, so that a
hang or a fault shows within seconds (tests/test_cupy_fp8_sparse_gpu.py is the real check)."""

from __future__ import annotations

import os
import sys

import numpy as np

os.environ["MLA_CUPY_FP8_KERNEL"] = "regs"
import mla  # noqa: E402
from mla import _arrays, testing  # noqa: E402


def main() -> int:
    case = testing.make_decode_case(np.random.default_rng(0), b=2, s_q=1, h_q=16, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=[700, 65], dtype=_arrays.BFLOAT16, fp8=True)
    c = testing.to_device(case)
    out, lse = mla.flash_mla_with_kvcache(*c.args(), is_fp8_kvcache=True, backend="cupy")
    want, lse_want = mla.flash_mla_with_kvcache(*case.args(), is_fp8_kvcache=True, backend="numpy")
    err = float(np.abs(_arrays.asnumpy(out).astype(np.float32) - want.astype(np.float32)).max())
    lse_err = float(np.abs(_arrays.asnumpy(lse) - lse_want).max())
    print(f"out max error {err:.3g} (tolerance {testing.out_atol(case):.3g}), lse max error {lse_err:.3g}")
    return 0 if err <= testing.out_atol(case) and lse_err <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
