"""Load benchmarks for the gate, interleaved in one run so every target sees the same machine.

Targets: the demo upstream on its own, a bare aiohttp streaming proxy (the baseline), the gate with
billing off (1 and 2 workers), the gate with billing on in front of a seeded local Stripe double
(one paying user, all cache hits; and 1,000 users, paid and unpaid, round-robin, counting the
Stripe calls) and nginx as a reverse proxy. Each measurement is a 1 s wrk warm-up followed by the
measured wrk run; targets are interleaved per workload (and per round) so that background noise
spreads over all of them. Results go to stdout and to bench/RESULTS.md.

    bash bench/run.sh                  # installs wrk/venv, then runs this file
    .venv/bin/python bench/bench.py --quick
    .venv/bin/python bench/bench.py --duration 10 --rounds 3 --targets "bare proxy,gate off 1w"

To add a target, append a ``Target`` in ``build_targets`` (see bench/README.md). The parts:
``procs`` (the harness and its processes), ``targets`` (workloads, targets, the plain ones),
``stripe_targets`` (billing on: the Stripe double's process, the paid and mixed loads),
``proxy_targets`` (nginx and Caddy with forward auth), ``replica_targets`` (PostgreSQL
replicas), ``wrk`` (running and reading wrk), ``report`` (tables, checks, RESULTS.md); this
file is the command line and the run.
"""

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # gateway and tests.*

from procs import BENCH_DIR, OUT_DIR, Bench
from proxy_targets import ForwardAuthTargets, nginx_target
from replica_targets import ReplicaTargets
from report import Row, kept_sections, machine_info, median_result, render_report
from stripe_targets import (
    MixedLoad,
    StripeDoubleProc,
    gate_header_target,
    gate_key_target,
    gate_paid_target,
)
from targets import (
    CADDY,
    CADDY_FA,
    GATE_1W,
    GATE_2W,
    GROUPS,
    NGINX_FA,
    NGINX_FA_NOCACHE,
    PAID_2W,
    UPSTREAM,
    WARMUP_SECONDS,
    WORKLOADS,
    Extra,
    Target,
    bare_target,
    gate_target,
)
from usage_targets import metered_target
from wrk import WrkResult, check_response, parse_wrk, run_wrk


def build_targets(b: Bench) -> list[Target]:
    """Every target, in table order. Add new ones here (see bench/README.md)."""
    double = StripeDoubleProc(b)
    fa = ForwardAuthTargets(b, double)
    paid_2w = gate_paid_target(b, double, PAID_2W, workers=2)
    fa_targets = [
        fa.nginx(b, NGINX_FA, auth=True),
        fa.nginx(b, NGINX_FA_NOCACHE, auth=True, cache=False),
        fa.caddy(b, CADDY, auth=False),
        fa.caddy(b, CADDY_FA, auth=True),
    ]
    plain_nginx = nginx_target(b)
    paid_1w = gate_paid_target(b, double)
    for t in (plain_nginx, paid_1w, paid_2w):  # the gate as proxy: its CPU is the "proxy" CPU
        t.sample = fa.sampler(with_gate=False)
    fa_targets[0].extra = lambda rows: fa.report([plain_nginx, paid_1w, paid_2w, *fa_targets], rows)
    return [
        Target(UPSTREAM, b.upstream_url),  # already running: the shared upstream itself
        bare_target(b),
        gate_target(b, GATE_1W, workers=1),
        gate_target(b, GATE_2W, workers=2),
        paid_1w,
        metered_target(b, double),
        gate_header_target(b, double),
        gate_key_target(b, double),
        paid_2w,
        MixedLoad(b, double).target,
        plain_nginx,
        *fa_targets,
        *ReplicaTargets(b, double).targets,
    ]


