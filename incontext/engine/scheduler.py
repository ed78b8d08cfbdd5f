"""Which samples run in the next denoising step: pure bookkeeping, no tensors, no model.

Every output image is a `Sample` with its own step counter. A batch holds samples of one
model and one resolution bucket (their token sequences must have the same length); samples
join at any step boundary while there is room and leave when they finish or are cancelled.
Requests are admitted first come, first served; a bucket that is not running waits at most
until the running batch drains, so no request starves.
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
    bucket: tuple[str, int, int]  # (model id, width, height)
    total_steps: int
    step: int = 0
    status: SampleStatus = SampleStatus.WAITING


@dataclass
class ScheduledBatch:
    """What `execute` runs: the samples, and which of them are new (need their inputs prepared)."""

    samples: list[Sample]
    new: list[Sample] = field(default_factory=list)

    @property
    def bucket(self) -> tuple[str, int, int] | None:
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
        """The running samples plus as many waiting ones of the same bucket as fit.

        When nothing runs, the oldest waiting sample's bucket becomes the running one. Waiting
        samples of other buckets are skipped over, not reordered, so within a bucket the
        order is arrival order.
        """
        if not self.running and self.waiting:
            bucket = self.waiting[0].bucket
        elif self.running:
            bucket = self.running[0].bucket
        else:
            return ScheduledBatch([])
        new: list[Sample] = []
        room = self.max_batch_size - len(self.running)
        if room > 0 and not self._oldest_waiting_elsewhere(bucket):
            keep: deque[Sample] = deque()
            for s in self.waiting:
                if room > 0 and s.bucket == bucket:
                    s.status = SampleStatus.RUNNING
                    new.append(s)
                    room -= 1
                else:
                    keep.append(s)
            self.waiting = keep
        self.running.extend(new)
        return ScheduledBatch(list(self.running), new)

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
