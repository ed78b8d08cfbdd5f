"""Which samples run in the next denoising step: pure bookkeeping, no tensors, no model.

Every output image is a `Sample` with its own step counter. A batch holds samples of one
model, one resolution and one number of images (their token sequences must have the same
length); samples join at any step boundary while there is room and leave when they finish
or are cancelled.
Requests are admitted first come, first served; a bucket that is not running waits at most
until the running batch drains, so no request starves.

Owners (API keys) share each step equally. An admitted sample keeps its latents between
steps, so it can sit a step out: when several owners have samples running, every owner puts
the same number of samples into the step (as many as the smallest owner has running), so a
key with one edit gets half the compute beside a key with a backlog, not one slot in sixteen.
One owner alone fills the batch as before.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class SampleStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


TERMINAL = {SampleStatus.FINISHED, SampleStatus.CANCELLED}


@dataclass(eq=False)
class Sample:
    request_id: str
    index: int  # which of the request's images
    # (model id, width, height, images): a batch's samples must have token sequences of one
    # length, and each reference image adds a target's length.
    bucket: tuple[str, int, int, int]
    total_steps: int
    step: int = 0
    status: SampleStatus = SampleStatus.WAITING
    owner: str = ""  # who asked (an API key's id): steps are shared equally between owners
    started: bool = False  # has been in a step (its inputs are prepared)


@dataclass
class ScheduledBatch:
    """What `execute` runs: the samples stepped now, and which of them are new (need their
    inputs prepared). Admitted samples that sit this step out are in neither."""

    samples: list[Sample]
    new: list[Sample] = field(default_factory=list)

    @property
    def bucket(self) -> tuple[str, int, int, int] | None:
        return self.samples[0].bucket if self.samples else None


class Scheduler:
    def __init__(self, max_batch_size: int = 8):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.waiting: deque[Sample] = deque()
        self.running: list[Sample] = []

    def add(self, samples: list[Sample]) -> None:
        self.waiting.extend(samples)

    def cancel(self, request_id: str) -> list[Sample]:
        """Remove a request's samples from the queue and the running batch; they never run again."""
        gone = [s for s in list(self.waiting) + self.running if s.request_id == request_id]
        for s in gone:
            s.status = SampleStatus.CANCELLED
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        self.running = [s for s in self.running if s.request_id != request_id]
        return gone

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Admit waiting samples of the running bucket, then pick which admitted ones step.

        When nothing runs, the oldest waiting sample's bucket becomes the running one. Waiting
        samples of other buckets are skipped over, not reordered, so within a bucket the
        order is arrival order. Each owner may have `max_batch_size` samples admitted, and at
        most `max_batch_size` owners may have samples admitted, so every admitted owner is in
        every step.
        """
        if not self.running and self.waiting:
            bucket = self.waiting[0].bucket
        elif self.running:
            bucket = self.running[0].bucket
        else:
            return ScheduledBatch([])
        if not self._oldest_waiting_elsewhere(bucket):
            self._admit(bucket)
        picked = self._pick()
        new = [s for s in picked if not s.started]
        for s in new:
            s.started = True
        return ScheduledBatch(picked, new)

    def _admit(self, bucket) -> None:
        admitted: dict[str, int] = {}
        for s in self.running:
            admitted[s.owner] = admitted.get(s.owner, 0) + 1
        keep: deque[Sample] = deque()
        for s in self.waiting:
            n = admitted.get(s.owner)
            room = n < self.max_batch_size if n is not None else len(admitted) < self.max_batch_size
            if s.bucket == bucket and room:
                s.status = SampleStatus.RUNNING
                admitted[s.owner] = (n or 0) + 1
                self.running.append(s)
            else:
                keep.append(s)
        self.waiting = keep

    def _pick(self) -> list[Sample]:
        """The samples that step now: all of them for one owner; with several, the same number
        from each (the smallest owner's count, within the batch size), each owner's furthest
        along first so its earliest requests finish first."""
        by_owner: dict[str, list[Sample]] = {}
        for s in self.running:
            by_owner.setdefault(s.owner, []).append(s)
        if len(by_owner) <= 1:
            return list(self.running)
        share = max(1, min(min(len(g) for g in by_owner.values()), self.max_batch_size // len(by_owner)))
        chosen = {id(s) for g in by_owner.values() for s in sorted(g, key=lambda s: -s.step)[:share]}
        return [s for s in self.running if id(s) in chosen]  # rows in admission order

    def _oldest_waiting_elsewhere(self, bucket) -> bool:
        # Fairness: once the oldest waiting sample belongs to another bucket, stop admitting
        # to this one, so the batch drains and that bucket gets its turn.
        return bool(self.waiting) and self.running != [] and self.waiting[0].bucket != bucket

    def update(self, batch: ScheduledBatch) -> list[Sample]:
        """Advance every sample of the batch by one step; returns those that just finished."""
        done = []
        for s in batch.samples:
            if s.status != SampleStatus.RUNNING:
                continue  # cancelled while the step ran
            s.step += 1
            if s.step >= s.total_steps:
                s.status = SampleStatus.FINISHED
                done.append(s)
        self.running = [s for s in self.running if s.status == SampleStatus.RUNNING]
        return done
