"""The PostgreSQL test server itself: a database per test, stop and start on the same port."""

from tests.postgres import PostgresServer


def test_each_test_gets_an_empty_database(pg_server: PostgresServer, pg_url: str) -> None:
    database = pg_url.rsplit("/", 1)[1]
    assert pg_server.psql("SELECT current_database()", database).strip() == database
    tables = pg_server.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", database)
    assert tables.strip() == "0"


def test_stop_and_start_keep_port_and_data(pg_server: PostgresServer, pg_url: str) -> None:
    database = pg_url.rsplit("/", 1)[1]
    pg_server.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)", database)
    port = pg_server.port
    pg_server.stop()
    assert not pg_server.running
    pg_server.start()
    assert pg_server.port == port
    assert pg_server.psql("SELECT x FROM kept", database).strip() == "7"
