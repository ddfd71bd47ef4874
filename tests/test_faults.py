"""Failures as small as they can be: a request whose sampling fails ends with its own error; the other requests in
its batch, and the replica, go on.

The failure is real, not simulated: a checkpoint whose LM head has one NaN row makes every sampled (temperature > 0)
request's probabilities NaN, which ``torch.multinomial`` refuses, while greedy requests (argmax) still decode.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from conftest import local_engine, prompts_for

from app.engine.loop import EngineLoop
from app.engine.messages import SequenceFailed
from app.engine.params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True)


@pytest.fixture(scope="module")
def nan_head(tiny_models, tmp_path_factory) -> str:
    from safetensors.torch import load_file, save_file

    dest = tmp_path_factory.mktemp("nan") / "mha"
    shutil.copytree(tiny_models["mha"], dest)
    weights = next(Path(dest).glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["lm_head.weight"][7] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return str(dest)


def test_a_failed_sampling_ends_its_sequence_alone(nan_head):
    engine = local_engine(nan_head)
    prompt = prompts_for(512, lengths=(9,), seed=3)[0]
    greedy = [engine.add(prompt, GREEDY) for _ in range(2)]
    sampled = engine.add(prompt, SAMPLED)
    while engine.has_work():
        engine.step()
    assert sampled.finish_reason == "error" and "sampling failed" in sampled.error
    assert [(s.finish_reason, len(s.output_ids)) for s in greedy] == [("length", 8)] * 2
    assert engine.blocks.num_used == 0 and not engine.running  # its blocks were freed with it


def test_the_failed_request_gets_an_error_and_the_engine_serves_on(nan_head):
    loop = EngineLoop(local_engine(nan_head))
    prompt = prompts_for(512, lengths=(9,), seed=4)[0]

    async def both():
        async def sampled():
            return [u async for u in loop.submit(lambda e: e.add(prompt, SAMPLED))]

        results = await asyncio.gather(sampled(), loop.run_whole(lambda e: e.add(prompt, GREEDY)),
                                       return_exceptions=True)
        after = await loop.run_whole(lambda e: e.add(prompt, GREEDY))
        return results, after

    try:
        (failed, served), after = asyncio.run(both())
        assert isinstance(failed, SequenceFailed) and "sampling failed" in str(failed)
        assert served.finish_reason == "length" and len(served.token_ids) == 8
        assert after.finish_reason == "length" and loop.alive  # the replica is healthy
    finally:
        loop.stop()


def test_a_caller_cancelled_in_the_tick_its_update_lands_stops_its_generation(tiny_models):
    """A non-streamed request whose caller leaves (Serve cancels its task) must abort its sequence whenever the
    cancel lands, also in the event-loop tick where a step's update arrives. There, Python 3.11's
    ``asyncio.wait_for`` returned the update and dropped the cancel, and the generation ran to its end (CI: idle 9 s
    after the client left, all 256 tokens). The cancel is queued right behind the engine thread's third update."""
    loop = EngineLoop(local_engine(tiny_models["mha"]))
    prompt = prompts_for(512, lengths=(9,), seed=7)[0]
    long = SamplingParams(max_tokens=200, ignore_eos=True)

    async def leave() -> tuple[bool, float]:
        aio = asyncio.get_running_loop()
        task = asyncio.create_task(loop.run_whole(lambda e: e.add(prompt, long)))
        deliver, delivered = aio.call_soon_threadsafe, []

        def then_cancel(callback, *args, **kwargs):  # the engine thread hands each update over with this
            handle = deliver(callback, *args, **kwargs)
            delivered.append(callback)
            if len(delivered) == 3:
                deliver(task.cancel)
            return handle

        aio.call_soon_threadsafe = then_cancel
        try:
            await task
            cancelled = False
        except asyncio.CancelledError:
            cancelled = True
        finally:
            aio.call_soon_threadsafe = deliver
        t0 = time.monotonic()
        while loop.engine.has_work() and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.01)
        return cancelled, time.monotonic() - t0

    try:
        cancelled, idle_after_s = asyncio.run(leave())
        assert cancelled, "the caller's cancel was dropped: it got the whole answer"
        assert not loop.engine.has_work() and idle_after_s < 2.0, idle_after_s  # aborted, not run to 200 tokens
        assert asyncio.run(loop.run_whole(lambda e: e.add(prompt, GREEDY))).finish_reason == "length" and loop.alive
    finally:
        loop.stop()


