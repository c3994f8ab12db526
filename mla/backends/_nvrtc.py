"""Locating and compiling the CUDA C++ sources in ``kernels/`` (shipped as ``mla.kernels``).

Internal. Sources are read through ``importlib.resources`` (so an installed wheel, an editable
install and a plain checkout on ``PYTHONPATH`` all work), local ``#include "x.cuh"`` lines are
inlined (CuPy's kernel cache keys on the source text, so a header edit must change that text),
and the result is compiled by NVRTC:

* ``compile_cubin`` -- through ``cupy.cuda.nvrtc`` to a cubin for a named architecture; needs
  only the NVRTC library (the ``nvidia-cuda-nvrtc`` wheel), no GPU. Used by the CI compile test.
* ``load_function`` -- through ``cupy.RawModule`` for the current device, cached per (file,
  function, defines, architecture).
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from pathlib import Path

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def unavailable_reason() -> str | None:
    """Why NVRTC cannot compile here (None when it can): the compile tests skip with this reason."""
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or the NVRTC shared library missing
        return (f"NVRTC is not usable here ({type(exc).__name__}: {exc}); "
                "pip install cupy-cuda13x nvidia-cuda-nvrtc")
    return None


def kernel_dir() -> Path:
    """The folder holding the .cu/.cuh sources (``mla.kernels``, or ``kernels/`` of a checkout)."""
    try:
        path = Path(str(importlib.resources.files("mla.kernels")))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "kernels"


def sources() -> list[str]:
    """Names of every compilable kernel source (``*.cu``)."""
    return sorted(p.name for p in kernel_dir().glob("*.cu"))


@functools.cache
def read_source(name: str) -> str:
    """The source of ``name`` with its local includes inlined (each header once)."""
    root = kernel_dir()
    seen: set[str] = set()

    def expand(text: str) -> str:
        def repl(match):
            header = match.group(1)
            if header in seen:
                return ""
            seen.add(header)
            body = (root / header).read_text()
            return expand(body.replace("#pragma once", ""))

        return _INCLUDE.sub(repl, text)

    return expand((root / name).read_text())


def options(arch: str | None, defines: dict | None = None, ptxas_verbose: bool = False) -> tuple[str, ...]:
    """NVRTC options: C++17, the target (e.g. "sm_90a"), -D defines, and -Xptxas -v when asked.
    MLA_NVRTC_LINEINFO=1 adds -lineinfo (compute-sanitizer and Nsight Compute then name source lines);
    MLA_NVRTC_DEFINES="NAME=VALUE ..." adds -D options to every build (diagnostics and A/B timings only)."""
    import os

    opts = ["-std=c++17"]
    if os.environ.get("MLA_NVRTC_LINEINFO") == "1":
        opts.append("-lineinfo")
    opts += [f"-D{d}" for d in os.environ.get("MLA_NVRTC_DEFINES", "").split()]
    if arch is not None:
        opts.append(f"--gpu-architecture={arch}")
    for key, value in sorted((defines or {}).items()):
        opts.append(f"-D{key}={value}")
    if ptxas_verbose:
        opts += ["-Xptxas", "-v"]
    return tuple(opts)


def compile_cubin(name: str, arch: str, defines: dict | None = None) -> tuple[bytes, str]:
    """Compile kernels/``name`` for ``arch`` (e.g. "sm_90a") with NVRTC, no GPU needed.

    Returns (cubin, log) where log holds ptxas' ``-v`` report; raises RuntimeError with the
    compiler log on errors.
    """
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(read_source(name), name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(options(arch, defines, ptxas_verbose=True)))
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed on {name} for {arch} with {defines}:\n"
                               f"{nvrtc.getProgramLog(prog)}") from exc
        log = nvrtc.getProgramLog(prog)
        return nvrtc.getCUBIN(prog), log
    finally:
        nvrtc.destroyProgram(prog)


def parse_ptxas(log: str) -> list[dict]:
    """[{function, arch, registers, stack, spill_stores, spill_loads}] from a ``-Xptxas -v`` log."""
    result = []
    for line in log.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            result.append({"function": m.group(1), "arch": m.group(2), "registers": None, "stack": None,
                           "spill_stores": None, "spill_loads": None})
            continue
        if not result:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            result[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                              spill_loads=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            result[-1]["registers"] = int(m.group(1))
    return result


@functools.cache
def _load(name: str, function: str, defines: tuple, arch: str | None, device_id: int, cooperative: bool):
    import cupy

    module = cupy.RawModule(code=read_source(name), options=options(arch, dict(defines)), backend="nvrtc",
                            enable_cooperative_groups=cooperative)
    return module.get_function(function)


def load_function(name: str, function: str, defines: dict | None = None, arch: str | None = None,
                  cooperative: bool = False):
    """A ``cupy.RawKernel``-like function compiled for the current device (cached).

    arch None lets CuPy pick the device's architecture; pass "sm_90a" for wgmma kernels. cooperative: calls launch
    it cooperatively (every CTA of the grid resident at once; CuPy 14 compiles the same code for it). Beware: CuPy
    then *shrinks* a grid larger than the device holds (with a warning) instead of failing, so the caller must launch
    only grids that fit (``cupy_hopper.fused_reason``).
    """
    import cupy

    key = tuple(sorted((defines or {}).items()))
    return _load(name, function, key, arch, cupy.cuda.Device().id, bool(cooperative))
