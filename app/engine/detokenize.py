"""Incremental detokenization: each appended token costs a decode of a few tokens, not of the whole output.

The engine's text contract (``OutputProcessor._update_text``) is: after every token, ``text`` is
``tokenizer.decode(output_ids, skip_special_tokens=...)`` (the request's; True unless it says otherwise) unless that
ends in "\\ufffd" (an incomplete UTF-8 character), in which case the previous text stands. Decoding the whole output
every step makes a sequence of n tokens cost O(n^2); ``IncrementalDetokenizer`` keeps that contract exactly and
decodes only a short window.

As in vLLM's ``detokenize_incrementally`` it keeps two offsets into the output ids: ``read`` (everything before it is
committed text, ``decode(ids[:read])`` exactly) and ``prefix <= read`` (where the decoded window starts, so the
window carries the context some decoders need). Each step decodes ``ids[prefix:]`` and takes what follows
``decode(ids[prefix:read])`` as the new text. Unlike vLLM it commits only at boundaries where that split is proven
exact for the tokenizer's decoder, and it recognises only decoders whose behaviour it has been reasoned through:

* ``bytelevel`` (GPT-2, SmolLM2, Llama 3, Qwen): decoding is UTF-8 (lossy) of the tokens' concatenated bytes, with no
  positional rule. Once a decoded window ends in a complete character the decoder's state is fresh, so
  ``decode(a + b) == decode(a) + decode(b)``; the window restarts there and is usually one token.
* ``sentencepiece`` (Llama 2, Mistral: Replace("▁", " "), ByteFallback, Fuse, optional Strip of one leading space):
  byte tokens ``<0xNN>`` are decoded as one run, and a run that is invalid UTF-8 turns wholly into "\\ufffd" - even
  characters that were complete before (so the full decode, and this text, may change earlier characters). A boundary
  is therefore committed only after a plain token (not a byte token, not an added/special token: a skipped special
  token would let a run continue across it). The Strip removes a leading space only from the start of the whole
  text, so the window's prefix must decode to non-empty text (or start at 0) for the strip to land inside it. (With
  no empty-string tokens any committed prefix would do; the rule costs nothing and does not rely on that.)

Anything else - slow (Python) tokenizers, other decoders (WordPiece, Metaspace, CTC...), a class that overrides
``decode``, or ``clean_up_tokenization_spaces`` in effect (" ." -> "." across a window edge) - falls back to decoding
the whole output every step: exactness beats speed. A window that fails to extend its prefix's text (which these
rules say cannot happen) also switches to the fallback.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal

Strategy = Literal["none", "full", "bytelevel", "sentencepiece"]

_BYTE_TOKEN = re.compile(r"<0x..>", re.DOTALL)  # ByteFallback's test: 6 chars, "<0x" ... ">" (superset: safe)
_SPIECE_DECODER = [
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
]
_SPIECE_STRIP = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
_INCOMPLETE = "\ufffd"
log = logging.getLogger(__name__)


def _stock_decode(tokenizer: Any) -> bool:
    """True when ``tokenizer.decode`` is transformers' own fast path (backend decode, then optional cleanup)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    cls = type(tokenizer)
    return (isinstance(tokenizer, TokenizersBackend) and cls._decode is TokenizersBackend._decode
            and cls.decode is PreTrainedTokenizerBase.decode)


def _cleans_up(tokenizer: Any) -> bool:
    """Whether ``decode`` applies ``clean_up_tokenization`` (mirrors TokenizersBackend._decode: skipped for BPE)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    bpe = type(tokenizer.backend_tokenizer.model).__name__ == "BPE"
    return not bpe or bool(
        getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))


def strategy_for(tokenizer: Any) -> Strategy:
    """How ``IncrementalDetokenizer`` decodes for this tokenizer (see the module docstring)."""
    if tokenizer is None:
        return "none"
    if not _stock_decode(tokenizer) or _cleans_up(tokenizer):
        return "full"
    decoder = tokenizer.backend_tokenizer.decoder
    if decoder is None:
        return "full"
    state = json.loads(decoder.__getstate__())
    if state.get("type") == "ByteLevel":
        return "bytelevel"
    spiece = (_SPIECE_DECODER, _SPIECE_DECODER + [_SPIECE_STRIP])
    if state.get("type") == "Sequence" and state.get("decoders") in spiece:
        return "sentencepiece"
    return "full"


class IncrementalDetokenizer:
    """The text of a growing list of output ids, as ``decode(ids, skip_special_tokens=skip_special_tokens)`` with an
    incomplete trailing character held back; ``append`` costs O(window), the window usually one or two tokens. (The
    window rules hold either way: with special tokens kept, a special token is still never a sentencepiece commit
    point, and a byte-level one decodes to its own text.)"""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.strategy: Strategy = strategy_for(tokenizer)
        self._ids: list[int] = []
        self._prefix = 0  # the window decoded each step starts here
        self._read = 0  # ids before this are committed
        self._committed = ""  # decode(ids[:read]), exactly
        self._prefix_text = ""  # decode(ids[prefix:read])
        if self.strategy == "sentencepiece":
            backend = tokenizer.backend_tokenizer
            self._id_to_token = backend.id_to_token
            self._model_size = backend.get_vocab_size(with_added_tokens=False)
            self._added = frozenset(backend.get_added_tokens_decoder()) | frozenset(tokenizer.all_special_ids)
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def append(self, token_id: int) -> str:
        """Add one output token; returns the whole text so far (not a delta: see the module docstring)."""
        self._ids.append(token_id)
        if self.strategy == "none":
            return self.text
        if self.strategy == "full":
            return self._set(self._decode(self._ids))
        window = self._decode(self._ids[self._prefix:])
        if not window.startswith(self._prefix_text):  # outside what the rules above allow: be exact instead
            log.warning("incremental detokenization (%s) broke its rules at %d tokens; decoding in full from now",
                        self.strategy, len(self._ids))
            self.strategy = "full"
            return self._set(self._decode(self._ids))
        text = self._committed + window[len(self._prefix_text):]
        self._set(text)
        if self.strategy == "bytelevel":
            if not window.endswith(_INCOMPLETE):
                self._prefix = self._read = len(self._ids)
                self._committed, self._prefix_text = text, ""
        elif self._plain(token_id):
            tail = window if self._read == self._prefix else self._decode(self._ids[self._read:])
            if tail:  # a prefix whose text is non-empty keeps the leading-space strip inside it
                self._prefix, self._prefix_text = self._read, tail
            else:
                self._prefix_text = window
            self._read, self._committed = len(self._ids), text
        return self.text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _set(self, text: str) -> str:
        if not text.endswith(_INCOMPLETE):  # an incomplete UTF-8 character waits for its next token
            self.text = text
        return self.text

    def _plain(self, token_id: int) -> bool:
        """A token after which no ByteFallback run can continue: in the model's vocabulary, not added or special
        (which skip_special_tokens may drop), not a byte token."""
        if not 0 <= token_id < self._model_size or token_id in self._added:
            return False
        token = self._id_to_token(token_id)
        return token is not None and not _BYTE_TOKEN.fullmatch(token)
