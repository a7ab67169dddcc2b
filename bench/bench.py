"""Load benchmarks for the gate, interleaved in one run so every target sees the same machine.

Targets: the demo upstream on its own, a bare aiohttp streaming proxy (the baseline), the gate with
billing off (1 and 2 workers) and nginx as a reverse proxy. Each measurement is a 1 s wrk warm-up
followed by the measured wrk run; targets are interleaved per workload (and per round) so that
background noise spreads over all of them. Results go to stdout and to bench/RESULTS.md.

    bash bench/run.sh                  # installs wrk/venv, then runs this file
    .venv/bin/python bench/bench.py --quick
    .venv/bin/python bench/bench.py --duration 10 --rounds 3 --targets "bare proxy,gate off 1w"

To add a target, append a ``Target`` in ``build_targets`` (see bench/README.md).
"""

import argparse
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
OUT_DIR = BENCH_DIR / "out"

UPSTREAM = "upstream direct"
BARE = "bare proxy"
GATE_1W = "gate off 1w"
GATE_2W = "gate off 2w"
NGINX = "nginx"

WARMUP_SECONDS = 1
TIMES = "\N{MULTIPLICATION SIGN}"
NONE = "-"


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Workload:
    """One wrk configuration against one path."""

    threads: int
    connections: int
    path: str
    body_bytes: int  # expected response size, checked once before measuring

    @property
    def name(self) -> str:
        kib, rest = divmod(self.body_bytes, 1024)
        size = f"{kib} KiB" if kib and not rest else f"{self.body_bytes} B"
        return f"t{self.threads} c{self.connections} {size}"


WORKLOADS = (
    Workload(2, 64, "/api/fixed?n=1024", 1024),
    Workload(2, 64, "/api/fixed?n=102400", 102400),
    Workload(1, 16, "/api/fixed?n=1024", 1024),
    Workload(1, 16, "/api/fixed?n=102400", 102400),
)


@dataclass
class Target:
    """Something wrk can hit.

    ``command`` (optional) is started before the run in its own process group with ``env`` added
    to the environment and killed at the end; the harness waits for the port of ``url`` to accept
    connections (up to ``start_timeout``). ``setup`` runs before the command (write a config file,
    start a helper with ``Bench.spawn``), ``teardown`` after everything is stopped. A target with
    ``skip`` set is reported but not run. ``headers`` go with every request (wrk ``-H`` and the
    pre-flight check), e.g. a session cookie or a trusted identity header minted in ``setup``.
    """

    name: str
    url: str
    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[["Bench", "Target"], None] | None = None
    teardown: Callable[["Bench", "Target"], None] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 20.0
    skip: str | None = None

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        if port is None:
            raise ValueError(f"target {self.name}: url {self.url} has no port")
        return port


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


@dataclass(frozen=True)
class Check:
    """A performance target: ``target`` must reach ``min_ratio`` times ``baseline``'s rps."""

    label: str
    target: str
    baseline: str
    min_ratio: float


CHECKS = (
    Check(f"gate 1 worker ≥ 0.90{TIMES} bare proxy", GATE_1W, BARE, 0.90),
    Check(f"gate 2 workers ≥ 1.6{TIMES} gate 1 worker", GATE_2W, GATE_1W, 1.6),
)


class StartError(Exception):
    """A process did not come up (exited, or its port never opened in time)."""


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])


class Bench:
    """What targets get from the harness: free ports, a scratch dir, the upstream, spawn()."""

    def __init__(self, workdir: Path, logdir: Path) -> None:
        self.workdir = workdir
        self.logdir = logdir
        self.python = sys.executable
        self.upstream_url = ""
        self.procs: list[Proc] = []

    @staticmethod
    def free_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port

    def base_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        # Works whether or not the project is pip-installed in the venv.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def spawn(
        self, name: str, command: list[str], env: dict[str, str], port: int, timeout: float
    ) -> Proc:
        """Start ``command`` in its own process group and wait until ``port`` accepts."""
        log_path = self.logdir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                command,
                env=self.base_env(env),
                # A scratch cwd: no stray .env is loaded, no database lands in the repo.
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        wait_for_port(port, proc, timeout)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()


