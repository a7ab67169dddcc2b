"""Running wrk against a target and reading its output (a :class:`WrkResult`); the
pre-flight request before it."""

import http.client
import re
import subprocess
from dataclasses import dataclass
from urllib.parse import urlsplit

from targets import Target, Workload

__all__ = ["WrkResult", "check_response", "parse_wrk", "run_wrk"]


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors, plus non-2xx/3xx answers unless the target expects them
    non_2xx: int = 0  # wrk's "Non-2xx or 3xx responses", always


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
