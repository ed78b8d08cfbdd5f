"""The callback sender on a bare database: every delivery ends (a URL nobody can parse, an
attempt that blows up), and one key's slow receivers do not hold up another key's callback."""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy as sa

from incontext.service import callbacks, keys
from incontext.service.callbacks import CallbackSender
from incontext.service.db import create_db_engine, make_session_factory, migrate
from incontext.service.models import CallbackAttempt, CallbackDelivery
from incontext.service.netpolicy import NetPolicy
from incontext.testing import LoopbackHost, QuietHandler

from .helpers import Receiver


@pytest.fixture
def db(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        key_ids = [keys.create_key(session)[0].id for _ in range(2)]
    yield sessions, key_ids
    engine.dispose()


def enqueue(sessions, key_id: str, url: str) -> str:
    with sessions.begin() as session:
        return callbacks._enqueue(session, api_key_id=key_id, url=url, envelope={"event": "run.completed"}).id


def run_sender(sessions, until, *, timeout_s: float = 20, patch=None) -> float:
    """Run a sender until `until(session)` holds; the seconds it took."""

    async def main() -> float:
        sender = CallbackSender(sessions, max_attempts=3, backoff_s=0.05, backoff_max_s=0.05, timeout_s=5, poll_s=0.05,
                                policy=NetPolicy(allow_private=True))
        if patch:
            patch(sender)
        started = time.monotonic()
        await sender.start()
        try:
            while time.monotonic() - started < timeout_s:
                with sessions() as session:
                    if until(session):
                        return time.monotonic() - started
                await asyncio.sleep(0.02)
            raise AssertionError(f"not done in {timeout_s} s")
        finally:
            await sender.close()

    return asyncio.run(main())


def delivery(session, delivery_id) -> CallbackDelivery:
    return session.get(CallbackDelivery, delivery_id, populate_existing=True)


def test_a_url_nobody_can_parse_ends_at_once_with_its_reason(db):
    sessions, (key, _) = db
    poison = enqueue(sessions, key, "http://[::1/")  # stored before submissions were checked
    run_sender(sessions, lambda s: delivery(s, poison).status != "pending")
    with sessions() as session:
        assert delivery(session, poison).status == "failed"
        attempt = session.scalars(sa.select(CallbackAttempt).where(CallbackAttempt.delivery_id == poison)).one()
        assert "not a valid URL" in attempt.error_message


def test_an_attempt_that_blows_up_is_recorded_and_the_delivery_ends(db):
    sessions, (key, _) = db
    broken = enqueue(sessions, key, "http://127.0.0.1:9/hook")

    def patch(sender):
        def load(delivery_id):
            raise RuntimeError("a bug")

        sender._load = load

    run_sender(sessions, lambda s: delivery(s, broken).status != "pending", patch=patch)
    with sessions() as session:
        assert delivery(session, broken).status == "failed" and delivery(session, broken).attempt_count == 3
        errors = session.scalars(sa.select(CallbackAttempt.error_message).where(CallbackAttempt.delivery_id == broken)).all()
        assert errors == ["internal error: RuntimeError"] * 3


class SlowReceiver(LoopbackHost):
    def __init__(self, delay_s: float):
        class Handler(QuietHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay_s)
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass

        super().__init__(Handler)


def test_one_keys_slow_receivers_do_not_hold_up_another_keys_callback(db):
    sessions, (hog, other) = db
    slow, fast = SlowReceiver(delay_s=3), Receiver()
    try:
        for _ in range(150):  # more than the sender ever has in flight
            enqueue(sessions, hog, f"{slow.url}/hook")
        mine = enqueue(sessions, other, f"{fast.url}/hook")  # the newest of all
        took = run_sender(sessions, lambda s: delivery(s, mine).status == "delivered")
        assert took < 2.0
    finally:
        slow.close()
        fast.close()
