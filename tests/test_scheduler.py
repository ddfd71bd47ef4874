"""The scheduler alone (``app.engine.scheduler``): no model, no workers. What a step holds, how blocks run out, that
the waiting queue is a policy one can swap, and the decode-only scheduler's adoption plan. The engine's behaviour with
a model (exactness, preemption, prefix hits) is tested in test_kv_memory, test_single_device and test_sampling."""

from __future__ import annotations

from collections.abc import Iterator

from app.engine.disagg import DecodeScheduler
from app.engine.messages import Handoff
from app.engine.params import SamplingParams
from app.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from app.engine.sequence import Sequence


def seq(i: int, prompt: int, strategy: str = "auto") -> Sequence:
    return Sequence(id=i, prompt_ids=list(range(1, prompt + 1)), params=SamplingParams(max_tokens=8), strategy=strategy)


def run(scheduler: Scheduler, plan: StepPlan, token: int = 7) -> None:
    """What the engine does after a forward pass: the tokens are computed, ready sequences take a token."""
    for s, n in plan.order:
        scheduler.computed(s, n)
        if s.remaining == 0:
            s.output_ids.append(token)
            s.all_ids.append(token)


def test_a_step_holds_decode_tokens_and_prefill_chunks_up_to_the_budget():
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=10))
    a, b = seq(0, 6), seq(1, 20)
    sched.add(a)
    plan = sched.schedule()
    assert [(s.id, n) for s, n in plan.prefill] == [(0, 6)] and not plan.decode
    run(sched, plan)
    sched.add(b)
    plan = sched.schedule()  # a decodes (1 token), b's first chunk takes the rest of the budget
    assert [(s.id, n) for s, n in plan.decode] == [(0, 1)] and [(s.id, n) for s, n in plan.prefill] == [(1, 9)]
    assert plan.requested == "auto" and plan.prefill_tokens == 9
    parts = plan.parts("weight_gathered")
    assert [(name, [len(c.ids) for c in chunks]) for name, chunks in parts] == [("weight_gathered", [9]),
                                                                                 ("megatron", [1])]
    assert [name for name, _ in plan.parts("megatron")] == ["megatron"]  # one pass for every token


def test_prefill_chunks_of_one_step_ask_for_one_strategy():
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=4))
    for i, strategy in enumerate(["megatron", "megatron", "weight_gathered"]):
        sched.add(seq(i, 5, strategy))
    plan = sched.schedule()
    assert [s.id for s, _ in plan.prefill] == [0, 1]  # the third waits for a step of its own
    run(sched, plan)
    plan = sched.schedule()
    assert [s.id for s, _ in plan.prefill] == [2] and [s.id for s, _ in plan.decode] == [0, 1]


def test_decode_out_of_blocks_preempts_the_newest_and_requeues_it_first():
    sched = Scheduler(SchedulerConfig(num_blocks=4, block_size=4))
    a, b = seq(0, 8), seq(1, 8)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())  # both prompts: every block held, both 8 + 1 tokens long
    plan = sched.schedule()  # a's next token needs a block: b goes
    assert [s.id for s, _ in plan.decode] == [0] and sched.preemptions == 1 and b.preemptions == 1
    assert sched.waiting.peek() is b and b.blocks == [] and b.num_computed == 0
    sched.finish(a)
    assert sched.blocks.num_used == 0


class ShortestFirst:
    """A queue policy: the shortest prompt first (preempted ones still before every new one)."""

    def __init__(self) -> None:
        self.front: list[Sequence] = []
        self.rest: list[Sequence] = []

    def push(self, s: Sequence) -> None:
        self.rest.append(s)
        self.rest.sort(key=lambda x: len(x.prompt_ids))

    def push_front(self, s: Sequence) -> None:
        self.front.insert(0, s)

    def peek(self) -> Sequence:
        return (self.front or self.rest)[0]

    def pop(self) -> Sequence:
        return (self.front or self.rest).pop(0)

    def remove(self, s: Sequence) -> None:
        (self.front if s in self.front else self.rest).remove(s)

    def __contains__(self, s: object) -> bool:
        return s in self.front or s in self.rest

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self.front + self.rest)

    def __len__(self) -> int:
        return len(self.front) + len(self.rest)


def test_the_waiting_queue_is_a_policy():
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=1), queue=ShortestFirst())
    long, short = seq(0, 30), seq(1, 3)
    sched.add(long)
    sched.add(short)
    assert [s.id for s, _ in sched.schedule().prefill] == [1]
    assert sched.queued_sequences() == [long] and sched.queued_tokens() == 30 + 3  # the short one still to prefill


def test_a_decode_scheduler_adopts_arrivals_before_decoding():
    sched = DecodeScheduler(SchedulerConfig(num_blocks=8, block_size=4))
    s = seq(0, 9)
    sched.arrive(s, Handoff(prompt_ids=s.prompt_ids, first_token=5, kv_refs=[]))
    assert sched.has_work() and sched.queued_sequences() == [s]
    plan = sched.schedule()
    assert [a.seq for a in plan.adopted] == [s] and not plan.order  # no forward pass for it
    assert len(s.blocks) == 3 and sched.running == [s]
    sched.abort(s)
    assert s.finish_reason == "abort" and sched.blocks.num_used == 0 and not sched.has_work()
