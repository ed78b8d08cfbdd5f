"""How many engine workers the queue calls for: Ray Serve's autoscaling policy for the workers
of `serve --engine ray` (rayapp.py).

Ray Serve's default policy scales on the requests its handles send to a deployment. Our
workers pull runs from the database, so no request ever reaches them and that signal reads
zero however long the queue. Instead each worker replica reports, through Ray Serve's custom
autoscaling metrics (`record_autoscaling_stats`), the runs queued in the database (the same
count from every replica) and the runs it holds; this policy asks for enough replicas that
each has `runs_per_replica` of them:

    replicas = ceil((queued + held by all workers) / runs_per_replica)

Ray Serve then applies the deployment's min and max replicas, its upscale and downscale
delays and its scaling factors (the policy returns the wish, not the bounds). With
min_replicas 0 the last replica goes once nothing is queued or held; from zero there is no
replica to report, so the API processes send the workers a `wake` request whenever they queue
runs, and a request to a deployment with no replica is what makes Ray Serve start one.

Pickled by value into Ray's controller: this module imports nothing of ours.
"""

from __future__ import annotations

import math
from typing import Any

QUEUED = "queued_runs"  # runs queued in the database, as one replica last counted them
HELD = "held_runs"  # runs the replica holds (dispatching or running)


def workers_for(queued: float, held: float, runs_per_replica: float) -> int:
    """The replicas that give every run queued or in flight a place, `runs_per_replica` each."""
    return math.ceil((queued + held) / runs_per_replica)


class QueueDepthPolicy:
    """Ray Serve's policy callable: called with an AutoscalingContext every control-loop tick,
    returns the wished replica count and the policy's state (none)."""

    def __init__(self, runs_per_replica: float = 16):
        if runs_per_replica <= 0:
            raise ValueError(f"runs_per_replica must be positive, not {runs_per_replica}")
        self.runs_per_replica = runs_per_replica

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        queued = metrics.get(QUEUED) or {}
        if not queued:  # no replica has reported yet (none running, or all just started)
            return ctx.target_num_replicas, {}
        # Every replica counts the same queue, each at its own moment: the largest count is
        # the latest growth. What the replicas hold is theirs alone: it adds up.
        held = sum((metrics.get(HELD) or {}).values())
        return workers_for(max(queued.values()), held, self.runs_per_replica), {}
