"""The SLO autoscaling policy (``cost.autoscale``) and the autoscaling simulator (``cost.autoscale_sim``), no Ray.

The policy tests use a hand-made replica profile (round numbers, so what should happen is plain); the simulator tests
replay a small bursty trace on Llama 2 7B over L4s priced by the planner, and assert how the policies compare, not
the numbers they reach.
"""

from __future__ import annotations

import random
import statistics

import pytest

from app.cli.main import main
from cost import load_catalog
from cost.autoscale import (AutoscaleSettings, Mix, PolicyState, ReplicaProfile, SLOTarget, Window, decide, erlang_c,
                            predict)
from cost.autoscale_sim import AUTOSCALERS, compare_autoscalers
from cost.simulator import Pool
from cost.workloads import builtin_workload
from strategies.shapes import CATALOG

SLO = SLOTarget(ttft_s=1.0, tpot_s=0.1, percentile=0.9)
SETTINGS = AutoscaleSettings(min_replicas=1, max_replicas=32, cold_start_s=30, window_s=30, downscale_delay_s=60)
# A replica: prefill 20 ms + 0.1 ms per token, decode step 30 ms + 0.2 ms per sequence, KV for 8K tokens.
PROFILE = ReplicaProfile(
    name="toy", devices=1, kv_capacity_tokens=8_000, max_seqs=64, max_batched_tokens=4096,
    prefill_batches=(1,), prefill_tokens=(1, 4096), prefill_s=((0.0201, 0.02 + 0.4096),),
    decode_batches=(1, 64), decode_contexts=(1, 4096), decode_s=((0.0302, 0.0302), (0.0428, 0.0428)))


def window(rate: float, span: float = 30.0, ramp: float = 0.0, prompt: int = 500, output: int = 100,
           seed: int = 0) -> Window:
    """Poisson arrivals over the last ``span`` seconds at ``rate``, rising by ``ramp`` req/s per second."""
    rng, ts, t = random.Random(seed), [], -span
    while True:  # thinning: candidates at the window's top rate, kept at the rate of their moment (t ≤ 0)
        t += rng.expovariate(rate)
        if t >= 0:
            break
        if rng.random() < max(0.0, rate + ramp * t) / rate:
            ts.append(t)
    return Window(span_s=span, arrivals_s=ts, prompt_tokens=[prompt] * len(ts), output_tokens=[output] * len(ts))


def test_erlang_c_and_predictions_behave():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = ρ
    assert erlang_c(4, 5.0) == 1.0 and erlang_c(4, 0.0) == 0.0
    mix = Mix.of(window(20), PROFILE, SLO.percentile)
    preds = [predict(c, 20, mix, PROFILE, SLO) for c in range(1, 12)]
    finite = [p.ttft_s for p in preds if p.ttft_s < float("inf")]
    assert preds[0].limit and finite == sorted(finite, reverse=True)  # one replica is overloaded; more only help
    assert preds[-1].ttft_s >= preds[-1].ttft_floor_s


def test_scales_up_on_a_rising_rate_before_the_slo_breaks():
    rising = window(12, ramp=0.25)  # 12 req/s now (4.5 at the window's start): 19.5 req/s one cold start ahead
    mix = Mix.of(rising, PROFILE, SLO.percentile)
    enough = next(c for c in range(1, 40) if predict(c, rising.rate, mix, PROFILE, SLO).meets(SLO, SETTINGS.up_headroom))
    now = predict(enough, rising.rate, mix, PROFILE, SLO)
    assert now.ttft_s <= SLO.ttft_s and now.tpot_s <= SLO.tpot_s  # enough for today's rate ...
    flat = decide(0, enough, window(rising.rate), PROFILE, SLO, SETTINGS)
    assert flat.desired == enough and flat.reason.startswith("hold")  # ... and a flat rate keeps it
    up = decide(0, enough, rising, PROFILE, SLO, SETTINGS)
    assert up.desired > enough and up.reason.startswith("up:")  # the rate one cold start ahead will not be: scale now
    assert f"forecast {SETTINGS.cold_start_s:.0f}s ahead" in up.reason


def test_queued_requests_and_scale_from_zero():
    empty = Window(span_s=30, queued=3)
    assert decide(0, 0, empty, PROFILE, SLO, SETTINGS.model_copy(update={"min_replicas": 0})).desired == 1
    calm = window(10)
    backlog = calm.model_copy(update={"queued": 300})
    assert decide(0, 4, backlog, PROFILE, SLO, SETTINGS).desired > decide(0, 4, calm, PROFILE, SLO, SETTINGS).desired


