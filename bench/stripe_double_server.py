"""The local Stripe test double as a benchmark helper process, seeded with many customers.

Serves ``gateway.demo.stripe_double.StripeDouble`` on a port. Before the port opens it seeds
``--users`` customers ``user{i}@bench.test``, an evenly spread ``--paid-fraction`` of them with an
active subscription to ``--price``, plus one paying customer ``solo@bench.test`` kept apart for the
single-user (cache hit) target, and writes them to ``--users-file`` (so the file exists once the
port accepts connections). Extra endpoints:

- ``GET /_bench/users``: the same JSON as the file;
- ``GET /_bench/calls``: Stripe API calls received so far: ``total``, ``by_path``
  (``"GET /v1/subscriptions": n``) and ``subscription_lists`` (customer id → number of
  ``GET /v1/subscriptions?customer=…`` calls; the double's own ``calls`` list keeps no query).

    python bench/stripe_double_server.py --users 1000 --paid-fraction 0.7 \\
        --users-file /tmp/users.json --api-key sk_test_x --webhook-secret whsec_x

``--port 0`` (the default) picks a free port and reports it (a ``port_chosen`` line, printed
once the users are seeded and written).
"""

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.demo.stripe_double import StripeDouble
from tests.processes import serve_app

SOLO_EMAIL = "solo@bench.test"
SUBSCRIPTIONS_PATH = "/v1/subscriptions"


def seed(double: StripeDouble, users: int, paid_fraction: float, price: str) -> dict[str, Any]:
    """Create the customers (no events); paying ones spread evenly over the index range."""
    seeded: list[dict[str, Any]] = []
    for i in range(users):
        # i is paid when the running count of paid users steps up: 0.7 -> 7 of every 10, mixed.
        paid = int((i + 1) * paid_fraction) > int(i * paid_fraction)
        customer = double.create_customer(f"user{i}@bench.test")
        if paid:
            double.create_subscription(customer["id"], price)
        seeded.append({"customer_id": customer["id"], "email": customer["email"], "paid": paid})
    solo = double.create_customer(SOLO_EMAIL)
    double.create_subscription(solo["id"], price)
    return {
        "price": price,
        "users": seeded,
        "solo": {"customer_id": solo["id"], "email": SOLO_EMAIL, "paid": True},
    }


class CallCounter:
    """Counts ``GET /v1/subscriptions`` per ``customer`` query parameter (``on_response_prepare``
    sees every answer of the app, errors and injected faults included)."""

    def __init__(self) -> None:
        self.subscription_lists: Counter[str] = Counter()

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.method == "GET" and request.path == SUBSCRIPTIONS_PATH:
            self.subscription_lists[request.query.get("customer", "")] += 1


def build_app(double: StripeDouble, users: dict[str, Any], counter: CallCounter) -> web.Application:
    app = double.app
    app.on_response_prepare.append(counter.on_response_prepare)

    async def get_users(request: web.Request) -> web.Response:
        return web.json_response(users)

    async def get_calls(request: web.Request) -> web.Response:
        by_path = Counter(f"{method} {path}" for method, path in double.calls)
        return web.json_response(
            {
                "total": len(double.calls),
                "by_path": dict(by_path),
                "subscription_lists": dict(counter.subscription_lists),
            }
        )

    app.router.add_get("/_bench/users", get_users)
    app.router.add_get("/_bench/calls", get_calls)
    return app


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--paid-fraction", type=float, default=0.7)
    parser.add_argument("--price", default="price_demo_monthly")
    parser.add_argument("--users-file", type=Path, required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--webhook-secret", required=True)
    args = parser.parse_args(argv)
    if not 0.0 <= args.paid_fraction <= 1.0:
        parser.error("--paid-fraction must be between 0 and 1")

    double = StripeDouble(api_key=args.api_key, webhook_secret=args.webhook_secret)
    users = seed(double, args.users, args.paid_fraction, args.price)
    write_atomically(args.users_file, users)  # before the port is reported: ready means seeded
    app = build_app(double, users, CallCounter())
    serve_app(app, "127.0.0.1", args.port, access_log=None)


if __name__ == "__main__":
    main()
