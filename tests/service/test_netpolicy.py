"""The server connects on a client's behalf (image_url, callback_url) only to public hosts,
unless the settings allow private ones."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest
import sqlalchemy as sa

from incontext.service import keys, lifecycle, netpolicy
from incontext.service.callbacks import CallbackSender
from incontext.service.db import create_db_engine, make_session_factory, migrate
from incontext.service.models import CallbackAttempt, CallbackDelivery
from incontext.service.netpolicy import NetPolicy
from incontext.service.storage import Storage
from incontext.service.runparams import RunParams

from .helpers import Receiver


def test_private_and_non_http_urls_are_refused_unless_allowed():
    strict, open_ = NetPolicy(), NetPolicy(allow_private=True)
    for address in ("127.0.0.1", "::1", "10.1.2.3", "169.254.169.254", "100.64.0.1", "224.0.0.1", "0.0.0.0", "::ffff:127.0.0.1", "2002:7f00:1::"):
        assert strict.refusal(ipaddress.ip_address(address)), address
    assert open_.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert strict.refusal(ipaddress.ip_address("93.184.215.14")) is None  # a public address
    assert "http(s)" in netpolicy.url_refusal("ftp://93.184.215.14/hook")
    assert "valid" in netpolicy.url_refusal("http://[::1/hook")


@pytest.fixture
def finished_run_with_callback(tmp_path):
    """A database holding one succeeded run whose callback goes to a loopback receiver."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    sessions = make_session_factory(engine)
    storage = Storage(tmp_path, secret=b"s", base_url="http://x", ttl_seconds=60)
    receiver = Receiver()
    with sessions.begin() as session:
        key, _ = keys.create_key(session)
        run = lifecycle.create_run(
            session, api_key_id=key.id, model_id="m", engine_model_id="m", input={},
            params=RunParams(prompt="p", seed=0, num_images=1, guidance_scale=3.5, num_inference_steps=4, output_format="png",
                             width=64, height=64, unit_price_micros=0).model_dump(),
            callback_url=f"{receiver.url}/hook",
        )
        lifecycle.mark_running(session, run.id, from_states=(lifecycle.QUEUED,))
        lifecycle.finish(session, storage, run.id, lifecycle.SUCCEEDED, output={"outputs": []})
    yield sessions, receiver
    receiver.close()
    engine.dispose()


def deliver(sessions, allow_private: bool) -> CallbackDelivery:
    async def main() -> CallbackDelivery:
        sender = CallbackSender(
            sessions, max_attempts=3, backoff_s=60, backoff_max_s=60, timeout_s=5, poll_s=0.05, policy=NetPolicy(allow_private=allow_private)
        )
        await sender.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with sessions() as session:
                    delivery = session.scalars(sa.select(CallbackDelivery)).one()
                    if delivery.attempt_count:
                        return delivery
                await asyncio.sleep(0.05)
            raise AssertionError("no delivery attempt in 30 s")
        finally:
            await sender.close()

    return asyncio.run(main())


def test_a_callback_to_a_private_address_is_refused_once_and_not_sent(finished_run_with_callback):
    sessions, receiver = finished_run_with_callback
    delivery = deliver(sessions, allow_private=False)
    assert delivery.status == "failed" and delivery.attempt_count == 1  # a policy refusal is not retried
    with sessions() as session:
        attempt = session.scalars(sa.select(CallbackAttempt).where(CallbackAttempt.delivery_id == delivery.id)).one()
        assert attempt.status_code is None and "not a public address" in attempt.error_message
    assert receiver.requests == []


def test_a_callback_to_a_private_address_is_sent_when_allowed(finished_run_with_callback):
    sessions, receiver = finished_run_with_callback
    delivery = deliver(sessions, allow_private=True)
    assert delivery.status == "delivered"
    assert len(receiver.requests) == 1
