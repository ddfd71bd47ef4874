"""The one loader: the embedded default model, local Llama folders, and clear errors for everything else."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from strategies.loader import Checkpoint, resolve_model
from strategies.shapes import ModelError


def test_default_model_is_smollm2_in_a_safetensors_folder(smollm2):
    ckpt = Checkpoint("smollm2-135m")
    s = ckpt.shape
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.intermediate_size, s.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    assert s.tie_word_embeddings
    assert (ckpt.path / "model.safetensors").is_file()
    assert ckpt.tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_the_tokenizer_is_the_one_autotokenizer_loads(smollm2):
    """The loader takes the generic tokenizer class by name (reaching it through ``AutoTokenizer`` imports torch,
    which the ingress never loads): the same class, ids, chat template and text as ``AutoTokenizer``'s."""
    from transformers import AutoTokenizer

    ours, theirs = Checkpoint(smollm2).tokenizer(), AutoTokenizer.from_pretrained(smollm2)
    assert type(ours) is type(theirs)
    text = "The capital of France is Paris. <|im_end|> Ünïcödé, emoji 🙂 and    spaces"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    ids = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.decode(ids) == theirs.decode(ids) and ours.decode(ids, skip_special_tokens=True) == \
        theirs.decode(ids, skip_special_tokens=True)


def test_second_start_reuses_the_conversion(smollm2):
    before = os.stat(os.path.join(smollm2, "model.safetensors")).st_mtime_ns
    assert str(resolve_model("smollm2-135m")) == smollm2
    assert os.stat(os.path.join(smollm2, "model.safetensors")).st_mtime_ns == before


CONVERT_ONCE = """
import sys, time
from transformers import LlamaConfig
from strategies.loader import ensure_converted, save_random_llama

def convert(folder):  # a real conversion, slow enough for the other start to arrive while it runs
    save_random_llama(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1), folder)
    time.sleep(2)

print(ensure_converted("tiny", convert))
"""


def test_concurrent_first_starts_convert_once_and_agree(tmp_path):
    """Two processes start on an empty cache at the same moment: one converts, the other waits; both see one folder.
    (The default model goes through the same ``ensure_converted``; its ~25 s conversion runs once per machine, in
    ``make model``, and ``test_second_start_reuses_the_conversion`` above checks it is not repeated.)"""
    env = {**os.environ, "DYNPART_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT_ONCE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert paths == {str(tmp_path / "tiny")}
    assert sum("converting" in o[0] for o in outs) == 1  # exactly one conversion
    assert sorted(os.listdir(tmp_path)) == [".tiny.lock", "tiny"]  # no half-written leftovers
    Checkpoint(tmp_path / "tiny")  # and it loads


def test_local_folder_loads(tiny_models):
    ckpt = Checkpoint(tiny_models["gqa"])
    assert ckpt.shape.num_kv_heads == 2 and ckpt.tensor("model.norm.weight").shape == (96,)


def test_missing_path_is_named():
    with pytest.raises(ModelError, match="no such folder"):
        Checkpoint("/definitely/not/here")


def test_non_llama_config_is_refused(tmp_path, tiny_models):
    cfg = json.loads(open(os.path.join(tiny_models["mha"], "config.json")).read())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="'gpt2' is not supported"):
        Checkpoint(tmp_path)


def test_corrupt_weights_are_named(tmp_path, tiny_models):
    for f in os.listdir(tiny_models["mha"]):
        data = open(os.path.join(tiny_models["mha"], f), "rb").read()
        if f.endswith(".safetensors"):
            data = data[: len(data) // 3]  # truncated download
        (tmp_path / f).write_bytes(data)
    with pytest.raises(ModelError, match="corrupt weights file"):
        ckpt = Checkpoint(tmp_path)
        for i in range(ckpt.shape.num_layers):  # a truncation past the header shows when tensors are read
            ckpt.tensor(f"model.layers.{i}.mlp.down_proj.weight")
