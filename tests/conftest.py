"""Shared fixtures: tiny float/GPTQ Llama checkpoints built once per session, tokenizer, calibration batches."""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")  # before gptqmodel is imported (docs/gptq_format.md)
# gptqmodel's TorchLinear torch.compile()s dequantize_weight per layer instance: on CPU every fresh tiny
# model recompiles (~5 s per forward).  Eager dequantisation is the same arithmetic and keeps tests fast.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from qalora_hf.testing.tiny import TINY_TEXTS, load_gptq, quantize_tiny, save_tiny_float_model, tiny_tokenizer  # noqa: E402

# (bits, desc_act, sym) used across the core tests: every width, act-order on and off, sym on and off.
GPTQ_CONFIGS = [
    (4, False, False),
    (4, True, False),
    (3, True, True),
    (2, False, True),
    (8, False, False),
    (8, True, True),
    (2, True, False),
    (3, False, False),
]


def config_id(cfg) -> str:
    bits, desc_act, sym = cfg[:3]
    bias = len(cfg) > 3 and cfg[3]
    return f"b{bits}-{'act' if desc_act else 'noact'}-{'sym' if sym else 'asym'}{'-bias' if bias else ''}"


@pytest.fixture(scope="session")
def tiny_float_dir(tmp_path_factory) -> Path:
    """A random 2-layer tiny Llama (no biases) with its tokenizer."""
    return save_tiny_float_model(tmp_path_factory.mktemp("tiny-float") / "model")


@pytest.fixture(scope="session")
def tiny_float_bias_dir(tmp_path_factory) -> Path:
    """The same tiny Llama with attention and MLP biases."""
    return save_tiny_float_model(tmp_path_factory.mktemp("tiny-float-bias") / "model", bias=True)


@pytest.fixture(scope="session")
def gptq_checkpoint(tmp_path_factory, request):
    """``get(bits=4, desc_act=False, sym=False, bias=False) -> Path``: a GPTQ (g=32) checkpoint, quantised lazily, cached per session."""
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("tiny-gptq")

    def get(bits: int = 4, desc_act: bool = False, sym: bool = False, bias: bool = False) -> Path:
        key = (int(bits), bool(desc_act), bool(sym), bool(bias))
        if key not in cache:
            float_dir = request.getfixturevalue("tiny_float_bias_dir" if bias else "tiny_float_dir")
            cache[key] = quantize_tiny(float_dir, root / config_id(key), bits=bits, group_size=32, desc_act=desc_act, sym=sym)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def load_tiny_gptq(gptq_checkpoint):
    """``load(bits=4, desc_act=False, sym=False, bias=False)``: a FRESH float32 model (torch kernel, eval mode) of that checkpoint."""

    def load(bits: int = 4, desc_act: bool = False, sym: bool = False, bias: bool = False):
        model = load_gptq(gptq_checkpoint(bits, desc_act, sym, bias), bits)
        model.eval()
        return model

    return load


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def calibration_batches(tiny_tok) -> list[dict]:
    """Padded batches (8 rows each) of :data:`TINY_TEXTS` for merge calibration."""
    batches = []
    for i in range(0, 32, 8):
        enc = tiny_tok(TINY_TEXTS[i : i + 8], return_tensors="pt", padding=True)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


@pytest.fixture(scope="session")
def sample_input_ids(tiny_tok) -> torch.Tensor:
    """Two unpadded rows of equal length for logit comparisons."""
    ids = [tiny_tok(t)["input_ids"] for t in TINY_TEXTS[40:42]]
    n = min(len(x) for x in ids)
    return torch.tensor([x[:n] for x in ids])


# --------------------------------------------------------------------------------------------------
# The real huggingface_hub client pointed at a local Hub-protocol server (tests/test_hub.py, test_export_hub.py)

HUB_TOKEN = "hf_localTestTokenNotSecret"


def _point_client_at(mp: pytest.MonkeyPatch, url: str, hf_home: Path) -> None:
    """Env for new processes + the import-time copies huggingface_hub already made of it."""
    from huggingface_hub import constants

    for key, value in {"HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home),
                       "HF_HUB_CACHE": str(hf_home / "hub"), "HF_TOKEN": HUB_TOKEN}.items():
        mp.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN"):
        mp.delenv(key, raising=False)
    mp.setattr(constants, "ENDPOINT", url)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    old_home = constants.HF_HOME  # token file, caches, agent registry, ... all live under HF_HOME
    for name, value in list(vars(constants).items()):
        if name.isupper() and isinstance(value, str) and value.startswith(old_home):
            mp.setattr(constants, name, str(hf_home) + value[len(old_home):])
    mp.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh local Hub-protocol server (HUB_TOKEN writes to ``local-user``) with the real client pointed at it."""
    from qalora_hf.testing.hub_server import HubServer

    with HubServer(tmp_path / "hub-storage", token=HUB_TOKEN, namespaces=["local-user"]) as server:
        _point_client_at(monkeypatch, server.url, tmp_path / "hf_home")
        yield server
