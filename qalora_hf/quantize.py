"""GPTQ-quantising a float model with transformers + optimum + gptqmodel, cached on disk.

Loading a GPTQ checkpoint with the trainable kernel is :func:`qalora_hf.gptq.load_gptq_model`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .cache import default_cache_dir
from .gptq import TRAINABLE_BACKEND, is_gptq_checkpoint, load_gptq_model  # noqa: F401  (also imported from here)
from .gptq import SUPPORTED_BITS

logger = logging.getLogger(__name__)


@dataclass
class QuantizeConfig:
    """How to GPTQ-quantise a float base model before QA-LoRA training.

    Raises:
        ValueError: unsupported ``bits``, non-positive ``group_size`` or ``num_calibration_rows``.
    """

    bits: int = field(default=4, metadata={"help": "Code width: 2, 3, 4 or 8."})
    group_size: int = field(default=32, metadata={"help": "Input channels per quantisation group (QA-LoRA pools these)."})
    desc_act: bool = field(default=False, metadata={"help": "GPTQ act-order (permuted g_idx); QA-LoRA pools by g_idx so both work."})
    sym: bool = field(default=False, metadata={"help": "Symmetric quantisation; the paper uses asymmetric (False)."})
    num_calibration_rows: int = field(default=128, metadata={"help": "Training rows used as GPTQ calibration text."})
    max_calibration_length: int = field(default=512, metadata={"help": "Token limit per calibration row."})
    damp_percent: float = field(default=0.1, metadata={"help": "GPTQ Hessian dampening."})
    true_sequential: bool = field(
        default=True,
        metadata={"help": "Quantise the linear layers of a block one after the other, each calibrated on the outputs of the "
                          "already-quantised ones (optimum's default: one calibration pass per layer). False calibrates all "
                          "layers of a block on one pass (GPTQ's original order; ~3x faster on CPU)."},
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where quantised bases are cached (default: <qalora_hf.cache.default_cache_dir()>/gptq)."})

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantizeConfig.bits={self.bits} is not supported; use one of {SUPPORTED_BITS}.")
        if self.group_size <= 0:
            raise ValueError(f"QuantizeConfig.group_size must be positive (e.g. 32, 64, 128), got {self.group_size}.")
        if self.num_calibration_rows <= 0:
            raise ValueError(f"QuantizeConfig.num_calibration_rows must be positive, got {self.num_calibration_rows}.")


def _cache_root(qconfig: QuantizeConfig) -> Path:
    if qconfig.cache_dir:
        return Path(qconfig.cache_dir)
    return default_cache_dir() / "gptq"


def _fingerprint(model_path: str, qconfig: QuantizeConfig, texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    # true_sequential=True (the default) is left out so that caches made before the option existed stay valid
    settings = {k: v for k, v in asdict(qconfig).items() if k != "cache_dir" and not (k == "true_sequential" and v)}
    h.update(json.dumps(settings, sort_keys=True).encode())
    p = Path(model_path)
    if p.is_dir():
        for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("config.json")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    else:
        h.update(model_path.encode())
    for t in texts:
        h.update(t.encode())
    return h.hexdigest()[:16]


def quantize_model(model_path: str, qconfig: QuantizeConfig, calibration_texts: Sequence[str], tokenizer=None) -> Path:
    """GPTQ-quantise the float model at ``model_path`` on ``calibration_texts``; return the cached checkpoint dir.

    The result is written with :func:`qalora_hf.export.export_gptq` (atomic, v1 zero-points) under
    ``<cache>/<model name>-<fingerprint>``, where the fingerprint covers the model files, the quantise
    options and the calibration text, so a second run with the same inputs reuses it.

    Raises:
        ValueError: no calibration text.
    """
    if not calibration_texts:
        raise ValueError("GPTQ quantisation needs calibration text; the training set gave none.")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    texts = list(calibration_texts)[: qconfig.num_calibration_rows]
    out = _cache_root(qconfig) / f"{Path(model_path).name}-gptq{qconfig.bits}-g{qconfig.group_size}-{_fingerprint(model_path, qconfig, texts)}"
    if (out / "config.json").is_file():
        logger.info("quantise: reusing cached GPTQ base %s", out)
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    from .export import export_gptq

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    logger.info(
        "quantise: GPTQ %d-bit g%d desc_act=%s sym=%s on %d calibration rows (gptqmodel via optimum)",
        qconfig.bits, qconfig.group_size, qconfig.desc_act, qconfig.sym, len(texts),
    )
    gptq = GPTQConfig(
        bits=qconfig.bits,
        group_size=qconfig.group_size,
        desc_act=qconfig.desc_act,
        sym=qconfig.sym,
        damp_percent=qconfig.damp_percent,
        dataset=texts,
        tokenizer=tokenizer,
        model_seqlen=qconfig.max_calibration_length,
        true_sequential=qconfig.true_sequential,
        backend=TRAINABLE_BACKEND,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=gptq, dtype=torch.float32)
    export_gptq(model, out, tokenizer=tokenizer, overwrite=True, split_ragged_groups=False)  # the groups GPTQ fitted
    del model
    return out
