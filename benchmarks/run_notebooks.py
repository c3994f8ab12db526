"""Run the teaching notebooks without Jupyter and keep their figures as PNG files.

The GPU machine has no Jupyter kernel (no ipykernel / nbclient, and no network to install them),
so this runner reads each ``notebooks/*.ipynb`` as JSON and executes its code cells in order in
one namespace per notebook, the way a kernel would (IPython-only lines, ``%`` and ``!``, are
skipped). After every cell the open matplotlib figures are saved as
``OUT/<notebook>_cell<NN>_fig<K>.png`` and closed, and the cell's printed output goes to
``OUT/<notebook>.log``. ``--gpu`` adds a cell after each notebook's ``parameters`` cell that sets
``run_on_gpu = measure_on_gpu = True`` (the GPU-only cells of notebooks 04 and 05 then run) and
sets MLA_NOTEBOOK_GPU=1. A markdown summary (notebook, seconds, figures, status) is written to
``OUT/notebooks.md``. CI runs it on the NumPy backend in tests/test_docs_cli.py;
``tests/test_notebooks.py`` executes the same notebooks through a real Jupyter kernel.

Run: ``python benchmarks/run_notebooks.py [--gpu] [--out DIR] [notebooks ...]``; exit status 1 if
any notebook raised.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU_PARAMETERS = "run_on_gpu = True\nmeasure_on_gpu = True\n"


def code_cells(path: pathlib.Path, gpu: bool) -> list[str]:
    """The notebook's code cells as source strings (plus the --gpu parameter cell)."""
    nb = json.loads(path.read_text())
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        cells.append(src)
        if gpu and "parameters" in cell.get("metadata", {}).get("tags", []):
            cells.append(GPU_PARAMETERS)
    return cells


def run_notebook(path: pathlib.Path, out_dir: pathlib.Path, gpu: bool) -> dict:
    """Execute one notebook in its own folder; returns {name, seconds, figures, error}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = path.stem
    log = io.StringIO()
    figures = []
    error = None
    namespace = {"__name__": "__main__"}
    cwd = os.getcwd()
    start = time.perf_counter()
    os.chdir(path.parent)  # notebooks read ../benchmarks etc. relative to their folder
    try:
        for n, src in enumerate(code_cells(path, gpu)):
            log.write(f"--- cell {n}\n")
            with contextlib.redirect_stdout(log):
                exec(compile(src, f"{name}[cell {n}]", "exec"), namespace)  # noqa: S102 - our own notebooks
            for k, num in enumerate(plt.get_fignums()):
                file = out_dir / f"{name}_cell{n:02d}_fig{k}.png"
                plt.figure(num).savefig(file, dpi=110, bbox_inches="tight")
                figures.append(file.name)
            plt.close("all")
    except Exception:
        error = traceback.format_exc()
        log.write(error)
    finally:
        os.chdir(cwd)
        plt.close("all")
    (out_dir / f"{name}.log").write_text(log.getvalue())
    return {"name": path.name, "seconds": time.perf_counter() - start, "figures": figures, "error": error}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", help="notebook files (default: notebooks/*.ipynb)")
    ap.add_argument("--gpu", action="store_true", help="run the GPU cells (run_on_gpu = measure_on_gpu = True)")
    ap.add_argument("--out", default="notebook-runs", help="folder for logs, figures and notebooks.md")
    args = ap.parse_args(argv)
    out_dir = pathlib.Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [pathlib.Path(p).resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    if args.gpu:
        os.environ["MLA_NOTEBOOK_GPU"] = "1"
    rows = [run_notebook(p, out_dir, args.gpu) for p in paths]
    lines = ["| notebook | seconds | figures | status |", "|---|---:|---:|---|"]
    for r in rows:
        status = "ok" if r["error"] is None else "FAILED: " + r["error"].strip().splitlines()[-1]
        lines.append(f"| {r['name']} | {r['seconds']:.1f} | {len(r['figures'])} | {status} |")
    table = "\n".join(lines) + "\n"
    (out_dir / "notebooks.md").write_text(table)
    print(table, end="")
    return 0 if all(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
