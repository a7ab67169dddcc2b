"""``/readyz`` through the real stack: not ready when ``DATABASE_PATH`` is not the file the
gate opened (deleted or replaced at runtime), naming the problem."""

import os
import sqlite3
from pathlib import Path

from tests.stack import running_stack


async def test_readyz_reports_a_deleted_database(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        async with client.get(stack.url("/_gate/readyz")) as resp:
            assert resp.status == 200
        os.unlink(stack.settings.database_path)
        async with client.get(stack.url("/_gate/readyz")) as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["status"] == "unavailable"
        assert "was deleted" in body["checks"]["store"]
        assert "DATABASE_PATH" in body["checks"]["store"]


async def test_readyz_reports_a_replaced_database(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        async with client.get(stack.url("/_gate/readyz")) as resp:
            assert resp.status == 200
        replacement = tmp_path / "restored.sqlite3"
        sqlite3.connect(replacement).close()
        replacement.replace(stack.settings.database_path)
        async with client.get(stack.url("/_gate/readyz")) as resp:
            assert resp.status == 503
            body = await resp.json()
        assert "replaced" in body["checks"]["store"]
