"""Pricing a pool for a request (``app.serve.pricing``): pure arithmetic over the pool's loads and config, checked
here without Ray, a cluster or a checkpoint (the catalog's shapes, the hardware catalog, hand-made load reports)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from app.engine.predictor import guessed_step_s
from app.engine.messages import EngineLoad
from app.serve import pricing
from app.serve.config import PoolConfig
from app.serve.feedback import RouteFeedback
from app.serve.pricing import PoolLoad, backlog, cached_tokens, decode_step_s, predicted_ttft, prefix_capacity, price
from cost import decode_step_time, get_hardware, plan_prefill
from cost.correction import StepKey
from strategies.shapes import model_shape

SHAPE = model_shape("smollm2-135m")
POOL = PoolConfig(name="p", devices=1, max_num_seqs=2, max_model_len=1024)
HW = POOL.priced_hardware()
NAMED = ["megatron", "weight_gathered", "projection_replicated"]


def report(**kw) -> EngineLoad:
    return EngineLoad(max_seqs=POOL.max_num_seqs, **kw)


def test_pricing_imports_no_ray():
    """Pure means importable and testable without Ray: no Ray module, and of the Serve app only its config."""
    tree = ast.parse(Path(pricing.__file__).read_text())
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + \
              [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m.split(".")[0] == "ray"], modules
    assert {m for m in modules if m.startswith("app.serve")} <= {"app.serve.config"}, modules


def test_backlog_takes_whichever_source_says_more():
    """The board's reports lag a beat, this ingress's own counts miss the other ingresses: the larger of the two."""
    reported = PoolLoad(front=[report(waiting_prompt_tokens=300, slot_wait_s=0.05, step_s=0.02),
                               report(waiting_prompt_tokens=100, slot_wait_s=0.15, step_s=0.04)])
    assert backlog(POOL, SHAPE, HW, reported) == (200, pytest.approx(0.1))  # means over replicas
    reported.queued = 500
    assert backlog(POOL, SHAPE, HW, reported)[0] == 500
    # this ingress fills every slot of both replicas (2 x 2): the tokens left, spread over the slots, at the mean step
    reported.inflight = [[10, 0], [10, 2], [20, 10], [4, 4]]
    assert backlog(POOL, SHAPE, HW, reported)[1] == pytest.approx(0.03 * (10 + 8 + 10 + 0) / 4)


def test_backlog_before_any_report_uses_the_engines_first_guess():
    own = PoolLoad(inflight=[[9, 1], [5, 0]])  # one replica taken, both its slots in use
    step = guessed_step_s(SHAPE, HW, POOL.devices, POOL.max_model_len, POOL.max_num_seqs)
    assert backlog(POOL, SHAPE, HW, own) == (0, pytest.approx(step * 13 / 2))
    assert backlog(POOL, SHAPE, HW, PoolLoad(inflight=[[9, 1]])) == (0, 0.0)  # a slot free: no wait


def test_a_disaggregated_pool_waits_for_both_halves_and_decodes_at_its_decode_step():
    load = PoolLoad(front=[report(slot_wait_s=0.25, step_s=0.5)], decode=[report(slot_wait_s=1.0, step_s=0.01)])
    assert backlog(POOL, SHAPE, HW, load)[1] == pytest.approx(1.25)
    assert decode_step_s(POOL, SHAPE, HW, load, 100) == pytest.approx(0.01)
    assert decode_step_s(POOL, SHAPE, HW, PoolLoad(), 112) == decode_step_time(SHAPE, HW, 1, [112])


def test_a_decode_step_is_priced_at_the_batch_the_request_joins():
    """The step measured now, at the batch running now, scaled by the planner to the batch the request will decode
    in: the replicas' running and waiting sequences, or this ingress's own requests there when a burst outruns the
    reports, plus this one (at most ``max_num_seqs``)."""
    pool = POOL.model_copy(update={"max_num_seqs": 16})
    plan = lambda rows: decode_step_time(SHAPE, HW, 1, [112] * rows)  # noqa: E731
    load = PoolLoad(front=[report(step_s=0.1, running=4, waiting=2)])
    assert decode_step_s(pool, SHAPE, HW, load, 112) == pytest.approx(0.1 * plan(7) / plan(4))
    load.inflight = [[32, 0]] * 10
    assert decode_step_s(pool, SHAPE, HW, load, 112) == pytest.approx(0.1 * plan(11) / plan(4))
    load.inflight = [[32, 0]] * 40
    assert decode_step_s(pool, SHAPE, HW, load, 112) == pytest.approx(0.1 * plan(16) / plan(4))
    assert plan(11) > plan(4)  # the batch costs more
    assert decode_step_s(pool, SHAPE, HW, PoolLoad(inflight=[[32, 0]] * 3), 112) == pytest.approx(plan(4))


def test_cached_prefix_leaves_the_last_token_to_compute():
    assert cached_tokens(3, 100, 16) == 48
    assert cached_tokens(3, 48, 16) == 32  # all three blocks held, the last token is computed anyway
    assert prefix_capacity(PoolLoad()) == pricing.POOL_PREFIX_BLOCKS
    assert prefix_capacity(PoolLoad(front=[report(total_blocks=64), report(total_blocks=32)])) == 96


def test_a_route_is_its_first_token_then_its_decode_steps():
    load = PoolLoad(front=[report(step_s=0.02)], queued=400)
    route = price(POOL, SHAPE, HW, load, 100, 9, "auto", NAMED, cached=32, hashes=[1, 2])
    alone = plan_prefill(SHAPE, HW, 1, 68, available=NAMED, cached=32)
    batched = plan_prefill(SHAPE, HW, 1, [68, 400], available=NAMED, cached=[32, 0])
    wait = batched.time_s - alone.time_s
    assert route.wait_s == pytest.approx(wait)
    assert route.ttft_s == pytest.approx(alone.predicted_s[alone.strategy] + wait)
    assert route.predicted_s == pytest.approx(route.ttft_s + 8 * 0.02)
    assert (route.pool, route.cached_tokens, route.hashes) == (POOL, 32, [1, 2])
    pinned = predicted_ttft(POOL, SHAPE, HW, PoolLoad(), 100, "weight_gathered", NAMED)
    assert pinned[0] == pytest.approx(plan_prefill(SHAPE, HW, 1, 100, available=NAMED)
                                      .predicted_s["weight_gathered"])


def test_prompts_ahead_read_slowly_beside_streams_are_waited_for_as_the_replicas_say():
    """Beside decoding streams a replica reads its waiting prompts at the step budget's pace, slower than the planner's
    batched prefill of them: the route waits the planner's batched prefill plus what the replicas say the pace adds
    (mean over replicas), on top of any slot wait. A replica's lone prefill of its queue is not that: it prices each
    prompt's fixed costs apart, and a report lagging a beat behind a prompt already read (the CI run that found it:
    a cached follow-up sent away from the pool holding its prefix) must not outprice the planner's batch."""
    batched = plan_prefill(SHAPE, HW, 1, [100, 400], available=NAMED)
    alone = plan_prefill(SHAPE, HW, 1, 100, available=NAMED)
    planner = batched.time_s - alone.time_s
    paced = [report(waiting_prompt_tokens=400, wait_s=20.0, paced_s=12.5, slot_wait_s=0.5, step_s=0.02),
             report(waiting_prompt_tokens=400, wait_s=14.0, paced_s=6.5, slot_wait_s=0.5, step_s=0.02)]
    route = price(POOL, SHAPE, HW, PoolLoad(front=paced), 100, 1, "auto", NAMED)
    assert route.wait_s == pytest.approx(planner + 9.5 + 0.5)  # the mean reported pace's excess, then the slot wait
    unpaced = [report(waiting_prompt_tokens=400, wait_s=10 * planner, step_s=0.02)]
    assert price(POOL, SHAPE, HW, PoolLoad(front=unpaced), 100, 1, "auto", NAMED).wait_s == pytest.approx(planner)