def test_a_hung_worker_is_detected_by_the_step_watchdog(ray_session, chat_tiny):
    """A shard worker stopped (SIGSTOP: hung, not dead) mid-generation: the stuck step is given up after its deadline
    (the floor here), every request the replica held ends with ``EngineFailed`` rather than waiting for ever, new ones
    are refused at once, and the replica reports unhealthy (Serve replaces it)."""
    import os
    import signal
    import time

    from app.engine.build import EngineOptions, build_engine
    from app.engine.messages import EngineFailed

    engine = build_engine(EngineOptions(model=chat_tiny, devices=2, max_model_len=256,
                                        step_watchdog_floor_s=2.0, prefill_layouts="named"))
    loop = EngineLoop(engine)
    prompt = prompts_for(512, lengths=(9,), seed=5)[0]
    pid = engine.group.pids()[1]
    try:
        async def run() -> tuple[list, BaseException | None, float]:
            got, stopped_at = [], None
            try:
                async for update in loop.submit(lambda e: e.add(prompt, SamplingParams(max_tokens=200,
                                                                                         ignore_eos=True))):
                    got.append(update)
                    if stopped_at is None and len(got) == 2:
                        os.kill(pid, signal.SIGSTOP)
                        stopped_at = time.perf_counter()
            except EngineFailed as e:
                return got, e, time.perf_counter() - stopped_at
            return got, None, 0.0

        got, error, detected_s = asyncio.run(asyncio.wait_for(run(), 60))
        assert error is not None and "watchdog" in str(error), error
        assert 2.0 <= detected_s < 10.0, detected_s  # the floor, plus the watchdog's poll
        assert not loop.alive
        with pytest.raises(EngineFailed):
            asyncio.run(loop.run_whole(lambda e: e.add(prompt, GREEDY)))
    finally:
        os.kill(pid, signal.SIGCONT)
        loop.stop()
        engine.group.shutdown()


def test_a_request_that_fails_to_start_fails_alone(nan_head):
    """A request whose start fails (a bug here, not the client's mistake) gets that error, not a 400 and not a dead
    engine thread: the next request is served."""
    loop = EngineLoop(local_engine(nan_head))
    prompt = prompts_for(512, lengths=(9,), seed=6)[0]

    def broken(engine):
        raise KeyError("a bug while starting")

    async def both():
        with pytest.raises(KeyError):
            await loop.run_whole(broken)
        return await loop.run_whole(lambda e: e.add(prompt, GREEDY))

    try:
        after = asyncio.run(both())
        assert after.finish_reason == "length" and loop.alive
    finally:
        loop.stop()


def test_a_call_waiting_for_a_pool_whose_replicas_all_failed_is_given_up():
    """The ingress's side of a hung pool (no Ray): a call still waiting when the board shows every replica of its
    pool failed is cancelled with ``EngineFailed`` within a beat (retried elsewhere or 503), not left waiting for
    Serve's replacement; a pool with a live replica, or none reported yet, keeps its calls."""
    from app.engine.messages import EngineFailed, EngineLoad
    from app.serve.board_view import BoardView
    from app.serve.config import AppConfig
    from app.serve.dispatch import unless_failed
    from app.serve.failed_replicas import FAILED

    cfg = AppConfig.model_validate({"pools": [{"name": "b"}]})
    view = BoardView(cfg, board=object())  # its reader is never started: the reports are set here
    assert not view.failed("b") and view.serving(cfg.pools[0])  # nothing reported yet: starting, not failed
    view.reported = {"b": [EngineLoad(max_seqs=4, replica="r1"), EngineLoad(max_seqs=4, replica="r2")]}
    FAILED.add("r1")
    assert not view.failed("b") and view.serving(cfg.pools[0])  # r2 serves
    cancelled = []

    async def waiting():
        try:
            await asyncio.sleep(60)  # a call in Serve's request router, waiting for a replica
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def run():
        call = asyncio.ensure_future(unless_failed(waiting(), lambda: "pool b" if view.failed("b") else None))
        await asyncio.sleep(0.6)
        assert not call.done()
        FAILED.add("r2")  # the board now says r2 failed too
        return await asyncio.wait_for(call, 2)

    try:
        with pytest.raises(EngineFailed, match="every replica of pool b failed"):
            asyncio.run(run())
        assert cancelled and view.failed("b") and not view.serving(cfg.pools[0])
    finally:
        FAILED._ids.clear()
    assert asyncio.run(unless_failed(asyncio.sleep(0.3, "answer"), lambda: None)) == "answer"


