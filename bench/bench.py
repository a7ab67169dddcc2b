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

To add a target, append a ``Target`` in ``build_targets`` (see bench/README.md).
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
OUT_DIR = BENCH_DIR / "out"

UPSTREAM = "upstream direct"
BARE = "bare proxy"
GATE_1W = "gate off 1w"
GATE_2W = "gate off 2w"
PAID = "gate on, paid (cache hit)"
PAID_HEADER = "gate on, paid (identity header)"
MIXED = "gate on, mixed users"
NGINX = "nginx"
NGINX_FA = "nginx + forward auth"
NGINX_FA_NOCACHE = "nginx + forward auth, no cache"
PAID_2W = "gate on, paid 2w"
CADDY = "caddy"
CADDY_FA = "caddy + forward auth"

#: ``--targets`` names that stand for several targets.
GROUPS: dict[str, tuple[str, ...]] = {
    "forward-auth": (NGINX, NGINX_FA, NGINX_FA_NOCACHE, PAID, PAID_2W, CADDY, CADDY_FA),
}
NGINX_EXAMPLE = REPO / "deploy" / "nginx" / "gateway-forward-auth.conf"
CADDY_EXAMPLE = REPO / "deploy" / "caddy" / "Caddyfile"
# The four lines of the shipped nginx config's auth cache (removed for NGINX_FA_NOCACHE).
NGINX_CACHE_LINES = re.compile(
    r"^\s*(?:proxy_cache|proxy_cache_key|proxy_no_cache|proxy_cache_bypass)\s.*\n", re.MULTILINE
)

# The billing-on targets: the local Stripe double, seeded by bench/stripe_double_server.py.
MIXED_USERS = 1000
PAID_FRACTION = 0.7
PRICE_ID = "price_demo_monthly"
STRIPE_KEY = "sk_test_bench_double"
WEBHOOK_SECRET = "whsec_bench_double"  # the made-up secret the double signs with
# A cold start of MIXED_USERS users is one Stripe call each; the test-key default of 20 calls/s
# would spend 50 s queueing in the gate's limiter, which protects the real Stripe, not the double.
MIXED_STRIPE_RATE_LIMIT = 1000
PRIME_CONNECTIONS = 16

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


