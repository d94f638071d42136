"""Facts about GPTQ models in transformers + optimum + gptqmodel, in one place.

* :func:`quantization_config_dict` / :func:`check_gptq_config` / :func:`gptq_settings`: the model's
  ``quantization_config`` (a dict on some code paths, a ``GPTQConfig`` object on others) as a dict,
  checked to be GPTQ with supported bits;
* :func:`gptq_layers`: the gptqmodel quantised linear layers of a model;
* :func:`is_gptq_checkpoint` and :func:`load_gptq_model`: a checkpoint's kind, and loading it with
  gptqmodel's trainable kernel (:data:`TRAINABLE_BACKEND`);
* :func:`mark_merged`: what a merged model's config must say (``sym: false``, no load-time ``backend``);
* :func:`kernel_summary`, :func:`check_trainable_kernels`, :func:`check_mergeable_kernels`: which gptqmodel
  kernel a model's layers run on, and whether it can train and be merged (docs/gptq_format.md, "Kernels").

See docs/gptq_format.md for the layout and the traps these functions exist for.  No torch import at module
level: the CLI checks a ``config.json`` with :func:`check_gptq_config` before loading anything heavy.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

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
    model = AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=GPTQConfig(bits=int(qc["bits"]), backend=TRAINABLE_BACKEND), dtype=dtype or torch.float32,
        device_map=device_map, **kwargs
    )
    from .gptq_format import install_checkpoint_format_hooks

    install_checkpoint_format_hooks(model)  # save_pretrained / push_to_hub write what the config's label says
    logger.info("load: %s with gptqmodel backend=%r: kernel %s", model_path, TRAINABLE_BACKEND, kernel_summary(model))
    return model


def _set_quantization_config(model, **values) -> None:
    """Set ``values`` in the model's ``quantization_config`` (dict or object) and in its ``hf_quantizer``'s copy
    (``save_pretrained`` writes the first; some transformers paths read the second)."""
    configs = (model.config.quantization_config, getattr(getattr(model, "hf_quantizer", None), "quantization_config", None))
    for config in {id(c): c for c in configs if c is not None}.values():
        for key, value in values.items():
            if isinstance(config, dict):
                config[key] = value
            else:
                setattr(config, key, value)


def mark_merged(model) -> None:
    """What a merged model's ``quantization_config`` must say, so that its plain ``save_pretrained`` and
    ``push_to_hub`` write what :func:`qalora_hf.export_gptq` writes (``docs/gptq_format.md``, "What the merged
    model's config says"):

    * ``sym: false``: the zero-points differ group by group;
    * ``backend: null``: ``backend="torch"`` was a load-time choice for training and merging (:data:`TRAINABLE_BACKEND`);
      written to ``config.json`` it would pin that slower kernel on every later ``from_pretrained``.  Kept when a
      ragged last group remains (only ``backend="torch"`` loads it, :func:`split_ragged_groups`);
    * ``dataset: null``, ``tokenizer: null``: a base quantised in the same process carries its calibration text there.
    """
    qc = quantization_config_dict(model.config.quantization_config)
    group_size = int(qc.get("group_size") or -1)
    ragged = group_size > 0 and any(int(layer.in_features) % group_size for layer in gptq_layers(model).values())
    values = {"sym": False, "dataset": None, "tokenizer": None}
    if not ragged:
        values["backend"] = None
    _set_quantization_config(model, **values)


def split_ragged_groups(model, sizes: Optional[tuple] = None) -> Optional[int]:
    """In place: if the model's ``group_size`` leaves a ragged last group (``in_features`` not a multiple of it, e.g.
    SmolLM2's 576 with 128), split every group of every GPTQ layer into groups of
    :func:`qalora_hf.gptq_format.exact_group_size` (64 there), each with its group's scale and zero-point.

    The weights stay the same, bit for bit (``docs/gptq_format.md``, "Ragged last groups"); the layers' ``g_idx``,
    ``scales``, ``qzeros`` and ``group_size`` and the ``quantization_config`` (and its ``hf_quantizer`` copy) change,
    so that ``save_pretrained``/``push_to_hub`` write a checkpoint every GPTQ kernel loads (gptqmodel's auto-picked
    CPU kernels and vLLM refuse a ragged group).  For a merged model (``merge_qalora`` calls it) or an export; a base
    that will still be trained must keep the groups GPTQ fitted, which QA-LoRA pools.

    Args:
        sizes: the group sizes to split into, largest first (default ``gptq_format.SPLIT_GROUP_SIZES``; the AWQ
            export passes its own).

    Returns:
        The new group size, or None when no group is ragged (or no smaller size divides them: kept, with a warning).
    """
    from .gptq_format import SPLIT_GROUP_SIZES, exact_group_size, split_groups

    layers = gptq_layers(model)
    qc = model.config.quantization_config
    group_size = int(qc["group_size"] if isinstance(qc, dict) else qc.group_size)
    new = exact_group_size(group_size, [int(layer.in_features) for layer in layers.values()], sizes or SPLIT_GROUP_SIZES)
    if new is None:
        logger.warning("group_size=%d leaves a ragged last group that no smaller group size divides; kept as it is, which "
                       "only gptqmodel's backend='torch' loads.", group_size)
        return None
    if new == group_size:
        return None
    for layer in layers.values():
        g_idx, rows = split_groups(layer.g_idx, group_size, new)
        rows = rows.to(layer.scales.device)
        layer.g_idx = g_idx.to(layer.g_idx.dtype).to(layer.g_idx.device)
        layer.qzeros = layer.qzeros[rows].contiguous()  # rows are groups (qzeros packs along the outputs)
        layer.scales = layer.scales[rows].contiguous()
        layer.group_size = new
        for hook in ("clear_weight_cache", "_stream_reset_cache"):  # gptqmodel's cached dequantised weights
            if callable(getattr(layer, hook, None)):
                getattr(layer, hook)()
    _set_quantization_config(model, group_size=new)
    logger.info("group_size=%d leaves a ragged last group: every group split into groups of %d with its scale and "
                "zero-point (the same weights; a checkpoint every GPTQ kernel loads).", group_size, new)
    return new


# --------------------------------------------------------------------------------------------------
# Kernels: which gptqmodel class a layer runs on, and what it can do (docs/gptq_format.md, "Kernels")


def _torch_linear_class():
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    return TorchLinear


def kernel_trainable(cls) -> bool:
    """Whether gptqmodel's kernel class ``cls`` trains (its own ``SUPPORTS_TRAINING`` flag: an inference-only kernel
    raises ``NotImplementedError`` on ``model.train()``)."""
    return bool(getattr(cls, "SUPPORTS_TRAINING", False))


def kernel_mergeable(cls) -> bool:
    """Whether the merge can read and write the integers of a layer of kernel class ``cls`` in place.

    True for gptqmodel's ``TorchLinear`` and its subclasses (``TritonV2Linear`` on CUDA): they keep ``qweight`` in
    gptqmodel's packed layout and v2 zero-points in memory at all times.  The other kernels repack the weights
    for their own matmul, at load time or on their first inference forward (``TorchFusedLinear`` and
    ``TorchAtenLinear`` / ``TorchCpuAvx512Linear`` into ATen's int4pack, ``TorchInt8Linear``, ExLlama, Marlin),
    or hold v1 zero-points (``REQUIRES_FORMAT_V2`` false), so what :func:`qalora_hf.gptq_format.read_layer` would
    unpack is not the checkpoint's integers.
    """
    return isinstance(cls, type) and issubclass(cls, _torch_linear_class()) and bool(getattr(cls, "REQUIRES_FORMAT_V2", False))


def kernel_classes(model) -> list[type]:
    """The gptqmodel kernel classes of ``model``'s quantised linear layers, sorted by name."""
    return sorted({type(m) for m in gptq_layers(model).values()}, key=lambda c: c.__name__)


def kernel_summary(model) -> str:
    """``"TorchLinear (trainable, mergeable)"``: each kernel class of ``model``'s GPTQ layers and what it can do, read
    from the class (:func:`kernel_trainable`, :func:`kernel_mergeable`)."""
    parts = []
    for cls in kernel_classes(model):
        can = ["trainable" if kernel_trainable(cls) else "inference-only", "mergeable" if kernel_mergeable(cls) else "not mergeable"]
        parts.append(f"{cls.__name__} ({', '.join(can)})")
    return ", ".join(parts) or "none (no gptqmodel layers)"


_RELOAD_HINT = (
    'load the model with GPTQConfig(bits=..., backend="torch") (what qalora_hf.load_gptq_model does, and what '
    "QALoraTrainer does with a checkpoint path)"
)


def check_trainable_kernels(model) -> None:
    """Refuse a model whose GPTQ layers run on an inference-only gptqmodel kernel, before any training.

    Raises:
        ValueError: names the kernel class and says how to load a trainable one.
    """
    bad = [c.__name__ for c in kernel_classes(model) if not kernel_trainable(c)]
    if bad:
        raise ValueError(
            f"the model's GPTQ layers run on gptqmodel's {', '.join(bad)}, an inference-only kernel (SUPPORTS_TRAINING "
            f"is false): training would fail at train(). {_RELOAD_HINT[0].upper()}{_RELOAD_HINT[1:]}."
        )


def check_mergeable_kernels(model) -> None:
    """Refuse a model whose GPTQ layers run on a kernel the merge cannot read (:func:`kernel_mergeable`), before any
    work.

    Raises:
        ValueError: names the kernel class and says how to load a mergeable one.
    """
    bad = [c.__name__ for c in kernel_classes(model) if not kernel_mergeable(c)]
    if bad:
        raise ValueError(
            f"the model's GPTQ layers run on gptqmodel's {', '.join(bad)}, which repacks the weights for its own matmul "
            "(or holds v1 zero-points), so the merge cannot read or write its integers. Only TorchLinear layers (and "
            f"TritonV2Linear on CUDA) can be merged: {_RELOAD_HINT}, then load the adapter with load_qalora_adapter."
        )