def test_scales_down_only_after_the_cooldown_and_with_hysteresis():
    quiet = window(2)
    first = decide(100, 10, quiet, PROFILE, SLO, SETTINGS)
    assert first.desired == 10 and first.state.down_since_s == 100 and "cooling down" in first.reason
    early = decide(130, 10, quiet, PROFILE, SLO, SETTINGS, first.state)
    assert early.desired == 10 and early.state.down_since_s == 100
    late = decide(160, 10, quiet, PROFILE, SLO, SETTINGS, early.state)
    assert 1 <= late.desired < 10 and late.reason.startswith("down:")
    # In the band (enough under the up threshold, not under the down one) it holds and the cooldown restarts.
    mix = Mix.of(window(20), PROFILE, SLO.percentile)
    c = next(c for c in range(1, 40) if predict(c, 20, mix, PROFILE, SLO).meets(SLO, SETTINGS.up_headroom))
    assert not predict(c - 1, 20, mix, PROFILE, SLO).meets(SLO, SETTINGS.down_headroom)
    held = decide(500, c, window(20), PROFILE, SLO, SETTINGS, PolicyState(down_since_s=0))
    assert held.desired == c and held.state.down_since_s is None


def test_never_below_min_replicas():
    settings = SETTINGS.model_copy(update={"min_replicas": 3, "downscale_delay_s": 0})
    idle = Window(span_s=30)
    assert decide(0, 8, idle, PROFILE, SLO, settings).desired == 3
    assert decide(0, 3, window(0.2), PROFILE, SLO, settings).desired == 3
    with pytest.raises(ValueError, match="min_replicas"):
        AutoscaleSettings(min_replicas=5, max_replicas=2)


def test_a_calibrated_profile_scales_prefill_and_decode_apart():
    assert PROFILE.single_prefill_time(1000) == pytest.approx(0.12)  # fills the original's memo
    slower = PROFILE.calibrated(prefill_speed=2.0, decode_speed=3.0, kv_capacity_tokens=100)
    assert slower.single_prefill_time(1000) == pytest.approx(0.24)  # not the original's memo
    assert slower.decode_time(1, 100) == pytest.approx(3 * PROFILE.decode_time(1, 100))
    assert slower.kv_capacity_tokens == 100 and PROFILE.kv_capacity_tokens == 8_000


def test_at_max_replicas_a_pool_that_needs_more_says_so():
    capped = SETTINGS.model_copy(update={"max_replicas": 1})
    busy = decide(0, 1, window(40), PROFILE, SLO, capped)
    assert busy.desired == 1 and busy.reason.startswith("hold: at max_replicas 1") and "overload" in busy.reason
    assert decide(0, 1, window(1), PROFILE, SLO, capped).reason.startswith("hold: 1 replicas")


def test_bursty_workload_rises_falls_and_clumps():
    a = builtin_workload("bursty", 3000, rate=10, burstiness=4, seed=3)
    assert a == builtin_workload("bursty", 3000, rate=10, burstiness=4, seed=3)
    end = a[-1].arrival_s
    thirds = [sum(1 for r in a if k * end / 3 <= r.arrival_s < (k + 1) * end / 3) for k in range(3)]
    assert thirds[1] > 1.5 * thirds[0] and thirds[1] > 1.5 * thirds[2]

    def scv(reqs):
        gaps = [b.arrival_s - x.arrival_s for x, b in zip(reqs, reqs[1:])]
        return statistics.variance(gaps) / statistics.mean(gaps) ** 2

    assert scv(a) > 2 * scv(builtin_workload("bursty", 3000, rate=10, burstiness=1, seed=3))


def test_every_gpu_in_the_catalog_has_a_price():
    assert all(hw.price_per_hour and hw.price_per_hour > 0 for name, hw in load_catalog().items() if name != "cpu")


@pytest.fixture(scope="module")
def bursty_run():
    reqs = builtin_workload("bursty", 1200, rate=6, burstiness=2, seed=1)
    pool = Pool(hardware=load_catalog()["L4"], devices=1, replicas=8)
    settings = AutoscaleSettings(max_replicas=16, cold_start_s=20, downscale_delay_s=30)
    return {r.autoscaler: r for r in compare_autoscalers(CATALOG["llama2-7b"], [pool], reqs, slo=SLO,
                                                         settings=settings, initial_replicas=3)}


def test_slo_policy_meets_the_slo_with_fewer_replica_hours_than_serve_default(bursty_run):
    slo, serve = bursty_run["slo"], bursty_run["serve-default"]
    assert slo.completed == 1200 and slo.rejected == 0
    assert slo.slo_attainment >= 0.95
    assert slo.slo_attainment >= serve.slo_attainment
    assert slo.replica_hours < serve.replica_hours
    assert slo.cost_usd == pytest.approx(slo.replica_hours * 0.80)  # the catalog's L4 price, one device a replica
    assert all(e.replicas_to >= 1 and e.reason for e in slo.events)
    assert any(e.replicas_to < e.replicas_from for e in slo.events)  # it also scales down after the peak
    assert bursty_run["fixed"].peak_replicas == 8 and not bursty_run["fixed"].events