WORKLOADS: tuple[Workload, ...] = (
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
    # wrk -s script, and its arguments for a workload (after ``--``)
    wrk_script: Path | None = None
    wrk_script_args: Callable[[Workload], list[str]] | None = None
    # Non-2xx answers are part of the workload (denied users): not errors, counted apart.
    non_2xx_expected: bool = False
    # After the pre-flight check, before any measurement (e.g. prime a cache); raising fails it.
    ready: Callable[["Bench", "Target"], None] | None = None
    # After the last measurement, while every process still runs (e.g. read counters).
    finish: Callable[["Bench", "Target"], None] | None = None
    # What the target adds to the report, given every row: a section, rows of the Targets table.
    extra: Callable[[dict[tuple[str, str], "Row"]], "Extra"] | None = None
    # Read before and after each measured wrk run (e.g. CPU seconds, requests the gate saw);
    # the differences per workload land in ``samples``.
    sample: Callable[["Bench", "Target"], dict[str, float]] | None = None
    samples: dict[str, dict[str, float]] = field(default_factory=dict)

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
    errors: int  # socket errors, plus non-2xx/3xx answers unless the target expects them
    non_2xx: int = 0  # wrk's "Non-2xx or 3xx responses", always


@dataclass
class Extra:
    """A target's own part of the report (see ``Target.extra``)."""

    title: str = ""  # heading of ``section``
    section: str = ""  # markdown
    # rows of the Targets table: label, scope (the workload column), value, verdict
    checks: list[tuple[str, str, str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # for results.json


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
    Check(f"gate on paid 1w ≥ 0.90{TIMES} bare proxy", PAID, BARE, 0.90),
    Check(f"nginx + forward auth (shipped, cached) ≥ 0.80{TIMES} nginx", NGINX_FA, NGINX, 0.80),
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
        self.ports: set[int] = set()

    def free_port(self) -> int:
        """A port free now, never one handed out before in this run (ports are picked up front,
        long before the processes bind them, so the kernel may offer one twice)."""
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port: int = s.getsockname()[1]
            if port not in self.ports:
                self.ports.add(port)
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

    def setup(b: Bench, t: Target) -> None:
        upstream = urlsplit(b.upstream_url).netloc
        write_nginx_conf(prefix, PLAIN_NGINX_SITE.format(port=port, upstream=upstream))

    return Target(
        name=NGINX,
        url=f"http://127.0.0.1:{port}",
        command=nginx_command(prefix),
        setup=setup,
        skip=None if shutil.which("nginx") else "nginx not installed",
    )


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


# --------------------------------------------------------------------------- billing on


@dataclass(frozen=True)
class BenchUser:
    customer_id: str
    email: str
    paid: bool


@dataclass(frozen=True)
class CallSnapshot:
    """The double's ``GET /_bench/calls`` at one moment (``at``: ``time.monotonic()``)."""

    at: float
    total: int
    by_path: dict[str, int]
    subscription_lists: dict[str, int]  # customer id -> GET /v1/subscriptions calls

    def since(self, before: "CallSnapshot") -> "CallSnapshot":
        """The calls between ``before`` and this snapshot."""

        def diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: n - b.get(k, 0) for k, n in a.items() if n - b.get(k, 0)}

        return CallSnapshot(
            self.at - before.at,
            self.total - before.total,
            diff(self.by_path, before.by_path),
            diff(self.subscription_lists, before.subscription_lists),
        )


class StripeDoubleProc:
    """The seeded Stripe double (``bench/stripe_double_server.py``) shared by the billing-on
    targets; the first of them to start starts it."""

    NAME = "stripe double"

    def __init__(self, b: Bench) -> None:
        self.port = b.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.users_file = b.workdir / "stripe-users.json"
        self.session_secret = secrets.token_hex(24)  # 48 characters, like a real one
        self.users: list[BenchUser] = []  # the mixed load's users
        self.solo: BenchUser | None = None  # a paying customer of its own, for the cache-hit row
        self._error: str | None = None

    def ensure_started(self, b: Bench) -> None:
        if self.solo is not None:
            return
        if self._error is not None:
            raise StartError(self._error)
        command = [
            *(b.python, str(BENCH_DIR / "stripe_double_server.py"), "--port", str(self.port)),
            *("--users", str(MIXED_USERS), "--paid-fraction", str(PAID_FRACTION)),
            *("--price", PRICE_ID, "--users-file", str(self.users_file)),
            *("--api-key", STRIPE_KEY, "--webhook-secret", WEBHOOK_SECRET),
        ]
        try:
            # The users file is written before the port opens: an open port means seeded.
            b.spawn(self.NAME, command, {}, self.port, 30.0)
        except StartError as exc:
            proc = next((p for p in b.procs if p.name == self.NAME), None)
            self._error = f"{self.NAME}: {exc}\n{proc.log_tail() if proc else ''}".strip()
            raise StartError(self._error) from None
        data = json.loads(self.users_file.read_text())
        self.users = [BenchUser(**u) for u in data["users"]]
        self.solo = BenchUser(**data["solo"])

    def gate_env(self, b: Bench, database: str, **extra: str) -> dict[str, str]:
        """Settings of a billing-on gate in front of this double."""
        return {
            "BILLING_MODE": "on",
            "STRIPE_SECRET_KEY": STRIPE_KEY,
            "STRIPE_API_BASE": self.url,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STRIPE_PRICE_IDS": PRICE_ID,
            "SESSION_SECRET": self.session_secret,
            "PUBLIC_URL": "http://127.0.0.1",  # required with billing on (issue 7.1)
            "DATABASE_PATH": str(b.workdir / database),
            "COOKIE_SECURE": "false",
            **extra,
        }

    def calls(self) -> CallSnapshot:
        with urllib.request.urlopen(self.url + "/_bench/calls", timeout=10) as resp:
            data = json.load(resp)
        return CallSnapshot(
            time.monotonic(),
            int(data["total"]),
            {str(k): int(v) for k, v in data["by_path"].items()},
            {str(k): int(v) for k, v in data["subscription_lists"].items()},
        )


def _repo_on_path() -> None:
    """Make ``gateway`` (this checkout) importable here, for the parts that call it."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def session_cookies(env: dict[str, str], users: list[BenchUser]) -> list[str]:
    """``gate_session`` values for ``users``: real server-side sessions, created through the
    gate's own session service in its ``DATABASE_PATH`` (before the gate starts), signed as a
    gate with settings ``env`` signs them."""
    _repo_on_path()
    from gateway.sessions import Sessions
    from gateway.settings import load_settings
    from gateway.store import SQLiteStore

    settings = load_settings(env)

    async def create() -> list[str]:
        store = SQLiteStore(settings.database_path)
        await store.open()
        try:
            sessions = Sessions(settings, store)
            return [await sessions.create(u.customer_id, u.email, "wrk (bench)") for u in users]
        finally:
            await store.close()

    return asyncio.run(create())


def gate_paid_target(
    b: Bench, double: StripeDoubleProc, name: str = PAID, workers: int = 1
) -> Target:
    """Billing on, one paying user: after the pre-flight request every lookup is a cache hit."""
    database = f"paid-{workers}w.sqlite3"
    target = gate_target(b, name, workers=workers, **double.gate_env(b, database))

    def setup(b: Bench, t: Target) -> None:
        double.ensure_started(b)
        assert double.solo is not None
        t.headers["Cookie"] = f"gate_session={session_cookies(t.env, [double.solo])[0]}"

    target.setup = setup
    return target


def gate_header_target(b: Bench, double: StripeDoubleProc) -> Target:
    """Billing on, the paying solo user named by a trusted identity header (an auth proxy in
    front): ``X-Forwarded-Email`` from loopback (the default ``TRUSTED_PROXIES``), no cookie."""
    env = double.gate_env(b, "paid-header.sqlite3", IDENTITY_HEADER="X-Forwarded-Email")
    target = gate_target(b, PAID_HEADER, workers=1, **env)

    def setup(b: Bench, t: Target) -> None:
        double.ensure_started(b)
        assert double.solo is not None
        t.headers["X-Forwarded-Email"] = double.solo.email

    target.setup = setup
    return target


@dataclass(frozen=True)
class CallStats:
    """Stripe calls of one phase, per user of the mixed load."""

    seconds: float
    total: int
    by_path: dict[str, int]
    touched: int  # users with at least one subscriptions.list call
    paid: list[int]  # calls per paying user
    unpaid: list[int]  # calls per non-paying user

    @classmethod
    def of(cls, delta: CallSnapshot, users: list[BenchUser]) -> "CallStats":
        per_user = [delta.subscription_lists.get(u.customer_id, 0) for u in users]
        return cls(
            seconds=delta.at,
            total=delta.total,
            by_path=delta.by_path,
            touched=sum(1 for n in per_user if n),
            paid=[n for n, u in zip(per_user, users, strict=True) if u.paid],
            unpaid=[n for n, u in zip(per_user, users, strict=True) if not u.paid],
        )

    @property
    def max_per_user(self) -> int:
        return max(self.paid + self.unpaid, default=0)


def per_user(calls: list[int]) -> str:
    if not calls:
        return NONE
    return f"{sum(calls) / len(calls):.2f} / {max(calls)}"


class MixedLoad:
    """Billing on, many users, paid and unpaid, round-robin (``bench/mixed_users.lua``).

    Stripe calls are read from the double before the gate starts, after priming (every user
    requested once) and after the last measurement; the whole window is far shorter than the
    gate's ``CACHE_TTL`` and ``NEGATIVE_CACHE_TTL`` (raised to 1 h here, from 60 s), so each
    user's calls in it are its calls per TTL, and the target is at most one.
    """

    TTL_SECONDS = 3600

    def __init__(self, b: Bench, double: StripeDoubleProc) -> None:
        self.double = double
        self.cookies_file = b.workdir / "mixed-cookies.txt"
        self.cookies: list[str] = []
        self.before: CallSnapshot | None = None
        self.primed: CallSnapshot | None = None
        self.after: CallSnapshot | None = None
        self.priming: Counter[tuple[bool, int]] = Counter()
        self.priming_seconds = 0.0
        env = double.gate_env(
            b,
            "mixed.sqlite3",
            CACHE_TTL=f"{self.TTL_SECONDS}s",
            NEGATIVE_CACHE_TTL=f"{self.TTL_SECONDS}s",
            STRIPE_RATE_LIMIT=str(MIXED_STRIPE_RATE_LIMIT),
        )
        self.target = gate_target(b, MIXED, workers=1, **env)
        self.target.setup = self.setup
        self.target.ready = self.prime
        self.target.finish = self.finish
        self.target.extra = self.report
        self.target.wrk_script = BENCH_DIR / "mixed_users.lua"
        self.target.wrk_script_args = lambda w: [str(self.cookies_file), str(w.threads)]
        self.target.non_2xx_expected = True

    def setup(self, b: Bench, t: Target) -> None:
        self.double.ensure_started(b)
        self.cookies = session_cookies(t.env, self.double.users)
        self.cookies_file.write_text("".join(c + "\n" for c in self.cookies))
        first_paid = next(i for i, u in enumerate(self.double.users) if u.paid)
        # For the pre-flight GET (it must answer 200); the script sets its own per request.
        t.headers["Cookie"] = f"gate_session={self.cookies[first_paid]}"
        self.before = self.double.calls()  # the gate is not started yet

    def prime(self, b: Bench, t: Target) -> None:
        """Every user once, PRIME_CONNECTIONS at a time: the cold misses, and a check that paying
        users get 200 and the others 402."""
        users, cookies = self.double.users, self.cookies
        parts = urlsplit(t.url)
        path = WORKLOADS[0].path

        def run(indices: range) -> Counter[tuple[bool, int]]:
            seen: Counter[tuple[bool, int]] = Counter()
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
            try:
                for i in indices:
                    conn.request("GET", path, headers={"Cookie": f"gate_session={cookies[i]}"})
                    resp = conn.getresponse()
                    resp.read()
                    seen[(users[i].paid, resp.status)] += 1
            finally:
                conn.close()
            return seen

        chunks = [range(k, len(users), PRIME_CONNECTIONS) for k in range(PRIME_CONNECTIONS)]
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(PRIME_CONNECTIONS) as pool:
            for seen in pool.map(run, chunks):
                self.priming.update(seen)
        self.priming_seconds = time.monotonic() - started
        self.primed = self.double.calls()
        wrong = {k: n for k, n in self.priming.items() if k not in ((True, 200), (False, 402))}
        if wrong:
            shown = ", ".join(
                f"{n} {'paid' if paid else 'unpaid'} → HTTP {status}"
                for (paid, status), n in sorted(wrong.items())
            )
            raise RuntimeError(f"priming: unexpected answers: {shown}")

    def finish(self, b: Bench, t: Target) -> None:
        self.after = self.double.calls()

    def report(self, rows: "dict[tuple[str, str], Row]") -> Extra:
        users = self.double.users
        n_paid = sum(1 for u in users if u.paid)
        n_unpaid = len(users) - n_paid
        label = f"Stripe calls per user per TTL ≤ 1 ({MIXED})"
        if self.before is None or self.after is None:
            why = "no call counts (the target did not run to the end)"
            return Extra(checks=[(label, "whole run", NONE, f"n/a ({why})")])
        title = "Billing on: Stripe calls under a mixed load"
        phases: list[tuple[str, CallStats]] = []
        if self.primed is not None:
            phases.append(
                ("priming: gate start → every user seen once", self.stats(self.primed, self.before))
            )
            phases.append(("measurements (warm-ups included)", self.stats(self.after, self.primed)))
        whole = self.stats(self.after, self.before)
        phases.append(("whole run", whole))
        out = [
            f"`{MIXED}`: {len(users):,} users ({n_paid:,} paying, {n_unpaid:,} not), one "
            "`gate_session` cookie each; every wrk request is the next user, round-robin, each "
            "thread from its own offset (`bench/mixed_users.lua`). Gate: 1 worker, "
            f"`CACHE_TTL={self.TTL_SECONDS}s`, `NEGATIVE_CACHE_TTL={self.TTL_SECONDS}s` (default "
            "60 s, raised so that the whole run is one TTL for unpaid users too), `L1_TTL` "
            f"default (5 s), `STRIPE_RATE_LIMIT={MIXED_STRIPE_RATE_LIMIT}` (the test-key default, "
            "20/s, would spend 50 s on the cold start). Before the measurements each user is "
            f"requested once ({PRIME_CONNECTIONS} connections, "
            f"{self.priming_seconds:.1f} s): "
            + ", ".join(
                f"{n:,} {'paid' if paid else 'unpaid'} → {status}"
                for (paid, status), n in sorted(self.priming.items(), reverse=True)
            )
            + ".",
            "",
            "| phase | seconds | Stripe calls | users with a call | calls per paid user "
            "(mean / max) | calls per unpaid user (mean / max) |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for name, st in phases:
            out.append(
                f"| {name} | {st.seconds:.0f} | {st.total:,} | {st.touched:,} / {len(users):,} "
                f"| {per_user(st.paid)} | {per_user(st.unpaid)} |"
            )
        paths = ", ".join(f"`{p}` {n:,}" for p, n in sorted(whole.by_path.items())) or "none"
        out += [
            "",
            f"Stripe calls by path over the whole run (every gate): {paths}.",
            "",
            "| workload | rps | requests | non-2xx (402, unpaid) | share | "
            f"{TIMES} {PAID} | {TIMES} bare proxy |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for w in WORKLOADS:
            row = rows.get((MIXED, w.name))
            if row is None or row.result is None:
                continue
            r = row.result
            share = f"{100 * r.non_2xx / r.requests:.1f} %" if r.requests else NONE
            out.append(
                f"| {w.name} | {r.rps:,.0f} | {r.requests:,} | {r.non_2xx:,} | {share} "
                f"| {fmt_ratio(ratio(rows, MIXED, PAID, w.name))} "
                f"| {fmt_ratio(ratio(rows, MIXED, BARE, w.name))} |"
            )
        out += [
            "",
            f"Expected share of non-2xx: the unpaid share of users, "
            f"{100 * n_unpaid / max(len(users), 1):.1f} %.",
        ]
        worst = whole.max_per_user
        scope = f"whole run, {whole.seconds:.0f} s < TTL {self.TTL_SECONDS} s"
        if whole.seconds >= self.TTL_SECONDS:
            verdict = "n/a (the run outlasted the TTL)"
        else:
            verdict = "PASS" if worst <= 1 else "MISS"
        value = f"max {worst}, mean {sum(whole.paid + whole.unpaid) / max(len(users), 1):.2f}"
        return Extra(
            title=title,
            section="\n".join(out),
            checks=[(label, scope, value, verdict)],
            data={
                "phases": {name: asdict(st) for name, st in phases},
                "priming": {
                    f"{'paid' if p else 'unpaid'} {s}": n for (p, s), n in self.priming.items()
                },
                "priming_seconds": self.priming_seconds,
            },
        )

    def stats(self, after: CallSnapshot, before: CallSnapshot) -> CallStats:
        return CallStats.of(after.since(before), self.double.users)


# --------------------------------------------------------------------------- forward auth

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_FA_METRIC = re.compile(r"^gate_forward_auth_responses_total\{[^}]*\}\s+([\d.e+]+)$", re.MULTILINE)


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (a target
    and its workers: each is started in its own group), from /proc/PID/stat."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        # after "pid (comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt
        # cmajflt utime stime
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def gate_auth_answers(gate_url: str) -> float:
    """Forward-auth answers the gate has given so far (its /_gate/metrics, asked directly)."""
    with urllib.request.urlopen(gate_url + "/_gate/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(n) for n in _FA_METRIC.findall(text))


def proc_named(b: Bench, name: str) -> Proc:
    proc = next((p for p in b.procs if p.name == name), None)
    if proc is None:
        raise RuntimeError(f"{name} is not running")
    return proc


class ForwardAuthTargets:
    """nginx (shipped config, with and without its auth cache) and Caddy (shipped Caddyfile)
    in front of the upstream, each asking its own billing-on gate (1 worker, the paying solo
    user's cookie) through ``/_gate/auth``; plain nginx and Caddy for comparison. Per measured
    run: CPU seconds of the proxy and of the gate (/proc/PID/stat of their process groups) and
    the gate's forward-auth answers (its /_gate/metrics), reported per request."""

    def __init__(self, b: Bench, double: StripeDoubleProc) -> None:
        self.double = double
        self.gates: dict[str, str] = {}  # target name -> its gate's URL

    def _gate_for(self, b: Bench, t: Target, database: str) -> str:
        """Start a billing-on gate for ``t`` (setup hook); the cookie header of the solo user."""
        self.double.ensure_started(b)
        assert self.double.solo is not None
        port = b.free_port()
        env = {
            "UPSTREAM_URL": b.upstream_url,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WORKERS": "1",
            "LOG_LEVEL": "warning",
            **self.double.gate_env(b, database),
        }
        cookie = session_cookies(env, [self.double.solo])[0]
        b.spawn(f"gate for {t.name}", [b.python, "-m", "gateway", "serve"], env, port, 30.0)
        self.gates[t.name] = f"http://127.0.0.1:{port}"
        t.headers["Cookie"] = f"gate_session={cookie}"
        return f"127.0.0.1:{port}"

    def sampler(self, with_gate: bool) -> Callable[[Bench, Target], dict[str, float]]:
        def sample(b: Bench, t: Target) -> dict[str, float]:
            out = {"proxy_cpu": group_cpu_seconds(proc_named(b, t.name).popen.pid)}
            if with_gate:
                out["gate_cpu"] = group_cpu_seconds(proc_named(b, f"gate for {t.name}").popen.pid)
                out["gate_asks"] = gate_auth_answers(self.gates[t.name])
            return out

        return sample

    def _proxy(
        self,
        b: Bench,
        name: str,
        config: str,
        *,
        auth: bool,
        command: Callable[[Path, Path], list[str]],
        write: Callable[[Target, Path, Path, int, str, str | None], None],
        start_timeout: float = 20.0,
    ) -> Target:
        """A proxy run as ``command(folder, config file)`` on a free port in front of the
        upstream, its files in a folder of its own; ``write(target, folder, config file, port,
        upstream, gate)`` writes its config (``gate``: the address of the gate it asks,
        started here with ``auth``; else None)."""
        port = b.free_port()
        home = b.workdir / re.sub(r"[^a-z0-9]+", "-", name)
        conf = home / config
        argv = command(home, conf)

        def setup(b: Bench, t: Target) -> None:
            home.mkdir(mode=0o755, exist_ok=True)
            upstream = urlsplit(b.upstream_url).netloc
            gate = self._gate_for(b, t, f"{home.name}.sqlite3") if auth else None
            write(t, home, conf, port, upstream, gate)

        return Target(
            name=name,
            url=f"http://127.0.0.1:{port}",
            command=argv,
            setup=setup,
            skip=None if shutil.which(argv[0]) else f"{argv[0]} not installed",
            sample=self.sampler(auth),
            start_timeout=start_timeout,
        )

    def nginx(self, b: Bench, name: str, *, auth: bool, cache: bool = True) -> Target:
        def write(
            t: Target, prefix: Path, conf: Path, port: int, upstream: str, gate: str | None
        ) -> None:
            if gate is not None:
                site = shipped_nginx_site(port, gate, upstream, prefix / "auth-cache", cache)
            else:
                site = PLAIN_NGINX_SITE.format(port=port, upstream=upstream)
            write_nginx_conf(prefix, site)

        def command(prefix: Path, conf: Path) -> list[str]:
            return nginx_command(prefix)

        return self._proxy(b, name, "nginx.conf", auth=auth, command=command, write=write)

    def caddy(self, b: Bench, name: str, *, auth: bool) -> Target:
        def write(
            t: Target, home: Path, conf: Path, port: int, upstream: str, gate: str | None
        ) -> None:
            if gate is not None:
                site = shipped_caddy_site(port, gate, upstream)
            else:
                site = f"http://127.0.0.1:{port} {{\n\treverse_proxy {upstream}\n}}\n"
            conf.write_text("{\n\tadmin off\n\tauto_https off\n}\n\n" + site)
            t.env.update(HOME=str(home), XDG_DATA_HOME=str(home), XDG_CONFIG_HOME=str(home))

        def command(home: Path, conf: Path) -> list[str]:
            return ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]

        return self._proxy(
            b, name, "Caddyfile", auth=auth, command=command, write=write, start_timeout=30.0
        )

    def report(self, targets: list[Target], rows: "dict[tuple[str, str], Row]") -> Extra:
        """CPU per request of proxy and gate, and how often the gate was asked."""
        lines = [
            "Per measured run (warm-ups excluded): CPU milliseconds per 1,000 requests of the "
            "proxy (all its processes; for the gate as proxy: the gate) and of its gate (from "
            "/proc/PID/stat), and the gate's "
            "forward-auth answers per request (1.00 = every request asked the gate; the rest "
            "were answered from nginx's auth cache). 2 cores are shared by wrk, the upstream, "
            "the proxy and the gate.",
            "",
            f"| target | workload | rps | {TIMES} nginx | proxy CPU ms / 1k req "
            "| gate CPU ms / 1k req | gate asks / request |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for w in WORKLOADS:
            for t in targets:
                got = t.samples.get(w.name)
                row = rows.get((t.name, w.name))
                if not got or row is None or row.result is None or not got.get("requests"):
                    continue
                per_k = 1e6 / got["requests"]  # seconds per request -> ms per 1,000
                gate_cpu = got.get("gate_cpu")
                asks = got.get("gate_asks")
                n = got["requests"]
                lines.append(
                    f"| {t.name} | {w.name} | {row.result.rps:,.0f} "
                    f"| {fmt_ratio(ratio(rows, t.name, NGINX, w.name))} "
                    f"| {got['proxy_cpu'] * per_k:.1f} "
                    f"| {NONE if gate_cpu is None else f'{gate_cpu * per_k:.1f}'} "
                    f"| {NONE if asks is None else f'{asks / n:.3f}'} |"
                )
        return Extra(
            title="Forward auth: where the time goes",
            section="\n".join(lines),
            data={t.name: t.samples for t in targets},
        )


def nginx_command(prefix: Path) -> list[str]:
    """nginx run on ``prefix/nginx.conf`` (as :func:`write_nginx_conf` writes it)."""
    conf, log = prefix / "nginx.conf", prefix / "error.log"
    return ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(log)]


def write_nginx_conf(prefix: Path, site: str) -> None:
    """``site`` as ``prefix/site.conf``, included by ``prefix/nginx.conf``
    (:func:`nginx_main_conf`)."""
    prefix.mkdir(mode=0o755, exist_ok=True)
    (prefix / "site.conf").write_text(site)
    (prefix / "nginx.conf").write_text(nginx_main_conf(prefix, prefix / "site.conf"))


def nginx_main_conf(prefix: Path, site: Path) -> str:
    """The main config of every nginx target here (workers, pid, logs, temp paths under
    ``prefix``), ``site`` included."""
    missing = nginx_modules_missing()
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        if kind not in missing
    )
    return NGINX_MAIN_CONF.format(prefix=prefix, temp_paths=temp_paths, site=site)


NGINX_MAIN_CONF = """\
daemon off;
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths}
    include {site};
}}
"""

# As the NGINX target's server block (the plain-nginx row of the forward-auth group).
PLAIN_NGINX_SITE = """\
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
"""


def shipped_nginx_site(port: int, gate: str, app: str, cache_dir: Path, cache: bool) -> str:
    """deploy/nginx/gateway-forward-auth.conf with the listen line, the two upstream addresses
    and the cache directory replaced (``gateway.demo.shipped_configs``, as the tests do);
    ``cache=False`` also removes the four auth-cache lines of the auth location."""
    from gateway.demo.shipped_configs import nginx_forward_auth

    try:
        site = nginx_forward_auth(
            NGINX_EXAMPLE.read_text(), port=port, gate=gate, app=app, cache_dir=str(cache_dir)
        )
    except ValueError as exc:
        raise StartError(str(exc)) from None
    if not cache:
        site, removed = NGINX_CACHE_LINES.subn("", site)
        if removed != 4:
            raise StartError(f"expected 4 auth-cache lines in {NGINX_EXAMPLE.name}, got {removed}")
    return site


def shipped_caddy_site(port: int, gate: str, app: str) -> str:
    """deploy/caddy/Caddyfile with its site address and the two addresses replaced."""
    from gateway.demo.shipped_configs import caddy_forward_auth

    try:
        return caddy_forward_auth(CADDY_EXAMPLE.read_text(), port=port, gate=gate, app=app)
    except ValueError as exc:
        raise StartError(str(exc)) from None


# --------------------------------------------------------------------------- replicas (issue 9)

PAID_3W = "gate on, paid 3w (SQLite)"
REPLICAS = "3 replicas + PostgreSQL + nginx, paid"
PAID_3W_NGINX = "gate on, paid 3w (SQLite) + nginx"
#: Sign-outs on replica A whose refusal on replicas B and C is timed (2 samples each).
INVALIDATION_SAMPLES = 100
#: Cold users requested on all three replicas at once (Stripe calls per user across replicas).
COLD_USERS = 50
REPLICAS_CONF = REPO / "deploy" / "nginx" / "replicas.conf"
GROUPS["replicas"] = (PAID, PAID_3W, PAID_3W_NGINX, REPLICAS)


def pg_sessions(url: str, env: dict[str, str], users: list[BenchUser], each: int = 1) -> list[str]:
    """``gate_session`` values for ``users`` (``each`` sessions per user, user-major) in the
    PostgreSQL database ``url``, signed as a gate with settings ``env`` signs them."""
    _repo_on_path()
    from gateway.sessions import Sessions
    from gateway.settings import load_settings
    from gateway.store import PostgresStore, parse_database_url

    settings = load_settings(env)

    async def create() -> list[str]:
        store = PostgresStore(parse_database_url(url))
        await store.open()
        try:
            sessions = Sessions(settings, store)
            return [
                await sessions.create(u.customer_id, u.email, "wrk (bench)")
                for u in users
                for _ in range(each)
            ]
        finally:
            await store.close()

    return asyncio.run(create())


def _status(conn: http.client.HTTPConnection, method: str, path: str, **kw: Any) -> int:
    conn.request(method, path, **kw)
    resp = conn.getresponse()
    resp.read()
    return resp.status


class ReplicaTargets:
    """The shared-PostgreSQL targets: ``WORKERS=3`` on SQLite (the baseline: the same three
    processes' worth of CPU on one host) and three single-worker replicas on one PostgreSQL
    behind nginx (``deploy/nginx/replicas.conf``, round robin, upstream keepalive), both serving
    one paying user from the cache. After the measurements (``finish``), on the replicas: Stripe
    calls of cold users requested on all three at once, and invalidation latency (sign-out on
    replica A → the cookie refused on B and C)."""

    def __init__(self, b: Bench, double: StripeDoubleProc) -> None:
        self.double = double
        self.pg: Any = None
        self.url = ""
        self.gate_ports = [b.free_port() for _ in range(3)]
        self.latencies: list[float] = []
        self.cold: CallSnapshot | None = None
        self.cold_users: list[BenchUser] = []
        self.cold_statuses: Counter[int] = Counter()
        self.paid_3w = gate_paid_target(b, double, PAID_3W, workers=3)
        port = b.free_port()
        self.prefix = b.workdir / "nginx-replicas"
        self.replicas = Target(
            name=REPLICAS,
            url=f"http://127.0.0.1:{port}",
            command=nginx_command(self.prefix),
            setup=self.setup_replicas,
            teardown=self.teardown,
            finish=self.finish,
            extra=self.report,
            start_timeout=30.0,
            skip=None if shutil.which("nginx") else "nginx not installed",
        )
        self.replicas.sample = self.sample_pg
        self.port = port
        self.nginx_3w = self.nginx_3w_target(b)

    @property
    def targets(self) -> list[Target]:
        return [self.paid_3w, self.nginx_3w, self.replicas]

    def nginx_3w_target(self, b: Bench) -> Target:
        """The ``WORKERS=3`` SQLite gate behind the same nginx config as the replicas (its
        upstream block listing that one gate): what the nginx hop costs, without PostgreSQL."""
        port = b.free_port()
        prefix = b.workdir / "nginx-3w"

        def setup(b: Bench, t: Target) -> None:
            t.headers.update(self.paid_3w.headers)  # its setup ran first (table order)
            gate = urlsplit(self.paid_3w.url).netloc
            self.write_nginx(prefix, port, [gate])

        return Target(
            name=PAID_3W_NGINX,
            url=f"http://127.0.0.1:{port}",
            command=nginx_command(prefix),
            setup=setup,
            skip=None if shutil.which("nginx") else "nginx not installed",
        )

    @staticmethod
    def write_nginx(prefix: Path, port: int, gates: list[str]) -> None:
        """deploy/nginx/replicas.conf with its ``listen`` line and its three ``server gate-N``
        addresses replaced by ``gates`` (lines beyond ``len(gates)`` removed)."""
        site = REPLICAS_CONF.read_text().replace(
            "listen 8080;", f"listen 127.0.0.1:{port} reuseport;"
        )
        for i in range(1, 4):
            line = re.search(rf"^ *server gate-{i}:8080[^\n]*\n", site, re.MULTILINE)
            if line is None:
                raise StartError(f"{REPLICAS_CONF.name}: no `server gate-{i}:8080` line")
            new = line.group(0).replace(f"gate-{i}:8080", gates[i - 1]) if i <= len(gates) else ""
            site = site.replace(line.group(0), new)
        write_nginx_conf(prefix, site)

    def sample_pg(self, b: Bench, t: Target) -> dict[str, float]:
        """Transactions PostgreSQL has counted in the bench database (commits + rollbacks;
        the sampling query itself counts one): the hot path should add none."""
        if self.pg is None or not self.pg.running:
            return {}
        out = self.pg.psql(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'bench'"
        )
        return {"pg_xacts": float(out.strip() or 0)}

    def gate_env(self, b: Bench, port: int) -> dict[str, str]:
        return {
            "UPSTREAM_URL": b.upstream_url,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WORKERS": "1",
            "LOG_LEVEL": "warning",
            **self.double.gate_env(b, "unused.sqlite3"),
            "DATABASE_URL": self.url,
        }

    def setup_replicas(self, b: Bench, t: Target) -> None:
        _repo_on_path()
        from tests.postgres import PostgresServer

        self.double.ensure_started(b)
        assert self.double.solo is not None
        root = b.workdir / "postgres"
        root.mkdir(mode=0o755)
        self.pg = PostgresServer(root)
        self.pg.init()
        self.pg.start()
        self.url = self.pg.create_database("bench")
        env = self.gate_env(b, self.gate_ports[0])
        t.headers["Cookie"] = f"gate_session={pg_sessions(self.url, env, [self.double.solo])[0]}"
        for i, gate_port in enumerate(self.gate_ports):
            env = self.gate_env(b, gate_port)
            b.spawn(f"replica {i + 1}", [b.python, "-m", "gateway", "serve"], env, gate_port, 30.0)
        self.write_nginx(self.prefix, self.port, [f"127.0.0.1:{p}" for p in self.gate_ports])

    def teardown(self, b: Bench, t: Target) -> None:
        if self.pg is not None and self.pg.running:
            self.pg.stop()

    # --- after the measurements, on the running replicas ---------------------------------------

    def finish(self, b: Bench, t: Target) -> None:
        self.measure_cold(b)
        self.measure_invalidation(b)

    def measure_cold(self, b: Bench) -> None:
        """COLD_USERS users never seen by the replicas, each requested on all three at once."""
        self.cold_users = [u for u in self.double.users if u.paid][-COLD_USERS:]
        cookies = pg_sessions(self.url, self.gate_env(b, 0), self.cold_users)
        before = self.double.calls()
        path = WORKLOADS[0].path

        def one(port: int, cookie: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                return _status(conn, "GET", path, headers={"Cookie": f"gate_session={cookie}"})
            finally:
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            for cookie in cookies:
                for status in pool.map(one, self.gate_ports, [cookie] * 3):
                    self.cold_statuses[status] += 1
        self.cold = self.double.calls().since(before)

    def measure_invalidation(self, b: Bench) -> None:
        """Sign out on replica A (its own account form), then poll B and C until they refuse
        the cookie: seconds from sending the sign-out to each replica's first refusal."""
        user = next(u for u in self.double.users if u.paid)
        cookies = pg_sessions(self.url, self.gate_env(b, 0), [user], INVALIDATION_SAMPLES)
        a_port, *others = self.gate_ports
        path = WORKLOADS[0].path
        conns = {p: http.client.HTTPConnection("127.0.0.1", p, timeout=30) for p in others}
        a = http.client.HTTPConnection("127.0.0.1", a_port, timeout=30)
        try:
            nonce = secrets.token_urlsafe(24)  # the CSRF cookie a browser would have
            for value in cookies:
                cookie = {"Cookie": f"gate_session={value}"}
                with_csrf = {"Cookie": f"gate_session={value}; gate_csrf={nonce}"}
                for port in others:  # in their caches (session and verdict) now
                    if _status(conns[port], "GET", path, headers=cookie) != 200:
                        raise RuntimeError("invalidation: a fresh session was refused")
                a.request("GET", "/_gate/account", headers={**with_csrf, "Accept": "text/html"})
                resp = a.getresponse()
                page = resp.read().decode()
                token = re.search(r'name="csrf" value="([^"]+)"', page)
                if resp.status != 200 or token is None:
                    raise RuntimeError(f"invalidation: account page HTTP {resp.status}")
                body = f"csrf={token.group(1)}"
                headers = {**with_csrf, "Content-Type": "application/x-www-form-urlencoded"}
                started = time.monotonic()
                if _status(a, "POST", "/_gate/logout", body=body, headers=headers) != 303:
                    raise RuntimeError("invalidation: sign-out on replica A failed")
                pending = set(others)
                while pending:
                    for port in list(pending):
                        if _status(conns[port], "GET", path, headers=cookie) == 401:
                            self.latencies.append(time.monotonic() - started)
                            pending.discard(port)
                    if time.monotonic() - started > 30:
                        raise RuntimeError("invalidation: not refused within 30 s")
        finally:
            a.close()
            for conn in conns.values():
                conn.close()

    def report(self, rows: "dict[tuple[str, str], Row]") -> Extra:
        checks: list[tuple[str, str, str, str]] = []
        baselines = (
            (PAID_3W, "WORKERS=3 (SQLite)"),
            (PAID_3W_NGINX, "WORKERS=3 (SQLite) behind the same nginx"),
        )
        for baseline, label in baselines:
            for w in WORKLOADS:
                value = ratio(rows, REPLICAS, baseline, w.name)
                verdict = NONE if value is None else ("PASS" if value >= 0.9 else "MISS")
                checks.append(
                    (
                        f"3 replicas (PostgreSQL) ≥ 0.90{TIMES} {label}",
                        w.name,
                        fmt_ratio(value),
                        verdict if value is not None else "n/a",
                    )
                )
        out = [
            f"`{PAID_3W}`: one gate, `WORKERS=3`, SQLite. `{PAID_3W_NGINX}`: that gate behind "
            f"nginx with `deploy/nginx/replicas.conf` (its upstream block listing the one gate). "
            f"`{REPLICAS}`: three gate processes (`WORKERS=1` each) on one PostgreSQL 15 (local, "
            "`fsync=off`), nginx in front with the same file (round robin, `keepalive 64`, 2 "
            "nginx workers). All serve one paying user from the cache. The first ratio is what "
            "the issue asks; the second has the same nginx hop on both sides, so what is left is "
            "the store's share. PostgreSQL transactions are counted in `pg_stat_database` of the "
            "bench database during the replicas' measurements (the sampling query counts one "
            "each time, and PostgreSQL publishes these counters up to a second late).",
            "",
            f"| workload | {REPLICAS} rps | {PAID_3W} rps | {PAID_3W_NGINX} rps "
            f"| ratio to {PAID_3W} | ratio to {PAID_3W_NGINX} | PostgreSQL transactions "
            "per 1,000 requests |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for w in WORKLOADS:
            r, base = rows.get((REPLICAS, w.name)), rows.get((PAID_3W, w.name))
            if r is None or base is None or r.result is None or base.result is None:
                continue
            hop = rows.get((PAID_3W_NGINX, w.name))
            hop_rps = NONE if hop is None or hop.result is None else f"{hop.result.rps:,.0f}"
            got = self.replicas.samples.get(w.name, {})
            xacts = (
                NONE
                if "pg_xacts" not in got or not got.get("requests")
                else f"{got['pg_xacts'] * 1000 / got['requests']:.2f}"
            )
            out.append(
                f"| {w.name} | {r.result.rps:,.0f} | {base.result.rps:,.0f} | {hop_rps} "
                f"| {fmt_ratio(ratio(rows, REPLICAS, PAID_3W, w.name))} "
                f"| {fmt_ratio(ratio(rows, REPLICAS, PAID_3W_NGINX, w.name))} | {xacts} |"
            )
        data: dict[str, Any] = {}
        if self.cold is not None:
            per = [self.cold.subscription_lists.get(u.customer_id, 0) for u in self.cold_users]
            worst = max(per, default=0)
            statuses = ", ".join(f"{n} {TIMES} {s}" for s, n in sorted(self.cold_statuses.items()))
            out += [
                "",
                f"Cold users: {len(self.cold_users)} paying users never seen, each requested on "
                f"the three replicas at once: answers {statuses}; Stripe `subscriptions.list` "
                f"calls per user: mean {sum(per) / max(len(per), 1):.2f}, max {worst}.",
            ]
            checks.append(
                (
                    "Stripe calls per user per TTL across 3 replicas ≤ 1",
                    "cold users",
                    f"max {worst}",
                    "PASS" if worst <= 1 else "MISS",
                )
            )
            data["cold_calls_per_user"] = per
        if self.latencies:
            ordered = sorted(self.latencies)
            p50 = statistics.median(ordered) * 1000
            p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000
            out += [
                "",
                f"Invalidation: {INVALIDATION_SAMPLES} sign-outs on replica A, each timed until "
                f"replicas B and C refuse the cookie ({len(ordered)} samples; from sending the "
                f"sign-out, polling): p50 {p50:.1f} ms, p99 {p99:.1f} ms, max "
                f"{ordered[-1] * 1000:.1f} ms.",
            ]
            checks.append(
                (
                    "invalidation across replicas p99 ≤ 1 s",
                    f"{len(ordered)} samples",
                    f"p50 {p50:.0f} ms / p99 {p99:.0f} ms",
                    "PASS" if p99 <= 1000 else "MISS",
                )
            )
            data["invalidation_ms"] = [x * 1000 for x in ordered]
        return Extra(
            title="Replicas: three gates on one PostgreSQL",
            section="\n".join(out),
            checks=checks,
            data=data,
        )


def build_targets(b: Bench) -> list[Target]:
    """Every target, in table order. Add new ones here (see bench/README.md)."""
    bare_port = b.free_port()
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
        paid_1w,
        gate_header_target(b, double),
        paid_2w,
        MixedLoad(b, double).target,
        plain_nginx,
        *fa_targets,
        *ReplicaTargets(b, double).targets,
    ]


# --------------------------------------------------------------------------- wrk

_LATENCY_RE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS_RE = re.compile(r"^\s*(\d+) requests in", re.MULTILINE)
_SOCKET_ERR_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(output: str, non_2xx_expected: bool = False) -> WrkResult:
    """Parse ``wrk --latency`` output; latencies are converted to milliseconds. Non-2xx/3xx
    answers count as errors unless ``non_2xx_expected`` (they are always in ``non_2xx``)."""
    latency = {pct: float(v) * _TO_MS[unit] for pct, v, unit in _LATENCY_RE.findall(output)}
    rps = _RPS_RE.search(output)
    requests = _REQUESTS_RE.search(output)
    if rps is None or requests is None or not {"50", "99"} <= latency.keys():
        raise ValueError(f"unexpected wrk output:\n{output}")
    socket_errors = sum(int(n) for m in _SOCKET_ERR_RE.findall(output) for n in m)
    non_2xx = sum(int(n) for n in _NON_2XX_RE.findall(output))
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=latency["50"],
        p99_ms=latency["99"],
        requests=int(requests.group(1)),
        errors=socket_errors + (0 if non_2xx_expected else non_2xx),
        non_2xx=non_2xx,
    )


def run_wrk(w: Workload, t: Target, seconds: int, latency: bool = True) -> str:
    cmd = ["wrk", f"-t{w.threads}", f"-c{w.connections}", f"-d{seconds}s"]
    for name, value in t.headers.items():
        cmd += ["-H", f"{name}: {value}"]
    if t.wrk_script is not None:
        cmd += ["-s", str(t.wrk_script)]
    cmd += ["--latency", t.url + w.path] if latency else [t.url + w.path]
    if t.wrk_script_args is not None:
        cmd += ["--", *t.wrk_script_args(w)]
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
        "- upstream: the demo app (`python -m gateway.demo.upstream`), one process, shared by "
        "every proxy; `/api/fixed` serves cached bodies with a Content-Length",
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


def start_target(b: Bench, t: Target) -> None:
    if t.setup is not None:
        t.setup(b, t)
    if t.command is not None:
        b.spawn(t.name, t.command, t.env, t.port, t.start_timeout)


def run(args: argparse.Namespace) -> int:
    global WORKLOADS  # --workloads: every table and check below follows the selection
    if args.workloads:
        names = [n.strip() for n in args.workloads.split(",") if n.strip()]
        unknown_w = sorted(set(names) - {w.name for w in WORKLOADS})
        if unknown_w:
            print(f"error: unknown workloads {unknown_w}", file=sys.stderr)
            return 2
        WORKLOADS = tuple(w for w in WORKLOADS if w.name in names)
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
            print(f"starting {t.name} on {t.url} ...", file=sys.stderr, flush=True)
            try:
                start_target(b, t)
            except Exception as exc:  # StartError, or a setup hook's failure: report, go on
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
                    proc = next((p for p in b.procs if p.name == t.name), None)
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
