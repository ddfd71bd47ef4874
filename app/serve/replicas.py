"""Engine replicas as Serve deployments: thin shells around an ``EngineLoop``.

Each replica owns the placement group Serve reserved for it (``placement_group_bundles``: one bundle per device):
it is rank 0 in bundle 0 and starts its shard workers there, rank r in bundle r. Three kinds share one shell:
``EngineReplica`` (aggregated: prefill and decode), ``PrefillReplica`` and ``DecodeReplica`` (a disaggregated
pool's two halves). Requests and updates are plain dicts / dataclasses so the ingress needs nothing from the engine
but this interface. Each also reports to Serve's autoscaler (``record_autoscaling_stats``) what the ``slo`` policy
sizes its pool from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from ray import serve

from app.engine.build import EngineOptions, build_engine
from app.engine.disagg import DecodeEngine, PrefillEngine
from app.engine.llm_engine import LLMEngine
from app.engine.loop import EngineLoop
from app.engine.messages import Handoff, Update
from app.engine.params import SamplingParams
from app.serve.load import DECODE_ROLE, HEARTBEAT_S, REPORT_S
from app.serve.metrics import set_kv_usage, set_prediction_errors, set_queued_tokens
from app.serve.slo_policy import Traffic

logger = logging.getLogger("ray.serve")


class _EngineShell:
    engine_class: type[LLMEngine] = LLMEngine
    role = ""  # a disaggregated pool's decode replicas report their load apart from its prefill replicas'
    loop: EngineLoop | None = None  # None until the engine has started (``__del__`` may run before)
    _report: asyncio.Task | None = None  # the load reports, once the engine has started

    @property
    def load_key(self) -> str:
        return f"{self.pool}{self.role}"

    def __init__(self, pool: str, opts: EngineOptions, bundle: dict, board=None):
        import ray

        self.pool, self.board = pool, board
        self.traffic, self.block_size = Traffic(), opts.block_size
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.actor_id = ray.get_runtime_context().get_actor_id() or ""
        t0 = time.perf_counter()
        engine = build_engine(opts, placement_group=ray.util.get_current_placement_group(), bundle=bundle,
                              engine_class=self.engine_class)
        t1 = time.perf_counter()
        self.available = engine.contenders  # the layouts a request may run here (the ingress prices them too)
        self.dtype = engine.group.dtype_name()  # what the pool's dtype (``auto`` by default) resolved to
        if engine.predictor is not None:  # first-use steps (buffers allocated, other replicas starting) teach nothing
            engine.predictor.learning = False
        for strategy in self.available:  # first use allocates buffers: not on a user's request
            engine.generate([[0] * 8], SamplingParams(max_tokens=2, ignore_eos=True), strategy=strategy)
        t2 = time.perf_counter()
        self._measure_step(engine)
        # the slo policy's prefill calibration (a decode-only engine takes no prompts from users: nothing to calibrate)
        self.prefill_speed = 1.0 if self.role else self._prefill_speed(engine)
        if engine.predictor is not None:
            engine.predictor.learning = True
        t3 = time.perf_counter()
        logger.info("pool %s: engine ready in %.1f s (workers, weights and KV cache %.1f s; first use of %d layouts "
                    "%.1f s; step and prefill measured %.1f s)", pool, t3 - t0, t1 - t0, len(self.available), t2 - t1,
                    t3 - t2)
        # this replica's processes (memory checks, fault drills): its own (rank 0), then its shard workers' (ranks 1..)
        self.pids = list(dict.fromkeys([os.getpid(), *engine.group.pids()]))
        self.loop = EngineLoop(engine, name=f"engine-{pool}", replica=self.replica_id)
        self._report = asyncio.get_event_loop().create_task(self._report_load())

    @staticmethod
    def _measure_step(engine: LLMEngine, steps: int = 6) -> None:
        """The decode step time this replica first reports (the router prices pools by it): the fastest of a few
        warm steps. Warm-up runs while the app's other replicas start on the same cores, and one slow first-use step
        in the average once made a 6-token prompt look cheaper on the 2-rank pool than on the 1-core one."""
        engine.add([0] * 8, SamplingParams(max_tokens=steps, ignore_eos=True))
        took = []
        while engine.has_work():
            t0 = time.perf_counter()
            engine.step()
            took.append(time.perf_counter() - t0)
        if len(took) > 1:  # the first step is the prefill (a prefill-only engine has no decode step)
            engine.step_s = min(took[1:])

    @staticmethod
    def _prefill_speed(engine: LLMEngine) -> float:
        """A warm prefill of up to 128 tokens, measured over what the planner predicts for it (the ``slo`` policy
        scales its profile's prefill times by this: the decode step says little about the GEMMs of a prefill)."""
        n = min(128, engine.scheduler.config.max_num_batched_tokens, engine.max_model_len - 2)
        engine.add([1] * n, SamplingParams(max_tokens=1, ignore_eos=True))  # not [0]: no prefix-cache hit
        t0 = time.perf_counter()
        engine.step()
        took = time.perf_counter() - t0
        while engine.has_work():
            engine.step()
        predicted = engine.predict_prefill_s(n)
        return took / predicted if predicted > 0 else 1.0

    async def _report_load(self) -> None:
        """The load gauges, and this replica's load on the app's ``LoadBoard`` (admission control reads it): looked at
        every ``REPORT_S``, sent when it changed or a ``HEARTBEAT_S`` passed (an idle replica costs the board and the
        metrics agent next to nothing)."""
        sent, sent_at = None, 0.0
        while True:
            load = dataclasses.replace(self.loop.load, replica=self.replica_id, actor=self.actor_id,
                                       failed=not self.loop.alive)
            now = time.monotonic()
            if load != sent or now - sent_at >= HEARTBEAT_S:
                set_queued_tokens(self.pool, load.waiting_prompt_tokens)
                set_kv_usage(self.pool, load.prefix_hit_rate, load.total_blocks - load.free_blocks, load.preemptions)
                if self.board is not None:
                    self.board.report.remote(self.replica_id, self.load_key, load)
                sent, sent_at = load, now
            if (predictor := self.loop.engine.predictor) is not None and (errors := predictor.drain_errors()):
                set_prediction_errors(self.pool, errors)
            await asyncio.sleep(REPORT_S)

    def info(self) -> dict:
        """What the ingress needs to pick a pool: the strategies this replica can run, and its load; also the sequences
        holding KV blocks and its processes, for operators and the reliability tests (a finished or aborted request
        holds none)."""
        import ray

        engine = self.loop.engine
        return {"pool": self.pool, "replica": self.replica_id, "available": self.available, "dtype": self.dtype,
                "queued_tokens": self.loop.queued_tokens(),
                "node": ray.get_runtime_context().get_node_id(), "seqs_in_use": engine.seqs_in_use(),
                "running": len(engine.running), "pids": self.pids, "healthy": self.loop.alive,
                "load": dataclasses.asdict(self.loop.load)}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve's controller hands the ``slo`` policy (``slo_policy.py``): this replica's traffic counters, its
        engine's queue, running batch, KV room and measured step time, and its prefill speed (measured at start: the
        steps under load time prefill chunks and decode together)."""
        load = self.loop.load
        return self.traffic.stats(load.waiting, load.running, load.step_s, self.prefill_speed,
                                  load.total_blocks * self.block_size)

    def check_health(self) -> None:
        """Serve restarts a replica whose engine thread died (e.g. a shard worker crashed)."""
        if not self.loop.alive:
            raise RuntimeError(f"engine of pool {self.pool} stopped: {self.loop.error!r}")

    def __del__(self):
        """Serve stopping this replica (scaled down, redeployed): it stops reporting first, so that its engine
        stopping is not reported as a failure, and takes its load off the board (were that call lost, the board
        drops the last report after ``STALE_S``)."""
        if self._report is not None:
            self._report.cancel()
            self._report = None
            if self.board is not None:
                self.board.withdraw.remote(self.replica_id)
        if self.loop is not None:
            self.loop.stop()
            if self.loop.engine.predictor is not None:  # what it learned since the last periodic save
                self.loop.engine.predictor.save()
            self.loop.engine.group.shutdown()


@serve.deployment
class EngineReplica(_EngineShell):
    async def generate(self, prompt_ids: list[int], params: dict, strategy: str = "auto") -> AsyncIterator[Update]:
        sp = SamplingParams.model_validate(params)
        # aclosing: a caller that leaves while this generator waits at its yield (Serve throws CancelledError in
        # there) closes the engine's stream now, which aborts the sequence; a plain ``async for`` leaves that to the
        # garbage collector
        with self.traffic.request(len(prompt_ids), sp.max_tokens) as done:
            async with aclosing(self.loop.submit(lambda e: e.add(prompt_ids, sp, strategy))) as updates:
                async for update in updates:
                    done.tokens = update.completion_tokens
                    yield update

    async def generate_whole(self, prompt_ids: list[int], params: dict, strategy: str = "auto") -> Update:
        """The whole answer as one update (non-streaming requests: one message, not one per step)."""
        sp = SamplingParams.model_validate(params)
        with self.traffic.request(len(prompt_ids), sp.max_tokens) as done:
            update = await self.loop.run_whole(lambda e: e.add(prompt_ids, sp, strategy))
            done.tokens = update.completion_tokens
            return update


@serve.deployment
class PrefillReplica(_EngineShell):
    engine_class = PrefillEngine

    async def prefill(self, prompt_ids: list[int], params: dict, strategy: str = "auto") -> Update:
        """The first token; its ``handoff`` carries the K/V references when the request wants more tokens."""
        sp = SamplingParams.model_validate({**params, "max_tokens": min(1, params["max_tokens"])})  # 0: prompt only
        with self.traffic.request(len(prompt_ids), params["max_tokens"]) as done:  # the mix: what decode will make
            done.tokens = params["max_tokens"]
            return await self.loop.run_whole(lambda e: e.add(prompt_ids, sp, strategy))


@serve.deployment
class DecodeReplica(_EngineShell):
    engine_class = DecodeEngine
    role = DECODE_ROLE

    async def decode(self, handoff: Handoff, params: dict) -> AsyncIterator[Update]:
        sp = SamplingParams.model_validate(params)
        async with aclosing(self.loop.submit(lambda e: e.adopt(handoff, sp))) as updates:  # as ``generate``'s
            async for update in updates:
                yield update

    async def decode_whole(self, handoff: Handoff, params: dict) -> Update:
        sp = SamplingParams.model_validate(params)
        return await self.loop.run_whole(lambda e: e.adopt(handoff, sp))
