"""Summarise Nsight Compute's per-SASS-instruction stall samples (``ncu --section SourceCounters --page source --csv
--print-source sass``, as benchmarks/gpu_checks.sh's FP8 register-kernel parts write them): the totals per stall
reason, warp instructions executed, and the instructions with the most samples.

    python3 benchmarks/ncu_stalls.py ncu_regs.txt [--top 40] [--tiles-per-sm 124]

The CSVs are megabytes; the runs keep this summary instead (benchmarks/runs/*/ncu_*_summary.txt)."""

from __future__ import annotations

import argparse
import csv


def summarise(path: str, top: int, tiles_per_sm: float, sms: int = 132, warps: int = 8) -> str:
    with open(path) as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    header = next(r for r in rows if r and r[0] == "Address")
    data = [r for r in rows if r and r[0].startswith("0x")]
    col = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def num(r, h):
        v = r[col[h]]
        return int(v) if v not in ("", "-") else 0

    samples = sum(num(r, "Warp Stall Sampling (All Samples)") for r in data)
    totals = {s: sum(num(r, s) for r in data) for s in stalls}
    executed = sum(num(r, "Instructions Executed") for r in data)
    out = [f"stall samples {samples}, not attributed to a named reason {samples - sum(totals.values())}"]
    for s, v in sorted(totals.items(), key=lambda x: -x[1]):
        out.append(f"  {s:24s} {v:7d} {100 * v / max(samples, 1):5.1f}%")
    out.append(f"warp instructions executed {executed} = {executed / sms / tiles_per_sm / warps:.0f} per warp per tile "
               f"of an SM ({sms} SMs, {tiles_per_sm} tiles an SM, {warps} warps)")
    out.append(f"top {top} instructions by samples (address, SASS, samples, executed, 3 largest reasons):")
    for r in sorted(data, key=lambda r: -num(r, "Warp Stall Sampling (All Samples)"))[:top]:
        reasons = sorted(((num(r, s), s[6:]) for s in stalls), reverse=True)[:3]
        out.append(f"  {r[0][-5:]} {r[1].strip()[:60]:60s} {num(r, 'Warp Stall Sampling (All Samples)'):6d} "
                   f"{num(r, 'Instructions Executed'):7d} {reasons}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--tiles-per-sm", type=float, default=124.0, help="128 x 8192 keys / 64 / 132 SMs")
    args = ap.parse_args()
    print(summarise(args.csv, args.top, args.tiles_per_sm))


if __name__ == "__main__":
    main()
