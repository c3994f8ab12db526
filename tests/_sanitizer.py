"""Shared by the GPU test files' compute-sanitizer tests (tests/test_*_gpu.py): run a script under a sanitizer tool,
skip where compute-sanitizer is not installed, fail with its report."""

from __future__ import annotations

import pytest

from mla import testing


def check_compute_sanitizer(tool, script):
    """``mla.testing.run_compute_sanitizer(tool, script)``: skip when compute-sanitizer is not on PATH, else assert
    it passed (the script printed SANITIZE-DONE, no errors / hazards), its report the failure message."""
    result = testing.run_compute_sanitizer(tool, script)
    if result is None:
        pytest.skip("compute-sanitizer is not on PATH")
    ok, report = result
    assert ok, report
