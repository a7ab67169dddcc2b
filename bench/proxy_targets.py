"""The proxy targets: plain nginx, and the forward-auth ones: nginx with the shipped config
(with and without its auth cache) and Caddy with the shipped Caddyfile, each in front of the
upstream and asking a billing-on gate of its own, plain Caddy beside them; the CPU each side
spends per request; the nginx main config of every nginx target."""

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from procs import Bench, StartError, gate_auth_answers, group_cpu_seconds
from report import Row, fmt_ratio, ratio
from stripe_targets import StripeDoubleProc
from targets import (
    NGINX,
    NONE,
    TIMES,
    WORKLOADS,
    Extra,
    Target,
)

from tests.proxies import caddy_main_config, write_nginx_config
from tests.shipped_configs import (
    CADDY_EXAMPLE,
    NGINX_EXAMPLE,
    caddy_forward_auth,
    nginx_forward_auth,
)

__all__ = [
    "ForwardAuthTargets",
    "nginx_target",
    "proxy_nginx_config",
    "shipped_caddy_site",
    "shipped_nginx_site",
]

# The four lines of the shipped nginx config's auth cache (removed for NGINX_FA_NOCACHE).
NGINX_CACHE_LINES = re.compile(
    r"^\s*(?:proxy_cache|proxy_cache_key|proxy_no_cache|proxy_cache_bypass)\s.*\n", re.MULTILINE
)

#: ``write(target, folder, port, upstream, gate)``: a proxy's config for ``port``, its command.
Writer = Callable[[Target, Path, int, str, "str | None"], list[str]]


def nginx_target(b: Bench) -> Target:
    """nginx as a plain reverse proxy in front of the upstream."""
    prefix = b.workdir / "nginx"

    def listen(b: Bench, t: Target, port: int) -> list[str]:
        upstream = urlsplit(b.upstream_url).netloc
        return proxy_nginx_config(prefix, PLAIN_NGINX_SITE.format(port=port, upstream=upstream))

    return Target(
        name=NGINX,
        listen=listen,
        skip=None if shutil.which("nginx") else "nginx not installed",
    )


def proxy_nginx_config(prefix: Path, site: str) -> list[str]:
    """The nginx of every nginx target (two workers, no access log; tests/proxies.py's main
    config) serving ``site``; its command."""
    return write_nginx_config(
        prefix, site, workers=2, worker_connections=4096, access_log=False, error_level="warn"
    )


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
        """Start a billing-on gate for ``t`` (setup hook), the solo user's cookie in its
        headers; the gate's address."""
        address, cookie = self.double.start_gate(b, f"gate for {t.name}", database)
        self.gates[t.name] = f"http://{address}"
        t.headers["Cookie"] = f"gate_session={cookie}"
        return address

    def sampler(self, with_gate: bool) -> Callable[[Bench, Target], dict[str, float]]:
        def sample(b: Bench, t: Target) -> dict[str, float]:
            out = {"proxy_cpu": group_cpu_seconds(b.child(t.name).pid)}
            if with_gate:
                out["gate_cpu"] = group_cpu_seconds(b.child(f"gate for {t.name}").pid)
                out["gate_asks"] = gate_auth_answers(self.gates[t.name])
            return out

        return sample

    def _proxy(
        self,
        b: Bench,
        name: str,
        binary: str,
        *,
        auth: bool,
        write: Writer,
        start_timeout: float = 20.0,
    ) -> Target:
        """A proxy in front of the upstream, its files in a folder of its own; ``write``
        writes its config for a port (``gate``: the address of the gate it asks, started in
        ``setup`` with ``auth``; else None) and gives its command."""
        home = b.workdir / re.sub(r"[^a-z0-9]+", "-", name)
        gate: list[str | None] = [None]

        def setup(b: Bench, t: Target) -> None:
            home.mkdir(mode=0o755, exist_ok=True)
            gate[0] = self._gate_for(b, t, f"{home.name}.sqlite3") if auth else None

        def listen(b: Bench, t: Target, port: int) -> list[str]:
            return write(t, home, port, urlsplit(b.upstream_url).netloc, gate[0])

        return Target(
            name=name,
            listen=listen,
            setup=setup,
            skip=None if shutil.which(binary) else f"{binary} not installed",
            sample=self.sampler(auth),
            start_timeout=start_timeout,
        )

    def nginx(self, b: Bench, name: str, *, auth: bool, cache: bool = True) -> Target:
        def write(t: Target, prefix: Path, port: int, upstream: str, gate: str | None) -> list[str]:
            if gate is not None:
                site = shipped_nginx_site(port, gate, upstream, prefix / "auth-cache", cache)
            else:
                site = PLAIN_NGINX_SITE.format(port=port, upstream=upstream)
            return proxy_nginx_config(prefix, site)

        return self._proxy(b, name, "nginx", auth=auth, write=write)

    def caddy(self, b: Bench, name: str, *, auth: bool) -> Target:
        def write(t: Target, home: Path, port: int, upstream: str, gate: str | None) -> list[str]:
            if gate is not None:
                site = shipped_caddy_site(port, gate, upstream)
            else:
                site = f"http://127.0.0.1:{port} {{\n\treverse_proxy {upstream}\n}}\n"
            conf = home / "Caddyfile"
            conf.write_text(caddy_main_config(site))
            t.env.update(HOME=str(home), XDG_DATA_HOME=str(home), XDG_CONFIG_HOME=str(home))
            return ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]

        return self._proxy(b, name, "caddy", auth=auth, write=write, start_timeout=30.0)

    def report(self, targets: list[Target], rows: dict[tuple[str, str], Row]) -> Extra:
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


def shipped_nginx_site(port: int, gate: str, app: str, cache_dir: Path, cache: bool) -> str:
    """deploy/nginx/gateway-forward-auth.conf with the listen line, the two upstream addresses
    and the cache directory replaced (``tests.shipped_configs``, as the tests do);
    ``cache=False`` also removes the four auth-cache lines of the auth location."""
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
    try:
        return caddy_forward_auth(CADDY_EXAMPLE.read_text(), port=port, gate=gate, app=app)
    except ValueError as exc:
        raise StartError(str(exc)) from None
