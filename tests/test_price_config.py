"""A price id Stripe does not know is a configuration error (landing page, startup log,
``gateway check``), and a legacy Plan id the Prices API does not return is read from the
Plans API — all against the Stripe double through the real client."""

import logging
import re
from pathlib import Path

import pytest

from gateway import admin
from gateway.cli import build_parser
from tests.stack import running_stack

HTML = {"Accept": "text/html"}
UNKNOWN = "price_does_not_exist"


async def test_unknown_price_says_not_configured_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    env = {"STRIPE_PRICE_IDS": f"{UNKNOWN},price_demo_monthly"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        async with client.get(stack.url("/_gate/subscribe"), headers=HTML) as resp:
            body = await resp.text()
        assert resp.status == 503
        assert "Billing is not configured" in body
        assert "temporarily unavailable" not in body.lower()

        # The startup check (run in the background at startup; here again, awaited).
        with caplog.at_level(logging.ERROR, logger="gateway.plans"):
            assert await stack.services.plans.check_configured() == [UNKNOWN]
        lines = [
            getattr(r, "gate_fields", {})
            for r in caplog.records
            if r.name == "gateway.plans" and r.getMessage() == "price_unknown"
        ]
        assert lines and all(f["setting"] == "STRIPE_PRICE_IDS" for f in lines)
        assert all(f["price"] == UNKNOWN for f in lines)

        args = build_parser().parse_args(["check"])
        assert await admin.run(args.command, args, stack.settings) == 1
        out = capsys.readouterr().out
        assert re.search(rf"price {UNKNOWN} +NOT FOUND: configuration error", out)
        assert re.search(r"price price_demo_monthly +ok", out)


async def test_stripe_outage_is_not_a_configuration_error(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        stack.double.faults.fail_always(500)
        async with client.get(stack.url("/_gate/subscribe"), headers=HTML) as resp:
            body = await resp.text()
        assert resp.status == 503
        assert "temporarily unavailable" in body.lower()
        assert "not configured" not in body


async def test_legacy_plan_id_falls_back_to_the_plans_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"STRIPE_PRICE_IDS": "plan_legacy_yearly"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        stack.double.add_legacy_plan(
            {"id": "plan_legacy_yearly", "amount": 9900, "interval": "year", "nickname": "Old"}
        )
        async with client.get(stack.url("/_gate/subscribe"), headers=HTML) as resp:
            body = await resp.text()
        assert resp.status == 200, body
        assert "$99.00" in body and "year" in body
        paths = [path for _, path in stack.double.calls]
        assert "/v1/prices/plan_legacy_yearly" in paths  # the Prices API first
        assert "/v1/plans/plan_legacy_yearly" in paths  # then the Plans API

        args = build_parser().parse_args(["check"])
        assert await admin.run(args.command, args, stack.settings) == 0
        out = capsys.readouterr().out
        assert re.search(r"price plan_legacy_yearly +ok \(PatentLLM Pro, \$99\.00 / year\)", out)
