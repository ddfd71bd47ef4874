"""IncrementalDetokenizer against the engine's contract: after every token, the full decode of the output (skip special
tokens), an incomplete trailing character held back. Any difference is a bug, so each case compares every step.

Tokenizers: the default model's (ByteLevel BPE, as shipped and as copied into the tiny chat model), a Llama-2-style one
built here (BPE with ByteFallback and the leading-space Strip, with and without that Strip), and a WordPiece one that
cleans up spaces (must fall back to the full decode). Sequences: encoded multilingual, emoji and whitespace-heavy text;
the same text one byte per token; seeded random ids (specials included); hand-made byte-run and leading-space cases.

Measured once (not a timed test; 500 tokens of TEXTS, 2 shared cores, load ~1.9): with SmolLM2's tokenizer the 500th
token costs ~100-130 us as a full decode and ~3.5-5.4 us incremental (one 1-token decode), the mean over tokens
1..500 being ~58-85 us full; with the Llama-2-style one ~140-215 us full against ~11-16 us incremental.
"""

from __future__ import annotations

import random
import string

import pytest

from app.engine.detokenize import IncrementalDetokenizer, strategy_for
from strategies.loader import Checkpoint

TEXTS = [
    "Hello, world! The capital of France is Paris. It's 23°C; don't panic .",
    "中文字符和日本語のテキスト、한국어 텍스트。𠀋𪚲 are outside the BMP.",
    "emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥 🤖🦙 — and “quotes” … ß ﬁ Ünïcödé àccents",
    "   leading   and\ttabs\n\n\nnewlines \r\n  trailing    ",
    "Γειά σου Κόσμε, Привет мир, مرحبا بالعالم, שלום עולם, नमस्ते दुनिया, ไทย, ᚠᛇᚻ",
    "code:\n    def f(x):\n        return x ** 2  # ok\n\n\tif a != b: print('\\u00e9')\n",
    " don't . , ! ? 're 's n't  .  ,",
    "\ufffd literal replacement char \ufffd then text \ufffd",
]


def engine_texts(tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    """What LLMEngine._update_text makes of ids, token by token (the O(n^2) reference)."""
    out, text = [], ""
    for n in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:n], skip_special_tokens=skip)
        if not full.endswith("\ufffd"):
            text = full
        out.append(text)
    return out


def check(tokenizer, ids: list[int], skip: bool = True) -> IncrementalDetokenizer:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    for n, (token, want) in enumerate(zip(ids, engine_texts(tokenizer, ids, skip), strict=True)):
        got = detok.append(token)
        assert got == want == detok.text, f"step {n}: ids {ids[: n + 1]}"
    assert detok.strategy == strategy_for(tokenizer), "the rules failed and it fell back to the full decode"
    return detok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smol_tok(smollm2):
    return Checkpoint(smollm2).tokenizer()


@pytest.fixture(scope="module")
def chat_tok(chat_tiny):
    return Checkpoint(chat_tiny).tokenizer()


@pytest.fixture(scope="module", params=["smollm2", "chat_tiny"])
def bytelevel_tok(request):
    return request.getfixturevalue({"smollm2": "smol_tok", "chat_tiny": "chat_tok"}[request.param])


def llama_like(add_prefix_space: bool = True):
    """A Llama-2-style tokenizer (transformers' LlamaTokenizer: BPE, ByteFallback, Strip): ASCII pieces and a few
    words; everything else falls back to <0xNN> byte tokens. Plus one non-special and one special added token."""
    from tokenizers import AddedToken
    from transformers.models.llama.tokenization_llama import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for ch in "\u2581" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in ("\u2581the", "\u2581of", "\u2581and", "\u2581is", "\u2581Paris", "\u2581\u2581", "\u2581\u2581\u2581\u2581",
                 "\u2581don't", "ing", "\u2581a"):
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                merges.append((word[: k - 1], word[k - 1]))
                vocab[word[:k]] = len(vocab)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=add_prefix_space)
    tok.add_tokens([AddedToken("<x>", special=False, normalized=False)])
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    return tok


@pytest.fixture(scope="module", params=[True, False], ids=["strip", "nostrip"])
def llama_tok(request):
    return llama_like(request.param)


# ------------------------------------------------------------------------------------------------------- strategies


def test_strategies_are_recognised(smol_tok, chat_tok, llama_tok):
    assert strategy_for(smol_tok) == strategy_for(chat_tok) == "bytelevel"
    assert strategy_for(llama_tok) == "sentencepiece"
    assert strategy_for(None) == "none"


def test_no_tokenizer_means_no_text():
    detok = IncrementalDetokenizer(None)
    assert [detok.append(t) for t in (1, 2, 3)] == ["", "", ""] and detok.text == "" and detok.token_ids == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ ByteLevel (SmolLM2)


@pytest.mark.parametrize("text", TEXTS)
def test_bytelevel_encoded_text(bytelevel_tok, text):
    ids = bytelevel_tok.encode(text, add_special_tokens=False)
    check(bytelevel_tok, ids)


def test_bytelevel_one_byte_per_token(bytelevel_tok):
    """Every multi-byte character split over 2-4 tokens: the incomplete ones are held back, then appear whole."""
    table = bytes_to_unicode()
    byte_ids = [bytelevel_tok.convert_tokens_to_ids(table[b]) for b in range(256)]
    for text in TEXTS:
        check(bytelevel_tok, [byte_ids[b] for b in text.encode()])
    # truncated and stray continuation bytes, a lead byte cut by ASCII, a lead byte at the very end
    raw = b"\xe4\xb8a\xf0\x9f\x98\x80\x80\x80\xe4\xb8\xad\xff\xfe\xc3(\xed\xa0\x80z\xf0\x9f"
    check(bytelevel_tok, [byte_ids[b] for b in raw])


