"""Fixtures that start the real server on a free port, with the real engine on the tiny
random model of tests/conftest.py (`tiny_model`), and talk HTTP to it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .helpers import Server, create_key, free_port, server_env


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


PG_USER = "postgres"


def _as_pg_user(*cmd: str) -> list[str]:
    # initdb refuses to run as root; run the cluster as the postgres system user.
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else list(cmd)


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster (initdb) for a test module; skips without the binaries."""
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not installed")
    if os.geteuid() == 0 and subprocess.run(["id", PG_USER], capture_output=True).returncode != 0:
        pytest.skip("running as root with no postgres user to run the cluster")
    # Not under pytest's tmp dir: that is private to root, and the cluster runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="incontext-pg-"))
    data = base / "cluster"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, PG_USER)
        shutil.chown(data, PG_USER)
    port = free_port()
    run = lambda *cmd: subprocess.run(_as_pg_user(*cmd), capture_output=True, text=True, timeout=600, cwd="/")
    init = run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    assert init.returncode == 0, init.stderr
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(base / "pg.log"), "-w", "start")
    assert start.returncode == 0, start.stderr + (base / "pg.log").read_text()
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"  # the throwaway cluster's own database
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)
