"""Callbacks: the envelope a finished run POSTs to its callback_url, how it is signed, and
the sender that delivers it with retries.

A delivery is a database row written in the same transaction that ends the run, so a
pending delivery survives a restart. The sender is its own task: a slow receiver never
holds up the engine.

Signing (every secret from `POST /v1/callback-secrets` is `whsec_` + base64 of 32 bytes):
- `Runflow-Signature`: one lowercase hex HMAC-SHA256(key=the whole secret string, msg=raw
  body), 64 characters, from the newest secret: Runflow's own verifier compares the whole
  header with one digest. During rotation the older secret signs only in `webhook-signature`.
- Standard Webhooks: `webhook-id` (the delivery id, fixed across retries), `webhook-timestamp`
  (unix seconds of this attempt), `webhook-signature`: `v1,<base64 HMAC-SHA256(key=base64-decoded
  part after whsec_, msg="{id}.{timestamp}.{body}")>`, one per active secret, space-separated.
- `Runflow-Request-Id`: the delivery id too. With no secret registered, nothing is signed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets as pysecrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased, sessionmaker

from incontext.service import logs
from incontext.service.db import utcnow
from incontext.service.errors import NotFound
from incontext.service.models import Batch, CallbackAttempt, CallbackDelivery, CallbackSecret, Run
from incontext.service.netpolicy import NetPolicy
from incontext.service.outbound import Outbound, OutboundFailed, Refused, Resolver
from incontext.service.runparams import RunParams
from incontext.service.schemas import RunPublic, public_output
from incontext.service.storage import Storage

log = logging.getLogger(__name__)

EVENTS = {
    "succeeded": "run.completed",
    "failed": "run.failed",
    "canceled": "run.cancelled",
    "partial_succeeded": "run.partial_succeeded",
}
SIGNING_SECRETS = 2  # the newest active secrets sign; two allow rotation without downtime


@dataclass(frozen=True)
class CallbackStyle:
    """Another API surface's callback (routes/bfl.py, replicate.py): its own body and
    signature headers, and which of a run's events it tells."""

    # (session, run as it is at the event, storage): the body, rendered when the event happens
    envelope: Callable[[Session, Run, Storage], dict]
    # (body, run params, delivery id, unix time, the key's signing secrets newest first)
    headers: Callable[[bytes, RunParams, str, int, list[str]], dict[str, str]]
    # Whether an event is told: "completed" (the run ended) or, for Replicate, "start",
    # "logs", "output" (its webhook_events_filter). By default only the end is.
    wanted: Callable[[RunParams, str], bool] = lambda params, event: event == "completed"


# Events before the end (Replicate's) are sent at most this often per run, as Replicate
# sends its `logs` events; `start`, `output` and the end are always sent.
PROGRESS_EVENT_INTERVAL_S = 0.5


# Chosen per run by run.params["callback_style"]; registered by the surfaces that create such runs.
CALLBACK_STYLES: dict[str, CallbackStyle] = {}


def style_of(run: Run | None) -> CallbackStyle | None:
    return CALLBACK_STYLES.get(RunParams.of(run).callback_style or "") if run is not None else None


# Envelopes.
def run_envelope(run: Run, storage: Storage) -> dict:
    public = RunPublic.from_row(run, storage, synchronous=True)
    if run.status == "failed":
        output = {"code": run.failure_code, "message": run.failure_message, "errors": [], "stage_code": run.failure_stage_code}
    else:
        output = public.output
    return {
        "event": EVENTS[run.status],
        "run_id": run.id,
        "status": run.status,
        "model_id": run.model_id,
        "batch_id": run.batch_id,
        "client_ref": run.client_ref,
        "output": output,
        "cost": public.cost,
        "duration_ms": public.duration_ms,
        "created_at": run.created_at.isoformat(),
        "completed_at": run.completed_at.isoformat(),
        "metadata": run.meta,
    }


