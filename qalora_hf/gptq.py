"""Facts about GPTQ models in transformers + optimum + gptqmodel, in one place.

* :func:`quantization_config_dict` / :func:`check_gptq_config` / :func:`gptq_settings`: the model's
  ``quantization_config`` (a dict on some code paths, a ``GPTQConfig`` object on others) as a dict,
  checked to be GPTQ with supported bits;
* :func:`gptq_layers`: the gptqmodel quantised linear layers of a model;
* :func:`is_gptq_checkpoint` and :func:`load_gptq_model`: a checkpoint's kind, and loading it with
  gptqmodel's trainable kernel (:data:`TRAINABLE_BACKEND`);
* :func:`mark_asymmetric`: what a merged model's config must say (``sym: false``).

See docs/gptq_format.md for the layout and the traps these functions exist for.  No torch import at module
level: the CLI checks a ``config.json`` with :func:`check_gptq_config` before loading anything heavy.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)  # the code widths gptqmodel packs and qalora_hf.gptq_format reads and writes

# gptqmodel's trainable GPTQ kernel on every device (and one that keeps v2 zero-points in memory); on CPUs
# with AVX512-BF16 the auto-picked TorchCpuAvx512Linear raises on train() (docs/gptq_format.md).
TRAINABLE_BACKEND = "torch"


def quantization_config_dict(qc: Any) -> dict:
    """``quantization_config`` as a plain dict: a dict as is, a ``GPTQConfig`` (or any ``QuantizationConfigMixin``)
    through ``to_dict()``; ``{}`` for None."""
    if qc is None:
        return {}
    return qc if isinstance(qc, dict) else qc.to_dict()


def _method(qc: dict) -> str:
    return str(qc.get("quant_method", "")).lower().replace("quantizationmethod.", "")


def check_gptq_config(qc: Any) -> dict:
    """``quantization_config`` (dict or object) as a dict, checked to describe a GPTQ model QA-LoRA supports.

    Raises:
        TypeError: missing, or another quantisation method (bitsandbytes, AWQ, ...).
        ValueError: no ``bits``, or bits outside :data:`SUPPORTED_BITS`.
    """
    if qc is None:
        raise TypeError(
            "not GPTQ-quantised (no quantization_config). QA-LoRA trains on a GPTQ base: load a GPTQ checkpoint with "
            "GPTQConfig(bits=..., backend='torch'), or quantise first (QALoraTrainer's quantize_config)."
        )
    qc = quantization_config_dict(qc)
    method = _method(qc)
    if method != "gptq":
        raise TypeError(
            f"quantised with '{method}', not GPTQ. QA-LoRA merges into GPTQ zero-points; on bitsandbytes "
            "PEFT would silently train plain LoRA. Use a GPTQ model (GPTQConfig / gptqmodel)."
        )
    if "bits" not in qc:
        raise ValueError("the GPTQ quantization_config has no 'bits'.")
    if int(qc["bits"]) not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ bits={qc['bits']} is not supported; QA-LoRA supports bits in {SUPPORTED_BITS}.")
    return qc


def gptq_settings(model) -> dict:
    """``quantization_config`` of a transformers GPTQ model as a dict (bits, group_size, desc_act, sym, ...).

    Raises:
        TypeError: the model is not GPTQ-quantised (a float model, bitsandbytes, AWQ, ...).
        ValueError: unsupported bits.
    """
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    try:
        return check_gptq_config(qc)
    except TypeError as err:
        raise TypeError(f"{type(model).__name__} is {err}" if qc is None else f"the model is {err}") from None


def quant_linear_class():
    """gptqmodel's base class of every quantised linear kernel (``BaseQuantLinear``)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return BaseQuantLinear


def gptq_layers(model) -> dict:
    """All gptqmodel quantised linear layers of ``model`` (``torch.nn.Module``), by qualified name."""
    cls = quant_linear_class()
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def is_gptq_checkpoint(model_path: str, **kwargs) -> bool:
    """Whether ``model_path`` (dir or Hub id) has a GPTQ ``quantization_config`` (``kwargs`` go to ``AutoConfig``)."""
    from transformers import AutoConfig

    qc = getattr(AutoConfig.from_pretrained(model_path, **kwargs), "quantization_config", None)
    return _method(quantization_config_dict(qc)) == "gptq"


def load_gptq_model(model_path: str, dtype=None, device_map=None, **kwargs):
    """Load a GPTQ checkpoint with gptqmodel's trainable torch kernel (``GPTQConfig(backend="torch")``).

    Args:
        model_path: local directory or Hub repo id.
        dtype: ``torch.dtype`` of the non-quantised parts (default ``torch.float32``).
        kwargs: passed to ``from_pretrained`` (``revision`` and ``token`` also to ``AutoConfig``).

    The model's ``save_pretrained`` / ``push_to_hub`` write a checkpoint that reloads to the same logits
    (:func:`qalora_hf.gptq_format.install_checkpoint_format_hooks`).

    Raises:
        TypeError: the checkpoint has no GPTQ ``quantization_config``.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")  # before gptqmodel is imported (docs/gptq_format.md)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPTQConfig

    config = AutoConfig.from_pretrained(model_path, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
    qc = quantization_config_dict(getattr(config, "quantization_config", None))
    if _method(qc) != "gptq":
        raise TypeError(f"{model_path} is not a GPTQ checkpoint; pass a quantize_config to quantise a float model first.")
    logger.info("load: %s with gptqmodel kernel backend=%r (trainable; the auto-picked CPU kernel is inference-only)", model_path, TRAINABLE_BACKEND)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=GPTQConfig(bits=int(qc["bits"]), backend=TRAINABLE_BACKEND), dtype=dtype or torch.float32,
        device_map=device_map, **kwargs
    )
    from .gptq_format import install_checkpoint_format_hooks

    install_checkpoint_format_hooks(model)  # save_pretrained / push_to_hub write what the config's label says
    return model


def mark_asymmetric(model) -> None:
    """Set ``sym = False`` in the model's ``quantization_config`` (dict or object) and in its ``hf_quantizer``'s copy:
    a merged model's zero-points differ group by group."""
    qc = model.config.quantization_config
    if isinstance(qc, dict):
        qc["sym"] = False
    else:
        qc.sym = False
    hf_quantizer = getattr(model, "hf_quantizer", None)
    if hf_quantizer is not None and hf_quantizer.quantization_config is not qc:
        hf_quantizer.quantization_config.sym = False
