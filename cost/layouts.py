"""The layout algebra: a partitioning candidate is a choice of execution mode per matrix, and the ops it implies.

A layer is norm → QKV → attention → O → residual → norm → gate/up → SwiGLU → down → residual. Each matrix runs in a
mode that needs its input in one activation state (REP, TOK, FEAT, PSUM) and leaves its output in another; wherever
a producer's state is not what the consumer needs, the one collective that converts it is inserted
(``TRANSITIONS`` below). Turning a ``Layout`` into ops here, and costing ops in ``formulas``, is the
whole cost model: the planner's three strategies are just three named candidates.
"""

from __future__ import annotations

import math

from cost.formulas import Collective, Compute, Op, Work, attention, elementwise, gemm, overlapped, split_time
from cost.hardware import Hardware
from strategies.layout import (ATTN_STATE, FEAT, GIVES, HELD_WHOLE, MATRICES, NEEDS, PSUM, REP, TOK, TRANSITIONS, Attn,
                               Layout, Mode, adjacent, feature_width, token_chunk,
                               transposed)
from strategies.shapes import ModelShape

# The vocabulary (states, modes, ``Layout``) lives where the engine reads it too; re-exported for the cost model.
__all__ = ["ATTN_STATE", "Attn", "FEAT", "GIVES", "Layout", "MATRICES", "Mode", "NEEDS", "PSUM", "REP", "TOK",
           "TRANSITIONS", "end_ops", "layer_ops", "matrix_dims", "model_time", "resident_bytes", "workspace_bytes"]


