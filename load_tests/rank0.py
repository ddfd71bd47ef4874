"""``python -m load_tests.rank0``: a replica's rank 0 in its own process against rank 0 as a shard-worker actor.

An engine replica of p devices drives its group from bundle 0 of its placement group. Either rank 0 is one more Ray
actor (the replica only drives: every step is p actor calls, and rank 0's logits come back through the object
store), or the replica is rank 0 itself (``ShardGroup(local_rank0=True)``: one actor call fewer per step, no logits
through the object store, one process fewer). Each round starts a group each way in a placement group of p bundles
(in rotated order: one process can be rank 0 of one group at a time), times ``--steps`` one-token decode steps of
``--rows`` sequences and a ``--prompt``-token prefill, and stops it. Prints the median [min–max] over rounds and
the ratio local/actor of the medians.
"""

from __future__ import annotations

import argparse
import statistics

from tqdm import tqdm

from app.cli.format import markdown_table, spread
from load_tests.engine_runs import blocks_for, random_prompt, runner_kwargs, whole
from placement.calibrate import timed
from strategies.kv_cache import Chunk

MODES = {"actor rank 0": False, "local rank 0": True}


def measure_once(model: str, devices: int, local: bool, rows: int, steps: int, prompt: int) -> dict[str, float]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from placement.bundles import default_bundle
    from placement.workers import ShardGroup
    from strategies.loader import Checkpoint

    vocab = Checkpoint(model).shape.vocab_size
    bundle = default_bundle()
    pg = placement_group([bundle] * devices, strategy="PACK")
    ray.get(pg.ready(), timeout=120)
    group = ShardGroup(devices, runner_kwargs(model, devices, capacity=prompt + steps + 8, seqs=rows),
                       placement_group=pg, bundle=bundle, local_rank0=local)
    try:
        per_seq = blocks_for(prompt + steps + 8)
        seqs = [whole(random_prompt(prompt, vocab, seed=i), first_block=i * per_seq) for i in range(rows)]
        for s in seqs:  # the prompts' K/V, then one warm step
            group.call("forward", [s], "megatron")
        decode = [Chunk([1], prompt, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(rows)]
        group.call("forward", decode)
        step_s = statistics.median(timed(lambda: group.call("forward", decode)) for _ in range(steps))
        prefill_s = min(timed(lambda: group.call("forward", [seqs[0]], "megatron")) for _ in range(3))
        return {"decode step ms": step_s * 1e3, "prefill ms": prefill_s * 1e3}
    finally:
        group.shutdown()
        remove_placement_group(pg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4, help="sequences decoded together")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt", type=int, default=128, help="prefill length (tokens)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import ray

    from placement.workers import local_ray_options

    ray.init(**local_ray_options())
    results: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    order = list(MODES)
    for r in tqdm(range(args.rounds), desc="rounds"):
        for mode in order[r % 2:] + order[:r % 2]:  # rotated
            for k, v in measure_once(args.model, args.devices, MODES[mode], args.rows, args.steps,
                                     args.prompt).items():
                results[mode].setdefault(k, []).append(v)
    metrics = list(results[order[0]])
    rows = [[mode, *(spread(results[mode][k], 2) for k in metrics)] for mode in order]
    ratio = {k: statistics.median(results[order[1]][k]) / statistics.median(results[order[0]][k]) for k in metrics}
    rows.append(["local / actor", *(f"{ratio[k]:.2f}" for k in metrics)])
    print(f"{args.model}, p = {args.devices}, {args.rows} rows decoded, {args.prompt}-token prefill, "
          f"{args.rounds} rounds (median [min–max])")
    print(markdown_table(["rank 0", *metrics], rows))


if __name__ == "__main__":
    main()
