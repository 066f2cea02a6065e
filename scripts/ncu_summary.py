#!/usr/bin/env python3
"""Summarises `ncu --csv` output of one profiled decode step: per kernel name, launches, total and mean
time, and DRAM read rate; then the step's summed kernel time (set against a graph replay of the step,
the difference is the time between kernels)."""
import csv
import re
import sys
from collections import defaultdict

rows = defaultdict(dict)  # (launch id) -> metric -> value
names = {}
with open(sys.argv[1], newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for rec in csv.DictReader(lines):
    key = rec["ID"]
    names[key] = rec["Kernel Name"]
    value = rec["Metric Value"].replace(",", "")
    unit = rec["Metric Unit"]
    try:
        v = float(value)
    except ValueError:
        continue
    scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "msecond": 1e3, "ms": 1e3, "nsecond": 1e-3,
             "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}.get(unit, 1.0)
    rows[key][rec["Metric Name"]] = v * scale

by_kernel = defaultdict(lambda: [0, 0.0, 0.0])
for key, m in rows.items():
    short = re.sub(r"\(.*", "", names[key])
    short = re.sub(r"^void ", "", short)
    entry = by_kernel[short]
    entry[0] += 1
    entry[1] += m.get("gpu__time_duration.sum", 0.0)
    entry[2] += m.get("dram__bytes_read.sum", 0.0)

total = sum(e[1] for e in by_kernel.values())
print(f"| kernel | launches | total us | mean us | GB/s read | share |")
print("|---|---|---|---|---|---|")
for name, (n, us, b) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1]):
    gbs = b / us / 1e3 if us > 0 else 0.0
    print(f"| {name[:70]} | {n} | {us:.1f} | {us / n:.2f} | {gbs:.0f} | {100 * us / total:.1f}% |")
print(f"| all kernels of the step | {sum(e[0] for e in by_kernel.values())} | {total:.1f} | | | 100% |")