def select_targets(spec: str, names: list[str]) -> tuple[list[str], list[str]]:
    """``--targets``: comma-separated names, where a name may itself contain commas
    (``gate on, paid (cache hit)``). Returns (selected, unknown)."""
    pieces = spec.split(",")
    selected: list[str] = []
    unknown: list[str] = []
    i = 0
    while i < len(pieces):
        # The longest run of pieces that spells a known name, else one unknown piece.
        match = next(
            (j for j in range(len(pieces), i, -1) if ",".join(pieces[i:j]).strip() in names), None
        )
        if match is None:
            if pieces[i].strip():
                unknown.append(pieces[i].strip())
            i += 1
        else:
            selected.append(",".join(pieces[i:match]).strip())
            i = match
    return selected, unknown


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="2 s per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="repeat and take medians")
    parser.add_argument(
        "--targets",
        default="",
        help="comma-separated target names to run, or a group: " + ", ".join(GROUPS),
    )
    parser.add_argument(
        "--workloads", default="", help='comma-separated workloads, e.g. "t2 c64 1 KiB"'
    )
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 2
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    if args.workloads:
        names = [n.strip() for n in args.workloads.split(",") if n.strip()]
        unknown_w = sorted(set(names) - {w.name for w in WORKLOADS})
        if unknown_w:
            print(f"error: unknown workloads {unknown_w}", file=sys.stderr)
            return 2
        # In place: every table and check of every module follows the selection.
        WORKLOADS[:] = [w for w in WORKLOADS if w.name in names]
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="gate-bench-"))
    workdir.chmod(0o755)  # nginx workers run as nobody and must reach their temp paths
    logdir = OUT_DIR / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    b = Bench(workdir, logdir)
    targets: list[Target] = []
    try:
        up_port = b.spawn(UPSTREAM, [b.python, "-m", "tests.probes", "--port", "0"], {}, 20.0)
        b.upstream_url = f"http://127.0.0.1:{up_port}"
        targets = build_targets(b)
        if args.targets:
            wanted, unknown = select_targets(args.targets, [t.name for t in targets] + [*GROUPS])
            if unknown:
                print(f"error: unknown targets {sorted(unknown)}", file=sys.stderr)
                return 2
            expanded = {n for name in wanted for n in GROUPS.get(name, (name,))}
            targets = [t for t in targets if t.name in expanded]

        status: dict[str, str] = {}
        failures: dict[str, str] = {}
        for t in targets:
            if t.skip:
                status[t.name] = f"skipped: {t.skip}"
                continue
            print(f"starting {t.name} ...", file=sys.stderr, flush=True)
            try:
                t.start(b)
            except Exception as exc:  # StartError (with the log's tail), or a hook's failure
                status[t.name] = "failed to start"
                failures[t.name] = str(exc)
                print(f"  {t.name}: failed to start: {exc}", file=sys.stderr)
                b.stop(t.name)
                continue
            print(f"  {t.name} on {t.url}", file=sys.stderr, flush=True)
            for path_w in {w.path: w for w in WORKLOADS}.values():
                problem = check_response(t, path_w)
                if problem:
                    status[t.name] = problem
                    failures[t.name] = f"GET {t.url}{path_w.path}: {problem}"
                    print(f"  {t.name}: {problem}", file=sys.stderr)
                    break
            if t.ready is not None and t.name not in status:
                try:
                    t.ready(b, t)
                except Exception as exc:
                    status[t.name] = "not ready"
                    failures[t.name] = f"not ready: {exc}"
                    print(f"  {t.name}: not ready: {exc}", file=sys.stderr)

        live = [t for t in targets if t.name not in status]
        samples: dict[tuple[str, str], list[WrkResult]] = {}
        for rnd in range(args.rounds):
            for w in WORKLOADS:
                for t in live:
                    if t.name in status:  # broke during an earlier measurement
                        continue
                    proc = next((c for c in b.children if c.name == t.name), None)
                    if proc is not None and proc.popen.poll() is not None:
                        status[t.name] = f"exited (code {proc.popen.returncode})"
                        failures[t.name] = f"exited during the run\n{proc.log_tail()}"
                        continue
                    print(
                        f"round {rnd + 1}/{args.rounds}  {w.name:<14} {t.name:<26}",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
                    try:
                        run_wrk(w, t, WARMUP_SECONDS, latency=False)
                        before = t.sample(b, t) if t.sample else {}
                        result = parse_wrk(run_wrk(w, t, args.duration), t.non_2xx_expected)
                        if t.sample is not None:
                            after = t.sample(b, t)
                            acc = t.samples.setdefault(w.name, {})
                            for key, value in after.items():
                                acc[key] = acc.get(key, 0.0) + value - before.get(key, 0.0)
                            acc["requests"] = acc.get("requests", 0.0) + result.requests
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                        status[t.name] = "error during run"
                        failures[t.name] = str(exc)
                        print(f"  error: {exc}", file=sys.stderr)
                        continue
                    samples.setdefault((t.name, w.name), []).append(result)
                    print(
                        f"  {result.rps:>10,.0f} rps  p50 {result.p50_ms:.2f} ms"
                        f"  p99 {result.p99_ms:.2f} ms  errors {result.errors}",
                        file=sys.stderr,
                        flush=True,
                    )

        for t in live:
            if t.finish is not None:
                try:
                    t.finish(b, t)
                except Exception as exc:
                    failures[f"{t.name} (after the run)"] = repr(exc)
                    print(f"  {t.name}: after the run: {exc!r}", file=sys.stderr)

        rows: dict[tuple[str, str], Row] = {}
        for w in WORKLOADS:
            for t in targets:
                got = samples.get((t.name, w.name))
                rows[(t.name, w.name)] = Row(
                    t.name,
                    w.name,
                    median_result(got) if got else None,
                    "" if got else status.get(t.name, "no result"),
                )

        extras: dict[str, Extra] = {t.name: t.extra(rows) for t in targets if t.extra is not None}
        report = render_report(machine_info(), args, targets, rows, failures, list(extras.values()))
        print(report)
        args.results.write_text(report + kept_sections(args.results))
        raw: dict[str, Any] = {f"{k[0]} | {k[1]}": asdict(v) for k, v in rows.items()}
        raw.update({f"{name} | extra": extra.data for name, extra in extras.items()})
        (OUT_DIR / "results.json").write_text(json.dumps(raw, indent=2, default=str))
        print(f"\nwritten to {args.results}", file=sys.stderr)
        return 0
    finally:
        b.stop_all()
        for t in targets:
            if t.teardown is not None:
                try:
                    t.teardown(b, t)
                except Exception as exc:  # keep tearing the others down, but say so
                    print(f"warning: teardown of {t.name} failed: {exc!r}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into SystemExit so the finally block stops every process we started.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
