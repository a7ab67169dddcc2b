"""In-process change announcements: order, stop, and a faulty listener."""

import logging

import pytest

from gateway.changes import Change, Changes


def test_listeners_run_in_order_and_stop() -> None:
    changes = Changes()
    seen: list[tuple[str, Change]] = []
    stop_a = changes.listen(lambda c: seen.append(("a", c)))
    changes.listen(lambda c: seen.append(("b", c)))
    changes.customer("cus_1")
    changes.session("sid", "cus_1")
    changes.customer(None)
    stop_a()
    stop_a()  # idempotent
    changes.everyone()
    assert seen == [
        ("a", Change("customer", "cus_1")),
        ("b", Change("customer", "cus_1")),
        ("a", Change("session", "sid", "cus_1")),
        ("b", Change("session", "sid", "cus_1")),
        ("a", Change("everyone")),
        ("b", Change("everyone")),
        ("b", Change("everyone")),
    ]


def test_a_faulty_listener_is_logged_and_the_next_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    changes = Changes()
    seen: list[Change] = []

    def broken(change: Change) -> None:
        raise RuntimeError("boom")

    changes.listen(broken)
    changes.listen(seen.append)
    with caplog.at_level(logging.ERROR, logger="gateway.changes"):
        changes.customer("cus_1")
    assert seen == [Change("customer", "cus_1")]
    [record] = caplog.records
    assert record.getMessage() == "change_listener_failed"
    assert "boom" in str(getattr(record, "gate_fields", {}))
