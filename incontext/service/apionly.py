"""An API-only process (INCONTEXT_DISPATCH=false): it stores runs and answers for them, and
leaves the denoising to the workers that share its database.

    INCONTEXT_DISPATCH=false incontext serve --database-url postgresql+psycopg://…

The ingress of `serve --engine ray` (rayapp.py) is one. It loads no model and claims nothing:
a POST commits its run as `queued`, and a worker's dispatcher claims it (leases.py). What
stands in for the engine and the dispatcher here keeps the routes unaware of the difference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

from incontext.engine.protocol import EditRequest, EditResult, ProgressCallback
from incontext.service.inputs import RunInput
from incontext.service.models import Run
from incontext.service.progress import RunProgress

log = logging.getLogger(__name__)


class WorkersEngine:
    """The engine of an API-only process: the workers hold the models, so it is ready as soon
    as it can queue runs for them; it never edits."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def is_ready(self) -> bool:
        return True

    def cancel(self, request_id: str) -> bool:
        # The cancel is a state in the database: the holder's next lease renewal stops the run.
        return False

    async def edit(self, request: EditRequest, on_progress: ProgressCallback | None = None) -> EditResult:
        raise RuntimeError("an API-only process (INCONTEXT_DISPATCH=false) runs no edits")


class QueueOnly:
    """The dispatcher of an API-only process: claims nothing and holds no inputs (the workers
    read them from storage). `on_queued`, when given, is called after runs were committed,
    from the route's thread: the Ray ingress uses it to wake the workers at once rather than
    at their next poll, and to let Ray Serve start one when there are none (scale to zero)."""

    def __init__(self, on_queued: Callable[[], None] | None = None):
        self.progress = RunProgress()  # steps are published where the runs are: none here
        self._on_queued = on_queued

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def claim_within(self, session: Session, inputs: dict[str, RunInput]) -> list[Run]:
        return []

    def submitted(self, inputs: dict[str, RunInput], claimed: list[Run] | None = None) -> None:
        if self._on_queued is None:
            return
        try:
            self._on_queued()
        except Exception:  # the workers poll the database anyway: a lost nudge only delays
            log.exception("could not notify the workers of queued runs")

    def cancel(self, run_id: str) -> None:
        pass
