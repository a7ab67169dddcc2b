"""Usage quotas in the benchmark: a paying user's request on a metered path (its quota far
away) against the same request unmetered (``PAID``), in the same run; and how many Stripe
calls (meter events) the metered requests cost."""

import time

from procs import Bench
from report import Row, fmt_ratio, ratio
from stripe_targets import PRICE_ID, StripeDoubleProc, session_cookies
from targets import METERED, PAID, TIMES, WORKLOADS, Extra, Target, gate_target

__all__ = ["metered_target"]

#: How long ``finish`` waits for the gate to send the measured windows (their window closes
#: after METER_REPORT_INTERVAL plus a 5 s grace).
_REPORT_WAIT = 20.0
_EVENTS = "POST /v1/billing/meter_events"


def metered_target(b: Bench, double: StripeDoubleProc) -> Target:
    """``PAID`` with every benchmarked path metered (``USAGE_RULES``), a quota of 10^12 units
    (never near), and 1 s report windows: the counting and the reporting under load."""
    target = gate_target(b, METERED, workers=1)
    sent: dict[str, float] = {}

    def setup(b: Bench, t: Target) -> None:
        double.ensure_started(b)
        t.env.update(double.gate_env(b, "metered.sqlite3"))
        t.env.update(
            {
                "USAGE_RULES": "/api/fixed*=analysis",
                "PRICE_QUOTAS": f"{PRICE_ID}=analysis:1000000000000",
                "METER_REPORT_INTERVAL": "1s",
            }
        )
        assert double.solo is not None
        t.headers["Cookie"] = f"gate_session={session_cookies(t.env, [double.solo])[0]}"

    def events() -> int:
        return double.calls().by_path.get(_EVENTS, 0)

    def finish(b: Bench, t: Target) -> None:
        # The last windows close a few seconds after the load (1 s window + 5 s grace): wait
        # until no new event came for 3 s, at least 8 s after the load.
        start = last_change = time.monotonic()
        count = events()
        while time.monotonic() < start + _REPORT_WAIT:
            time.sleep(0.5)
            now = events()
            if now != count:
                count, last_change = now, time.monotonic()
            elif time.monotonic() > max(start + 8, last_change + 3):
                break
        sent["total"] = float(count)

    def extra(rows: dict[tuple[str, str], Row]) -> Extra:
        lines = [
            f"A paying user on a metered path (quota far away) {TIMES} the same request "
            "unmetered, in the same run; and the Stripe meter events the metered requests "
            "cost (one per customer, meter and report window: 1 s here, 60 s by default).",
            "",
            f"| workload | metered rps | unmetered rps | {TIMES} unmetered |",
            "|---|--:|--:|--:|",
        ]
        requests = 0
        for w in WORKLOADS:
            metered, paid = rows.get((METERED, w.name)), rows.get((PAID, w.name))
            if metered is None or metered.result is None:
                continue
            requests += metered.result.requests
            paid_rps = paid.result.rps if paid is not None and paid.result is not None else 0.0
            lines.append(
                f"| {w.name} | {metered.result.rps:,.0f} | {paid_rps:,.0f} "
                f"| {fmt_ratio(ratio(rows, METERED, PAID, w.name))} |"
            )
        total = sent.get("total", 0.0)
        per_k = 1000 * total / requests if requests else 0.0
        lines += [
            "",
            f"Meter events sent: {total:.0f} for {requests:,} measured requests (warm-ups "
            f"add a few more requests and windows): {per_k:.3f} Stripe calls per 1,000 "
            "metered requests.",
        ]
        return Extra(
            title="Usage quotas: metered vs unmetered",
            section="\n".join(lines),
            data={"meter_events": total, "requests": requests, "per_1000": per_k},
        )

    target.setup = setup
    target.finish = finish
    target.extra = extra
    return target
