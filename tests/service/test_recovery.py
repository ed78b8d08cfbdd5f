"""Durability: SIGKILL the server with runs queued and running and callbacks pending,
restart it on the same data dir, and every run still ends (and every callback arrives)."""

from __future__ import annotations

import pytest

from .helpers import Receiver, Server, create_key, data_uri, server_env, wait_for, wait_run
from incontext.client import Client, RunFailed

MODEL = "flux-pro/kontext"


def test_sigkill_and_restart(tmp_path, tiny_model):
    data_dir = tmp_path / "data"
    env = server_env(
        tiny_model,
        INCONTEXT_MAX_CONCURRENT_RUNS_PER_MODEL="2",
        INCONTEXT_PROGRESS_LOG_EVERY_STEPS="1",
        INCONTEXT_CALLBACK_MAX_ATTEMPTS="100",
    )
    srv = Server(data_dir, env)
    key = create_key(data_dir)
    receiver = Receiver(fail_first=10**6)  # refuse every callback until the restart
    srv.start()
    try:
        with srv.client(key) as api:
            def submit(steps):
                body = {"input": {"prompt": "p", "image_url": data_uri(), "num_inference_steps": steps}, "callback_url": receiver.url}
                r = api.post(f"/v1/models/{MODEL}/runs", json=body)
                assert r.status_code == 201
                return r.json()["id"]

            quick = submit(1)
            assert wait_run(api, quick)["status_code"] == "succeeded"
            wait_for(lambda: receiver.requests)  # its callback failed once and waits for a retry
            slow = [submit(50) for _ in range(5)]
            running = wait_for(lambda: [r for r in slow if api.get(f"/v1/runs/{r}").json()["status_code"] == "running"], timeout=120)
            statuses = {r: api.get(f"/v1/runs/{r}").json()["status_code"] for r in slow}
            assert list(statuses.values()).count("queued") >= 3, statuses

        srv.kill()
        # The queued runs' inputs, handed to the dispatcher in memory, died with the process:
        # after the restart they run from storage. One interrupted run loses its input file:
        # it must fail clearly, not hang.
        lost = running[0]
        (data_dir / "inputs" / lost).unlink()
        receiver.fail_first = 0
        delivered_from = len(receiver.requests)
        srv.start()

        with srv.client(key) as api:
            for run_id in slow:
                run = wait_run(api, run_id, timeout=300)
                if run_id == lost:
                    assert run["status_code"] == "failed"
                    assert (run["failure_code"], run["failure_stage_code"]) == ("INPUT_LOST", "dispatch")
                    assert run["cost"] == "0.00"
                else:
                    assert run["status_code"] == "succeeded", run
                    assert run["output"]["outputs"][0]["url"]
            interrupted = [r for r in slow if r != lost and statuses[r] == "running"]
            for run_id in interrupted:
                messages = [log["message"] for log in api.get(f"/v1/runs/{run_id}/logs").json()["items"]]
                assert "requeued after a restart" in messages

        with Client(srv.url, key) as client:
            with pytest.raises(RunFailed) as failed:
                client.wait(lost, timeout=5)
            assert failed.value.failure_code == "INPUT_LOST"

        # Every run's callback arrives, including the one pending before the crash.
        def delivered():
            events = {b["run_id"]: b["event"] for b in receiver.bodies()[delivered_from:]}
            return events if set(events) == {quick, *slow} else None

        events = wait_for(delivered, timeout=120)
        assert events[lost] == "run.failed" and events[quick] == "run.completed"
    finally:
        srv.stop()
        receiver.close()
