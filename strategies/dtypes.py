"""The torch dtypes a config may name (``shapes.DTYPE_NAMES``), and back: apart from ``shapes.py`` and ``loader.py``,
which the ingress reads without loading torch."""

from __future__ import annotations

import torch

from strategies.shapes import DTYPE_NAMES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def dtype_name(dtype: torch.dtype) -> str:
    """The config's name of a torch dtype (``torch.bfloat16`` -> ``bfloat16``), the inverse of ``DTYPES``."""
    return str(dtype).removeprefix("torch.")
