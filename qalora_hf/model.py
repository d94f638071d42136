"""Injecting QA-LoRA adapters into a transformers GPTQ model, through PEFT."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional, Union

from peft import LoraConfig, PeftModel, get_peft_model

from .adapter import QALoraGPTQLinear, gptq_group_size, pooling_permutation
from .config import POOLING_G_IDX, POOLING_KEY, QALoraConfig, QALoraLoraConfig
from .gptq_format import install_checkpoint_format_hooks
from .gptq import gptq_layers, gptq_settings, quant_linear_class  # noqa: F401  (gptq_layers/gptq_settings: also imported from here)

logger = logging.getLogger(__name__)


def _resolve_targets(model, target_modules: Union[list[str], str], layers: dict) -> list[str]:
    """Expand 'all-linear' and check each target hits GPTQ layers only; returns qualified layer names."""
    if target_modules == "all-linear":
        names = [n for n in layers if not n.split(".")[-1] == "lm_head"]
        if not names:
            raise ValueError("the model has no GPTQ linear layers to adapt.")
        return names
    chosen = []
    modules = dict(model.named_modules())
    for target in target_modules:
        hits = [n for n in modules if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(
                f"target module '{target}' matches no module of the model; valid GPTQ layer names end in: "
                f"{sorted({n.split('.')[-1] for n in layers})}."
            )
        not_gptq = [n for n in hits if n not in layers]
        if not_gptq:
            raise ValueError(
                f"target module '{target}' matches {not_gptq[0]} ({type(modules[not_gptq[0]]).__name__}), which is not a GPTQ "
                "quantised layer; PEFT would train plain LoRA there, which cannot be merged into GPTQ. Remove it from target_modules."
            )
        chosen.extend(hits)
    return sorted(set(chosen))


def _lora_config_for(model, config: QALoraConfig) -> tuple[LoraConfig, list[str]]:
    qc = gptq_settings(model)
    layers = gptq_layers(model)
    if not layers:
        raise TypeError(
            "the model has a GPTQ quantization_config but no gptqmodel quantised layers; install gptqmodel and load "
            "with GPTQConfig(bits=..., backend='torch')."
        )
    model_g = int(qc.get("group_size", -1))
    if model_g in (-1, 0):
        raise ValueError(
            "the GPTQ model uses group_size=-1 (one group per row): QA-LoRA then has a single pooled feature per layer. "
            "Quantise with a group size such as 32, 64 or 128."
        )
    g = config.group_size or model_g
    if g != model_g:
        raise ValueError(
            f"QALoraConfig.group_size={g} differs from the model's GPTQ group_size={model_g}; the adapter could not be "
            f"merged into the zero-points. Set group_size={model_g} or leave it unset."
        )
    names = _resolve_targets(model, config.target_modules, layers)
    for name in names:
        layer = layers[name]
        if gptq_group_size(layer) != g:
            raise ValueError(f"{name}: GPTQ group_size {gptq_group_size(layer)} != {g}; set group_size={gptq_group_size(layer)}.")
        pooling_permutation(layer.g_idx, g, name)
    lora_config = config.to_lora_config(group_size=g)
    # Exact module names, so PEFT does not re-interpret suffixes.
    lora_config.target_modules = names
    return lora_config, names


def _register(lora_config: LoraConfig) -> LoraConfig:
    lora_config._register_custom_module({quant_linear_class(): QALoraGPTQLinear})
    return lora_config


def check_not_peft(model) -> None:
    """Refuse a model that PEFT has already wrapped or injected adapter layers into.

    Raises:
        ValueError: says what to pass instead (the GPTQ base model; a saved QA-LoRA adapter goes through
            :func:`load_qalora_adapter`).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = isinstance(model, PeftModel)
    if wrapped or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        what = f"a {type(model).__name__}" if wrapped else "a model with PEFT adapter layers injected"
        raise ValueError(
            f"got {what}: QA-LoRA adds its own adapters to the GPTQ base model, and PEFT cannot wrap a model twice. "
            "Pass the GPTQ model itself (loaded with qalora_hf.load_gptq_model, or GPTQConfig(bits=..., backend=\"torch\")), "
            "or its checkpoint path to QALoraTrainer, with the adapter options in qalora_config=QALoraConfig(...). "
            "To continue a QALoraTrainer run, pass the base again and call trainer.train(resume_from_checkpoint=...); to "
            "merge a loaded QA-LoRA adapter, call merge_qalora(peft_model) (or `qalora-hf merge`); model.unload() gives "
            "the base back without adapters."
        )


