"""The billing-on targets: the seeded Stripe double as a process of its own
(``bench/stripe_double_server.py``), a gate in front of it serving one paying user from the
cache, and the mixed load (1,000 users, paid and unpaid, round-robin) with its Stripe calls per
user counted."""

import asyncio
import concurrent.futures
import http.client
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from procs import BENCH_DIR, Bench, StartError
from report import Row, fmt_ratio, ratio
from targets import (
    BARE,
    MIXED,
    NONE,
    PAID,
    PAID_HEADER,
    PAID_KEY,
    TIMES,
    WORKLOADS,
    Extra,
    Target,
    gate_env,
    gate_target,
)

__all__ = [
    "BenchUser",
    "CallSnapshot",
    "MixedLoad",
    "StripeDoubleProc",
    "gate_header_target",
    "gate_key_target",
    "gate_paid_target",
    "session_cookies",
]

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
        self.url = ""  # once started
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
            *(b.python, str(BENCH_DIR / "stripe_double_server.py"), "--port", "0"),
            *("--users", str(MIXED_USERS), "--paid-fraction", str(PAID_FRACTION)),
            *("--price", PRICE_ID, "--users-file", str(self.users_file)),
            *("--api-key", STRIPE_KEY, "--webhook-secret", WEBHOOK_SECRET),
        ]
        try:
            # The users file is written before the port is reported: reported means seeded.
            port = b.spawn(self.NAME, command, {}, 30.0)
        except StartError as exc:
            self._error = str(exc)
            raise
        self.url = f"http://127.0.0.1:{port}"
        data = json.loads(self.users_file.read_text())
        self.users = [BenchUser(**u) for u in data["users"]]
        self.solo = BenchUser(**data["solo"])

    def gate_env(self, b: Bench, database: str, **extra: str) -> dict[str, str]:
        """Settings of a billing-on gate in front of this double (once started)."""
        assert self.url, "the Stripe double is not started"
        return {
            "BILLING_MODE": "on",
            "STRIPE_SECRET_KEY": STRIPE_KEY,
            "STRIPE_API_BASE": self.url,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STRIPE_PRICE_IDS": PRICE_ID,
            "SESSION_SECRET": self.session_secret,
            "PUBLIC_URL": "http://127.0.0.1",  # required with billing on
            "DATABASE_PATH": str(b.workdir / database),
            "COOKIE_SECURE": "false",
            **extra,
        }

    def start_gate(self, b: Bench, name: str, database: str) -> tuple[str, str]:
        """A billing-on gate of one worker in front of this double, started as ``name``
        (``database``: its SQLite file): its address and the solo user's session cookie."""
        self.ensure_started(b)
        assert self.solo is not None
        env = gate_env(b, 1, **self.gate_env(b, database))
        cookie = session_cookies(env, [self.solo])[0]
        port = b.spawn(name, [b.python, "-m", "gateway", "serve"], env, 30.0)
        return f"127.0.0.1:{port}", cookie

    def calls(self) -> CallSnapshot:
        with urllib.request.urlopen(self.url + "/_bench/calls", timeout=10) as resp:
            data = json.load(resp)
        return CallSnapshot(
            time.monotonic(),
            int(data["total"]),
            {str(k): int(v) for k, v in data["by_path"].items()},
            {str(k): int(v) for k, v in data["subscription_lists"].items()},
        )


def session_cookies(env: dict[str, str], users: list[BenchUser]) -> list[str]:
    """``gate_session`` values for ``users``: real server-side sessions, created through the
    gate's own session service in its ``DATABASE_PATH`` (before the gate starts), signed as a
    gate with settings ``env`` signs them."""
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
    target = gate_target(b, name, workers=workers)

    def setup(b: Bench, t: Target) -> None:
        double.ensure_started(b)
        t.env.update(double.gate_env(b, database))
        assert double.solo is not None
        t.headers["Cookie"] = f"gate_session={session_cookies(t.env, [double.solo])[0]}"

    target.setup = setup
    return target


def gate_key_target(b: Bench, double: StripeDoubleProc) -> Target:
    """Billing on, the paying solo user's API key (``Authorization: Bearer gk_…``, no cookie),
    made with ``gateway keys create`` in the gate's database before it starts."""
    target = gate_target(b, PAID_KEY, workers=1)

    def setup(b: Bench, t: Target) -> None:
        double.ensure_started(b)
        t.env.update(double.gate_env(b, "paid-key.sqlite3"))
        assert double.solo is not None
        create = ["keys", "create", double.solo.customer_id, "--name", "bench", "--json"]
        made = subprocess.run(
            [sys.executable, "-m", "gateway", *create],
            env={**os.environ, **t.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        t.headers["Authorization"] = f"Bearer {json.loads(made.stdout)['key']}"

    target.setup = setup
    return target


def gate_header_target(b: Bench, double: StripeDoubleProc) -> Target:
    """Billing on, the paying solo user named by a trusted identity header (an auth proxy in
    front): ``X-Forwarded-Email`` from loopback (the default ``TRUSTED_PROXIES``), no cookie."""
    target = gate_target(b, PAID_HEADER, workers=1)

    def setup(b: Bench, t: Target) -> None:
        double.ensure_started(b)
        t.env.update(double.gate_env(b, "paid-header.sqlite3", IDENTITY_HEADER="X-Forwarded-Email"))
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
        self.target = gate_target(b, MIXED, workers=1)
        self.target.setup = self.setup
        self.target.ready = self.prime
        self.target.finish = self.finish
        self.target.extra = self.report
        self.target.wrk_script = BENCH_DIR / "mixed_users.lua"
        self.target.wrk_script_args = lambda w: [str(self.cookies_file), str(w.threads)]
        self.target.non_2xx_expected = True

    def setup(self, b: Bench, t: Target) -> None:
        self.double.ensure_started(b)
        t.env.update(
            self.double.gate_env(
                b,
                "mixed.sqlite3",
                CACHE_TTL=f"{self.TTL_SECONDS}s",
                NEGATIVE_CACHE_TTL=f"{self.TTL_SECONDS}s",
                STRIPE_RATE_LIMIT=str(MIXED_STRIPE_RATE_LIMIT),
            )
        )
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

    def report(self, rows: dict[tuple[str, str], Row]) -> Extra:
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
