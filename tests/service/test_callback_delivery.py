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


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_senders_on_one_database_deliver_each_callback_once(tmp_path, database, request):
    """Every process of a deployment (API replicas, Ray workers, several servers) runs a sender
    on the same deliveries: each must go out once, not once per process."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if database == "sqlite" else request.getfixturevalue("postgres_url")
    engine = create_db_engine(url)
    migrate(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        key = keys.create_key(session)[0].id
    receiver = Receiver()
    try:
        ids = {enqueue(sessions, key, f"{receiver.url}/hook") for _ in range(40)}

        async def main() -> None:
            senders = [
                CallbackSender(sessions, max_attempts=3, backoff_s=0.05, backoff_max_s=0.05, timeout_s=5, poll_s=0.01, policy=NetPolicy(allow_private=True))
                for _ in range(2)
            ]
            for sender in senders:
                await sender.start()
            try:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    with sessions() as session:
                        if not session.scalar(sa.select(sa.func.count()).select_from(CallbackDelivery).where(CallbackDelivery.status == "pending")):
                            break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)  # a second sender's late duplicate would land now
            finally:
                for sender in senders:
                    await sender.close()

        asyncio.run(main())
        sent = [r["headers"]["webhook-id"] for r in receiver.requests]
        assert sorted(sent) == sorted(ids)  # each once
        with sessions() as session:
            attempts = session.scalar(sa.select(sa.func.count()).select_from(CallbackAttempt))
        assert attempts == 40
    finally:
        receiver.close()
        engine.dispose()