def matrix_dims(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(K, N) of each matrix of a (padded) shape."""
    e, dh = shape.hidden_size, shape.head_dim
    dq, dkv = shape.num_heads * dh, shape.num_kv_heads * dh
    return {"qkv": (e, dq + 2 * dkv), "o": (dq, e), "gate_up": (e, 2 * shape.intermediate_size),
            "down": (shape.intermediate_size, e)}


class _Builder:
    """Walks one layer, tracking the activation state and appending ops; p devices, ``work`` of T tokens."""

    def __init__(self, shape: ModelShape, p: int, work: Work, b: int):
        self.shape, self.p, self.work, self.b = shape, p, work, b
        self.ops: list[Op] = []

    def rows(self, state: str) -> float:
        return token_chunk(self.work.tokens, self.p) if state == TOK else self.work.tokens

    def move(self, state: str, need: str, width: int, what: str) -> str:
        """The collective converting ``state`` into ``need``, on the tensor the engine really moves: token shards
        padded to p equal zigzag chunks, a feature split padded to a multiple of p."""
        kind = TRANSITIONS.get((state, need))
        if kind and self.p > 1:
            rows = self.p * token_chunk(self.work.tokens, self.p) if TOK in (state, need) else self.work.tokens
            cols = feature_width(width, self.p) if FEAT in (state, need) else width
            self.ops.append(Collective(f"{what} {state}->{need}", kind, rows * cols * self.b))
        return need

    def pointwise(self, name: str, state: str, width: int, tensors: int) -> None:
        local = width / self.p if state == FEAT else width
        self.ops.append(elementwise(name, self.rows(state), local, self.b, tensors))

    def matmul(self, name: str, mode: Mode, state: str, k: int, n: int) -> str:
        state = self.move(state, NEEDS[mode], k, f"{name} input")
        p, t = self.p, self.work.tokens
        if mode is Mode.COL:
            self.ops.append(gemm(name, t, k, n / p, self.b))
        elif mode is Mode.ROW:
            self.ops.append(gemm(name, t, k / p, n, self.b))
        elif mode is Mode.REDUNDANT:
            self.ops.append(gemm(name, t, k, n, self.b))
        else:
            self.ops.append(gemm(name, self.rows(TOK), k, n, self.b))
            if mode is Mode.GATHERED and p > 1:
                self.ops.append(Collective(f"{name} weights", "all_gather", k * n * self.b, prefetched=True))
        return GIVES[mode]

    def attention(self, mode: Attn, state: str, width: int) -> str:
        s, p, w, b = self.shape, self.p, self.work, self.b
        state = self.move(state, ATTN_STATE[mode], width, "qkv")
        h, hkv, dh = s.num_heads, s.num_kv_heads, s.head_dim
        if mode is Attn.HEADS:
            self.ops.append(attention("attention", w.attn_pairs, w.kv_tokens, w.tokens, h / p, hkv / p, dh, b))
        elif mode is Attn.REDUNDANT:
            self.ops.append(attention("attention", w.attn_pairs, w.kv_tokens, w.tokens, h, hkv, dh, b))
        if mode is not Attn.HEADS and p > 1 and w.cached_tokens > 0:
            # The cache is sharded by KV head, but these need every head: gather the cached prefix each layer.
            self.ops.append(Collective("cached k/v all-gather", "all_gather", w.cached_tokens * 2 * hkv * dh * b))
        if mode is Attn.TOKENS:
            if p > 1:
                self.ops.append(Collective("k/v all-gather", "all_gather", self.rows(TOK) * p * 2 * hkv * dh * b))
            # Zigzag token shards (chunks r and 2p-1-r): every device scores 1/p of the causal pairs, and its
            # queries' share of the (query, cached key) pairs.
            busiest = w.attn_pairs * self.rows(TOK) / w.tokens
            self.ops.append(attention("attention", busiest, w.kv_tokens, self.rows(TOK), h, hkv, dh, b,
                                      kernel="attention_sharded"))
        return state


def layer_ops(c: Layout, shape: ModelShape, p: int, work: Work, b: int) -> list[Op]:
    """Ops of one transformer layer on the busiest of p devices (shape already padded for p)."""
    dims = matrix_dims(shape)
    e, f = shape.hidden_size, shape.intermediate_size
    bld = _Builder(shape, p, work, b)
    bld.pointwise("input norm", c.residual, e, 2)
    state = bld.matmul("qkv", c.qkv, c.residual, *dims["qkv"])
    state = bld.attention(c.attn, state, dims["qkv"][1])
    state = bld.matmul("o", c.o, state, *dims["o"])
    bld.move(state, c.residual, e, "attention out")
    bld.pointwise("post-attention norm", c.residual, e, 2)
    state = bld.matmul("gate_up", c.gate_up, c.residual, *dims["gate_up"])
    if state == PSUM:  # SwiGLU is nonlinear: partial sums must be reduced first, into what down needs
        state = bld.move(state, NEEDS[c.down], 2 * f, "gate_up out")
    bld.pointwise("swiglu", state, f, 3)
    state = bld.matmul("down", c.down, bld.move(state, NEEDS[c.down], f, "swiglu out"), *dims["down"])
    bld.move(state, c.residual, e, "mlp out")
    return one_weight_gather(bld.ops)


def one_weight_gather(ops: list[Op]) -> list[Op]:
    """The gathered matrices of a layer live in one flat buffer, so the engine gathers them with one all-gather per
    layer (``strategies/weight_gathered.py``): price one collective of their summed size, not one per matrix."""
    gathers = [op for op in ops if isinstance(op, Collective) and op.prefetched]
    if len(gathers) < 2:
        return ops
    names = ", ".join(g.name.removesuffix(" weights") for g in gathers)
    merged = Collective(f"layer weights ({names})", "all_gather", sum(g.size for g in gathers), prefetched=True)
    return [op for op in ops if not (isinstance(op, Collective) and op.prefetched)] + [merged]


def end_ops(c: Layout, shape: ModelShape, p: int, work: Work, b: int) -> list[Op]:
    """Embedding (vocabulary-parallel: partial sums into the residual state) and the LM head on last tokens."""
    e, v = shape.hidden_size, shape.vocab_size
    bld = _Builder(shape, p, work, b)
    bld.pointwise("embedding", PSUM, e, 1)  # every device writes partial sums for all T rows
    bld.move(PSUM, c.residual, e, "embedding")
    last = work.seqs
    if c.residual == TOK and p > 1:  # each sequence's last hidden state lives on one device: summed into place
        bld.ops.append(Collective("last hidden states", "all_reduce", last * e * b))
    v_rank = math.ceil(v / p)  # vocab-parallel, padded
    bld.ops.append(gemm("lm head", last, e, v_rank, b))
    if p > 1:
        bld.ops.append(Collective("logits", "all_gather", last * v_rank * p * b))
    return bld.ops


def model_time(c: Layout, shape: ModelShape, hw: Hardware, p: int, work: Work) -> float:
    """Seconds for a forward pass of all layers: layer i+1's weights are gathered while layer i computes.

    With per-layer blocking time A, compute C and prefetched gathers W over n layers:
    t = W (first layer, nothing to hide behind) + n·A + (n−1)·max(C, W) + C, plus embedding and LM head
    (max(C, W) is ``overlapped``: less than perfect overlap on a calibrated CPU).
    """
    b, n = hw.bytes_per_element, shape.num_layers
    a, comp, w = split_time(layer_ops(c, shape, p, work, b), hw, p)
    ea, ec, _ = split_time(end_ops(c, shape, p, work, b), hw, p)
    return w + n * a + (n - 1) * overlapped(comp, w, hw) + comp + ea + ec


def resident_bytes(c: Layout | list[Layout], shape: ModelShape, p: int, b: int) -> float:
    """Weights per device for the whole model, for one layout or for several held together (as an engine holds
    every layout it offers): the Megatron shards (decode reads them), a whole replica for a matrix some layout
    replicates (the shard is a view of its row: held once), a second shard sliced the other way for one some layout
    transposes, the gather buffers (two layers of the most any layout gathers, plus its packed send buffer), the
    embedding shards."""
    layouts = c if isinstance(c, list) else [c]
    dims = matrix_dims(shape)
    per_layer = buffer = 0.0
    for m in MATRICES:
        kn = dims[m][0] * dims[m][1]
        modes = {x.modes()[m] for x in layouts}
        if p == 1:
            per_layer += kn
            continue
        per_layer += kn if modes & set(HELD_WHOLE) else kn / p
        if any(transposed(m, mode) for mode in modes):  # its other dimension by a p-th of the padded hidden size
            per_layer += kn // shape.hidden_size * feature_width(shape.hidden_size, p) / p
    for x in layouts if p > 1 else []:
        gathered = [m for m, mode in x.modes().items() if mode is Mode.GATHERED]
        size = sum(dims[m][0] * dims[m][1] for m in gathered)
        send = size / p if gathered and not adjacent(gathered) else 0  # packed for the one gather per layer
        buffer = max(buffer, 2 * size + send)
    norms = 2 * shape.hidden_size
    return (shape.num_layers * (per_layer + norms) + buffer + shape.embedding_params / p) * b


def workspace_bytes(c: Layout, shape: ModelShape, p: int, work: Work, b: int) -> float:
    """Peak live activations on one device: the residual stream plus the largest op's inputs and outputs."""
    ops = layer_ops(c, shape, p, work, b) + end_ops(c, shape, p, work, b)
    residual = (token_chunk(work.tokens, p) if c.residual == TOK else work.tokens) * shape.hidden_size * b
    return residual + max(op.activation_bytes for op in ops if isinstance(op, Compute))
