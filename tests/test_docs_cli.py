"""README snippets run; the CLI and the roofline model behave."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from mla import perf
from mla.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_snippets():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(readme_snippets())))
def test_readme_python_snippets_run(index):
    exec(compile(readme_snippets()[index], f"README.md snippet {index}", "exec"), {})


def test_demo_runs_and_checks(capsys):
    assert main(["demo", "--b", "2", "--seqlen", "130", "--h-q", "4", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "-> OK" in out and "roofline on an H100" in out


def test_demo_float32_small_dims(capsys):
    assert main(["demo", "--d", "64", "--d-v", "32", "--page", "16", "--dtype", "float32", "--backend", "numpy"]) == 0


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy  available" in out and "numba" in out and "cupy" in out


def test_bench_json_on_cpu(capsys):
    assert main(["bench", "--backends", "numpy", "--shape", "2", "1", "4", "128", "--reps", "2", "--warmup", "0",
                 "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["backend"] == "numpy" and rows[0]["ms"] > 0


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--b", "0"])
    assert main(["demo", "--d", "32", "--d-v", "64"]) == 2
    assert main(["bench", "--backends", "torch"]) == 2


def test_python_dash_m_mla_help():
    res = subprocess.run([sys.executable, "-m", "mla", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "demo" in res.stdout


def test_roofline_counts_match_design():
    s = perf.DecodeShape(b=128, s_q=1, h_q=16, seqlen=8192)
    assert perf.decode_bytes(s) == 128 * (16 * 576 * 2 + 8192 * 576 * 2 + 16 * 512 * 2)
    assert perf.decode_flops(s) == 2 * 128 * 16 * 8192 * (576 + 512)
    r = perf.roofline(s, "h100")
    assert r.bound == "memory" and r.intensity < perf.PLATFORMS["h100"].ridge_intensity
    # FlashMLA's 0.443 ms on this shape is 2734 GB/s (DESIGN.md §5)
    assert abs(r.achieved(0.443e-3)["gbs"] - 2734) < 10
    big = perf.roofline(perf.DecodeShape(b=128, s_q=2, h_q=128, seqlen=8192), "h100")
    assert big.bound == "compute" and abs(big.achieved(0.925e-3)["tflops"] - 631) < 2


def test_fp8_shape_moves_fewer_bytes():
    a = perf.decode_bytes(perf.DecodeShape(b=1, s_q=1, h_q=16, seqlen=8192))
    b = perf.decode_bytes(perf.DecodeShape(b=1, s_q=1, h_q=16, seqlen=8192, fp8=True))
    assert 1.7 < a / b < 1.76


def test_kv_bytes_per_token_mla_is_smallest():
    mha = perf.kv_cache_bytes_per_token(61, 128, kind="mha")
    gqa = perf.kv_cache_bytes_per_token(61, 128, kind="gqa", n_kv_heads=8)
    mla_ = perf.kv_cache_bytes_per_token(61, 128, kind="mla")
    assert mla_ < gqa < mha and mla_ == 61 * 576 * 2
    with pytest.raises(ValueError, match="kind must be"):
        perf.kv_cache_bytes_per_token(61, 128, kind="mqa")
    assert np.isfinite(perf.PLATFORMS["h100"].ridge_intensity)


def test_notebook_runner_saves_figures_and_reports_failures(tmp_path):
    """benchmarks/run_notebooks.py (the GPU machine's Jupyter-free runner) on one notebook, and on
    a broken one: figures become PNG files, a raising cell fails the run and is named."""
    runner = [sys.executable, str(ROOT / "benchmarks" / "run_notebooks.py"), "--out", str(tmp_path)]
    res = subprocess.run(runner + [str(ROOT / "notebooks" / "03_flash_decoding.ipynb")],
                         capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
    assert res.returncode == 0, res.stdout + res.stderr
    pngs = sorted(tmp_path.glob("03_flash_decoding_cell*_fig*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "| 03_flash_decoding.ipynb |" in (tmp_path / "notebooks.md").read_text()
    bad = tmp_path / "broken.ipynb"
    bad.write_text('{"cells": [{"cell_type": "code", "metadata": {}, "source": "x = 1"},'
                   ' {"cell_type": "code", "metadata": {}, "source": "raise RuntimeError(\\"boom\\")"}],'
                   ' "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    res = subprocess.run(runner + [str(bad)], capture_output=True, text=True)
    assert res.returncode == 1 and "FAILED: RuntimeError: boom" in res.stdout


def test_gpu_verification_script_names_real_files():
    """benchmarks/gpu_checks.sh (run on the GPU machine) parses, and every test file, benchmark and
    module it runs exists, so a rename cannot silently empty the next GPU session's checks."""
    script = ROOT / "benchmarks" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    paths = set(re.findall(r"\b((?:tests|benchmarks)/[\w/]+\.py)\b", text))
    assert len(paths) >= 10
    assert [p for p in paths if not (ROOT / p).is_file()] == []
    for module in set(re.findall(r"python3 -m ([\w.]+)", text)) - {"pytest", "pip"}:
        where = ROOT / module.replace(".", "/")
        assert where.with_suffix(".py").is_file() or where.is_dir(), module


def test_sass_loop_counter_finds_nested_loops():
    """benchmarks/sass_loops.py (the instruction count behind Numba v6) on a small listing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sass_loops", ROOT / "benchmarks" / "sass_loops.py")
    sl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sl)
    listing = "\n".join(f"        /*{a:04x}*/                   {t} ;" for a, t in [
        (0x00, "MOV R1, c[0x0][0x28]"), (0x10, "IMAD R2, R3, R4, RZ"), (0x20, "LDGSTS.E.BYPASS.128 [R2], [R4.64]"),
        (0x30, "@P0 BRA 0x20"), (0x40, "HMMA.16816.F32.BF16 R8, R12, R16, R8"), (0x50, "@!P1 BRA 0x10"),
        (0x60, "EXIT")])
    found = sl.loops(listing)
    assert [(lp["start"], lp["end"], lp["count"]) for lp in found] == [(1, 5, 5), (2, 3, 2)]
    assert found[0]["ops"]["HMMA"] == 1 and found[1]["ops"]["LDGSTS"] == 1 and sl.opcode("@!P1 BRA 0x10") == "BRA"
