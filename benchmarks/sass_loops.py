"""Count a kernel's machine instructions loop by loop (no GPU needed): where does a tile's time go?

ncu said Numba v5 is issue-bound (0.33 instructions a cycle, one warp a scheduler), so the question
is how many instructions each part of a 64-key tile costs. This script compiles a Numba tensor-core
version (``kernels/numba_decode.py`` v4 / v5 / v6) to PTX with ``numba.cuda.compile_ptx``, assembles it
with ``ptxas -arch=sm_90``, disassembles with ``cuobjdump -sass`` (needs ``nvdisasm``; both come as pip
wheels: nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm) and lists every loop (a backward branch) with its
static instruction count and most common opcodes. Multiply by trip counts for dynamic counts; the
result for v5 / v6 is in benchmarks/NOTES.md ("v6").

    python benchmarks/sass_loops.py 5 6            # versions to analyse
    python benchmarks/sass_loops.py --sass file.sass
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WARPS = {4: 4, 5: 8, 6: 8}


def tools() -> dict[str, str] | None:
    """{'ptxas': path, 'cuobjdump': path} or None when one is missing (nvdisasm must be on PATH too)."""
    found = {name: shutil.which(name) for name in ("ptxas", "cuobjdump", "nvdisasm")}
    return None if None in found.values() else found


def numba_sass(version: int, kind: str = "bf16", d: int = 576, d_v: int = 512, page: int = 64) -> str:
    """SASS text of Numba tensor-core version 4, 5 or 6 for the DeepSeek shape."""
    from mla.kernels import numba_decode as nd
    from numba import cuda, types

    kernel = nd._make_v4(kind, d, d_v, WARPS[version], page, version == 6)
    arr = types.Array
    sig = (arr(types.uint16, 4, "C"), arr(types.uint16, 4, "C"), arr(types.int32, 2, "C"), arr(types.int32, 1, "C"),
           arr(types.int32, 2, "C"), arr(types.int32, 1, "C"), arr(types.float32, 4, "C"), arr(types.float32, 3, "C"),
           types.float32, types.boolean, types.int32, types.int32)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        subprocess.run(["ptxas", "-arch=sm_90", str(src), "-o", str(cubin)], check=True)
        return subprocess.run(["cuobjdump", "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout


def instructions(sass: str) -> list[tuple[int, str]]:
    """[(address, instruction text)] of a cuobjdump -sass listing."""
    return [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, flags=re.MULTILINE)]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def loops(sass: str) -> list[dict]:
    """Every loop: {'start', 'end' (instruction indices), 'count', 'ops' (Counter of opcodes)}, outermost first."""
    ins = instructions(sass)
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    found = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"BRA\s+(?:`\()?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
            start = index[int(m.group(1), 16)]
            body = [t for _, t in ins[start:i + 1]]
            found.append({"start": start, "end": i, "count": len(body),
                          "ops": collections.Counter(opcode(t) for t in body)})
    return sorted(found, key=lambda lp: (lp["start"], -lp["end"]))


def report(sass: str, title: str, top: int = 8) -> str:
    lines = [f"{title}: {len(instructions(sass))} instructions"]
    for lp in loops(sass):
        if lp["count"] < 4:
            continue
        ops = ", ".join(f"{k} {v}" for k, v in lp["ops"].most_common(top))
        lines.append(f"  loop [{lp['start']:5d} .. {lp['end']:5d}] {lp['count']:5d} instr: {ops}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("versions", nargs="*", type=int, default=[5, 6], help="Numba tensor-core versions (4, 5, 6)")
    ap.add_argument("--sass", help="analyse this cuobjdump -sass listing instead")
    args = ap.parse_args(argv)
    if args.sass:
        print(report(Path(args.sass).read_text(), args.sass))
        return 0
    if tools() is None:
        print("needs ptxas, cuobjdump and nvdisasm on PATH (pip: nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
    for v in args.versions:
        print(report(numba_sass(v), f"numba v{v}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
