"""Settings: validation, the one table, and that the docs generated from it agree."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import settings as settings_mod
from gateway.cli import build_parser
from gateway.settings import Settings, SettingsError, billing_state, load_settings
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent
UP = {"UPSTREAM_URL": "http://127.0.0.1:9000"}


def test_defaults_are_valid_and_documented_defaults_match() -> None:
    s = load_settings(UP)
    assert s.port == 8080
    assert s.gate_prefix == "/_gate"
    assert s.cache_ttl == 3600
    assert s.billing_mode == "auto"
    assert not s.billing_enabled
    assert [str(n) for n in s.trusted_proxies] == ["127.0.0.1/32", "::1/128"]


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"UPSTREAM_URL": "ftp://x"}, "UPSTREAM_URL='ftp://x' is invalid"),
        ({"UPSTREAM_URL": "not a url"}, "UPSTREAM_URL="),
        ({**UP, "CACHE_TTL": "-5"}, "CACHE_TTL='-5' is invalid"),
        ({**UP, "CACHE_TTL": "soon"}, "expected a duration"),
        ({**UP, "BILLING_MODE": "maybe"}, "BILLING_MODE='maybe' is invalid: expected one of auto"),
        ({**UP, "PORT": "http"}, "PORT='http' is invalid: expected an integer"),
        ({**UP, "TRUSTED_PROXIES": "0.0.0.0/0"}, "trusting every address"),
        ({**UP, "TRUSTED_PROXIES": "10.0.0.300"}, "TRUSTED_PROXIES="),
        ({**UP, "GATE_PREFIX": "gate"}, "GATE_PREFIX='gate' is invalid"),
        ({**UP, "PUBLIC_PATHS": "static/*"}, "PUBLIC_PATHS is invalid: public path 'static/*'"),
        ({**UP, "PUBLIC_PATHS": "/a*b"}, "PUBLIC_PATHS is invalid"),
        ({}, "UPSTREAM_URL is not set"),
        ({**UP, "BILLING_MODE": "on"}, "STRIPE_SECRET_KEY is not set"),
        ({**UP, "STRIPE_SECRET_KEY": "pk_live_x"}, "STRIPE_SECRET_KEY=<hidden>"),
        ({**UP, "STRIPE_SECRET_KEY": "sk_live_x"}, "STRIPE_WEBHOOK_SECRET is not set"),
        (
            {**UP, "STRIPE_SECRET_KEY": "sk_live_x", "STRIPE_WEBHOOK_SECRET": "whsec_1"},
            "STRIPE_PRICE_IDS is not set",
        ),
        (
            {
                **UP,
                "STRIPE_SECRET_KEY": "sk_live_x",
                "STRIPE_WEBHOOK_SECRET": "whsec_1",
                "STRIPE_PRICE_IDS": "price_1",
                "SESSION_SECRET": "short",
            },
            "SESSION_SECRET=<hidden> is invalid",
        ),
        (
            {
                **UP,
                "STRIPE_SECRET_KEY": "sk_live_x",
                "STRIPE_WEBHOOK_SECRET": "whsec_1",
                "STRIPE_PRICE_IDS": "price_1",
            },
            "SESSION_SECRET is not set: billing is on",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message
    for secret in ("sk_live_x", "pk_live_x", "'short'"):
        assert secret not in message


@pytest.mark.parametrize(
    ("mode", "key", "enabled"),
    [
        ("auto", "", False),
        ("auto", "sk_test_1", False),
        ("auto", "rk_test_1", False),
        ("auto", "sk_live_1", True),
        ("auto", "rk_live_1", True),
        ("on", "sk_test_1", True),
        ("off", "sk_live_1", False),
    ],
)
def test_billing_mode(mode: str, key: str, enabled: bool) -> None:
    env = {
        **UP,
        "BILLING_MODE": mode,
        "STRIPE_SECRET_KEY": key,
        "STRIPE_PRICE_IDS": "price_1",
        "STRIPE_WEBHOOK_SECRET": "whsec_1",
        "SESSION_SECRET": "x" * 32,
        "PUBLIC_URL": "https://gate.example",
    }
    s = load_settings(env)
    assert s.billing_enabled is enabled
    state, why = billing_state(s)
    assert state is enabled and why


def test_secrets_are_not_in_repr() -> None:
    s = load_settings(
        {
            **UP,
            "STRIPE_SECRET_KEY": "sk_test_secretvalue",
            "SESSION_SECRET": "sessionsecretvalue" * 2,
        }
    )
    assert "secretvalue" not in repr(s)


def test_durations() -> None:
    assert settings_mod.parse_duration("30d") == 30 * 86400
    assert settings_mod.parse_duration("15m") == 900
    assert settings_mod.parse_duration("90") == 90


def test_cli_exit_code_2_and_one_line_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={"PATH": "/usr/bin:/bin", "UPSTREAM_URL": "http://127.0.0.1:1", "CACHE_TTL": "-1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gateway: CACHE_TTL='-1' is invalid: expected a duration like 30s, 15m, 1h or 30d"
    ]
    assert "Traceback" not in proc.stderr


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("UPSTREAM_URL=http://127.0.0.1:1\nCACHE_TTL=nope\nPORT=1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={"PATH": "/usr/bin:/bin", "PORT": "2"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "CACHE_TTL='nope'" in proc.stderr


def _gateway(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unknown_settings_in_env_file_and_environment_are_named_with_the_nearest(
    tmp_path: Path,
) -> None:
    # Typos, another tool's name and a GATEWAY_-prefixed spelling, in .env and the environment;
    # a settings error (exit 2) stops `serve` after the warnings, before anything listens.
    (tmp_path / ".env").write_text(
        "UPSTREAM_URL=http://127.0.0.1:1\nUPSTREAM_TIMEOUT=10s\nSTRIPE_PRICE_ID=price_1\n"
        "POSTGRES_PASSWORD=compose-reads-it\nCACHE_TTL=nope\n"
    )
    proc = _gateway(
        tmp_path, "serve", env={"GATEWAY_PORT": "9000", "SMTP_PASS": "x", "HOSTNAME": "box"}
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "gateway: warning: GATEWAY_PORT (in the environment) is not a setting and is ignored;"
        " did you mean PORT?",
        "gateway: warning: SMTP_PASS (in the environment) is not a setting and is ignored;"
        " did you mean SMTP_PASSWORD?",
        "gateway: warning: STRIPE_PRICE_ID (in .env) is not a setting and is ignored;"
        " did you mean STRIPE_PRICE_IDS?",
        "gateway: warning: UPSTREAM_TIMEOUT (in .env) is not a setting and is ignored;"
        " did you mean READ_TIMEOUT?",
        "gateway: CACHE_TTL='nope' is invalid: expected a duration like 30s, 15m, 1h or 30d",
    ]


def test_unknown_settings_helper() -> None:
    lines = settings_mod.unknown_settings(
        ["PORT", "STRIPE_PRICE_ID", "DEMO_STRIPE_PORT"], ["PATH", "HOME", "STRIPE_KEY", "PORT"]
    )
    assert lines == [
        "STRIPE_KEY (in the environment) is not a setting and is ignored;"
        " did you mean STRIPE_SECRET_KEY?",
        "STRIPE_PRICE_ID (in .env) is not a setting and is ignored; did you mean STRIPE_PRICE_IDS?",
    ]
    assert settings_mod.unknown_settings(["NOTHING_LIKE_IT"], []) == [
        "NOTHING_LIKE_IT (in .env) is not a setting and is ignored"
    ]


def test_malformed_env_line_stops_with_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "UPSTREAM_URL=http://127.0.0.1:1\n# a comment\n\nAPP_NAME=Patent LLM\n"
        "this line is not a setting\nPORT=1\n"
    )
    proc = _gateway(tmp_path, "check")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "gateway: .env line 5 cannot be parsed: expected NAME=value"
        " (quote a value that holds spaces, quotes or #)"
    ]
    assert "python-dotenv" not in proc.stderr


def test_readme_settings_table_is_generated_from_the_table() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- settings-table:start -->\n(.*)\n<!-- settings-table:end -->", readme, re.S
    )
    assert block, "README lacks the settings table markers"
    assert block.group(1) == settings_mod.markdown_table()


def test_env_example_is_generated_from_the_table() -> None:
    assert (ROOT / ".env.example").read_text() == settings_mod.env_example() + "\n"


def test_help_lists_every_setting() -> None:
    text = build_parser().format_help()
    for spec in settings_mod.TABLE:
        assert spec.name in text
    # and every Settings field that comes from the environment is in the table
    names = {s.name.lower() for s in settings_mod.TABLE}
    fields = set(settings_mod.Settings.__dataclass_fields__) - {"demo"}
    assert fields == names


def test_dataclass_defaults_are_the_tables_parsed_defaults() -> None:
    """Names AND defaults: each field but ``demo`` is a table row, and its dataclass default is
    that row's default as the loader parses it."""
    names = [s.name.lower() for s in settings_mod.TABLE]
    field_list = [f for f in dataclasses.fields(Settings) if f.name != "demo"]
    assert [f.name for f in field_list] == names
    loaded = load_settings({}, demo=True)  # demo: the only consistency rule an empty env breaks
    default = Settings()
    for f in field_list:
        spec_default = settings_mod.table_defaults()[f.name]
        assert f.default == spec_default, f.name
        assert getattr(default, f.name) == getattr(loaded, f.name) == spec_default, f.name
    assert dataclasses.replace(loaded, demo=False) == default
    # the three that once differed
    assert [str(n) for n in default.trusted_proxies] == ["127.0.0.1/32", "::1/128"]
    assert [str(n) for n in default.metrics_allow] == ["127.0.0.1/32", "::1/128"]
    assert default.public_paths == ("/favicon.ico", "/robots.txt")


def test_overrides_go_through_the_consistency_checks() -> None:
    with pytest.raises(SettingsError, match="STRIPE_SECRET_KEY is not set"):
        load_settings(UP, billing_mode="on")
    with pytest.raises(TypeError):
        load_settings(UP, no_such_setting=1)


def test_make_settings_builds_through_the_loader() -> None:
    s = make_settings(session_secret="s" * 40, login_rate_limit=2)
    assert s.session_secret == "s" * 40 and s.login_rate_limit == 2
    assert s.trusted_proxies == Settings().trusted_proxies
    with pytest.raises(SettingsError, match="STRIPE_PRICE_IDS is not set"):
        make_settings(billing_mode="on", stripe_secret_key="sk_test_1")
