"""Shared by tests/test_numba_sim.py and tests/test_numba_sparse_fp8_sim.py: a Python script in a fresh process (the
Numba CUDA simulator must be switched on before numba.cuda is first imported, and this pytest process may already
have imported it), run from the repository root with the repository on PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(script, *args, timeout, **env):
    """``python -c script *args`` in ROOT; env: variables to set for it (None: unset it). Returns the
    CompletedProcess (text stdout / stderr)."""
    environ = dict(os.environ)
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=environ,
                          cwd=ROOT, timeout=timeout)


def simulator_results(script, cases, timeout, **env):
    """Run ``script`` under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1, plus env as in run_python) with
    ``json.dumps(cases)`` as its argument; it prints one line ``RESULTS<json>``, returned decoded. Fails the
    test (with the output's tails) when the script exits non-zero or prints no such line."""
    proc = run_python(script, json.dumps(cases), timeout=timeout, NUMBA_ENABLE_CUDASIM="1", **env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"simulator subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULTS"):])
