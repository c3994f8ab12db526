"""Run a kernels/*.cu RawKernel source on the CPU (tests only): see tests/cuda_host_emu.h.

``EmuModule(name, defines).get_function(fn)`` returns an object called like a ``cupy.RawKernel``:
``fn(grid, block, args, shared_mem=bytes)`` with NumPy arrays (passed as pointers) and NumPy
scalars (np.int32, np.uint32, np.float32, np.int64) as arguments. The source (local includes
inlined) is compiled with g++ after every function holding inline PTX is replaced by the
emulation in cuda_host_emu.h; the library is cached per source text under the system temp folder.
Slow (each CUDA thread is a fiber; warp operations are rendezvous): for small problems only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from mla.backends import _nvrtc

HERE = Path(__file__).resolve().parent
EMULATED = {"smem_u32", "pack2", "lo_f", "hi_f", "to_elem", "fast_exp2", "mul_rn", "cp_async16", "cp_async4",
            "cp_async_commit", "cp_async_wait", "red_add2", "ldsm_x4", "ldsm_x2", "ldsm_x4_t", "mma16816",
            "e4m3x4_to_bf16x4_2m120", "e4m3_pair_to_bf16x2_2m120", "bf16x2_mul", "ldg_nc_v2", "ldg_nc_v4",
            "ldg_nc_f32_or1", "ldg_nc_i32_or"}

SCHEDULES = ("lockstep", "skewed", "reverse")

_FUNC_START = re.compile(r"^(template\s*<[^\n]*>\s*\n)?__device__\s+__forceinline__\s+[^\n(]*?(\w+)\s*\(",
                         re.MULTILINE)
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)',
                     re.MULTILINE)
_SHARED = re.compile(r"extern\s+__shared__[^;]*\b(\w+)\s*\[\s*\]\s*;")


def compiler():
    """The host C++ compiler (g++), or None."""
    return shutil.which("g++")


def _strip_ptx_functions(src: str) -> str:
    """Drop every __device__ __forceinline__ function whose body holds inline PTX (asm); the ones
    the rest of the source calls must have an emulation in cuda_host_emu.h."""
    out, pos, dropped = [], 0, []
    for m in _FUNC_START.finditer(src):
        if m.start() < pos:
            continue
        depth, i = 0, src.index("{", m.end())
        for j in range(i, len(src)):
            if src[j] == "{":
                depth += 1
            elif src[j] == "}":
                depth -= 1
                if depth == 0:
                    break
        body = src[m.start():j + 1]
        if "asm" in body:
            out.append(src[pos:m.start()])
            pos = j + 1
            dropped.append(m.group(2))
    out.append(src[pos:])
    text = "".join(out)
    # helpers nobody calls may stay unemulated (a shared header grows); a called one must not
    missing = sorted(n for n in set(dropped) - EMULATED if re.search(rf"\b{n}\b", text))
    if missing:
        raise RuntimeError(f"inline-PTX helpers without an emulation in cuda_host_emu.h: {missing}")
    return text


def _ctype(decl: str):
    decl = decl.strip()
    if "*" in decl:
        return ctypes.c_void_p
    words = decl.replace("const", "").split()[:-1]
    typ = " ".join(words)
    return {"int": ctypes.c_int, "float": ctypes.c_float, "u32": ctypes.c_uint32, "unsigned": ctypes.c_uint32,
            "long long": ctypes.c_longlong, "u64": ctypes.c_uint64}[typ]


class _Function:
    def __init__(self, lib, name, params):
        self.name = name
        self.params = params
        self._fn = getattr(lib, f"emu_{name}")
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_uint] * 3 + [ctypes.c_int, ctypes.c_size_t] + [_ctype(p) for p in params]
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise ValueError(f"{self.name}: {shared_mem} B of dynamic shared memory without raising "
                             f"max_dynamic_shared_size_bytes ({self.max_dynamic_shared_size_bytes})")
        conv = []
        for a, p in zip(args, self.params):
            if isinstance(a, np.ndarray):
                if "*" not in p:
                    raise TypeError(f"{self.name}: array passed for scalar parameter {p!r}")
                conv.append(a.ctypes.data)
            elif "*" in p and (a is None or (isinstance(a, (int, np.integer)) and int(a) == 0)):
                conv.append(None)  # a null pointer (the backends pass np.uint64(0))
            else:
                if "*" in p:
                    raise TypeError(f"{self.name}: scalar passed for pointer parameter {p!r}")
                conv.append(a.item() if isinstance(a, np.generic) else a)
        self._fn(*grid, int(block[0]), int(shared_mem), *conv)


class EmuModule:
    """A kernels/<name> source compiled for the CPU emulator with the given -D defines."""

    def __init__(self, name: str, defines: dict | None = None, source: str | None = None):
        """source: the text to compile instead of kernels/<name> (local includes already inlined)."""
        src = _nvrtc.read_source(name) if source is None else source
        src = _strip_ptx_functions(src)
        src = _SHARED.sub(lambda m: f"unsigned char* {m.group(1)} = emu::smem_base;", src)
        kernels = [(m.group(1), [p.strip() for p in m.group(2).split(",")]) for m in _KERNEL.finditer(src)]
        wrappers = []
        for fname, params in kernels:
            names = [re.findall(r"\w+", p)[-1] for p in params]
            wrappers.append(
                f'extern "C" void emu_{fname}(unsigned gx, unsigned gy, unsigned gz, int threads, size_t smem, '
                f'{", ".join(params)}) {{\n'
                f"  emu::launch(emu_dim3{{gx, gy, gz}}, threads, smem, [&] {{ {fname}({', '.join(names)}); }});\n}}\n")
        # a kernel named by a macro (``MLA_KERNEL_NAME(...)``): the library reports the expanded name
        macros = [fname for fname, _ in kernels if fname.isupper()]
        wrappers += [f'extern "C" const char* emu_name_{m}() {{ return EMU_STR({m}); }}\n' for m in macros]
        head = "".join(f"#define {k} {v}\n" for k, v in sorted((defines or {}).items()))
        head += "#define EMU_XSTR(x) #x\n#define EMU_STR(x) EMU_XSTR(x)\n"
        text = head + '#include "cuda_host_emu.h"\n' + src + "\n" + "\n".join(wrappers)
        key = hashlib.sha256((text + (HERE / "cuda_host_emu.h").read_text()).encode()).hexdigest()[:20]
        cache = Path(tempfile.gettempdir()) / "mla_cuda_emu"
        cache.mkdir(exist_ok=True)
        lib = cache / f"{Path(name).stem}_{key}.so"
        if not lib.exists():
            cpp = cache / f"{Path(name).stem}_{key}.{os.getpid()}.cpp"
            cpp.write_text(text)
            tmp = cache / f"{Path(name).stem}_{key}.{os.getpid()}.so"
            res = subprocess.run([compiler() or "g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", f"-I{HERE}",
                                  str(cpp), "-o", str(tmp)], capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"g++ failed on the emulated {name}:\n{res.stderr[-6000:]}")
            tmp.replace(lib)
        self._lib = ctypes.CDLL(str(lib))
        self._functions = {}
        for fname, params in kernels:
            name = fname
            if fname in macros:
                getter = getattr(self._lib, f"emu_name_{fname}")
                getter.restype = ctypes.c_char_p
                name = getter().decode()
            self._functions[name] = _Function(self._lib, fname, params)

    def configure(self, eager: bool = False, schedule: str = "lockstep") -> None:
        """cp.async copies at the issue (eager) or at the wait (lazy); warp schedule "lockstep",
        "skewed" (warp w runs every (w + 1)-th round) or "reverse" (the last warp fastest)."""
        self._lib.emu_config(int(bool(eager)), SCHEDULES.index(schedule))

    def get_function(self, name: str) -> _Function:
        return self._functions[name]
