"""Memory of R replicas of p shard workers, each loading its own shards vs mapping the node's shared copy.

Each mode runs in a fresh local Ray (this script re-runs itself per mode) and reports the proportional set size
(PSS: shared pages split among the processes that map them) summed over the whole Ray process tree — driver,
raylet with its object store, shard workers and the weight store — so shared pages are counted once, after one
forward pass per replica (zero-copy pages count only once a process touches them).

    .venv/bin/python -m load_tests.shared_weights_memory --model smollm2-135m --devices 2 --replicas 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from strategies.shapes import DEFAULT_MODEL


def tree_pss_mb() -> float:
    import psutil

    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def measure(model: str, devices: int, replicas: int, shared: bool) -> dict:
    import ray

    from app.engine.build import EngineOptions, build_engine
    from app.engine.params import SamplingParams
    from placement.bundles import DEVICE_RESOURCE
    from placement.workers import local_ray_options

    ray.init(**local_ray_options(num_cpus=2, resources={DEVICE_RESOURCE: devices * replicas},
                                 object_store_memory=2 * 2**30))
    time.sleep(3)
    idle = tree_pss_mb()
    opts = EngineOptions(model=model, devices=devices, max_num_seqs=1, max_model_len=256, shared_weights=shared)
    engines = [build_engine(opts) for _ in range(replicas)]
    for e in engines:  # a forward pass touches every weight page (mapped shared pages count once they are used)
        e.generate([[1] * 16], SamplingParams(max_tokens=2))
    time.sleep(3)
    loaded = tree_pss_mb()
    weights = engines[0].group.call_all("memory_report")[0]["weights"] / 2**20
    for e in engines:
        e.group.shutdown()
    ray.shutdown()
    return {"shared_weights": shared, "replicas": replicas, "devices": devices, "idle_mb": round(idle),
            "loaded_mb": round(loaded), "added_mb": round(loaded - idle), "weights_per_rank_mb": round(weights, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--mode", choices=["own", "shared"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(measure(args.model, args.devices, args.replicas, args.mode == "shared")))
        return
    rows = []
    for mode in ("own", "shared"):
        out = subprocess.run([sys.executable, "-m", "load_tests.shared_weights_memory", "--model", args.model,
                              "--devices", str(args.devices), "--replicas", str(args.replicas), "--mode", mode],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    saved = rows[0]["added_mb"] - rows[1]["added_mb"]
    print(json.dumps({"saved_mb": saved, "saved_fraction": round(saved / rows[0]["added_mb"], 3)}))


if __name__ == "__main__":
    main()
