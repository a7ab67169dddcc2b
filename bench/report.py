"""The benchmark's report: medians over rounds, ratios between targets, the results table,
the performance checks, the machine it ran on, and the markdown of bench/RESULTS.md."""

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from targets import (
    BARE,
    CHECKS,
    GATE_1W,
    NGINX,
    NONE,
    TIMES,
    WARMUP_SECONDS,
    WORKLOADS,
    Extra,
    Target,
)
from wrk import WrkResult

__all__ = [
    "Row",
    "fmt_ratio",
    "kept_sections",
    "machine_info",
    "median_result",
    "ratio",
    "render_report",
    "render_table",
]


@dataclass
class Row:
    target: str
    workload: str
    result: WrkResult | None = None
    status: str = ""  # set when there is no result: "failed to start", "skipped: ..."


def median_result(results: list[WrkResult]) -> WrkResult:
    return WrkResult(
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
        non_2xx=sum(r.non_2xx for r in results),
    )


def ratio(rows: dict[tuple[str, str], Row], target: str, baseline: str, wl: str) -> float | None:
    a, b = rows.get((target, wl)), rows.get((baseline, wl))
    if a is None or b is None or a.result is None or b.result is None or not b.result.rps:
        return None
    return a.result.rps / b.result.rps


def render_table(targets: list[Target], rows: dict[tuple[str, str], Row]) -> str:
    head = (
        f"| target | workload | rps | p50 ms | p99 ms | {TIMES} bare proxy "
        f"| {TIMES} gate off 1w | {TIMES} nginx | errors |"
    )
    lines = [head, "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for w in WORKLOADS:
        for t in targets:
            row = rows[(t.name, w.name)]
            if row.result is None:
                blanks = " | ".join([NONE] * 6)
                lines.append(f"| {t.name} | {w.name} | {row.status} | {blanks} |")
                continue
            r = row.result
            cells = [
                t.name,
                w.name,
                f"{r.rps:,.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                fmt_ratio(ratio(rows, t.name, BARE, w.name)),
                fmt_ratio(ratio(rows, t.name, GATE_1W, w.name)),
                fmt_ratio(ratio(rows, t.name, NGINX, w.name)),
                str(r.errors),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_ratio(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}"


def render_checks(rows: dict[tuple[str, str], Row], extras: list[Extra]) -> str:
    lines = ["| target | workload | value | result |", "|---|---|--:|---|"]
    for check in CHECKS:
        if not all(
            any((n, w.name) in rows for w in WORKLOADS) for n in (check.target, check.baseline)
        ):
            continue  # not selected (--targets)
        for w in WORKLOADS:
            value = ratio(rows, check.target, check.baseline, w.name)
            if value is None:
                missing = []
                for name in (check.target, check.baseline):
                    row = rows.get((name, w.name))
                    if row is None:
                        missing.append(f"{name}: not run")
                    elif row.result is None:
                        missing.append(f"{name}: {row.status or 'no result'}")
                verdict, shown = "n/a (" + "; ".join(missing) + ")", NONE
            else:
                verdict = "PASS" if value >= check.min_ratio else "MISS"
                shown = f"{value:.2f}"
            lines.append(f"| {check.label} | {w.name} | {shown} | {verdict} |")
    for extra in extras:
        lines += [
            f"| {label} | {scope} | {value} | {verdict} |"
            for label, scope, value, verdict in extra.checks
        ]
    return "\n".join(lines)


def tool_version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": importlib.metadata.version("aiohttp"),
        "nginx": tool_version(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": tool_version(["wrk", "-v"]).split(" Copyright")[0],
    }


def kept_sections(path: Path) -> str:
    """The sections other bench scripts keep in the results file (between
    ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``, e.g. ``bench/ws_capacity.py``'s), so
    that a run of this one does not erase them."""
    if not path.exists():
        return ""
    blocks = re.findall(
        r"\n<!-- [\w-]+:start -->\n.*?\n<!-- [\w-]+:end -->\n", path.read_text(), re.S
    )
    return "".join(blocks)


def render_report(
    info: dict[str, str],
    args: argparse.Namespace,
    targets: list[Target],
    rows: dict[tuple[str, str], Row],
    failures: dict[str, str],
    extras: list[Extra],
) -> str:
    expected = [t.name for t in targets if t.non_2xx_expected]
    out = [
        "# Benchmark results",
        "",
        f"- date: {info['date']}",
        f"- machine: nproc={info['nproc']}, {info['cpu']}, Linux {info['kernel']}",
        f"- versions: python {info['python']}, aiohttp {info['aiohttp']}, "
        f"{info['nginx']}, {info['wrk']}",
        f"- run: `{shlex.join(['bench/bench.py', *sys.argv[1:]])}` — {args.duration} s per "
        f"measurement after a {WARMUP_SECONDS} s warm-up, {args.rounds} round(s), "
        "targets interleaved; medians over rounds",
        "- upstream: the demo app with the test endpoints (`python -m tests.probes`), one "
        "process, shared by every proxy; `/api/fixed` serves cached bodies with a Content-Length",
        "- wrk, the upstream and the proxy under test share the same cores: compare ratios "
        "within this run, not absolute numbers across machines",
        "- errors: socket errors + non-2xx/3xx answers"
        + (
            f" (for {', '.join(f'`{n}`' for n in expected)}: socket errors only, its denials "
            "are part of the workload and counted below)"
            if expected
            else ""
        ),
        "",
        render_table(targets, rows),
        "",
    ]
    for extra in extras:
        if extra.section:
            out += [f"## {extra.title}", "", extra.section, ""]
    out += ["## Targets", "", render_checks(rows, extras), ""]
    if failures:
        out += ["## Failures", ""]
        for name, detail in failures.items():
            out += [f"### {name}", "", "```", detail, "```", ""]
    return "\n".join(out)
