"""What the benchmark measures: workloads, targets (and the plain ones: the gate with billing
off, the bare proxy), what a target adds to the report, the ratios it checks, and the rows of
results."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procs import BENCH_DIR, Bench

if TYPE_CHECKING:
    from report import Row

__all__ = [
    "CHECKS",
    "GROUPS",
    "WORKLOADS",
    "Check",
    "Extra",
    "Target",
    "Workload",
    "bare_target",
    "gate_env",
    "gate_target",
]

UPSTREAM = "upstream direct"
BARE = "bare proxy"
GATE_1W = "gate off 1w"
GATE_2W = "gate off 2w"
PAID = "gate on, paid (cache hit)"
PAID_HEADER = "gate on, paid (identity header)"
PAID_KEY = "gate on, paid (API key)"
MIXED = "gate on, mixed users"
NGINX = "nginx"
NGINX_FA = "nginx + forward auth"
NGINX_FA_NOCACHE = "nginx + forward auth, no cache"
PAID_2W = "gate on, paid 2w"
CADDY = "caddy"
CADDY_FA = "caddy + forward auth"

METERED = "gate on, paid, metered (quota far)"
PAID_3W = "gate on, paid 3w (SQLite)"
REPLICAS = "3 replicas + PostgreSQL + nginx, paid"
PAID_3W_NGINX = "gate on, paid 3w (SQLite) + nginx"

#: ``--targets`` names that stand for several targets.
GROUPS: dict[str, tuple[str, ...]] = {
    "forward-auth": (NGINX, NGINX_FA, NGINX_FA_NOCACHE, PAID, PAID_2W, CADDY, CADDY_FA),
    "replicas": (PAID, PAID_3W, PAID_3W_NGINX, REPLICAS),
    "api-keys": (PAID, PAID_KEY),
    "usage": (PAID, METERED),
}

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


#: Every workload, in table order (``--workloads`` keeps some: changed in place).
WORKLOADS: list[Workload] = [
    Workload(2, 64, "/api/fixed?n=1024", 1024),
    Workload(2, 64, "/api/fixed?n=102400", 102400),
    Workload(1, 16, "/api/fixed?n=1024", 1024),
    Workload(1, 16, "/api/fixed?n=102400", 102400),
]


@dataclass
class Target:
    """Something wrk can hit.

    ``command`` (optional) is started before the run in its own process group with ``env`` added
    to the environment and killed at the end; it binds port 0 and reports its port (the gate
    with ``PORT=0``, the helpers with ``--port 0``). A proxy that cannot (nginx, Caddy) has
    ``listen`` instead: ``listen(bench, target, port)`` writes its config for a free port and
    returns its command (started again on another port if that one was taken meanwhile). The
    harness waits until the port accepts connections (up to ``start_timeout``) and sets ``url``
    (given up front only for something already running). ``setup`` runs before the command
    (start a helper with ``Bench.spawn``, add settings to ``env``), ``teardown`` after
    everything is stopped. A target with ``skip`` set is reported but not run. ``headers`` go
    with every request (wrk ``-H`` and the pre-flight check), e.g. a session cookie or a
    trusted identity header minted in ``setup``.
    """

    name: str
    url: str = ""
    command: list[str] | None = None
    listen: Callable[["Bench", "Target", int], list[str]] | None = None
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

    def start(self, b: "Bench") -> None:
        """``setup``, then the command (or ``listen``'s) until it accepts; ``url`` set."""
        if self.setup is not None:
            self.setup(b, self)
        if self.command is not None:
            port = b.spawn(self.name, self.command, self.env, self.start_timeout)
        elif self.listen is not None:
            listen = self.listen
            port = b.spawn_on_free_port(
                self.name, lambda port: listen(b, self, port), self.env, self.start_timeout
            )
        else:
            return  # already running: ``url`` was given
        self.url = f"http://127.0.0.1:{port}"


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
    Check(f"paid with an API key ≥ 0.90{TIMES} paid with a cookie", PAID_KEY, PAID, 0.90),
    Check(f"nginx + forward auth (shipped, cached) ≥ 0.80{TIMES} nginx", NGINX_FA, NGINX, 0.80),
    Check(f"metered paid request ≥ 0.90{TIMES} unmetered paid", METERED, PAID, 0.90),
)


# --------------------------------------------------------------------------- plain targets


def gate_env(b: Bench, workers: int, **env: str) -> dict[str, str]:
    """Settings of a gate in front of the upstream on a port of its choosing (``PORT=0``);
    ``env`` adds or overrides settings."""
    return {
        "UPSTREAM_URL": b.upstream_url,
        "HOST": "127.0.0.1",
        "PORT": "0",
        "WORKERS": str(workers),
        "LOG_LEVEL": "warning",
        **env,
    }


def gate_target(b: Bench, name: str, workers: int, **env: str) -> Target:
    """The gate as ``python -m gateway serve`` (billing off unless ``env`` says otherwise)."""
    return Target(
        name=name,
        command=[b.python, "-m", "gateway", "serve"],
        env=gate_env(b, workers, **{"BILLING_MODE": "off", **env}),
        start_timeout=30.0,
    )


def bare_target(b: Bench) -> Target:
    """The baseline: the smallest aiohttp streaming proxy (``bench/bare_proxy.py``)."""
    return Target(
        BARE,
        command=[
            *(b.python, str(BENCH_DIR / "bare_proxy.py")),
            *("--port", "0", "--upstream", b.upstream_url),
        ],
    )
