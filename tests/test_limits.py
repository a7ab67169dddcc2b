"""The descriptor budget, the caps derived from it, raising RLIMIT_NOFILE, and the WebSocket
slot accounting (``gateway.limits``). Real servers: tests/test_connections.py."""

import json
import resource
import subprocess
import sys

import pytest

from gateway.limits import (
    ACCEPT_BURST,
    AUTO_MAX_CONNECTIONS,
    BASE_FDS,
    MAX_LINGERING_REFUSALS,
    PROBE_SLOTS,
    RESERVED_FDS,
    RETRY_AFTER,
    UpstreamPool,
    WebSocketSlots,
    connection_budget,
    plan_limits,
    websockets_busy,
)
from gateway.settings import SettingsError, load_settings
from tests.conftest import ROOT

ENV = {"UPSTREAM_URL": "http://127.0.0.1:1", "BILLING_MODE": "off"}


def test_defaults_fit_the_systemd_default_of_1024_descriptors() -> None:
    limits = plan_limits(load_settings(ENV), 1024)
    # Every connection proxied (two descriptors each) plus the reserve stays under 1,024.
    assert limits.max_connections == (1024 - RESERVED_FDS) // 2 == 400
    assert 2 * limits.max_connections + RESERVED_FDS <= 1024
    assert limits.max_websockets == 200  # half the slots: plain requests always find room
    assert limits.max_websockets_per_user == 16
    assert (limits.header_timeout, limits.keepalive_timeout) == (20.0, 75.0)
    assert not limits.clamped


def test_automatic_cap_is_bounded_when_descriptors_are_plenty() -> None:
    limits = plan_limits(load_settings(ENV), 1_048_576)
    assert limits.max_connections == AUTO_MAX_CONNECTIONS
    assert limits.max_websockets == AUTO_MAX_CONNECTIONS // 2


def test_explicit_caps_are_kept_within_the_budget() -> None:
    env = {**ENV, "MAX_CONNECTIONS": "5000", "MAX_WEBSOCKETS": "9000"}
    limits = plan_limits(load_settings(env), 1024)
    assert limits.max_connections == connection_budget(1024) == 400
    assert limits.clamped
    assert limits.max_websockets == 400  # never more WebSockets than connections
    small = plan_limits(load_settings({**ENV, "MAX_CONNECTIONS": "10"}), 1024)
    assert (small.max_connections, small.max_websockets, small.clamped) == (10, 5, False)
    assert small.max_websockets_per_user == 5  # the per-user cap follows the worker cap


def test_per_ip_cap_body_timeout_and_probe_slots() -> None:
    limits = plan_limits(load_settings(ENV), 1024)
    assert limits.max_connections_per_ip == 100  # a quarter of the connections
    assert (limits.body_timeout, limits.body_min_rate) == (60.0, 100)
    assert limits.probe_paths == {"/_gate/healthz", "/_gate/readyz"}
    # The probe slots come out of the same reserve: one descriptor each, never proxied.
    assert RESERVED_FDS == BASE_FDS + ACCEPT_BURST + MAX_LINGERING_REFUSALS + PROBE_SLOTS == 224
    env = {**ENV, "MAX_CONNECTIONS_PER_IP": "9999", "GATE_PREFIX": "/gate"}
    wide = plan_limits(load_settings(env), 1024)
    assert wide.max_connections_per_ip == 400  # never more than the connections
    assert wide.probe_paths == {"/gate/healthz", "/gate/readyz"}
    tiny = plan_limits(load_settings({**ENV, "MAX_CONNECTIONS": "2"}), 1024)
    assert tiny.max_connections_per_ip == 1


def test_a_tiny_descriptor_limit_still_allows_one_connection() -> None:
    assert connection_budget(100) == 1
    assert plan_limits(load_settings(ENV), 100).max_connections == 1


#: A bad value of each limit setting, and why the loader refuses it.
BAD_LIMITS = {
    "HEADER_TIMEOUT": ("0s", "must be at least 1"),
    "KEEPALIVE_TIMEOUT": ("soon", "expected a duration like 30s, 15m, 1h or 30d"),
    "MAX_CONNECTIONS": ("-1", "must be at least 0"),
    "MAX_WEBSOCKETS_PER_USER": ("0", "must be at least 1"),
    "MAX_CONNECTIONS_PER_IP": ("-3", "must be at least 0"),
    "BODY_TIMEOUT": ("0s", "must be at least 1"),
    "BODY_MIN_RATE": ("fast", "expected an integer"),
}