def get_qalora_model(model, config: Optional[QALoraConfig] = None, adapter_name: str = "default") -> PeftModel:
    """Wrap a transformers GPTQ model with QA-LoRA adapters on every targeted quantised layer.

    The packed INT weights stay frozen; only ``lora_A`` [r, G] / ``lora_B`` [N, r] train.

    Args:
        model: a ``PreTrainedModel`` loaded by transformers + optimum + gptqmodel with a trainable kernel
            (``GPTQConfig(bits=..., backend="torch")``).
        config: adapter options; default ``QALoraConfig()``.

    Returns:
        A ``peft.PeftModel`` whose ``save_pretrained`` writes a stock PEFT LoRA adapter
        (``use_qalora=True``, ``qalora_group_size`` = GPTQ group size).

    Raises:
        TypeError: not a GPTQ model (float, bitsandbytes, AWQ, ...).
        ValueError: a model already wrapped by PEFT (a ``PeftModel``, or one with PEFT adapter layers injected),
            unsupported bits, group size mismatch, ``in_features`` not a multiple of the group size, or a target
            that matches nothing or a non-GPTQ layer.
    """
    check_not_peft(model)
    config = config or QALoraConfig()
    lora_config, names = _lora_config_for(model, config)
    install_checkpoint_format_hooks(model)  # so the merged model's save_pretrained writes a correct checkpoint
    peft_model = get_peft_model(model, _register(lora_config), adapter_name=adapter_name)
    n_adapted = sum(isinstance(m, QALoraGPTQLinear) for m in peft_model.modules())
    if n_adapted != len(names):
        raise RuntimeError(f"expected {len(names)} QA-LoRA layers, PEFT created {n_adapted}.")
    return peft_model


def load_qalora_adapter(model, adapter_path: str, is_trainable: bool = False, adapter_name: str = "default", **kwargs) -> PeftModel:
    """Load a saved QA-LoRA adapter (ours or stock PEFT ``use_qalora``) onto a GPTQ ``model``.

    Our adapter files record ``"qalora_pooling": "g_idx"``; a file without it is a stock PEFT adapter,
    which pools contiguous channels: it loads on a base without act-order (where both poolings agree) and
    is refused on an act-order base, where its update cannot be merged.

    Args:
        adapter_path: a local directory or Hub repo holding ``adapter_config.json`` and
            ``adapter_model.safetensors``; ``kwargs`` go to ``PeftModel.from_pretrained`` (``subfolder``,
            ``revision``, ...).

    Raises:
        ValueError: the adapter is not a QA-LoRA adapter (``use_qalora`` false), a stock PEFT adapter on an
            act-order base, it does not fit the model, or ``model`` is already wrapped by PEFT.
    """
    check_not_peft(model)
    raw = _read_adapter_config(adapter_path, subfolder=kwargs.get("subfolder"), revision=kwargs.get("revision"))
    pooling = raw.pop(POOLING_KEY, None)
    lora_config = LoraConfig.from_peft_type(**raw)
    if not getattr(lora_config, "use_qalora", False):
        raise ValueError(f"{adapter_path} is a plain LoRA adapter (use_qalora is false); it cannot be merged into GPTQ zero-points.")
    checked, names = _lora_config_for(model, QALoraConfig.from_lora_config(lora_config))
    if pooling != POOLING_G_IDX:
        layers = gptq_layers(model)
        permuted = [n for n in names if pooling_permutation(layers[n].g_idx, int(lora_config.qalora_group_size), n) is not None]
        if permuted:
            raise ValueError(
                f"{adapter_path} is a stock PEFT use_qalora adapter (its adapter_config.json has no "
                f"'{POOLING_KEY}': '{POOLING_G_IDX}'): it pools contiguous channels, but this base uses act-order "
                f"({permuted[0]} has a permuted g_idx), so its update is not constant inside quantisation groups and "
                "cannot be merged into GPTQ zero-points. Train the adapter with qalora_hf (it pools by g_idx), or use a "
                "base quantised with desc_act=False. If this adapter was trained by qalora_hf before its files were "
                f"marked, add \"{POOLING_KEY}\": \"{POOLING_G_IDX}\" to its adapter_config.json."
            )
    lora_config = QALoraLoraConfig(**{f.name: getattr(lora_config, f.name) for f in dataclasses.fields(LoraConfig) if f.init})
    lora_config.target_modules = checked.target_modules
    lora_config.inference_mode = not is_trainable
    install_checkpoint_format_hooks(model)
    return PeftModel.from_pretrained(model, adapter_path, config=_register(lora_config), is_trainable=is_trainable, adapter_name=adapter_name, **kwargs)


def _read_adapter_config(adapter_path: str, subfolder: Optional[str] = None, revision: Optional[str] = None) -> dict:
    """The raw ``adapter_config.json`` of a local directory or Hub repo (PEFT's own reader drops unknown keys)."""
    path = Path(adapter_path, subfolder or "", "adapter_config.json")
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(adapter_path, "adapter_config.json", subfolder=subfolder, revision=revision))
    return json.loads(path.read_text())
