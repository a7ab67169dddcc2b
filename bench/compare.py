"""Before/after: this checkout's gate against another checkout's (e.g. the commit before a
refactoring), as ratios to the bare proxy, runs alternating between the two.

    git worktree add /tmp/before <commit> && (cd /tmp/before && bash scripts/bootstrap dev)
    .venv/bin/python bench/compare.py /tmp/before --runs 3

Each run is one ``bench/bench.py`` of one checkout (its own upstream, Stripe double and bare
proxy; targets interleaved within it), and the runs alternate: before, after, before, after…
so both see the machine in the same states. A gate's throughput divided by the bare proxy's in
the *same* run cancels most of the machine's noise; what is left shows as the spread of a
checkout's runs, printed next to the medians. Read a difference as real only where the two
ranges do not overlap.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["main", "parse_ratios"]

REPO = Path(__file__).resolve().parent.parent
TARGETS = "bare proxy,gate off 1w,gate on, paid (cache hit)"
COLUMN = "\N{MULTIPLICATION SIGN} bare proxy"


def parse_ratios(results: str) -> dict[tuple[str, str], float]:
    """``(target, workload) → ratio to the bare proxy`` from a RESULTS.md main table."""
    out: dict[tuple[str, str], float] = {}
    column: int | None = None
    for line in results.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["target", "workload"]:
            column = cells.index(COLUMN) if COLUMN in cells else None
            continue
        if column is None or len(cells) <= column or line.startswith("|---"):
            continue
        try:
            out[(cells[0], cells[1])] = float(cells[column])
        except ValueError:
            continue  # a target that did not run ("-", "failed to start")
    return out


def run_bench(
    checkout: Path, args: argparse.Namespace, results: Path
) -> dict[tuple[str, str], float]:
    python = checkout / ".venv" / "bin" / "python"
    command = [
        str(python),
        str(checkout / "bench" / "bench.py"),
        *("--duration", str(args.duration), "--targets", args.targets),
        *("--results", str(results)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not results.exists():
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"bench in {checkout} failed ({done.returncode}):\n{tail}")
    ratios = parse_ratios(results.read_text())
    if not ratios:
        raise SystemExit(f"{results}: no '{COLUMN}' column (is {checkout}'s bench.py too old?)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the other checkout (with its own .venv)")
    parser.add_argument("--runs", type=int, default=3, help="runs per checkout (alternating)")
    parser.add_argument("--duration", type=int, default=3, help="seconds per measurement")
    parser.add_argument("--targets", default=TARGETS, help="bench.py --targets (both sides)")
    args = parser.parse_args()
    before = args.before.resolve()
    if not (before / ".venv" / "bin" / "python").exists():
        parser.error(f"{before}/.venv is missing: run `bash scripts/bootstrap dev` there first")
    if not 1 <= args.runs <= 10:
        parser.error("--runs must be between 1 and 10")
    seen: dict[str, list[dict[tuple[str, str], float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="gate-compare-") as tmp:
        for i in range(args.runs):
            for side, checkout in (("before", before), ("after", REPO)):
                print(f"run {i + 1}/{args.runs}: {side} ({checkout})", file=sys.stderr, flush=True)
                seen[side].append(run_bench(checkout, args, Path(tmp) / f"{side}-{i}.md"))
    keys = [k for k in seen["after"][0] if k[0] != "bare proxy" and k in seen["before"][0]]
    print(f"Ratios to the bare proxy, {args.runs} alternating runs each (before: {before})\n")
    print("| target | workload | before (runs) | before median | after (runs) | after median |")
    print("|---|---|---|--:|---|--:|")
    for key in keys:
        cells = []
        for side in ("before", "after"):
            values = [r[key] for r in seen[side] if key in r]
            cells += [" ".join(f"{v:.2f}" for v in values), f"{statistics.median(values):.2f}"]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