def test_a_pool_whose_requests_end_later_than_priced_is_priced_later():
    """What happens after a request is priced (its prompt paced beside streams, more requests joining its batch) shows
    only in what it took: requests that took 1.5x their predicted first token and 1.3x their predicted decode step
    make the next route there 1.5x and 1.3x; its wait, what admission refuses by, stays the queue the replicas report;
    prompts of another size borrow the pool's figure; the uncorrected figures stay what the feedback learns from."""
    load = PoolLoad(front=[report(step_s=0.1)], queued=400)
    before = price(POOL, SHAPE, HW, load, 100, 9, "auto", NAMED)
    feedback = RouteFeedback()
    for _ in range(16):
        feedback.observe(POOL.name, 100, 0, *before.raw, 1.5 * before.raw[0], 1.3 * before.raw[1])
    after = price(POOL, SHAPE, HW, load, 100, 9, "auto", NAMED, learned=feedback.table())
    assert after.raw == before.raw == (before.ttft_s, before.step_s)
    assert after.ttft_s == pytest.approx(1.5 * before.ttft_s, rel=0.03) and after.wait_s == before.wait_s > 0
    assert after.step_s == pytest.approx(1.3 * before.step_s, rel=0.03)
    assert after.predicted_s == pytest.approx(after.ttft_s + 8 * after.step_s)
    longer = price(POOL, SHAPE, HW, load, 700, 9, "auto", NAMED, learned=feedback.table())
    assert longer.ttft_s == pytest.approx(1.5 * longer.raw[0], rel=0.05)
    feedback.observe(POOL.name, 100, 0, *before.raw, None, None)  # an answer too short to time: nothing learned
    assert feedback.table().steps() == 32  # 16 first tokens and 16 decode steps