@pytest.mark.parametrize("name", BAD_LIMITS)
def test_bad_limit_settings_are_one_line_errors(name: str) -> None:
    value, reason = BAD_LIMITS[name]
    with pytest.raises(SettingsError) as err:
        load_settings({**ENV, name: value})
    assert str(err.value) == f"{name}={value!r} is invalid: {reason}"


_RAISE = """
import json, resource
from gateway.limits import raise_fd_limit
fd = raise_fd_limit()
print(json.dumps([fd.before, fd.soft, fd.hard, fd.error,
                  list(resource.getrlimit(resource.RLIMIT_NOFILE))]))
"""


def test_soft_descriptor_limit_is_raised_to_the_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard > 1024, "this test needs a hard limit > 1024"
    top = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    proc = subprocess.run(
        [sys.executable, "-c", _RAISE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, top)),
    )
    assert proc.returncode == 0, proc.stderr
    before, soft, got_hard, error, now = json.loads(proc.stdout)
    assert (before, soft, got_hard, error, now) == (1024, top, top, "", [top, top])


# ---------------------------------------------------------------- WebSocket slots


def test_websocket_slots_cap_each_user_and_the_worker() -> None:
    slots = WebSocketSlots(max_total=3, max_per_user=2)
    a1, a2 = slots.acquire("cus_a"), slots.acquire("cus_a")
    assert a1 is not None and a2 is not None
    assert slots.acquire("cus_a") is None  # per-user cap
    b1 = slots.acquire("cus_b")
    assert b1 is not None
    assert slots.acquire("cus_c") is None  # worker cap, though cus_c has none
    assert (slots.total, slots.count("cus_a"), slots.refused) == (3, 2, 2)
    a1.release()
    a1.release()  # idempotent: a second release frees nothing more
    assert (slots.total, slots.count("cus_a")) == (2, 1)
    c1 = slots.acquire("cus_c")
    assert c1 is not None
    assert slots.acquire("cus_a") is None  # worker full again
    for slot in (a2, b1, c1):
        slot.release()
    assert (slots.total, slots.count("cus_a"), slots.count("cus_b")) == (0, 0, 0)


def test_websocket_slot_is_released_by_its_context_manager() -> None:
    slots = WebSocketSlots(max_total=1, max_per_user=1)
    slot = slots.acquire("127.0.0.1")
    assert slot is not None
    with slot:
        assert slots.acquire("127.0.0.1") is None
    assert slots.total == 0
    assert slots.acquire("127.0.0.1") is not None


def test_the_upstream_pool_is_as_large_as_the_connection_cap_by_default() -> None:
    # Every admitted connection (each WebSocket and stream among them) gets an upstream one.
    for fd_limit in (1024, 20_000, 65_536):
        limits = plan_limits(load_settings({**ENV, "MAX_CONNECTIONS": "100000"}), fd_limit)
        assert limits.upstream_connections == limits.max_connections >= limits.max_websockets
    env = {**ENV, "MAX_CONNECTIONS": "40", "UPSTREAM_MAX_CONNECTIONS": "7"}
    assert plan_limits(load_settings(env), 1024).upstream_connections == 7
    env = {**ENV, "MAX_CONNECTIONS": "40", "UPSTREAM_MAX_CONNECTIONS": "700"}
    assert plan_limits(load_settings(env), 1024).upstream_connections == 40


def test_upstream_pool_refuses_beyond_its_size() -> None:
    pool = UpstreamPool(2)
    assert pool.take() and pool.take()
    assert not pool.take()
    pool.give()
    assert pool.take()
    assert (pool.in_use, pool.refused) == (2, 1)


def test_websockets_busy_is_a_503_to_retry() -> None:
    resp = websockets_busy()
    assert resp.status == 503
    assert resp.headers["Retry-After"] == str(RETRY_AFTER)
    assert resp.body is not None
    assert json.loads(bytes(resp.body))["error"] == "too_many_websockets"  # type: ignore[arg-type]
