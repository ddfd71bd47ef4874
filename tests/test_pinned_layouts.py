"""A request that names a prefill layout (``x-dynpart-strategy``, gRPC ``strategy``, a ``static:`` policy) gets one
its engine built at start, or a 400 saying what runs: a serving step never builds a layout (issue 23, items 5 and 7).

The engine refuses an unbuilt label in ``add`` (the end-to-end check through Serve is in test_serve_api.py); the
in-process ``dynpart generate --prefill-strategy <label>`` builds its label before any step; the router refuses a
layout no pool can run, naming why, instead of calling it an overload.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from conftest import local_engine, reference_greedy

from app.engine.messages import RequestError
from app.engine.params import SamplingParams
from strategies.layout import STRATEGY_NAMES, check_strategy
from strategies.loader import Checkpoint

# Not on the Pareto front of the tiny chat model on 2 CPU devices, nor a named strategy: no engine builds it unasked.
LABEL = check_strategy("residual=TOK qkv=col attn=heads o=replicated gate_up=gathered down=replicated")
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def test_the_engine_refuses_a_layout_it_did_not_build(chat_tiny):
    engine = local_engine(chat_tiny, Checkpoint(chat_tiny).tokenizer(), max_model_len=64)
    with pytest.raises(RequestError, match="was not built when this engine started") as e:
        engine.add([1, 2, 3], GREEDY, strategy=LABEL)
    assert LABEL in str(e.value) and all(repr(s) in str(e.value) for s in engine.contenders)
    assert e.value.param == "strategy" and not engine.has_work()
    assert engine.generate([[1, 2, 3]], GREEDY, strategy="weight_gathered")[0].finish_reason == "length"


def test_a_pinned_layout_is_built_before_any_step_and_others_are_refused(ray_session, chat_tiny):
    """What ``dynpart generate --devices 2 --prefill-strategy <label>`` does: the label is built with the engine
    (within the budget, on every rank) and gives transformers' greedy tokens; a label it did not pin is refused."""
    from app.engine.build import EngineOptions, build_engine

    engine = build_engine(EngineOptions(model=chat_tiny, devices=2, max_model_len=64, max_num_seqs=1, dtype="float32"),
                          pinned=[LABEL])
    try:
        assert LABEL in engine.contenders and set(STRATEGY_NAMES) <= set(engine.contenders)  # static policies too
        prompt = [1, 504, 2988, 314, 2535, 42]
        seq = engine.generate([prompt], GREEDY, strategy=LABEL)[0]
        assert seq.prefill_strategy == LABEL and seq.output_ids == reference_greedy(chat_tiny, prompt, 6)
        other = LABEL.replace("gate_up=gathered", "gate_up=col")
        assert other not in engine.layouts
        with pytest.raises(RequestError, match="was not built"):
            engine.add(prompt, GREEDY, strategy=other)
    finally:
        engine.group.shutdown()


def test_a_pinned_layout_no_pool_can_hold_is_a_400_not_an_overload(chat_tiny):
    """A pool built ``projection_replicated`` but its devices' memory (as the planner prices it) holds a prefill by
    megatron and not by it: pinned there, the request is refused as the client's mistake, saying why; an unbuilt
    label is refused naming what each pool runs."""
    from app.serve.config import AppConfig
    from app.serve.errors import api_error
    from app.serve.dispatch import PoolHandles
    from app.serve.router import Router
    from cost.formulas import Work
    from cost.planner import DEFAULT_UTILIZATION, memory_row

    async def info():
        return {"available": list(STRATEGY_NAMES)}

    fake = SimpleNamespace(info=SimpleNamespace(remote=info))
    cfg = AppConfig.model_validate({"model": chat_tiny, "pools": [dict(name="pair", devices=2, hardware="L4")]})
    router = Router(cfg, {"pair": PoolHandles(engine=fake)})
    n, hw = 400, router.hardware["pair"]
    need = {s: memory_row(s, router.shape, hw, 2, Work.chunks(n, 0)) for s in ("megatron", "projection_replicated")}
    gb = {s: r.resident_gb + r.workspace_gb + r.kv_gb for s, r in need.items()}
    assert gb["megatron"] < gb["projection_replicated"]
    router.hardware["pair"] = hw.model_copy(update={"memory_gb": sum(gb.values()) / 2 / DEFAULT_UTILIZATION})

    async def pick(strategy: str):
        return await router.pick_pool(n, 4, strategy=strategy)

    assert asyncio.run(pick("megatron")).pool.name == "pair"
    with pytest.raises(RequestError) as e:
        asyncio.run(pick("projection_replicated"))
    err = api_error(e.value)
    assert err.status == 400 and err.kind == "invalid_request_error", err
    assert "'projection_replicated' cannot run" in err.message and f"pool pair lacks the memory to prefill {n}" \
        in err.message, err.message
    with pytest.raises(RequestError) as e:
        asyncio.run(pick(LABEL))
    assert f"pool pair did not build it at start (it runs 'megatron', 'weight_gathered'" in str(e.value)