def wait_for_port(port: int, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = proc.popen.poll()
        if code is not None:
            raise StartError(f"exited with code {code}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise StartError(f"port {port} not open after {timeout:.0f}s") from None
        time.sleep(0.05)  # poll interval, not a readiness guess


def stop(proc: Proc) -> None:
    """SIGTERM the process group we created, SIGKILL it if it lingers."""
    if proc.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            print(f"warning: {proc.name} ignored SIGTERM, killing", file=sys.stderr)
    # Workers forked by the main process share its group; make sure none survive it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=5)


# --------------------------------------------------------------------------- targets


def nginx_modules_missing() -> set[str]:
    out = subprocess.run(["nginx", "-V"], capture_output=True, text=True, check=False).stderr
    return set(re.findall(r"--without-http_(\w+)_module", out))


def nginx_target(b: "Bench") -> Target:
    port = b.free_port()
    prefix = b.workdir / "nginx"
    conf = prefix / "nginx.conf"

    def setup(b: Bench, t: Target) -> None:
        prefix.mkdir(mode=0o755, exist_ok=True)
        missing = nginx_modules_missing()
        temp_paths = [
            f"    {kind}_temp_path {prefix / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            if kind not in missing
        ]
        upstream = urlsplit(b.upstream_url).netloc
        conf.write_text(
            NGINX_CONF.format(
                prefix=prefix, port=port, upstream=upstream, temp_paths="\n".join(temp_paths)
            )
        )

    return Target(
        name=NGINX,
        url=f"http://127.0.0.1:{port}",
        command=["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        setup=setup,
        skip=None if shutil.which("nginx") else "nginx not installed",
    )


NGINX_CONF = """\
daemon off;
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths}
    upstream app {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 16 16k;
        }}
    }}
}}
"""


def gate_target(b: Bench, name: str, workers: int, **env: str) -> Target:
    """The gate as ``python -m gateway serve``; ``env`` adds or overrides settings."""
    port = b.free_port()
    return Target(
        name=name,
        url=f"http://127.0.0.1:{port}",
        command=[b.python, "-m", "gateway", "serve"],
        env={
            "UPSTREAM_URL": b.upstream_url,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "BILLING_MODE": "off",
            "WORKERS": str(workers),
            "LOG_LEVEL": "warning",
            **env,
        },
        start_timeout=30.0,
    )


def build_targets(b: Bench) -> list[Target]:
    """Every target, in table order. Add new ones here (see bench/README.md)."""
    bare_port = b.free_port()
    return [
        Target(UPSTREAM, b.upstream_url),  # already running: the shared upstream itself
        Target(
            BARE,
            f"http://127.0.0.1:{bare_port}",
            command=[
                *(b.python, str(BENCH_DIR / "bare_proxy.py")),
                *("--port", str(bare_port), "--upstream", b.upstream_url),
            ],
        ),
        gate_target(b, GATE_1W, workers=1),
        gate_target(b, GATE_2W, workers=2),
        nginx_target(b),
    ]


# --------------------------------------------------------------------------- wrk

_LATENCY_RE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS_RE = re.compile(r"^\s*(\d+) requests in", re.MULTILINE)
_SOCKET_ERR_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(output: str) -> WrkResult:
    """Parse ``wrk --latency`` output; latencies are converted to milliseconds."""
    latency = {pct: float(v) * _TO_MS[unit] for pct, v, unit in _LATENCY_RE.findall(output)}
    rps = _RPS_RE.search(output)
    requests = _REQUESTS_RE.search(output)
    if rps is None or requests is None or not {"50", "99"} <= latency.keys():
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = sum(int(n) for m in _SOCKET_ERR_RE.findall(output) for n in m)
    errors += sum(int(n) for n in _NON_2XX_RE.findall(output))
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=latency["50"],
        p99_ms=latency["99"],
        requests=int(requests.group(1)),
        errors=errors,
    )


def run_wrk(w: Workload, t: Target, seconds: int, latency: bool = True) -> str:
    cmd = ["wrk", f"-t{w.threads}", f"-c{w.connections}", f"-d{seconds}s"]
    for name, value in t.headers.items():
        cmd += ["-H", f"{name}: {value}"]
    cmd += ["--latency", t.url + w.path] if latency else [t.url + w.path]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def check_response(t: Target, w: Workload) -> str | None:
    """One plain request first, so a broken target reports why instead of a great rps."""
    parts = urlsplit(t.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("GET", w.path, headers=t.headers)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        return f"request failed: {exc}"
    finally:
        conn.close()
    if resp.status != 200:
        return f"bad response: HTTP {resp.status}"
    if len(body) != w.body_bytes:
        return f"bad response: {len(body)} bytes, expected {w.body_bytes}"
    return None


# --------------------------------------------------------------------------- report


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
    )


def ratio(rows: dict[tuple[str, str], Row], target: str, baseline: str, wl: str) -> float | None:
    a, b = rows.get((target, wl)), rows.get((baseline, wl))
    if a is None or b is None or a.result is None or b.result is None or not b.result.rps:
        return None
    return a.result.rps / b.result.rps


def render_table(targets: list[Target], rows: dict[tuple[str, str], Row]) -> str:
    head = (
        f"| target | workload | rps | p50 ms | p99 ms | {TIMES} bare proxy | {TIMES} nginx "
        "| errors |"
    )
    lines = [head, "|---|---|--:|--:|--:|--:|--:|--:|"]
    for w in WORKLOADS:
        for t in targets:
            row = rows[(t.name, w.name)]
            if row.result is None:
                blanks = " | ".join([NONE] * 5)
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
                fmt_ratio(ratio(rows, t.name, NGINX, w.name)),
                str(r.errors),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_ratio(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}"


def render_checks(rows: dict[tuple[str, str], Row]) -> str:
    lines = ["| target | workload | ratio | result |", "|---|---|--:|---|"]
    for check in CHECKS:
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


def render_report(
    info: dict[str, str],
    args: argparse.Namespace,
    targets: list[Target],
    rows: dict[tuple[str, str], Row],
    failures: dict[str, str],
) -> str:
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
        "- upstream: the demo app (`python -m gateway.demo.upstream`), one process, shared by "
        "every proxy; `/api/fixed` serves cached bodies with a Content-Length",
        "- wrk, the upstream and the proxy under test share the same cores: compare ratios "
        "within this run, not absolute numbers across machines",
        "",
        render_table(targets, rows),
        "",
        "## Targets",
        "",
        render_checks(rows),
        "",
    ]
    if failures:
        out += ["## Failures", ""]
        for name, detail in failures.items():
            out += [f"### {name}", "", "```", detail, "```", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="2 s per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="repeat and take medians")
    parser.add_argument("--targets", default="", help="comma-separated target names to run")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 2
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    return args


def start_target(b: Bench, t: Target) -> None:
    if t.setup is not None:
        t.setup(b, t)
    if t.command is not None:
        b.spawn(t.name, t.command, t.env, t.port, t.start_timeout)


def run(args: argparse.Namespace) -> int:
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
        up_port = b.free_port()
        b.upstream_url = f"http://127.0.0.1:{up_port}"
        b.spawn(
            UPSTREAM,
            [b.python, "-m", "gateway.demo.upstream", "--port", str(up_port)],
            {},
            up_port,
            20.0,
        )
        targets = build_targets(b)
        if args.targets:
            wanted = {n.strip() for n in args.targets.split(",") if n.strip()}
            unknown = wanted - {t.name for t in targets}
            if unknown:
                print(f"error: unknown targets {sorted(unknown)}", file=sys.stderr)
                return 2
            targets = [t for t in targets if t.name in wanted]

        status: dict[str, str] = {}
        failures: dict[str, str] = {}
        for t in targets:
            if t.skip:
                status[t.name] = f"skipped: {t.skip}"
                continue
            print(f"starting {t.name} ...", file=sys.stderr, flush=True)
            try:
                start_target(b, t)
            except (StartError, OSError) as exc:
                status[t.name] = "failed to start"
                proc = next((p for p in b.procs if p.name == t.name), None)
                tail = proc.log_tail() if proc else ""
                failures[t.name] = f"{exc}\n{tail}".strip()
                print(f"  {t.name}: failed to start: {exc}\n{tail}", file=sys.stderr)
                if proc is not None:
                    stop(proc)
                continue
            for path_w in {w.path: w for w in WORKLOADS}.values():
                problem = check_response(t, path_w)
                if problem:
                    status[t.name] = problem
                    failures[t.name] = f"GET {t.url}{path_w.path}: {problem}"
                    print(f"  {t.name}: {problem}", file=sys.stderr)
                    break

        live = [t for t in targets if t.name not in status]
        samples: dict[tuple[str, str], list[WrkResult]] = {}
        for rnd in range(args.rounds):
            for w in WORKLOADS:
                for t in live:
                    if t.name in status:  # broke during an earlier measurement
                        continue
                    proc = next((p for p in b.procs if p.name == t.name), None)
                    if proc is not None and proc.popen.poll() is not None:
                        status[t.name] = f"exited (code {proc.popen.returncode})"
                        failures[t.name] = f"exited during the run\n{proc.log_tail()}"
                        continue
                    print(
                        f"round {rnd + 1}/{args.rounds}  {w.name:<14} {t.name:<16}",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
                    try:
                        run_wrk(w, t, WARMUP_SECONDS, latency=False)
                        result = parse_wrk(run_wrk(w, t, args.duration))
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

        report = render_report(machine_info(), args, targets, rows, failures)
        print(report)
        args.results.write_text(report)
        (OUT_DIR / "results.json").write_text(
            json.dumps(
                {f"{k[0]} | {k[1]}": asdict(v) for k, v in rows.items()}, indent=2, default=str
            )
        )
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
