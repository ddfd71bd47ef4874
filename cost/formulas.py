"""Cost of single operations on one device: roofline compute and alpha-beta (ring) collectives.

Everything above this module (layouts, search, planner, simulator) describes work as lists of ``Compute`` and
``Collective`` ops and asks this module what they cost, so there is exactly one formula for each kind of cost.
Units: seconds, bytes, FLOPs. Sizes are per device on the critical path (the busiest device).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cost.hardware import CollectiveKind, Hardware

# Ring algorithms (NCCL's cost: each pass sends (p-1)/p of the tensor): bytes sent per device as a fraction of the
# full tensor D, and the number of latency steps α.
_BYTES_FACTOR = {"all_reduce": lambda p: 2 * (p - 1) / p, "all_gather": lambda p: (p - 1) / p,
                 "reduce_scatter": lambda p: (p - 1) / p, "all_to_all": lambda p: (p - 1) / p**2}
_STEPS = {"all_reduce": lambda p: 2 * (p - 1), "all_gather": lambda p: p - 1,
          "reduce_scatter": lambda p: p - 1, "all_to_all": lambda p: p - 1}


@dataclass(frozen=True, slots=True)
class Work:
    """What one forward pass computes, before any partitioning.

    ``attn_pairs`` counts the (query, key) pairs causal attention scores, summed over sequences: it is what makes
    attention quadratic in prompt length. ``kv_tokens`` counts the K/V entries read (cached context plus new).
    ``cached_tokens`` counts the context already in the KV cache and ``cached_pairs`` the part of ``attn_pairs``
    whose key is cached: token-sharded attention must gather that prefix from the head-sharded cache, and its busiest
    device scores a different share of those pairs than of the causal ones.
    """

    tokens: int
    attn_pairs: int
    kv_tokens: int
    seqs: int
    cached_tokens: int = 0
    cached_pairs: int = 0

    @classmethod
    def prefill(cls, lengths: int | Sequence[int]) -> Work:
        """Whole prompts, nothing cached: ``chunks(lengths, 0)``."""
        lens = [lengths] if isinstance(lengths, int) else list(lengths)
        if not lens or min(lens) < 1:
            raise ValueError(f"prompt lengths must be positive, got {lengths!r}")
        return cls.chunks(lens)

    @classmethod
    def chunks(cls, new: int | Sequence[int], cached: int | Sequence[int] = 0) -> Work:
        """Prefill chunks: ``new`` tokens per sequence whose first ``cached`` tokens are already in the KV cache
        (an earlier chunk or a prefix-cache hit). An int ``cached`` applies to every sequence.

        Each new query sees every cached key plus the causal part of the chunk: new·cached + new(new+1)/2 pairs, so a
        prompt's chunks add up to the whole prompt's pairs."""
        ns = [new] if isinstance(new, int) else list(new)
        cs = [cached] * len(ns) if isinstance(cached, int) else list(cached)
        if not ns or min(ns) < 1:
            raise ValueError(f"chunk lengths must be positive, got {new!r}")
        if len(cs) != len(ns):
            raise ValueError(f"cached lengths {cached!r} do not match the {len(ns)} chunks")
        if min(cs) < 0:
            raise ValueError(f"cached lengths must not be negative, got {cached!r}")
        prefix = sum(n * c for n, c in zip(ns, cs))
        causal = sum(n * (n + 1) // 2 for n in ns)
        return cls(tokens=sum(ns), attn_pairs=prefix + causal, kv_tokens=sum(ns) + sum(cs), seqs=len(ns),
                   cached_tokens=sum(cs), cached_pairs=prefix)

    @classmethod
    def decode(cls, contexts: Sequence[int]) -> Work:
        """One decode step for sequences whose caches already hold ``contexts`` tokens each.

        A one-token chunk per sequence, so ``cached_tokens`` is the contexts, as for any chunk: the engine decodes
        with megatron, which reads its own heads of the cache locally, while ``plan_decode``'s token-sharded
        alternatives would have to gather the whole cache each layer (and are priced so)."""
        ctx = list(contexts)
        if not ctx:
            raise ValueError("a decode step needs at least one sequence")
        return cls.chunks([1] * len(ctx), ctx)


@dataclass(frozen=True, slots=True)
class Compute:
    """A kernel on the busiest device: FLOPs, HBM bytes, token rows (for GEMM efficiency), live activation bytes."""

    name: str
    flops: float
    bytes: float
    rows: float
    activation_bytes: float = 0.0
    kernel: str = "gemm"  # which measured throughput curve applies: "gemm" or "attention"


@dataclass(frozen=True, slots=True)
class Collective:
    """A collective over the p devices on a full tensor of ``size`` bytes; ``prefetched`` ones overlap compute."""

    name: str
    kind: CollectiveKind
    size: float
    prefetched: bool = False

    def bytes_per_device(self, p: int) -> float:
        return _BYTES_FACTOR[self.kind](p) * self.size if p > 1 else 0.0

    def steps(self, p: int) -> int:
        return _STEPS[self.kind](p) if p > 1 else 0


Op = Compute | Collective


def compute_time(op: Compute, hw: Hardware) -> float:
    """Roofline: max(FLOPs / achieved FLOP/s at this row count, bytes / achieved bandwidth) + launch overhead κ."""
    t_flops = op.flops / hw.flops_per_s(max(op.rows, 1.0), op.kernel) if op.flops else 0.0
    return max(t_flops, op.bytes / hw.memory_bytes_per_s) + hw.launch_overhead_us * 1e-6


def collective_time(op: Collective, hw: Hardware, p: int) -> float:
    """Alpha-beta: steps·α + bytes sent per device / β; zero on one device.

    A blocking collective also waits for the slowest rank to arrive: ``sync_overhead_us`` (0 unless calibrated;
    on a shared CPU host, where ranks drift apart between collectives, it is a large part of a short prefill)."""
    if p <= 1:
        return 0.0
    alpha, beta = hw.alpha_beta(op.kind)
    sync = 0.0 if op.prefetched else hw.sync_overhead_us * 1e-6
    return op.steps(p) * alpha + op.bytes_per_device(p) / beta + sync


def split_time(ops: Iterable[Op], hw: Hardware, p: int) -> tuple[float, float, float]:
    """(A, C, W): blocking collective time, compute time, and prefetched (overlappable) collective time."""
    c = a = w = 0.0
    for op in ops:
        if isinstance(op, Compute):
            c += compute_time(op, hw)
        elif op.prefetched:
            w += collective_time(op, hw, p)
        else:
            a += collective_time(op, hw, p)
    return a, c, w


def ops_time(ops: Iterable[Op], hw: Hardware, p: int) -> float:
    """Time of ops when prefetched collectives run on the link while compute runs: t = A + max(C, W).

    Blocking collectives A sit on the critical path; prefetched weight gathers W share the link but overlap the
    compute C (gathered one layer ahead), so only the part of W longer than C shows.
    """
    a, c, w = split_time(ops, hw, p)
    return a + overlapped(c, w, hw)


def overlapped(c: float, w: float, hw: Hardware) -> float:
    """Compute C alongside a prefetched gather W: max(C, W) when the link works on its own (GPU copy engines);
    C + W − overlap·min(C, W) when it partly needs the computing cores (a calibrated CPU's ``prefetch_overlap``)."""
    return c + w - hw.prefetch_overlap * min(c, w)


def gemm(name: str, rows: float, k: float, n: float, b: int, flops_scale: float = 1.0) -> Compute:
    """Y[rows, n] = X[rows, k]·W[k, n] on one device: 2·rows·k·n FLOPs, reads X and W, writes Y."""
    act = rows * (k + n) * b
    return Compute(name, 2 * rows * k * n * flops_scale, act + k * n * b, rows, act)


def attention(name: str, pairs: float, kv_tokens: float, queries: float, heads: float, kv_heads: float,
              head_dim: int, b: int, kernel: str = "attention") -> Compute:
    """Causal attention core on ``heads`` local heads: QKᵀ and PV are 4·pairs·heads·dh FLOPs; reads Q, K, V, writes O.

    ``kernel="attention_sharded"``: a token shard's queries against all earlier keys (a masked block, not the
    square causal kernel), which a calibrated profile times separately."""
    q_o = 2 * queries * heads * head_dim * b
    kv = 2 * kv_tokens * kv_heads * head_dim * b
    return Compute(name, 4 * pairs * heads * head_dim, q_o + kv, queries, q_o + kv, kernel)


def elementwise(name: str, rows: float, width: float, b: int, tensors: int = 2) -> Compute:
    """A memory-bound pointwise kernel (norm, SwiGLU) touching ``tensors`` [rows, width] tensors."""
    return Compute(name, 0.0, tensors * rows * width * b, rows, tensors * rows * width * b)
