"""The operator CLI (`gateway check|sync|grant|revoke|status`) against the real store and the
Stripe double, with the same settings a gate would use."""

import re
from pathlib import Path

import pytest

from gateway import admin
from gateway import settings as settings_mod
from gateway.cli import build_parser, main
from tests.conftest import changed
from tests.stack import replay, running_stack, session_value, until_refused


async def run(command: list[str], settings: object) -> int:
    args = build_parser().parse_args(command)
    return await admin.run(args.command, args, settings)  # type: ignore[arg-type]


async def test_status_sync_grant_revoke(
    tmp_path: Path, database_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_stack(tmp_path, database_env) as stack, stack.session() as client:
        resp = await stack.subscribe(client, "carol@example.com")
        assert resp.status == 303
        settings = stack.settings

        assert await run(["status", "carol@example.com"], settings) == 0
        out = capsys.readouterr().out
        assert "status    active" in out and "access    yes (active)" in out

        assert await run(["status", "nobody@example.com"], settings) == 0
        assert "no Stripe customer" in capsys.readouterr().out

        calls = len(stack.double.calls)
        assert await run(["sync", "--all"], settings) == 0
        out = capsys.readouterr().out
        assert "active" in out
        assert len(stack.double.calls) > calls  # really re-read from Stripe

        # grant: a user with no subscription gets access until the date
        dave = stack.double.create_customer("dave@example.com")
        assert await run(["grant", "dave@example.com", "--until", "2099-01-31"], settings) == 0
        assert "granted dave@example.com until 2099-01-31" in capsys.readouterr().out
        assert await run(["status", "dave@example.com"], settings) == 0
        out = capsys.readouterr().out
        assert dave["id"] in out and "access    yes (grant)" in out

        assert await run(["revoke", "dave@example.com"], settings) == 0
        capsys.readouterr()
        assert await run(["status", "dave@example.com"], settings) == 0
        assert "access    no" in capsys.readouterr().out


async def test_check_reports_upstream_and_prices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_stack(tmp_path) as stack:
        assert await run(["check"], stack.settings) == 0
        out = capsys.readouterr().out
        assert re.search(r"upstream reachable +yes \(HTTP 200\)", out)
        # as the landing page says it, with the product's name
        assert re.search(r"price price_demo_monthly +ok \(PatentLLM Pro, \$19\.00 / month\)", out)
        assert re.search(
            r"webhooks +ok \(1 signing secret; endpoint \S+/_gate/webhooks/stripe\)", out
        )
        # the SQLite file by its path (no DATABASE_URL)
        path = Path(stack.settings.database_path).resolve()
        assert re.search(
            rf"store +sqlite://{re.escape(str(path))} \(DATABASE_PATH\) \(writable\)", out
        )
        broken = changed(stack.settings, upstream_url="http://127.0.0.1:9")
        assert await run(["check"], broken) == 1
        assert re.search(r"upstream reachable +NO", capsys.readouterr().out)


async def test_check_lists_unknown_settings_and_a_missing_webhook_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_stack(tmp_path) as stack:
        no_webhooks = changed(stack.settings, stripe_webhook_secret=())
        args = build_parser().parse_args(["check"])
        args.unknown_settings = settings_mod.unknown_settings(["STRIPE_PRICE_ID"], [])
        assert await admin.run("check", args, no_webhooks) == 1
        out = capsys.readouterr().out
        assert re.search(
            r"setting STRIPE_PRICE_ID +UNKNOWN \(in \.env\) is not a setting and is ignored; "
            r"did you mean STRIPE_PRICE_IDS\?",
            out,
        )
        assert re.search(
            r"webhooks +STRIPE_WEBHOOK_SECRET is not set: webhooks will be refused", out
        )


async def test_check_shows_the_database_url_without_its_password(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_url = pg_url.replace("://gate@", "://gate:hunter2-pw@")  # trust auth: any password
    assert secret_url != pg_url
    async with running_stack(tmp_path, {"DATABASE_URL": secret_url}) as stack:
        assert await run(["check"], stack.settings) == 0
        out = capsys.readouterr().out
        assert re.search(r"store +postgresql://gate:\*\*\*@127\.0\.0\.1:\d+/\S+ \(writable\)", out)
        assert "hunter2-pw" not in out


def test_grant_with_a_bad_date_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UPSTREAM_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("DATABASE_PATH", str(tmp_path / "g.sqlite3"))
    assert main(["grant", "x@example.com", "--until", "tomorrow"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gateway: --until='tomorrow' is invalid: expected a date YYYY-MM-DD"
    )


async def test_revoke_signs_out_every_session_of_the_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway revoke USER` ends the user's sessions too (and says how many); the running
    gate, which only shares the database, stops letting them in within L1_TTL."""
    async with (
        running_stack(tmp_path, {"L1_TTL": "1s"}) as stack,
        stack.session() as laptop,
        stack.session() as phone,
        stack.session() as other,
    ):
        assert (await stack.subscribe(laptop, "erin@example.com")).status == 303
        assert (await stack.subscribe(other, "fred@example.com")).status == 303
        customer = (await stack.services.store.customer_ids_for_email("erin@example.com"))[0]
        await stack.sign_in(phone, customer, "erin@example.com")
        cookies = [session_value(laptop), session_value(phone)]
        for value in cookies:
            assert await replay(stack.base, value) == 200

        assert await run(["revoke", "Erin@Example.com"], stack.settings) == 0
        assert "revoked Erin@Example.com: 2 sessions signed out" in capsys.readouterr().out
        for value in cookies:
            assert await until_refused(stack.base, value) in (401, 402, 303)
        assert await replay(stack.base, session_value(other)) == 200  # someone else: untouched
        assert await run(["revoke", customer], stack.settings) == 0
        assert f"revoked {customer}: 0 sessions signed out" in capsys.readouterr().out