def test_a_request_that_ended_well_is_told_to_the_router_with_its_route():
    """The ingress counts every request as it ends (``responses.done``); one answered 200 also goes back to what
    priced it (``Router.learn``), with the route it was priced by; a failed one says nothing of the price."""
    from app.serve.responses import Result, done

    route = price(POOL, SHAPE, HW, PoolLoad(), 100, 9, "auto", NAMED)
    told: list = []
    result = Result(pool=POOL.name, devices=1, route=route, learn=told.append)
    done(result, "503")
    assert told == []
    done(result)
    assert told == [result] and told[0].route is route


def test_a_pool_whose_memory_cannot_prefill_the_prompt_is_not_priced():
    tiny = get_hardware("L4").model_copy(update={"memory_gb": 0.05})
    assert price(POOL, SHAPE, tiny, PoolLoad(), 1000, 4, "auto", NAMED) is None


def test_a_pool_is_priced_by_what_its_replicas_learned_of_the_cost_model():
    """The replicas' reports carry their correction tables (pooled by steps): prefill is priced corrected, so
    admission compares the times the engines now predict for themselves (decode steps are priced as measured)."""
    slow = {"": (math.log(2.0), 50), "prefill": (math.log(2.0), 50)}
    load = PoolLoad(front=[report(correction=slow)])
    plain = predicted_ttft(POOL, SHAPE, HW, PoolLoad(), 300, "auto", NAMED)[0]
    assert predicted_ttft(POOL, SHAPE, HW, load, 300, "auto", NAMED)[0] == pytest.approx(2 * plain, rel=0.05)
    pooled = pricing.correction(PoolLoad(front=[report(correction=slow), report()],
                                         decode=[report(correction={"": (0.0, 50)})]))
    assert pooled.entries[""] == (pytest.approx(math.log(2.0) / 2), 100)
    assert pooled.factor(StepKey.of("megatron", "prefill", 300, 0)) > 1.5
