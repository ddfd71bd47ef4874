"""``dynpart generate``: one prompt through the engine, on one device or p shard workers."""

from __future__ import annotations

import argparse
import json

from strategies.layout import STRATEGY_NAMES, check_strategy
from strategies.shapes import DEFAULT_MODEL, DTYPE_NAMES



def strategy_arg(text: str) -> str:
    """argparse type of ``--prefill-strategy``: auto, a strategy name, or any layout label (its canonical name)."""
    try:
        return check_strategy(text, allow_auto=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} (embedded) or a local Llama folder")
    p.add_argument("--devices", type=int, default=1, help="shard workers (devices) of the replica")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="auto: bfloat16 where the device multiplies it natively (AMX/AVX512-BF16, GPUs), else float32")
    p.add_argument("--max-model-len", type=int, default=2048, help="prompt + generated tokens per sequence")
    p.add_argument("--hardware", default=None, help="hardware catalog entry for the planner (default: detected)")


def register(sub) -> None:
    prep = sub.add_parser("prepare", help="convert/check a model once so later starts are fast")
    prep.add_argument("--model", default=DEFAULT_MODEL)
    prep.set_defaults(func=prepare)
    p = sub.add_parser("generate", help="generate text for one prompt")
    add_engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--prefill-strategy", default="auto", type=strategy_arg,
                   help=f"auto (the planner), {', '.join(STRATEGY_NAMES)}, or a layout label as `dynpart search` "
                        "prints it, quoted")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=generate)


def prepare(args: argparse.Namespace) -> int:
    from strategies.loader import Checkpoint

    ckpt = Checkpoint(args.model)
    print(f"{args.model}: {ckpt.path} ({ckpt.shape.total_params / 1e6:.0f}M parameters)")
    return 0


def engine_options(args: argparse.Namespace, **extra):
    from app.engine.build import EngineOptions

    return EngineOptions(model=args.model, devices=args.devices, dtype=args.dtype, max_model_len=args.max_model_len,
                         hardware=args.hardware, **extra)


def generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from app.engine.build import build_engine
    from app.engine.params import SamplingParams
    from app.serve.errors import validation_message

    if args.max_tokens < 1:  # the engine takes 0 (a prompt scored only, over HTTP); generate prints what it generates
        raise ValueError("max_tokens must be at least 1")
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=args.stop)
        opts = engine_options(args, max_num_seqs=1)
    except ValidationError as e:
        raise ValueError(validation_message(e.errors())[1]) from None
    # a layout named here is built before any step; this process is rank 0 (one engine here: one process fewer)
    engine = build_engine(opts, pinned=[args.prefill_strategy], rank0_here=True)
    try:
        tok = engine.tokenizer
        if args.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
        else:
            ids = tok(args.prompt)["input_ids"]
        seq = engine.generate([list(ids)], params, strategy=args.prefill_strategy)[0]
        dtype = engine.group.dtype_name()
    finally:
        engine.group.shutdown()
    result = {
        "text": seq.text,
        "token_ids": seq.output_ids,
        "prompt_tokens": len(seq.prompt_ids),
        "finish_reason": seq.finish_reason,
        "ttft_ms": round(seq.ttft_s * 1e3, 3),
        "tpot_ms": None if seq.tpot_s is None else round(seq.tpot_s * 1e3, 3),
        "prefill_strategy": seq.prefill_strategy,
        "devices": opts.devices,
        "dtype": dtype,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(seq.text)
    return 0

