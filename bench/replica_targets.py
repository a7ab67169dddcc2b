"""The replica targets: three single-worker gates on one PostgreSQL behind nginx
(``deploy/nginx/replicas.conf``), against one ``WORKERS=3`` gate on SQLite with and without the
same nginx; after the measurements, Stripe calls of cold users across the replicas and how fast a
sign-out on one replica reaches the others."""

import asyncio
import concurrent.futures
import http.client
import re
import secrets
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from procs import Bench, StartError
from proxy_targets import proxy_nginx_config
from report import Row, fmt_ratio, ratio
from stripe_targets import BenchUser, CallSnapshot, StripeDoubleProc, gate_paid_target
from targets import (
    NONE,
    PAID_3W,
    PAID_3W_NGINX,
    REPLICAS,
    TIMES,
    WORKLOADS,
    Extra,
    Target,
    gate_env,
)

from tests.postgres import PostgresServer
from tests.shipped_configs import REPLICAS_EXAMPLE

__all__ = ["ReplicaTargets", "pg_sessions"]

#: Sign-outs on replica A whose refusal on replicas B and C is timed (2 samples each).
INVALIDATION_SAMPLES = 100
#: Cold users requested on all three replicas at once (Stripe calls per user across replicas).
COLD_USERS = 50


def pg_sessions(url: str, env: dict[str, str], users: list[BenchUser], each: int = 1) -> list[str]:
    """``gate_session`` values for ``users`` (``each`` sessions per user, user-major) in the
    PostgreSQL database ``url``, signed as a gate with settings ``env`` signs them."""
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
        self.pg: PostgresServer | None = None
        self.url = ""
        self.gate_ports: list[int] = []  # the replicas', once started
        self.latencies: list[float] = []
        self.cold: CallSnapshot | None = None
        self.cold_users: list[BenchUser] = []
        self.cold_statuses: Counter[int] = Counter()
        self.paid_3w = gate_paid_target(b, double, PAID_3W, workers=3)
        self.prefix = b.workdir / "nginx-replicas"
        self.replicas = Target(
            name=REPLICAS,
            listen=self.listen_replicas,
            setup=self.setup_replicas,
            teardown=self.teardown,
            finish=self.finish,
            extra=self.report,
            start_timeout=30.0,
            skip=None if shutil.which("nginx") else "nginx not installed",
        )
        self.replicas.sample = self.sample_pg
        self.nginx_3w = self.nginx_3w_target(b)

    @property
    def targets(self) -> list[Target]:
        return [self.paid_3w, self.nginx_3w, self.replicas]

    def nginx_3w_target(self, b: Bench) -> Target:
        """The ``WORKERS=3`` SQLite gate behind the same nginx config as the replicas (its
        upstream block listing that one gate): what the nginx hop costs, without PostgreSQL."""
        prefix = b.workdir / "nginx-3w"

        def setup(b: Bench, t: Target) -> None:
            t.headers.update(self.paid_3w.headers)  # it started first (table order)

        def listen(b: Bench, t: Target, port: int) -> list[str]:
            return self.write_nginx(prefix, port, [urlsplit(self.paid_3w.url).netloc])

        return Target(
            name=PAID_3W_NGINX,
            listen=listen,
            setup=setup,
            skip=None if shutil.which("nginx") else "nginx not installed",
        )

    @staticmethod
    def write_nginx(prefix: Path, port: int, gates: list[str]) -> list[str]:
        """deploy/nginx/replicas.conf with its ``listen`` line and its three ``server gate-N``
        addresses replaced by ``gates`` (lines beyond ``len(gates)`` removed); the command."""
        site = REPLICAS_EXAMPLE.read_text().replace(
            "listen 8080;", f"listen 127.0.0.1:{port} reuseport;"
        )
        for i in range(1, 4):
            line = re.search(rf"^ *server gate-{i}:8080[^\n]*\n", site, re.MULTILINE)
            if line is None:
                raise StartError(f"{REPLICAS_EXAMPLE.name}: no `server gate-{i}:8080` line")
            new = line.group(0).replace(f"gate-{i}:8080", gates[i - 1]) if i <= len(gates) else ""
            site = site.replace(line.group(0), new)
        return proxy_nginx_config(prefix, site)

    def sample_pg(self, b: Bench, t: Target) -> dict[str, float]:
        """Transactions PostgreSQL has counted in the bench database (commits + rollbacks;
        the sampling query itself counts one): the hot path should add none."""
        if self.pg is None or not self.pg.running:
            return {}
        out = self.pg.psql(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'bench'"
        )
        return {"pg_xacts": float(out.strip() or 0)}

    def gate_env(self, b: Bench) -> dict[str, str]:
        """A replica's settings: one worker, the shared PostgreSQL."""
        return gate_env(b, 1, **self.double.gate_env(b, "unused.sqlite3"), DATABASE_URL=self.url)

    def setup_replicas(self, b: Bench, t: Target) -> None:
        self.double.ensure_started(b)
        assert self.double.solo is not None
        root = b.workdir / "postgres"
        root.mkdir(mode=0o755)
        self.pg = PostgresServer(root)
        self.pg.init()
        self.pg.start()
        self.url = self.pg.create_database("bench")
        env = self.gate_env(b)
        t.headers["Cookie"] = f"gate_session={pg_sessions(self.url, env, [self.double.solo])[0]}"
        command = [b.python, "-m", "gateway", "serve"]
        self.gate_ports = [b.spawn(f"replica {i}", command, env, 30.0) for i in (1, 2, 3)]

    def listen_replicas(self, b: Bench, t: Target, port: int) -> list[str]:
        return self.write_nginx(self.prefix, port, [f"127.0.0.1:{p}" for p in self.gate_ports])

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
        cookies = pg_sessions(self.url, self.gate_env(b), self.cold_users)
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
        cookies = pg_sessions(self.url, self.gate_env(b), [user], INVALIDATION_SAMPLES)
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

    def report(self, rows: dict[tuple[str, str], Row]) -> Extra:
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
