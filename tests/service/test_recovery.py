"""Durability: SIGKILL the server with runs queued and running and callbacks pending,
restart it on the same data dir, and every run still ends (and every callback arrives);
SIGKILL the engine process under running runs, and they run again on a new one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

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
        # A callback attempt in flight when the server is killed is tried again after its
        # timeout plus this margin (30 s by default): here a few seconds, not a wait.
        INCONTEXT_CALLBACK_TIMEOUT_SECONDS="2",
        INCONTEXT_CALLBACK_CLAIM_MARGIN_SECONDS="1",
    )
    srv = Server(data_dir, env)
    key = create_key(data_dir)
    receiver = Receiver(fail_first=10**6)  # refuse every callback until the restart
    srv.start()
    try:
        with srv.client(key) as api:
            def submit(steps, images=1):
                body = {"input": {"prompt": "p", "image_url": data_uri(), "num_inference_steps": steps, "num_images": images},
                        "callback_url": receiver.url}
                r = api.post(f"/v1/models/{MODEL}/runs", json=body)
                assert r.status_code == 201
                return r.json()["id"]

            quick = submit(1)
            assert wait_run(api, quick)["status_code"] == "succeeded"
            wait_for(lambda: receiver.requests)  # its callback failed once and waits for a retry
            slow = [submit(50, images=4) for _ in range(5)]  # slow enough that none ends before the kill
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


def engine_child(srv) -> int:
    """The pid of the server's engine process (engine/process.py), read from /proc."""
    def children() -> list[int]:
        pids = []
        for task in Path(f"/proc/{srv.proc.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    (pid,) = wait_for(children, timeout=60)
    return pid


def test_runs_in_flight_when_the_engine_process_dies_are_requeued_then_fail_cleanly(tmp_path, tiny_model):
    """SIGKILL the engine child (as the OOM killer would) with two runs on it: both go back to
    the queue and a new child runs them. A run the engine dies on INCONTEXT_ENGINE_MAX_ATTEMPTS
    times fails with ENGINE_CRASHED instead of killing engines forever."""
    data_dir = tmp_path / "data"
    env = server_env(tiny_model, INCONTEXT_ENGINE_MAX_ATTEMPTS="2", INCONTEXT_PROGRESS_LOG_EVERY_STEPS="1")
    srv = Server(data_dir, env)
    key = create_key(data_dir)
    srv.start()
    stopped: list[int] = []
    try:
        with srv.client(key) as api:
            def submit() -> str:
                body = {"input": {"prompt": "p", "image_url": data_uri(), "num_inference_steps": 50}}
                r = api.post(f"/v1/models/{MODEL}/runs", json=body)
                assert r.status_code == 201, r.text
                return r.json()["id"]

            def messages(run_id: str) -> list[str]:
                return [log["message"] for log in api.get(f"/v1/runs/{run_id}/logs").json()["items"]]

            def stop_the_engine_mid_run(run_ids: list[str], after_requeues: int) -> int:
                """SIGSTOP the engine once every run has denoised a step since its last requeue
                (so the kill lands mid-run however fast the steps are), then return its pid."""
                def mid_run() -> bool:
                    for run_id in run_ids:
                        logs = messages(run_id)
                        requeues = [i for i, m in enumerate(logs) if m.startswith("requeued:")]
                        if len(requeues) != after_requeues or not any(m.startswith("step ") for m in logs[(requeues or [0])[-1]:]):
                            return False
                    return True

                wait_for(mid_run, timeout=240, interval=0.01)
                pid = engine_child(srv)
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
                assert all(api.get(f"/v1/runs/{r}").json()["status_code"] == "running" for r in run_ids)
                return pid

            def kill(pid: int) -> None:
                os.kill(pid, signal.SIGKILL)
                stopped.remove(pid)

            first, second = submit(), submit()
            kill(stop_the_engine_mid_run([first, second], after_requeues=0))
            # Both were requeued and a fresh engine process finished them.
            for run_id in (first, second):
                assert wait_run(api, run_id, timeout=300)["status_code"] == "succeeded"
                logs = messages(run_id)
                assert "requeued: the engine process stopped during the request (exit code -9) (attempt 1 of 2)" in logs, logs
                assert logs[-1] == "succeeded"

            # A second death on the same run is its last: it fails, costs nothing, and says why.
            doomed = submit()
            kill(stop_the_engine_mid_run([doomed], after_requeues=0))
            kill(stop_the_engine_mid_run([doomed], after_requeues=1))
            run = wait_run(api, doomed, timeout=120)
            assert (run["status_code"], run["failure_code"], run["failure_stage_code"], run["cost"]) == (
                "failed", "ENGINE_CRASHED", "inference", "0.00"
            )
            assert run["failure_message"].startswith("the engine stopped 2 times while it had this run")
    finally:
        for pid in stopped:  # a failed assertion must not leave a stopped engine behind
            os.kill(pid, signal.SIGKILL)
        srv.stop()
