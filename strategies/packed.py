"""Weights prepacked for the CPU's GEMM library, and the one ``linear`` every matmul of a pass goes through.

A decode step multiplies a few rows by every weight matrix: the GEMM streams the weights from memory and does little
arithmetic per byte. MKL's sgemm on a plain row-major ``[out, in]`` weight reaches that memory rate only at one row:
SmolLM2's decode step at 4 sequences takes 1.6x as long, at 16 sequences 1.3x as long, as with every weight
reordered once into oneDNN's blocked layout for its inner-product primitive (``torch.ops.mkldnn.
_reorder_linear_weight``, what torch.compile's freezing pass does for ``nn.Linear``; measured on this 2-core AVX2
EPYC, one thread: BENCHMARKS.md "Decode step: weights prepacked for the GEMM"). vLLM's CPU backend does the same
(``create_onednn_mm`` on the prepacked weight, ``vllm/model_executor/layers/utils.py``), and drops the plain copy.

One row (a lone decode) is a GEMV, which no blocked layout helps: it streams the weight once. MKL streams a weight
stored input-major (``[in, out]``, each input's row of outputs contiguous: ``y += x_i * W[i, :]``) at ~9 GB/s on
this CPU, and the plain ``[out, in]`` one (a dot product per output) at ~6.5 GB/s, as does oneDNN's blocked layout:
SmolLM2's 30 layers' GEMVs take 48 ms against 66 ms, its LM head 10 ms against 17 ms. So a packed weight also keeps
an input-major copy for the one-row case (``by_input``): a second copy, counted in ``nbytes``.

A packed weight is a second copy in an opaque layout, made where the weights live (each worker, at load): the plain
shards stay, since collectives send them (gathered layouts, replicas built at start) and, with ``shared_weights``,
they are the node's one shared copy. ``memory_report`` counts the packed copies. Packing is for CPU devices in
float32 (or bfloat16 where oneDNN runs it natively); elsewhere ``pack`` is not called and ``linear`` is ``x @ w.T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedLinear:
    """``x @ weight.T`` for a weight reordered once into oneDNN's blocked layout; one row (a lone decode) goes to
    MKL's GEMV on the input-major copy (see the module docstring)."""

    plain: torch.Tensor  # the weight as loaded [out, in] (a view of the resident shard: no extra memory)
    packed: torch.Tensor  # opaque (mkldnn) tensor: no views, no collectives
    by_input: torch.Tensor  # the weight transposed, contiguous [in, out]: the one-row GEMV's fast layout

    @property
    def nbytes(self) -> int:
        """Memory of the two copies this adds (``plain`` is the resident shard's): each the size of the weight."""
        return 2 * self.plain.numel() * self.plain.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= 1:  # one row: GEMV; none: oneDNN refuses an empty batch
            return x @ self.by_input
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")


Weight = torch.Tensor | PackedLinear


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether weights on ``device`` in ``dtype`` are worth packing: a CPU with oneDNN, in float32, or in bfloat16
    where oneDNN multiplies it natively."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


PACK_ROWS = 16  # the batch the blocked layout is chosen for; one layout serves every batch size (within ~10%)


def pack(weight: torch.Tensor) -> PackedLinear:
    """``weight`` [out, in] reordered for oneDNN's inner product, and transposed for the one-row GEMV (two copies;
    ``weight`` is left as it is)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)
    return PackedLinear(weight, packed, weight.T.contiguous())


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """``x @ weight.T`` [rows, out], through the packed weight when there is one."""
    return weight(x) if isinstance(weight, PackedLinear) else x @ weight.T
