"""A throwaway PostgreSQL cluster (initdb + pg_ctl) for `bench scale` and the test suite:
`incontext serve --engine ray` needs a database its processes share, and a benchmark or a
test must not touch a real one."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

PG_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or no way to run them (root without a postgres user)."""


def _as_pg_user(*cmd: str) -> list[str]:
    # initdb refuses to run as root; run the cluster as the postgres system user.
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else list(cmd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a cluster on a free loopback port, yield its SQLAlchemy URL, stop and delete it."""
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        raise PostgresUnavailable("PostgreSQL binaries (initdb, pg_ctl) not installed")
    if os.geteuid() == 0 and subprocess.run(["id", PG_USER], capture_output=True).returncode != 0:
        raise PostgresUnavailable("running as root with no postgres user to run the cluster")
    # Not under a private tmp dir: the cluster runs as the postgres user.
    base = Path(tempfile.mkdtemp(prefix="incontext-pg-"))
    data = base / "cluster"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, PG_USER)
        shutil.chown(data, PG_USER)
    port = _free_port()
    run = lambda *cmd: subprocess.run(_as_pg_user(*cmd), capture_output=True, text=True, timeout=600, cwd="/")
    init = run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    if init.returncode != 0:
        raise PostgresUnavailable(f"initdb failed: {init.stderr}")
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(base / "pg.log"), "-w", "start")
    if start.returncode != 0:
        raise PostgresUnavailable(f"pg_ctl start failed: {start.stderr}{(base / 'pg.log').read_text()}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"  # the throwaway cluster's own database
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)