@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
def test_bytelevel_random_ids_with_specials(bytelevel_tok, skip):
    table = bytes_to_unicode()
    byte_ids = [bytelevel_tok.convert_tokens_to_ids(table[b]) for b in range(256)]
    specials = sorted(bytelevel_tok.backend_tokenizer.get_added_tokens_decoder())
    rng = random.Random(0)
    for _ in range(6):
        pools = [range(len(bytelevel_tok)), byte_ids, specials, byte_ids[128:]]
        check(bytelevel_tok, [rng.choice(rng.choice(pools)) for _ in range(250)], skip)


def test_bytelevel_window_stays_small(smol_tok):
    """The point of it: each step decodes the new token (more only while a character is incomplete)."""
    decoded = []

    class Counting:
        def __init__(self, tok):
            self.tok = tok

        def decode(self, ids, skip_special_tokens=False):
            decoded.append(len(ids))
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = smol_tok.encode(" ".join(TEXTS[:-1]) * 3, add_special_tokens=False)  # the last ends in U+FFFD
    detok = IncrementalDetokenizer(smol_tok)
    detok._tokenizer = Counting(smol_tok)
    for t in ids:
        detok.append(t)
    assert detok.text == smol_tok.decode(ids, skip_special_tokens=True)
    assert len(decoded) == len(ids) and max(decoded) <= 4 and sum(decoded) < 1.5 * len(ids)


# --------------------------------------------------------------------------------------- sentencepiece (Llama 2 style)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_encoded_text(llama_tok, text):
    ids = llama_tok.encode(text, add_special_tokens=False)
    assert any(llama_tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids) or text.isascii()
    check(llama_tok, ids)
    check(llama_tok, [1, *ids, 2])


def test_sentencepiece_byte_runs_and_leading_spaces(llama_tok):
    """The cases where a window edge could differ from the full decode."""
    v = llama_tok.convert_tokens_to_ids
    b = [v(f"<0x{x:02X}>") for x in range(256)]
    sp, a, the, x, eot = v("\u2581"), v("\u2581a"), v("\u2581the"), v("<x>"), v("<|eot|>")
    zhong = [b[0xE4], b[0xB8], b[0xAD]]
    cases = [
        [*zhong, b[0xE4], b[0xB8], b[0xAD], a],  # a run completes twice
        [*zhong, b[0xE4], a, the],  # a complete char, then a stray lead byte: the whole run becomes U+FFFD
        [*zhong, 1, b[0xE4], eot, b[0xB8], b[0xAD], a],  # skipped specials inside a run: it continues
        [b[0xE4], b[0xB8], 1, b[0xAD], a], [b[0xE4], 2, 0, b[0xB8], b[0xAD], the],  # specials of the base vocab too
        [*zhong, x, b[0xB8], b[0xAD], a],  # a kept added token ends the run
        [sp, sp, a], [sp, a], [1, a], [1, sp, 2, sp, a], [eot, eot, the, sp, sp, sp, a],
        [sp] * 12 + [a], [x, sp, a], [a, eot, sp, eot, the], [b[0x20], a], [b[0x20], b[0x20], the, b[0x20]],
    ]
    for ids in cases:
        check(llama_tok, ids)


def test_sentencepiece_text_may_change_retroactively_like_the_full_decode(llama_tok):
    """A byte run that turns invalid replaces characters already shown: the contract, not an artefact."""
    v = llama_tok.convert_tokens_to_ids
    b = [v(f"<0x{x:02X}>") for x in range(256)]
    ids = [b[0xE4], b[0xB8], b[0xAD], b[0xE4], v("\u2581a")]
    assert engine_texts(llama_tok, ids) == ["", "", "中", "中", "\ufffd" * 4 + " a"]
    check(llama_tok, ids)


@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
def test_sentencepiece_random_ids(llama_tok, skip):
    vocab = len(llama_tok)
    rng = random.Random(1)
    bytes_ = range(3, 259)
    for _ in range(8):
        check(llama_tok, [rng.choice(rng.choice([range(vocab), bytes_, range(259, vocab), [0, 1, 2, vocab - 1]]))
                          for _ in range(200)], skip)


# ----------------------------------------------------------------------------------------------------- the fallback


def wordpiece_with_cleanup():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[CLS]", "[SEP]", "hello", "world", "don", "'", "t", ".", ",", "!", "?", "s", "##s", "##ing", "go"]
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=True)


def test_unrecognised_decoders_and_cleanup_fall_back_to_the_full_decode(smol_tok):
    tok = wordpiece_with_cleanup()
    assert strategy_for(tok) == "full"
    rng = random.Random(2)
    check(tok, tok.encode("hello world . don't go ! goings , worlds ?", add_special_tokens=False))
    check(tok, [rng.randrange(len(tok)) for _ in range(120)])

    class Custom(type(smol_tok)):
        def decode(self, *args, **kwargs):
            return super().decode(*args, **kwargs)

    custom = Custom.__new__(Custom)
    custom.__dict__.update(smol_tok.__dict__)
    assert strategy_for(custom) == "full"
    check(custom, smol_tok.encode(TEXTS[2], add_special_tokens=False))


def test_bpe_ignores_the_cleanup_flag_so_the_fast_path_stays_exact(smol_tok):
    """transformers skips clean_up_tokenization for BPE; Llama 3's config sets the flag, so this is the common case."""
    import copy

    tok = copy.deepcopy(smol_tok)
    tok.clean_up_tokenization_spaces = True
    assert strategy_for(tok) == "bytelevel"
    check(tok, tok.encode(TEXTS[0] + TEXTS[6], add_special_tokens=False))