def test_cli_prints_the_autoscaling_table(tmp_path, capsys):
    f = tmp_path / "trace.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{i * 0.5},{200 + 50 * i},16\n"
                                                                       for i in range(40)))
    assert main(["simulate", "--model", "llama2-7b", "--pool", "L4:1:2", "--workload", str(f), "--autoscale", "all",
                 "--cold-start", "5", "--max-replicas", "4"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in AUTOSCALERS if name != "slo-cheapest") and "replica-h" in out
    assert "SLO met" in out and "slo against serve-default" in out
    assert "slo-cheapest" not in out  # the same as slo with one pool
    assert main(["simulate", "--model", "llama2-7b", "--pool", "L4:1:2", "--pool", "A10G:1:1", "--workload", str(f),
                 "--autoscale", "all", "--cold-start", "5", "--max-replicas", "4"]) == 0
    assert "slo-cheapest" in capsys.readouterr().out
    assert main(["simulate", "--model", "llama2-7b", "--pool", "L4:1", "--workload", str(f), "--autoscale", "nope"])
    assert "--autoscale takes slo, slo-cheapest, serve-default, fixed or all" in capsys.readouterr().err


# -- several pools: where growth goes, where requests spill (``cost.growth``) ----------------------------------------


def view(name: str, profile: ReplicaProfile, price: float | None, rate: float, current: int = 1,
         max_replicas: int = 32, context: int = 8_000):
    """A pool at a control tick with ``decide``'s own answer for ``rate`` req/s of 500-token prompts."""
    from cost.growth import PoolView

    settings = SETTINGS.model_copy(update={"max_replicas": max_replicas})
    w = window(rate)
    return PoolView(name=name, profile=profile, slo=SLO, settings=settings, current=current, context_tokens=context,
                    price_per_replica_hour=price, window=w, decision=decide(0.0, current, w, profile, SLO, settings))


def test_growth_goes_to_the_pool_that_carries_the_overflow_cheapest():
    from cost.growth import place_growth

    half = PROFILE.calibrated(prefill_speed=2.0, decode_speed=2.0)  # half the speed
    busy = view("busy", PROFILE, 4.0, rate=30)  # needs more than its one replica
    assert busy.decision.desired > 1
    # a sibling at half the speed for a tenth of the price carries a request/s for a fifth: it grows instead
    placed = place_growth([busy, view("cheap", half, 0.4, rate=1)])
    assert placed["busy"].desired == 1 and placed["busy"].reason.startswith("hold: pool cheap takes")
    assert placed["cheap"].desired > 1 and "for pool busy's overflow" in placed["cheap"].reason
    # at the same price the slower sibling costs more per request: growth stays home
    placed = place_growth([busy, view("slow", half, 4.0, rate=1)])
    assert placed["busy"].desired == busy.decision.desired and placed["slow"].desired == 1
    # a sibling that cannot hold the requests, has no replica to spill to, or no room, takes nothing
    for other in (view("cheap", half, 0.4, rate=1, context=400), view("cheap", half, 0.4, rate=1, current=0),
                  view("cheap", half, 0.4, rate=1, max_replicas=1)):
        assert place_growth([busy, other])["busy"].desired == busy.decision.desired
    # unpriced pools compare device-hours: a 2-device replica at the same speed costs twice a 1-device one
    double = PROFILE.model_copy(update={"devices": 2})
    assert place_growth([busy, view("double", double, None, rate=1)])["busy"].desired == busy.decision.desired


def test_a_pool_queued_past_its_objective_spills_while_another_meets_its_own():
    from cost.growth import Option, spill

    fast_now, fast_queued, cheap = Option(0.3, 0.0, 2.3, 1.0), Option(3.3, 3.0, 5.3, 1.0), Option(0.8, 0.0, 6.8, 1.0)
    assert spill([fast_now, cheap]) == 0 and spill([fast_queued, cheap]) == 1
    assert spill([fast_queued, Option(1.5, 0.0, 6.8, 1.0)]) == 0  # nobody timely: the earliest finish
    assert spill([Option(3.3, 0.0, 5.3, 1.0), cheap]) == 0  # late without a queue: no scale-up to wait out
    assert spill([Option(3.3, 3.0, 5.3, None), cheap]) == 0  # no objective, nothing to break
    assert spill([fast_queued._replace(grows=False), cheap]) == 0  # at its max_replicas: no scale-up to wait out


def test_the_simulator_places_growth_across_pools_and_serves_every_request():
    from cost.autoscale_sim import run_autoscaler

    reqs = builtin_workload("bursty", 1200, rate=12, burstiness=2, seed=2)
    pools = [Pool(hardware=load_catalog()[hw], devices=1, replicas=1) for hw in ("A100-80GB-SXM", "L4")]
    settings = AutoscaleSettings(max_replicas=16, cold_start_s=20, downscale_delay_s=30)
    res = {a: run_autoscaler(CATALOG["llama2-7b"], pools, reqs, a, slo=SLO, settings=settings, initial_replicas=1)
           for a in ("slo", "slo-cheapest")}
    for r in res.values():
        assert r.completed == 1200 and r.rejected == 0 and r.slo_attainment >= 0.95
    assert any("overflow" in e.reason for e in res["slo-cheapest"].events)
    assert not any("overflow" in e.reason for e in res["slo"].events)
