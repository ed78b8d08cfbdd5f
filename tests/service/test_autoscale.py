"""The workers' autoscaling policy (service/autoscale.py), without Ray: fed the contexts Ray
Serve would give it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from incontext.service.autoscale import HELD, QUEUED, QueueDepthPolicy, workers_for


def _ctx(target=1, **metrics):
    return SimpleNamespace(target_num_replicas=target, aggregated_metrics=metrics)


def test_asks_for_a_worker_per_runs_per_replica_queued_or_held():
    policy = QueueDepthPolicy(runs_per_replica=4)
    # Two replicas counted the same queue at different moments: the later, larger count wins.
    assert policy(_ctx(**{QUEUED: {"a": 9.0, "b": 10.0}, HELD: {"a": 4.0, "b": 4.0}})) == (5, {})  # (10 + 8) / 4
    assert policy(_ctx(target=3, **{QUEUED: {"a": 0.0}, HELD: {"a": 1.0}})) == (1, {})


def test_asks_for_none_once_nothing_is_queued_or_held():
    # Ray Serve keeps min_replicas: zero only where scale to zero was asked for.
    assert QueueDepthPolicy(2)(_ctx(target=2, **{QUEUED: {"a": 0.0, "b": 0.0}, HELD: {"a": 0.0, "b": 0.0}})) == (0, {})
    assert workers_for(0, 0, 16) == 0 and workers_for(1, 0, 16) == 1 and workers_for(16, 1, 16) == 2


def test_keeps_the_target_until_a_worker_reports():
    assert QueueDepthPolicy(2)(SimpleNamespace(target_num_replicas=3, aggregated_metrics=None)) == (3, {})
    assert QueueDepthPolicy(2)(_ctx(target=2)) == (2, {})


def test_refuses_a_runs_per_replica_that_is_not_positive():
    with pytest.raises(ValueError):
        QueueDepthPolicy(0)
