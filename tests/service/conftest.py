"""Fixtures that start the real server on a free port, with the real engine on the tiny
random model of tests/conftest.py (`tiny_model`), and talk HTTP to it."""

from __future__ import annotations

import pytest

from incontext.bench.postgres import PostgresUnavailable, throwaway_postgres

from .helpers import Server, create_key, server_env


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model):
    data_dir = tmp_path_factory.mktemp("server")
    srv = Server(data_dir, server_env(tiny_model))
    srv.keys = [create_key(data_dir, "alice"), create_key(data_dir, "bob")]
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def api(server):
    with server.client(server.keys[0]) as c:
        yield c


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster (initdb) for a test module; skips without the binaries."""
    try:
        with throwaway_postgres() as url:
            yield url
    except PostgresUnavailable as e:
        pytest.skip(str(e))
