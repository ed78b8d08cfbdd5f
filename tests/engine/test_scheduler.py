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


def owned(rid: str, n: int, owner: str, steps: int = 3) -> list[Sample]:
    return [Sample(rid, i, ("m", 64, 64), steps, owner=owner) for i in range(n)]


def test_a_key_with_one_edit_steps_every_step_beside_another_keys_backlog():
    s = Scheduler(max_batch_size=8)
    backlog = owned("hog", 12, "key-a", steps=10)
    s.add(backlog)
    s.update(s.schedule())  # the backlog fills the batch
    single = owned("one", 1, "key-b", steps=10)
    s.add(single)
    steps_taken = 0
    while single[0].status != SampleStatus.FINISHED:
        batch = s.schedule()
        assert single[0] in batch.samples
        # Half the step each: one of the hog's samples beside the single edit, not seven.
        assert [x.owner for x in batch.samples].count("key-a") == 1
        s.update(batch)
        steps_taken += 1
    assert steps_taken == 10
    # Once it is done, the backlog has the whole batch again, and everything finishes.
    assert len(s.schedule().samples) == 8
    run_to_end(s, limit=200)
    assert all(x.status == SampleStatus.FINISHED and x.step == 10 for x in backlog)


def test_owners_put_equal_numbers_into_a_step_and_finish_their_earliest_work_first():
    s = Scheduler(max_batch_size=8)
    s.add(owned("a1", 3, "key-a", steps=4) + owned("a2", 3, "key-a", steps=4))
    s.update(s.schedule())
    s.add(owned("b", 2, "key-b", steps=4))
    batch = s.schedule()
    assert sorted(x.owner for x in batch.samples) == ["key-a", "key-a", "key-b", "key-b"]
    # key-a's two furthest-along samples step: its first request's, not the newcomers'.
    assert {x.request_id for x in batch.samples if x.owner == "key-a"} == {"a1"}


def test_more_owners_than_the_batch_holds_wait_their_turn_and_all_finish():
    s = Scheduler(max_batch_size=2)
    everyone = [x for k in range(5) for x in owned(f"r{k}", 1, f"key-{k}", steps=2)]
    s.add(everyone)
    trace = run_to_end(s)
    assert max(len(t) for t in trace) == 2
    assert all(x.status == SampleStatus.FINISHED for x in everyone)
    first_seen = {}
    for i, step in enumerate(trace):
        for rid, _ in step:
            first_seen.setdefault(rid, i)
    assert [first_seen[f"r{k}"] for k in range(5)] == sorted(first_seen[f"r{k}"] for k in range(5))  # arrival order
