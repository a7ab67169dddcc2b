"""What nginx itself spends on forward auth, counted, not timed: instructions per request.

Throughput on these shared 2-core machines moves by ±10 % between runs; an instruction count
does not. This script runs each nginx config under valgrind's callgrind (one process:
``master_process off``, one worker, no access log), sends it wrk's requests for a few seconds
with the paying solo user's cookie (after a warm-up, so nginx's auth cache answers), once with
only the gate's cookie in the Cookie header and once with a browser's (the app's cookies
around it, :data:`COOKIES`), and divides the user-space instructions nginx executed by the
requests it answered:

- ``nginx``: the plain reverse proxy of the ``nginx`` bench target;
- ``shipped``: deploy/nginx/gateway-forward-auth.conf as the tests run it (bench's
  ``shipped_nginx_site``), asking its own billing-on gate (1 worker) in front of the Stripe
  double, as the ``nginx + forward auth`` target does;
- ``shipped + proxy_cache_bypass``: the shipped config with the ``proxy_cache_bypass
  $gateway_uncached;`` line it had until 2026-12 (its cookie maps then ran on every request);
- ``shipped before 2026-12``: that, and the app-cookie maps as they were then
  (:data:`OLD_COOKIE_MAPS`);
- ``shipped + pcre_jit``: the shipped config with ``pcre_jit on;`` in nginx.conf's main
  context (where a conf.d file cannot put it).

The upstream is the bench's (``python -m tests.probes``), wrk sends ``/api/fixed?n=1024``
with 8 connections (:data:`WORKLOAD`). Kernel time (system calls, TCP) is not counted: compare
rows with each other. Needs valgrind (``apt-get install -y valgrind``), nginx and wrk.

    .venv/bin/python bench/nginx_cost.py              # every config, 5 s each
    .venv/bin/python bench/nginx_cost.py --seconds 10 --configs nginx,shipped
"""

import argparse
import functools
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procs import Bench  # noqa: E402
from proxy_targets import PLAIN_NGINX_SITE, shipped_nginx_site  # noqa: E402
from stripe_targets import StripeDoubleProc  # noqa: E402
from targets import Target, Workload  # noqa: E402
from wrk import parse_wrk, run_wrk  # noqa: E402

from tests.processes import Child, spawn, start_on_free_port, stop  # noqa: E402
from tests.proxies import nginx_main_config  # noqa: E402

__all__ = ["CONFIGS", "COOKIES", "main", "render"]

BYPASS_AFTER = "        proxy_no_cache $gateway_uncached $upstream_http_x_gate_denial;\n"
#: The shipped config's app-cookie maps as they were until 2026-12 (three maps, each run on
#: every request: two of them scanning the Cookie header character by character).
OLD_COOKIE_MAPS = r"""map $http_cookie $gateway_cookie_1 {
    default                                                      $http_cookie;
    "~^\s*gate_session\s*=[^;]*(?:;\s*)?(?<rest>.*)$"             $rest;
    "~^(?<before>.*?);\s*gate_session\s*=[^;]*(?<after>.*)$"       $before$after;
}
map $gateway_cookie_1 $gateway_cookie_2 {
    default                                                      $gateway_cookie_1;
    "~^\s*gate_session\s*=[^;]*(?:;\s*)?(?<rest>.*)$"             $rest;
    "~^(?<before>.*?);\s*gate_session\s*=[^;]*(?<after>.*)$"       $before$after;
}
map $gateway_cookie_2 $gateway_app_cookie {
    default                                                      $gateway_cookie_2;
    "~(?:^|;)\s*gate_session\s*="                                 "";
}
"""

#: A config's server blocks for (port, gate, upstream, cache dir).
Config = Callable[[int, str, str, Path], str]
#: The server blocks for a port.
Site = Callable[[int], str]


def _shipped(port: int, gate: str, upstream: str, cache: Path) -> str:
    return shipped_nginx_site(port, gate, upstream, cache, True)


def _with_bypass(port: int, gate: str, upstream: str, cache: Path) -> str:
    site = _shipped(port, gate, upstream, cache)
    if BYPASS_AFTER not in site:
        raise SystemExit("the shipped config's proxy_no_cache line changed: update BYPASS_AFTER")
    return site.replace(
        BYPASS_AFTER, BYPASS_AFTER + "        proxy_cache_bypass $gateway_uncached;\n"
    )


def _before(port: int, gate: str, upstream: str, cache: Path) -> str:
    """The shipped config as it was until 2026-12: its old cookie maps, proxy_cache_bypass."""
    site = _with_bypass(port, gate, upstream, cache)
    start = site.index("map $http_cookie $gateway_cookie_1 {")
    end = site.index("}", site.index("map $gateway_cookie_2 $gateway_cookie_3 {")) + 2
    return site[:start] + OLD_COOKIE_MAPS + site[end:]


def _plain(port: int, gate: str, upstream: str, cache: Path) -> str:
    return PLAIN_NGINX_SITE.format(port=port, upstream=upstream)


#: name -> (its server blocks, pcre_jit on)
CONFIGS: dict[str, tuple[Config, bool]] = {
    "nginx": (_plain, False),
    "shipped": (_shipped, False),
    "shipped + proxy_cache_bypass": (_with_bypass, False),
    "shipped before 2026-12": (_before, False),
    "shipped + pcre_jit": (_shipped, True),
}


