"""The step scheduler, without a model: admission, buckets, fairness, cancellation."""

from __future__ import annotations

from incontext.engine.scheduler import Sample, SampleStatus, Scheduler


def samples(rid: str, n: int, bucket=("m", 64, 64), steps: int = 3) -> list[Sample]:
    return [Sample(rid, i, bucket, steps) for i in range(n)]


def run_to_end(s: Scheduler, limit: int = 100) -> list[list[tuple[str, int]]]:
    trace = []
    for _ in range(limit):
        if not s.has_work():
            break
        batch = s.schedule()
        trace.append([(x.request_id, x.index) for x in batch.samples])
        s.update(batch)
    return trace


def test_requests_join_a_running_batch_at_step_boundaries():
    s = Scheduler(max_batch_size=4)
    s.add(samples("a", 1, steps=3))
    first = s.schedule()
    assert [x.request_id for x in first.new] == ["a"]
    s.update(first)
    s.add(samples("b", 2, steps=2))
    second = s.schedule()
    assert {x.request_id for x in second.samples} == {"a", "b"}
    assert [x.request_id for x in second.new] == ["b", "b"]


def test_batch_never_exceeds_max_and_everything_finishes():
    s = Scheduler(max_batch_size=3)
    all_samples = samples("a", 2) + samples("b", 2) + samples("c", 1)
    s.add(all_samples)
    trace = run_to_end(s)
    assert max(len(t) for t in trace) == 3
    assert all(x.status == SampleStatus.FINISHED and x.step == 3 for x in all_samples)


def test_other_bucket_gets_its_turn_once_it_is_oldest():
    s = Scheduler(max_batch_size=2)
    s.add(samples("a", 1, ("m", 64, 64), steps=2))
    s.schedule()
    s.add(samples("b", 1, ("m", 96, 64), steps=2))  # other size: cannot share the batch
    s.add(samples("c", 1, ("m", 64, 64), steps=2))  # same size, but arrived after b
    trace = run_to_end(s)
    order = [rid for step in trace for rid, _ in step]
    # c must not overtake b: the 64×64 batch drains, then b runs, then c.
    assert order.index("b") < order.index("c")


def test_cancel_removes_waiting_and_running_samples():
    s = Scheduler(max_batch_size=4)
    s.add(samples("a", 2) + samples("b", 1))
    batch = s.schedule()
    gone = s.cancel("a")
    assert len(gone) == 2 and all(x.status == SampleStatus.CANCELLED for x in gone)
    finished = s.update(batch)
    assert finished == []  # a's samples were cancelled mid-step and do not advance
    assert [x.request_id for x in s.schedule().samples] == ["b"]


def test_empty_scheduler_schedules_nothing():
    assert Scheduler().schedule().samples == []
