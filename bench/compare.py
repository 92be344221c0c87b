"""The throughput benchmark alternated between an older revision and this checkout, pair by pair.

    python -m bench.compare BASE [--pairs 6] [-- THROUGHPUT ARGS...]
    # e.g.: python -m bench.compare main --pairs 10 -- --rounds 3 --producers 1,4

On this shared 2-core machine two runs of the same code differ by five points of ratio or more
(docs/benchmarks.md), so one run of each side says nothing about a change worth two. This checks
BASE out into a temporary git worktree, runs ``python -m bench.throughput`` from there and from
this checkout in turn, ``--pairs`` times, and prints for each figure (the ratio and the CPU per
job, for each set of producers) every pair's difference, this checkout minus BASE, with their
mean, median and standard deviation. Both sides run in this interpreter, with the same
packages: only the code of the two revisions differs. Uncommitted changes of this checkout are
measured as they are.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# "N=300 jobs of 5 ticks, ..., 1 producer thread(s)" opens each set's report.
HEADER = re.compile(r"^N=\d+ jobs .*, ([^,]+)$")
FIGURES = {
    "ratio %": re.compile(r"^ratio\s+([\d.]+)%"),
    "CPU ms/job": re.compile(r"^CPU per job, whole machine: ([\d.]+) ms"),
}


def run_throughput(checkout: Path, args: list[str]) -> dict[str, float]:
    """One run of the benchmark from ``checkout``: figure name -> value."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.throughput", *args],
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"bench.throughput failed in {checkout}:\n{result.stderr[-3000:]}")
    figures: dict[str, float] = {}
    label = ""
    for line in result.stdout.splitlines():
        if header := HEADER.match(line):
            label = header[1]
        for name, pattern in FIGURES.items():
            if found := pattern.match(line):
                figures[f"{name}, {label}"] = float(found[1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the revision to compare against (a commit, branch or tag)")
    parser.add_argument("--pairs", type=int, default=6)
    argv = sys.argv[1:]
    # What follows "--" goes to bench.throughput as it is.
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    throughput_args = argv[split + 1 :]

    with tempfile.TemporaryDirectory(prefix="tf-bench-base-") as tmp:
        base = Path(tmp, "base")
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(base), args.base],
            cwd=ROOT,
            check=True,
        )
        try:
            differences: dict[str, list[float]] = {}
            for pair in range(1, args.pairs + 1):
                before = run_throughput(base, throughput_args)
                after = run_throughput(ROOT, throughput_args)
                shown = []
                for name, value in after.items():
                    if name in before:
                        differences.setdefault(name, []).append(value - before[name])
                        shown.append(f"{name}: {before[name]:g} -> {value:g}")
                print(f"pair {pair}: " + "; ".join(shown), flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False
            )

    print(f"\nthis checkout minus {args.base}, {args.pairs} alternated pairs:")
    for name, values in differences.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"  {name:<40} mean {statistics.mean(values):+6.2f}  median "
            f"{statistics.median(values):+6.2f}  sd {spread:5.2f}"
        )


if __name__ == "__main__":
    main()
