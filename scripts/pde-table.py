#!/usr/bin/env python3
"""Mean ± std tables of `scripts/pde-tables` runs (standard library only).

    python3 scripts/pde-table.py runs/pde-tables

Reads every `<solver>-seed<S>-<start>/summary.json` and `<dir>.time` (wall seconds) and prints,
per solver, one Markdown row per method: the MAE over the test simulations as mean ± sample std
over the seeds, ZO-SOL / NON per seed as mean ± std, the queries of a run and its training
seconds (mean over seeds).
"""
import json
import statistics
import sys
from pathlib import Path

ORDER = ["src", "non", "sol-nograd", "zo-sol", "zo-sol (scratch)", "fo-sol"]


def fmt(v):
    if v == 0:
        return "0"
    return f"{v:.3e}" if abs(v) < 1e-3 else f"{v:.4f}"


def spread(values):
    if len(values) < 2:
        return fmt(values[0]) if values else "—"
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def main(root):
    root = Path(root)
    runs = {}
    for summary in sorted(root.glob("*-seed*-*/summary.json")):
        name = summary.parent.name
        solver, rest = name.split("-seed")
        seed, start = rest.split("-")
        data = json.loads(summary.read_text())
        time_file = summary.parent.with_name(name + ".time")
        wall = None
        if time_file.is_file():
            wall = float(time_file.read_text().split()[0])
        for method, mae in data["mae"].items():
            key = method
            if method == "zo-sol" and start == "scratch":
                key = "zo-sol (scratch)"
            entry = runs.setdefault(solver, {}).setdefault(key, {})
            entry[int(seed)] = {
                "mae": mae,
                "queries": data["queries"][method],
                "seconds": data["seconds"][method],
                "wall": wall,
            }
    for solver, methods in runs.items():
        seeds = sorted({s for m in methods.values() for s in m})
        print(f"\n### {solver}: seeds {', '.join(map(str, seeds))}\n")
        print("| method | MAE (mean ± std) | / NON (mean ± std) | per seed | queries | training s |")
        print("|---|---|---|---|---|---|")
        non = methods.get("non", {})
        for key in ORDER:
            if key not in methods:
                continue
            rows = methods[key]
            maes = [rows[s]["mae"] for s in seeds if s in rows]
            ratios = [rows[s]["mae"] / non[s]["mae"] for s in seeds if s in rows and s in non]
            per_seed = ", ".join(fmt(rows[s]["mae"]) for s in seeds if s in rows)
            queries = statistics.mean(rows[s]["queries"] for s in rows)
            seconds = statistics.mean(rows[s]["seconds"] for s in rows)
            ratio = spread(ratios) if ratios and key != "non" else "—"
            print(f"| {key} | {spread(maes)} | {ratio} | {per_seed} | {queries:,.0f} | {seconds:.1f} |")
        walls = sorted({(s, r["wall"]) for m in methods.values() for s, r in m.items() if r["wall"]})
        if walls:
            print(f"\nwall per run (s): min {min(w for _, w in walls):.0f}, max {max(w for _, w in walls):.0f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/pde-tables")