def batch_envelope(batch: Batch, runs: list[Run], counts: dict[str, int], storage: Storage) -> dict:
    """A batch's single callback. `run_id` carries the batch id, as `batch_id` does."""
    items = [
        {"run_id": r.id, "client_ref": r.client_ref, "status": r.status, "output": public_output(r.output, storage), "failure_code": r.failure_code}
        for r in runs
    ]
    return {
        "event": EVENTS[batch.status],
        "run_id": batch.id,
        "batch_id": batch.id,
        "status": batch.status,
        "model_id": batch.model_id,
        "output": {"items": items, "counts": counts},
        "duration_ms": int((batch.completed_at - batch.created_at).total_seconds() * 1000),
        "created_at": batch.created_at.isoformat(),
        "completed_at": batch.completed_at.isoformat(),
        "metadata": batch.meta,
    }


# A data URI in a JSON body: base64 needs no escapes, so the string ends at the next quote.
_INLINE_IMAGE = re.compile(r'"(data:[^",;]*;base64),([A-Za-z0-9+/=]*)"')


def without_inline_images(body: str) -> str:
    """A delivery's body once it has ended (delivered or given up): a sync_mode run's data URIs
    abbreviated, as a run's input echo abbreviates them, so the callback history does not keep
    the images. Until then the body is kept whole: every retry sends the same bytes."""
    if '"data:' not in body:
        return body
    return _INLINE_IMAGE.sub(lambda m: f'"{m[1]},<{len(m[2]):,} characters omitted>"', body)


def _enqueue(session: Session, *, api_key_id: str, url: str, envelope: dict, run_id=None, batch_id=None, event=None) -> CallbackDelivery:
    body = json.dumps(envelope, separators=(",", ":"), default=str)
    delivery = CallbackDelivery(
        api_key_id=api_key_id, run_id=run_id, batch_id=batch_id, url=url, event=event or envelope["event"], body=body, next_attempt_at=utcnow()
    )
    session.add(delivery)
    session.flush()
    return delivery


def enqueue_run(session: Session, run: Run, storage: Storage) -> CallbackDelivery | None:
    """The run's callback, queued for sending; None when its surface's client asked not to
    hear of this end. A succeeded Replicate-style run that asked for `output` events gets one
    first (its images appear as it ends)."""
    style = style_of(run)
    if style is None:
        return _enqueue(session, api_key_id=run.api_key_id, url=run.callback_url, envelope=run_envelope(run, storage), run_id=run.id, event=EVENTS[run.status])
    if run.status == "succeeded":
        enqueue_event(session, run, "output", storage)
    if not style.wanted(RunParams.of(run), "completed"):
        return None
    envelope = style.envelope(session, run, storage)
    return _enqueue(session, api_key_id=run.api_key_id, url=run.callback_url, envelope=envelope, run_id=run.id, event=EVENTS[run.status])


def enqueue_event(session: Session, run: Run | str, event: str, storage: Storage) -> CallbackDelivery | None:
    """An event before the run's end ("start", "logs", "output"), queued for sending if the
    run's surface tells it and its client asked for it (Replicate's webhook_events_filter).
    `logs` events closer than PROGRESS_EVENT_INTERVAL_S to the run's last one are dropped:
    the next one (and the end's body) carries every line."""
    if isinstance(run, str):
        run = session.get(Run, run)
    style = style_of(run)
    if run is None or not run.callback_url or style is None or not style.wanted(RunParams.of(run), event):
        return None
    if event == "logs":
        if run.status not in ("queued", "dispatching", "running"):  # lines written as it ended: the end's body has them
            return None
        last = session.scalar(
            sa.select(sa.func.max(CallbackDelivery.created_at)).where(CallbackDelivery.run_id == run.id, CallbackDelivery.event == "logs")
        )
        if last is not None and (utcnow() - last).total_seconds() < PROGRESS_EVENT_INTERVAL_S:
            return None
    envelope = style.envelope(session, run, storage)
    return _enqueue(session, api_key_id=run.api_key_id, url=run.callback_url, envelope=envelope, run_id=run.id, event=event)


def enqueue_batch(session: Session, batch: Batch, counts: dict[str, int], storage: Storage) -> CallbackDelivery:
    runs = list(session.scalars(sa.select(Run).where(Run.batch_id == batch.id).order_by(Run.id)))
    envelope = batch_envelope(batch, runs, counts, storage)
    return _enqueue(session, api_key_id=batch.api_key_id, url=batch.callback_url, envelope=envelope, batch_id=batch.id)


