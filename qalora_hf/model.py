"""Injecting QA-LoRA adapters into a transformers GPTQ model, through PEFT."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

from peft import LoraConfig, PeftModel, get_peft_model

from .adapter import QALoraGPTQLinear, gptq_group_size, pooling_permutation
from .config import BASE_KEY, POOLING_G_IDX, POOLING_KEY, QALoraConfig, QALoraLoraConfig
from .gptq_format import install_checkpoint_format_hooks
from .gptq import gptq_layers, gptq_settings, quant_linear_class  # noqa: F401  (gptq_layers/gptq_settings: also imported from here)

logger = logging.getLogger(__name__)


def _resolve_targets(model, target_modules: Union[list[str], str], layers: dict) -> list[str]:
    """Expand 'all-linear' and check each target hits GPTQ layers only; returns qualified layer names
    (:func:`qalora_hf.checks.resolve_targets`, the same check the trainer runs before quantising)."""
    from .checks import resolve_targets

    return resolve_targets(target_modules, list(layers), {n: type(m).__name__ for n, m in model.named_modules()})


def base_fingerprint(model, names: Optional[list[str]] = None) -> Optional[dict]:
    """Which GPTQ base ``model`` is: a sha256 over the integer state of its first and last adapted GPTQ layers.

    Hashed per layer, in order: the layer name, then the unpacked codes ``q`` [K, N], the v2 zero-points ``z``
    [G, N] (int64), the fp16 scales [G, N] (as float32) and ``g_idx`` [K] (int64), all as read by
    :func:`qalora_hf.gptq_format.read_layer` — the same values whatever kernel or on-disk zero-point convention the
    model was loaded with.  Two checkpoints quantised from the same float model on other calibration rows, or a base
    after a merge, give other digests.

    Args:
        names: the adapted layers (default: every GPTQ layer); the first and the last are hashed.

    Returns:
        ``{"sha256": hex, "layers": [first, last], "bits": int, "group_size": int}``, or None when the layers cannot be
        read as integers (an inference-only kernel).
    """
    import hashlib

    import torch

    from .gptq_format import read_layer

    layers = gptq_layers(model)
    names = [n for n in (names or list(layers)) if n in layers]
    if not names:
        return None
    picked = [names[0]] if len(names) == 1 else [names[0], names[-1]]
    h = hashlib.sha256()
    try:
        for name in picked:
            t = read_layer(layers[name])
            h.update(name.encode())
            for tensor in (t.q.to(torch.int64), t.z.to(torch.int64), t.scales.to(torch.float32), t.g_idx.to(torch.int64)):
                h.update(tensor.contiguous().numpy().tobytes())
    except (TypeError, ValueError) as err:
        logger.debug("no base fingerprint: %s", err)
        return None
    qc = gptq_settings(model)
    return {"sha256": h.hexdigest(), "layers": picked, "bits": int(qc["bits"]), "group_size": int(qc.get("group_size", -1))}


def _base_name(model) -> Optional[str]:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)


def check_same_base(model, adapter_path: str, recorded: Optional[dict], recorded_name: Optional[str]) -> None:
    """Refuse an adapter trained on another GPTQ base than ``model``.

    With a ``qalora_base`` fingerprint in the adapter (every adapter qalora_hf writes), it is compared with
    :func:`base_fingerprint` of ``model``.  Without one (stock PEFT adapters, older files), the adapter's
    ``base_model_name_or_path`` is compared with the model's name when both are Hub repo ids (a local path tells
    nothing about which repo it holds).

    Raises:
        ValueError: a different base, saying which one the adapter records and how to override (``allow_other_base``).
    """
    from .checks import looks_like_path

    override = "pass allow_other_base=True (qalora-hf merge --allow-other-base) if you are sure it fits"
    if recorded:
        wanted = list(recorded.get("layers") or [])
        layers = gptq_layers(model)
        if not wanted or any(n not in layers for n in wanted):
            raise ValueError(
                f"{adapter_path} was trained on a GPTQ base with the layers {recorded.get('layers')}, which this base "
                f"({_base_name(model)}) does not have as GPTQ layers; load it onto the base it was trained on "
                f"({recorded_name}), or {override}."
            )
        current = base_fingerprint(model, wanted)
        if current is None:
            logger.warning("%s: cannot compare its base (the GPTQ layers cannot be read as integers)", adapter_path)
            return
        if current["sha256"] != recorded.get("sha256"):
            raise ValueError(
                f"{adapter_path} was trained on another GPTQ base: its adapter_config.json records {BASE_KEY} sha256 "
                f"{str(recorded.get('sha256'))[:16]}... (base {recorded_name}), this base ({_base_name(model)}) has "
                f"{current['sha256'][:16]}... over the same layers {recorded['layers']}. Merging it here would give a wrong "
                f"model without an error. Load it onto the base it was trained on, or {override}."
            )
        return
    current_name = _base_name(model)
    names = [n for n in (recorded_name, current_name) if isinstance(n, str) and n]
    if len(names) == 2 and not any(os.path.exists(n) or looks_like_path(n) for n in names) and names[0] != names[1]:
        raise ValueError(
            f"{adapter_path} records base_model_name_or_path={recorded_name!r}, but the base is {current_name!r} (the "
            f"adapter has no {BASE_KEY} fingerprint to compare). Load it onto {recorded_name}, or {override}."
        )


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
        (``use_qalora=True``, ``qalora_group_size`` = GPTQ group size), plus ``qalora_pooling`` and ``qalora_base``
        (:func:`base_fingerprint` of ``model``).

    Raises:
        TypeError: not a GPTQ model (float, bitsandbytes, AWQ, ...).
        ValueError: a model already wrapped by PEFT (a ``PeftModel``, or one with PEFT adapter layers injected),
            unsupported bits, group size mismatch, ``in_features`` not a multiple of the group size, or a target
            that matches nothing or a non-GPTQ layer.
    """
    check_not_peft(model)
    config = config or QALoraConfig()
    lora_config, names = _lora_config_for(model, config)
    lora_config.qalora_base = base_fingerprint(model, names)  # written into every adapter_config.json, compared on load
    install_checkpoint_format_hooks(model)  # so the merged model's save_pretrained writes a correct checkpoint
    peft_model = get_peft_model(model, _register(lora_config), adapter_name=adapter_name)
    n_adapted = sum(isinstance(m, QALoraGPTQLinear) for m in peft_model.modules())
    if n_adapted != len(names):
        raise RuntimeError(f"expected {len(names)} QA-LoRA layers, PEFT created {n_adapted}.")
    return peft_model