def _site_for_port(config: Config, port: int, *, gate: str, upstream: str, cache: Path) -> str:
    return config(port, gate, upstream, cache)


#: The two Cookie headers measured (``{s}``: the session): the bench's, and a browser's that
#: also holds the app's cookies (a Streamlit XSRF token, an analytics id, a preference, two
#: Google Analytics cookies; about 300 bytes, a typical size).
COOKIES: dict[str, str] = {
    "gate cookie only": "gate_session={s}",
    "browser cookies": "_xsrf=2|9f8e7d6c|0123456789abcdef0123456789abcdef|1765000000; "
    "ajs_anonymous_id=4b1c2f3e-5d6a-4c7b-8e9f-0a1b2c3d4e5f; theme=dark; gate_session={s}; "
    "_ga=GA1.1.123456789.1765000000; _ga_XYZ=GS1.1.1765000000.1.1.1765000000.0.0.0",
}


#: wrk's load: 1 thread, 8 connections, 1 KiB answers.
WORKLOAD = Workload(1, 8, "/api/fixed?n=1024", 1024)


def wrk(base: str, cookie: str, seconds: int) -> int:
    """Requests answered in ``seconds`` of :data:`WORKLOAD` at ``base`` sending ``cookie`` as
    the Cookie header; any error or answer other than 2xx/3xx stops the run."""
    out = run_wrk(WORKLOAD, Target("nginx", base, headers={"Cookie": cookie}), seconds)
    result = parse_wrk(out)
    if result.errors:
        raise SystemExit(f"wrk saw errors:\n{out}")
    return result.requests


def measure(prefix: Path, site: Site, jit: bool, cookie: str, seconds: int) -> float:
    """Instructions per request of nginx serving ``site`` (for its port) under callgrind."""
    prefix.mkdir(mode=0o755)

    def start(port: int) -> Child:
        (prefix / "site.conf").write_text(site(port))
        main = nginx_main_config(prefix, prefix / "site.conf", access_log=False, error_level="warn")
        main = main.replace("daemon off;", "daemon off;\nmaster_process off;")
        (prefix / "nginx.conf").write_text(("pcre_jit on;\n" if jit else "") + main)
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}/callgrind.out"]
        argv += ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
        argv += ["-e", str(prefix / "error.log")]
        return spawn("nginx under callgrind", argv, prefix / "valgrind.log")

    child, port = start_on_free_port(start, 60.0)
    try:
        url = f"http://127.0.0.1:{port}"
        wrk(url, cookie, 2)  # warm-up: the auth cache holds the allow
        control = ["callgrind_control", str(child.pid)]
        subprocess.run([*control[:1], "-z", *control[1:]], capture_output=True, check=True)
        requests = wrk(url, cookie, seconds)
        subprocess.run([*control[:1], "-d", *control[1:]], capture_output=True, check=True)
        dumps = sorted(prefix.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        totals = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.MULTILINE)
        if totals is None:
            raise SystemExit(f"no totals in {dumps[-1]}")
        return int(totals.group(1)) / requests
    finally:
        stop(child)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="seconds of load per config")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    missing = [
        tool for tool in ("valgrind", "callgrind_control", "nginx", "wrk") if not shutil.which(tool)
    ]
    if missing:
        print(
            f"error: {', '.join(missing)} not installed"
            " (apt-get install -y valgrind nginx-light wrk)",
            file=sys.stderr,
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="gate-nginx-cost-"))
    work.chmod(0o755)  # nginx's temp paths below it
    (work / "logs").mkdir()
    b = Bench(work, work / "logs")
    rows: dict[str, dict[str, float]] = {}
    try:
        port = b.spawn("upstream", [b.python, "-m", "tests.probes", "--port", "0"], {}, 20.0)
        b.upstream_url = f"http://127.0.0.1:{port}"
        gate, session = StripeDoubleProc(b).start_gate(b, "gate", "gate.sqlite3")
        for i, name in enumerate(names):
            site_for, jit = CONFIGS[name]
            for j, (shape, cookie) in enumerate(COOKIES.items()):
                site = functools.partial(
                    _site_for_port,
                    site_for,
                    gate=gate,
                    upstream=f"127.0.0.1:{port}",
                    cache=work / f"cache-{i}-{j}",
                )
                started = time.monotonic()
                per_request = measure(
                    work / f"nginx-{i}-{j}", site, jit, cookie.format(s=session), args.seconds
                )
                rows.setdefault(name, {})[shape] = per_request
                print(
                    f"{name}, {shape}: {per_request:,.0f} instructions / request"
                    f" ({time.monotonic() - started:.0f} s)",
                    file=sys.stderr,
                )
    finally:
        b.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(render(rows))
    return 0


def render(rows: dict[str, dict[str, float]]) -> str:
    """The markdown table: instructions per request by Cookie header, and over plain nginx."""
    shapes = list(COOKIES)
    head = " | ".join(f"{shape} | over nginx" for shape in shapes)
    lines = [f"| nginx config | {head} |", "|---|" + "--:|--:|" * len(shapes)]
    base = rows.get("nginx", {})
    for name, by_shape in rows.items():
        cells = []
        for shape in shapes:
            value = by_shape[shape]
            over = "-" if name == "nginx" or shape not in base else f"+{value - base[shape]:,.0f}"
            cells.append(f"{value:,.0f} | {over}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