def deliveries_for_run(session: Session, run_id: str) -> list[tuple[CallbackDelivery, list[CallbackAttempt]]]:
    rows = session.scalars(sa.select(CallbackDelivery).where(CallbackDelivery.run_id == run_id).order_by(CallbackDelivery.id)).all()
    out = []
    for d in rows:
        attempts = session.scalars(
            sa.select(CallbackAttempt).where(CallbackAttempt.delivery_id == d.id).order_by(CallbackAttempt.attempt_number)
        ).all()
        out.append((d, list(attempts)))
    return out


# Secrets.
def create_secret(session: Session, api_key_id: str, label: str | None) -> tuple[CallbackSecret, str]:
    plain = "whsec_" + base64.b64encode(pysecrets.token_bytes(32)).decode()
    row = CallbackSecret(api_key_id=api_key_id, label=label, secret=plain)
    session.add(row)
    session.flush()
    return row, plain


def list_secrets(session: Session, api_key_id: str) -> list[CallbackSecret]:
    return list(session.scalars(sa.select(CallbackSecret).where(CallbackSecret.api_key_id == api_key_id).order_by(CallbackSecret.id)))


def revoke_secret(session: Session, api_key_id: str, secret_id: str) -> CallbackSecret:
    row = session.get(CallbackSecret, secret_id)
    if row is None or row.api_key_id != api_key_id:
        raise NotFound(f"no callback secret {secret_id}")
    row.revoked_at = row.revoked_at or utcnow()
    return row


def signing_secrets(session: Session, api_key_id: str) -> list[str]:
    return list(
        session.scalars(
            sa.select(CallbackSecret.secret)
            .where(CallbackSecret.api_key_id == api_key_id, CallbackSecret.revoked_at.is_(None))
            .order_by(CallbackSecret.id.desc())
            .limit(SIGNING_SECRETS)
        )
    )


def signature_headers(body: bytes, secrets: list[str], msg_id: str, timestamp: int) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Runflow-Request-Id": msg_id, "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    if secrets:
        headers["Runflow-Signature"] = hmac.new(secrets[0].encode(), body, hashlib.sha256).hexdigest()
        signed = f"{msg_id}.{timestamp}.".encode() + body
        headers["webhook-signature"] = " ".join(
            "v1," + base64.b64encode(hmac.new(base64.b64decode(s.removeprefix("whsec_")), signed, hashlib.sha256).digest()).decode()
            for s in secrets
        )
    return headers


