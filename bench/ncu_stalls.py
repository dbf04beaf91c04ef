"""Summarise Nsight Compute's per-SASS-line warp stall samples.

    ncu --set full --import-source yes -k regex:KERNEL -c 1 -o rep python3 ...
    ncu --import rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 bench/ncu_stalls.py sass.csv [--top 20]

Prints the samples by stall reason (the columns whose names start with "stall_", where the report has them) and
the SASS lines with the most samples ("Warp Stall Sampling (All Samples)"), each with its top reason.
"""
import argparse
import csv
import io


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def summarise(text: str, top: int = 20) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "Source" in line and "Address" in line), 0)
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    if not rows:
        return "no rows in the report"
    columns = list(rows[0])
    total_col = next((c for c in columns if "Warp Stall Sampling (All Samples)" in c), None)
    reasons = [c for c in columns if c.startswith("stall_") and "not issued" not in c.lower()]  # all samples
    out = [f"{len(rows)} SASS lines; columns: {len(columns)}"]
    if total_col is None:
        return "\n".join(out + ["no 'Warp Stall Sampling (All Samples)' column: " + ", ".join(columns[:30])])
    total = sum(_number(r[total_col]) for r in rows)
    out.append(f"total samples {total:.0f}")
    sums = sorted(((sum(_number(r[c]) for r in rows), c) for c in reasons), reverse=True)
    out += [f"  {c:<28} {v:6.0f} {100 * v / max(total, 1):5.1f} %" for v, c in sums if v > 0]
    out.append("")
    for r in sorted(rows, key=lambda r: -_number(r[total_col]))[:top]:
        why = max(reasons, key=lambda c: _number(r[c])) if reasons else ""
        out.append(f"  {_number(r[total_col]):6.0f}  {r.get('Source', '')[:60]:<60} {why}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    with open(args.csv, encoding="utf-8", errors="replace") as f:
        print(summarise(f.read(), args.top))


if __name__ == "__main__":
    main()
