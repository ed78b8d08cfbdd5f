"""`python -m incontext.service keys …` and `serve`'s refusals to open up: without a key, and
with a model whose licence allows no commercial use nobody acknowledged."""

from __future__ import annotations

import pytest

from incontext.service.app import UnsafeStart, build_registry, check_safe_to_serve, open_database
from incontext.settings import Settings

from .helpers import cli, free_port


def test_keys_create_list_revoke_against_a_running_server(server):
    result = cli("keys", "create", "--data-dir", str(server.data_dir), "--label", "temp")
    assert result.returncode == 0
    assert result.stdout.count("\n") == 1  # the key alone on its own line
    key = result.stdout.strip()
    assert key.startswith("ic_live_") and len(key) > 40

    with server.client(key) as c:
        assert c.get("/v1/auth/me").json()["label"] == "temp"
        listed = cli("keys", "list", "--data-dir", str(server.data_dir))
        assert listed.returncode == 0 and "temp" in listed.stdout and key not in listed.stdout
        assert key.encode() not in (server.data_dir / "incontext.db").read_bytes()  # stored hashed

        me = c.get("/v1/auth/me").json()
        revoked = cli("keys", "revoke", me["id"], "--data-dir", str(server.data_dir))
        assert revoked.returncode == 0, revoked.stderr
        r = c.get("/v1/auth/me")
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED"

    assert cli("keys", "revoke", "no-such-key", "--data-dir", str(server.data_dir)).returncode == 1


def test_data_dir_from_environment(tmp_path):
    result = cli("keys", "create", env={"INCONTEXT_DATA_DIR": str(tmp_path / "from-env")})
    assert result.returncode == 0 and result.stdout.startswith("ic_live_")
    assert (tmp_path / "from-env" / "incontext.db").exists()


def test_serve_refuses_non_loopback_without_a_key(tmp_path):
    result = cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr and "keys create" in result.stderr
    assert not (tmp_path / "playground.key").exists()  # the playground's key is for loopback only


def test_serve_refuses_short_env_keys_beyond_loopback(tmp_path):
    result = cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(tmp_path), env={"INCONTEXT_API_KEYS": "dev"})
    assert result.returncode == 2 and "shorter than 20 characters" in result.stderr


def test_serve_refuses_a_non_commercial_model_beyond_loopback_unless_accepted(tmp_path):
    # Recognised by the name its weights are published under; the directory holds nothing else.
    flux_dev = tmp_path / "FLUX.1-Kontext-dev"
    flux_dev.mkdir()
    env = {"INCONTEXT_MODEL_DIR": str(flux_dev), "INCONTEXT_API_KEYS": "k" * 32}
    result = cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"), env=env)
    assert result.returncode == 2
    assert "FLUX.1 [dev] Non-Commercial License" in result.stderr and "INCONTEXT_ACCEPT_NONCOMMERCIAL_LICENSE=1" in result.stderr
    assert str(flux_dev) not in result.stderr  # named by its directory's name

    def check(**settings):
        serving = Settings(data_dir=tmp_path / "data", model_dir=flux_dev, api_keys=["k" * 32], **settings)
        db, sessions = open_database(serving)
        try:
            check_safe_to_serve(serving, sessions, build_registry(serving))
        finally:
            db.dispose()

    check(host="0.0.0.0", accept_noncommercial_license=True)  # the operator's word
    check(host="127.0.0.1")  # loopback: only its own user can reach it
    with pytest.raises(UnsafeStart, match="does not allow commercial use"):
        check(host="0.0.0.0")