# Delivery.
class CallbackSender:
    """Sends due deliveries; each failure is recorded and retried with exponential backoff.

    Every attempt ends in a recorded row, whatever goes wrong (a URL the client library cannot
    parse, a bug), so every delivery ends after `max_attempts`. Receivers are served in turn:
    at most PER_KEY_IN_FLIGHT deliveries of one key are in flight, and due deliveries are
    taken round-robin between keys, so one key's slow or failing receivers cannot hold up
    another key's callbacks."""

    PER_KEY_IN_FLIGHT = 4
    MAX_IN_FLIGHT = 100

    def __init__(self, sessions: sessionmaker[Session], *, max_attempts: int, backoff_s: float, backoff_max_s: float, timeout_s: float, poll_s: float,
                 policy: NetPolicy, resolver: Resolver | None = None, on_attempt: Callable[[str], None] | None = None,
                 claim_margin_s: float = 30.0):
        """`on_attempt`: told each attempt's outcome once recorded ("delivered", "retried" or
        "failed": given up), from a worker thread; the app's metrics count them.
        `claim_margin_s`: how long past an attempt's timeout a delivery claimed by a process
        that died mid-attempt waits before another process tries it again."""
        self._sessions = sessions
        self._on_attempt = on_attempt
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._timeout_s = timeout_s
        self._claim_margin_s = claim_margin_s
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task] = {}
        self._in_flight_keys: dict[str, str] = {}  # delivery id → its API key id
        self._task: asyncio.Task | None = None
        # Its own outbound slots: slow receivers never take the ones image fetches use.
        self._outbound = Outbound(policy, max_concurrent=self.MAX_IN_FLIGHT, **({"resolver": resolver} if resolver else {}))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="callback-sender")

    async def close(self) -> None:
        # The flag as well as the cancel: on Python 3.11, asyncio.wait_for can swallow a cancel
        # that lands as its wait ends (often here: every finished delivery sets _wake), and the
        # loop would go on for ever with close() waiting for it.
        self._closing = True
        tasks = [t for t in (self._task, *self._in_flight.values()) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._outbound.aclose()

    def wake(self) -> None:
        """Look for due deliveries now; callable from any thread."""
        if self._loop:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while not self._closing:
            try:
                for delivery_id, key_id in await asyncio.to_thread(self._due):
                    task = asyncio.create_task(self._attempt(delivery_id))
                    self._in_flight[delivery_id] = task
                    self._in_flight_keys[delivery_id] = key_id
                    task.add_done_callback(lambda _t, d=delivery_id: self._untrack(d))
            except Exception:
                log.exception("callback sender: could not read due deliveries")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_s)
            except TimeoutError:
                pass
            self._wake.clear()

    def _untrack(self, delivery_id: str) -> None:
        self._in_flight.pop(delivery_id, None)
        self._in_flight_keys.pop(delivery_id, None)
        self._wake.set()  # a slot is free: its key (or another) may have more due

    def _due(self) -> list[tuple[str, str]]:
        """Due deliveries not in flight, (id, key id), oldest first within each key and keys in turn."""
        busy = dict(self._in_flight_keys)  # a copy: the loop's thread changes it
        room = self.MAX_IN_FLIGHT - len(busy)
        if room <= 0:
            return []
        per_key: dict[str, int] = {}
        for key_id in busy.values():
            per_key[key_id] = per_key.get(key_id, 0) + 1
        rank = sa.func.row_number().over(partition_by=CallbackDelivery.api_key_id, order_by=(CallbackDelivery.next_attempt_at, CallbackDelivery.id))
        # One run's deliveries go one at a time, oldest first (ids are time-ordered): a
        # Replicate receiver never sees a `logs` event after the `completed` one.
        earlier = aliased(CallbackDelivery)
        waits = sa.exists().where(earlier.run_id == CallbackDelivery.run_id, earlier.status == "pending", earlier.id < CallbackDelivery.id)
        due = (
            sa.select(CallbackDelivery.id, CallbackDelivery.api_key_id, rank.label("rank"))
            .where(CallbackDelivery.status == "pending", CallbackDelivery.next_attempt_at <= utcnow(), CallbackDelivery.id.not_in(list(busy)), ~waits)
            .subquery()
        )
        with self._sessions.begin() as session:
            rows = session.execute(
                sa.select(due.c.id, due.c.api_key_id).where(due.c.rank <= self.PER_KEY_IN_FLIGHT).order_by(due.c.rank, due.c.id).limit(room)
            ).all()
            picked = []
            for delivery_id, key_id in rows:
                if per_key.get(key_id, 0) < self.PER_KEY_IN_FLIGHT:
                    per_key[key_id] = per_key.get(key_id, 0) + 1
                    picked.append((delivery_id, key_id))
            claimed = self._claim(session, [delivery_id for delivery_id, _ in picked])
        return [(delivery_id, key_id) for delivery_id, key_id in picked if delivery_id in claimed]

    def _claim(self, session: Session, ids: list[str]) -> set[str]:
        """Take these deliveries for this process's attempt: every process of a deployment runs
        a sender on the same table, and a delivery must go out once, not once per process. The
        UPDATE moves next_attempt_at past the attempt's deadline only where it is still due, so
        of two processes racing for a row only the first changes it (PostgreSQL re-reads a row
        it waited for; SQLite has one writer). A process that dies mid-attempt leaves the row
        due again once that time has passed: another tries it then (at least once, as webhooks
        promise); _record sets the real next attempt."""
        if not ids:
            return set()
        until = utcnow() + timedelta(seconds=self._timeout_s + self._claim_margin_s)
        return set(session.scalars(
            sa.update(CallbackDelivery)
            .where(CallbackDelivery.id.in_(ids), CallbackDelivery.status == "pending", CallbackDelivery.next_attempt_at <= utcnow())
            .values(next_attempt_at=until)
            .returning(CallbackDelivery.id)
        ))

    def _load(self, delivery_id: str) -> tuple[str | None, str, bytes, Callable[[int], dict[str, str]]]:
        """The run it tells of (None: a batch's), the URL, the body, and how to sign it at a given unix time."""
        with self._sessions() as session:
            d = session.get(CallbackDelivery, delivery_id)
            body = d.body.encode()
            run = session.get(Run, d.run_id) if d.run_id else None
            secrets = signing_secrets(session, d.api_key_id)
            if style := style_of(run):
                params = RunParams.of(run)
                return d.run_id, d.url, body, lambda ts: style.headers(body, params, delivery_id, ts, secrets)
            return d.run_id, d.url, body, lambda ts: signature_headers(body, secrets, delivery_id, ts)

    async def _attempt(self, delivery_id: str) -> None:
        try:
            await self._send(delivery_id)
        except Exception as exc:
            # Recorded like any failed attempt, so it is retried with backoff and ends after
            # max_attempts instead of staying due (and tried every poll) forever.
            log.exception("callback %s: could not send", delivery_id)
            try:
                await asyncio.to_thread(self._record, delivery_id, None, 0, f"internal error: {exc.__class__.__name__}")
            except Exception:
                log.exception("callback %s: could not record the attempt", delivery_id)

    async def _send(self, delivery_id: str) -> None:
        run_id, url, body, sign = await asyncio.to_thread(self._load, delivery_id)
        logs.bind_run(run_id)  # this delivery's task: its lines (and _record's) are about the run
        headers = sign(int(time.time()))
        status_code, error, final = None, None, False
        started = time.perf_counter()
        try:
            # The address is checked at each attempt, not at submission: a name can resolve
            # elsewhere by then. A refusal is final: trying again cannot change it.
            status_code = await self._outbound.post(url, content=body, headers=headers, deadline_s=self._timeout_s)
            if not 200 <= status_code < 300:
                error = f"receiver answered HTTP {status_code}"
        except Refused as exc:
            error, final = f"callback_url refused: {exc}; the server does not post to it (INCONTEXT_FETCH_PRIVATE_NETWORKS)", True
        except OutboundFailed as exc:
            error = str(exc)
        elapsed_ms = int((time.perf_counter() - started) * 1000)
        await asyncio.to_thread(self._record, delivery_id, status_code, elapsed_ms, error, final=final)

    def _record(self, delivery_id: str, status_code: int | None, elapsed_ms: int, error: str | None, *, final: bool = False) -> None:
        with self._sessions.begin() as session:
            d = session.get(CallbackDelivery, delivery_id)
            d.attempt_count += 1
            session.add(CallbackAttempt(delivery_id=d.id, attempt_number=d.attempt_count, status_code=status_code, response_time_ms=elapsed_ms, error_message=error))
            if error is None:
                d.status, d.completed_at, d.next_attempt_at = "delivered", utcnow(), None
                log.debug("callback %s to %s delivered (attempt %d, %d ms)", d.id, d.url, d.attempt_count, elapsed_ms)
            elif final or d.attempt_count >= self._max_attempts:
                d.status, d.completed_at, d.next_attempt_at = "failed", utcnow(), None
                log.warning("callback %s to %s failed after %d attempts: %s", d.id, d.url, d.attempt_count, error)
            if d.completed_at is not None:
                d.body = without_inline_images(d.body)
            else:
                delay = min(self._backoff_s * 2 ** (d.attempt_count - 1), self._backoff_max_s)
                d.next_attempt_at = utcnow() + timedelta(seconds=delay)
                log.info("callback %s to %s: attempt %d failed (%s); trying again in %.1f s", d.id, d.url, d.attempt_count, error, delay)
            outcome = d.status if d.completed_at is not None else "retried"
        if self._on_attempt is not None:  # once committed: an attempt rolled back was not made
            self._on_attempt(outcome)
