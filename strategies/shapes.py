"""Model shapes: the few numbers of a Llama model that the engine, the sharding and the cost model all need.

One pydantic model is read from a Hugging Face ``config.json`` (or a ``LlamaConfig``) and used everywhere, so the
planner's cost formulas and the engine's shard sizes can never disagree about a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_BLOCK_SIZE = 16  # tokens per KV block: the engine's cache, its block manager and the router's prefix hashes
DEFAULT_MODEL = "smollm2-135m"  # the model served when none is named: embedded in a PyPI package (loader.py)
DtypeName = Literal["float32", "bfloat16", "float16"]  # weight and activation dtypes the engine runs
# What a config may ask for: a dtype, or "auto": the fastest the device computes well (placement.hardware.fast_dtype)
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)


class ModelError(ValueError):
    """A model cannot be found, is not a Llama model, or its files are corrupt."""


class ModelShape(BaseModel):
    """Shape of a Llama-family decoder (SwiGLU MLP, RMSNorm, rotary attention, optional GQA)."""

    model_config = ConfigDict(frozen=True)

    name: str = "llama"
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)  # E
    intermediate_size: int = Field(gt=0)  # F
    num_heads: int = Field(gt=0)  # H
    num_kv_heads: int = Field(gt=0)  # Hkv
    head_dim: int = Field(gt=0)  # dh
    vocab_size: int = Field(gt=0)  # V
    max_position_embeddings: int = Field(gt=0)
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @property
    def params_per_layer(self) -> int:
        """P_L = E·H·dh (Q) + 2·E·Hkv·dh (K, V) + H·dh·E (O) + 3·E·F (gate, up, down)."""
        e, dh = self.hidden_size, self.head_dim
        return 2 * e * self.num_heads * dh + 2 * e * self.num_kv_heads * dh + 3 * e * self.intermediate_size

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def total_params(self) -> int:
        return self.num_layers * self.params_per_layer + self.embedding_params

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None) -> "ModelShape":
        """Build from a ``transformers`` config object or a config.json dict; reject anything that is not Llama."""
        d = config if isinstance(config, dict) else config.to_dict()
        model_type = d.get("model_type")
        if model_type != "llama":
            raise ModelError(f"model type {model_type!r} is not supported: dynpart serves Llama models only")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ModelError(f"config sets {key}=true: Llama variants with biases are not supported")
        heads = d["num_attention_heads"]
        return cls(
            name=name or d.get("_name_or_path") or "llama",
            num_layers=d["num_hidden_layers"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            vocab_size=d["vocab_size"],
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_config_file(cls, path: str | Path) -> "ModelShape":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{path} is not valid JSON: {e}") from e
        try:
            return cls.from_hf_config(d, name=path.parent.name)
        except KeyError as e:
            raise ModelError(f"{path} lacks the Llama field {e.args[0]!r}") from e


# Shapes of models we cannot load here but plan for (their config.json values). Llama 2 is MHA, 4K context, untied.
CATALOG: dict[str, ModelShape] = {
    "llama2-7b": ModelShape(name="llama2-7b", num_layers=32, hidden_size=4096, intermediate_size=11008,
                            num_heads=32, num_kv_heads=32, head_dim=128, vocab_size=32000,
                            max_position_embeddings=4096),
    "llama2-13b": ModelShape(name="llama2-13b", num_layers=40, hidden_size=5120, intermediate_size=13824,
                             num_heads=40, num_kv_heads=40, head_dim=128, vocab_size=32000,
                             max_position_embeddings=4096),
    "llama2-70b": ModelShape(name="llama2-70b", num_layers=80, hidden_size=8192, intermediate_size=28672,
                             num_heads=64, num_kv_heads=8, head_dim=128, vocab_size=32000,
                             max_position_embeddings=4096),
    "smollm2-135m": ModelShape(name="smollm2-135m", num_layers=30, hidden_size=576, intermediate_size=1536,
                               num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152,
                               max_position_embeddings=8192, tie_word_embeddings=True),
}


def model_shape(name_or_path: str) -> ModelShape:
    """A catalog name, or a local folder / config.json path."""
    if name_or_path in CATALOG:
        return CATALOG[name_or_path]
    p = Path(name_or_path)
    if p.exists():
        return ModelShape.from_config_file(p)
    raise ModelError(f"unknown model {name_or_path!r}: use one of {sorted(CATALOG)} or a local folder with config.json")