def load_qalora_adapter(model, adapter_path: str, is_trainable: bool = False, adapter_name: str = "default", *,
                        allow_other_base: bool = False, **kwargs) -> PeftModel:
    """Load a saved QA-LoRA adapter (ours or stock PEFT ``use_qalora``) onto a GPTQ ``model``.

    Our adapter files record ``"qalora_pooling": "g_idx"``; a file without it is a stock PEFT adapter,
    which pools contiguous channels: it loads on a base without act-order (where both poolings agree) and
    is refused on an act-order base, where its update cannot be merged.  The base the adapter records
    (``qalora_base``, or else ``base_model_name_or_path``) must be ``model`` (:func:`check_same_base`) unless
    ``allow_other_base``.

    Args:
        adapter_path: a local directory or Hub repo holding ``adapter_config.json`` and
            ``adapter_model.safetensors``; ``kwargs`` go to ``PeftModel.from_pretrained`` (``subfolder``,
            ``revision``, ...).

    Raises:
        ValueError: the adapter is not a QA-LoRA adapter (``use_qalora`` false), a stock PEFT adapter on an
            act-order base, an adapter trained on another base (without ``allow_other_base``), it does not fit the
            model, or ``model`` is already wrapped by PEFT.
    """
    check_not_peft(model)
    raw = _read_adapter_config(adapter_path, subfolder=kwargs.get("subfolder"), revision=kwargs.get("revision"))
    pooling = raw.pop(POOLING_KEY, None)
    recorded_base = raw.pop(BASE_KEY, None)
    lora_config = LoraConfig.from_peft_type(**raw)
    if not getattr(lora_config, "use_qalora", False):
        raise ValueError(f"{adapter_path} is a plain LoRA adapter (use_qalora is false); it cannot be merged into GPTQ zero-points.")
    checked, names = _lora_config_for(model, QALoraConfig.from_lora_config(lora_config))
    if allow_other_base:
        logger.warning("%s: not comparing the base it was trained on with this one (allow_other_base=True)", adapter_path)
    else:
        check_same_base(model, adapter_path, recorded_base, raw.get("base_model_name_or_path"))
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
    lora_config.qalora_base = recorded_base
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