def test_a_call_waiting_for_a_pool_whose_node_was_lost_is_given_up():
    """A pool whose node is lost: its replica's actor died (Serve's router drops it and then waits for a replacement
    no node can host), its report may still be fresh or may have aged out. Once the board says Serve counts no running
    replica of the deployment, a waiting call is given up (``EngineFailed``: retried elsewhere or 503), whatever the
    reports say; so is the decode half of a disaggregated pool whose decode deployment is lost."""
    from app.engine.messages import EngineFailed, EngineLoad
    from app.serve.board_view import BoardView
    from app.serve.config import AppConfig
    from app.serve.dispatch import unless_failed
    from app.serve.load import DECODE_ROLE

    cfg = AppConfig.model_validate({"pools": [{"name": "b"}, {"name": "d", "disaggregated": True}]})
    b, d = cfg.pools
    view = BoardView(cfg, board=object())  # its reader is never started: the board's state is set here
    view.reported = {"b": [EngineLoad(max_seqs=4, replica="r1")]}  # the dead replica's last report, still fresh

    async def given_up(pool, role: str) -> bool:
        lost = lambda: "lost" if view.gone(pool, role) else None  # noqa: E731
        call = asyncio.ensure_future(unless_failed(asyncio.sleep(60), lost))
        await asyncio.sleep(0.3)
        assert not call.done()  # nothing says the pool is gone yet: the call waits
        view.down = set(pool.deployments.values()) - ({"d-prefill"} if pool is d else set())
        try:
            await asyncio.wait_for(call, 2)
        except EngineFailed:
            return True
        finally:
            view.down = set()
        return False

    assert asyncio.run(given_up(b, "")) and not view.gone(b)
    view.down = {"b"}
    assert not view.serving(b) and view.serving(d)
    view.reported = {}  # the report aged out: still lost
    assert view.gone(b) and not view.serving(b)
    view.down = set()
    assert asyncio.run(given_up(d, DECODE_ROLE))  # only d's decode half lost
    view.down = {"d-decode"}
    assert view.gone(d, DECODE_ROLE) and not view.gone(d) and not view.serving(d)


def test_a_call_that_dies_with_its_replicas_actor_marks_that_replica_failed():
    """A node lost kills its replicas' actors: the call fails with ``RayActorError`` naming the actor, not the
    replica. The ingress finds the replica whose report carries that actor and skips it from then on, so the next
    request to a pool left without replicas is refused at once rather than sent to wait for a replacement."""
    from ray.exceptions import RayActorError

    from app.engine.messages import EngineLoad
    from app.serve.board_view import BoardView
    from app.serve.config import AppConfig
    from app.serve.dispatch import replica_failed
    from app.serve.failed_replicas import FAILED

    cfg = AppConfig.model_validate({"pools": [{"name": "b"}, {"name": "c"}]})
    view = BoardView(cfg, board=object())
    view.reported = {"b": [EngineLoad(max_seqs=4, replica="rb", actor="a1")],
                     "c": [EngineLoad(max_seqs=4, replica="rc", actor="a2")]}
    try:
        assert not replica_failed(ValueError("a bad request"), view) and view.serving(cfg.pools[0])
        assert replica_failed(RayActorError(actor_id="a1"), view)
        assert "rb" in FAILED and not view.serving(cfg.pools[0]) and view.serving(cfg.pools[1])
        assert replica_failed(RayActorError(actor_id="a9"), view) and view.serving(cfg.pools[1])  # unknown: none
        assert "" not in FAILED
    finally:
        FAILED._ids.clear()
