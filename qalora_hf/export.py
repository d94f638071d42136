"""Writing a (merged) GPTQ model as a checkpoint that stock transformers + optimum + gptqmodel load.

With gptqmodel's torch kernels the in-memory zero-points are v2 (the real ``z``), while the config
says ``checkpoint_format: "gptq"`` (v1, ``z - 1`` on disk); plain ``save_pretrained`` would write the v2
values under the v1 label and the reload would be off by one zero-point everywhere (docs/gptq_format.md).
Every GPTQ model this package hands back carries
:func:`qalora_hf.gptq_format.install_checkpoint_format_hooks`, so its ``save_pretrained`` and
``push_to_hub`` write what the label says.  :func:`export_gptq` is the full-featured path: v1
``qzeros`` (the format transformers/optimum/gptqmodel, vLLM and most other GPTQ engines read), a clean
``quantization_config``, tokenizer, card, adapter and report, written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch

from .gptq_format import count_zero_points_at_0, install_checkpoint_format_hooks, set_checkpoint_format
from .gptq import gptq_layers, gptq_settings, quantization_config_dict
from .gptq import split_ragged_groups as split_ragged_groups_in_place
from .safety import ADAPTER_FILES, assert_folder_publishable, check_adapter_dir  # noqa: F401

logger = logging.getLogger(__name__)

# Keys of GPTQConfig that describe the weights on disk (the rest are quantisation-time or load-time options).
_QUANT_KEYS = ("quant_method", "bits", "group_size", "desc_act", "sym", "true_sequential", "damp_percent", "static_groups", "meta")


def clean_quantization_config(qc, *, sym: Optional[bool] = None) -> dict:
    """The ``quantization_config`` to write: weight-format keys only, ``checkpoint_format: "gptq"``.

    Drops calibration data, tokenizer, backend and other load/quantise-time options (the calibration
    ``dataset`` would otherwise leak training text into ``config.json``).
    """
    d = quantization_config_dict(qc)
    out = {k: d[k] for k in _QUANT_KEYS if k in d and d[k] is not None}
    out["quant_method"] = "gptq"
    if sym is not None:
        out["sym"] = sym
    out["checkpoint_format"] = "gptq"
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_tmp_dirs(target: Path) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` dirs of ``target`` left by an export that was killed (its pid is gone),
    and ``.<name>.old-*`` backups once ``target`` itself exists again."""
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        pid = path.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if path.is_dir() and (not pid.isdigit() or not _pid_alive(int(pid))):
            logger.info("removing %s left by an interrupted export", path)
            shutil.rmtree(path, ignore_errors=True)
    if target.exists():
        for path in target.parent.glob(f".{target.name}.old-*"):
            shutil.rmtree(path, ignore_errors=True)


def _atomic_replace(tmp: Path, target: Path) -> None:
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, backup)
    os.replace(tmp, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _copy_adapter(adapter_dir: Path, dest: Path, base_model_id: Optional[str]) -> None:
    """Copy only :data:`ADAPTER_FILES`; ``base_model_name_or_path`` becomes ``base_model_id``, or loses its local directories."""
    dest.mkdir(parents=True)
    shutil.copyfile(adapter_dir / "adapter_model.safetensors", dest / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    recorded = config.get("base_model_name_or_path")
    if base_model_id:
        config["base_model_name_or_path"] = base_model_id
    elif isinstance(recorded, str) and (Path(recorded).is_absolute() or recorded.startswith("~") or Path(recorded).exists()):
        config["base_model_name_or_path"] = Path(recorded.rstrip("/")).name
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_extra_names(extra_files: dict) -> None:
    for name in extra_files:
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name.startswith("~") or "\\" in name:
            raise ValueError(f"extra_files name {name!r} must be a relative path inside the export (no '..', not absolute).")


def write_export_dir(target: Path, write_weights, *, model, quantization_config: dict, tokenizer=None, card=None,
                     adapter_dir: Optional[Path] = None, extra_files: Optional[dict] = None, base_model_id: Optional[str] = None,
                     tokens=()) -> Path:
    """The atomic write shared by :func:`export_gptq` and :func:`qalora_hf.awq_export.export_awq`.

    In a hidden ``.<name>.tmp-<pid>-<hex>`` directory beside ``target``: ``write_weights(tmp)`` (the weights and
    ``config.json``), then ``quantization_config`` written into ``config.json`` (``_name_or_path`` dropped), the
    generation config, the tokenizer, the adapter's two PEFT files in ``adapter/``, ``extra_files``, the card as
    ``README.md``; the folder is checked by :func:`qalora_hf.safety.assert_folder_publishable` and renamed into
    place.  On any error the temporary directory is removed and ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        write_weights(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = quantization_config
        config.pop("_name_or_path", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if adapter_dir is not None:
            _copy_adapter(adapter_dir, tmp / "adapter", base_model_id)
        for name, src in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)
        if card is not None:
            card.save(tmp / "README.md")
        assert_folder_publishable(tmp, tokens)
        _atomic_replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def export_gptq(
    model,
    output_dir: str | os.PathLike,
    tokenizer=None,
    card=None,
    adapter_dir: Optional[str | os.PathLike] = None,
    extra_files: Optional[dict[str, str | os.PathLike]] = None,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
    base_model_id: Optional[str] = None,
    tokens: tuple = (),
    split_ragged_groups: bool = True,
) -> Path:
    """Write a GPTQ model (merged or not) atomically as a stock-loadable checkpoint.

    Writes sharded ``*.safetensors`` (with v1 ``qzeros``), ``config.json`` with a cleaned
    ``quantization_config`` (:func:`clean_quantization_config`), ``generation_config.json``, the
    tokenizer (with its chat template), ``README.md`` from ``card`` (a ``huggingface_hub.ModelCard``),
    the adapter's ``adapter_config.json`` + ``adapter_model.safetensors`` (only those: no pickle of a
    checkpoint directory, such as ``training_args.bin`` with its ``hub_token``) in ``adapter/``, with
    ``base_model_name_or_path`` set to ``base_model_id`` or stripped of local directories, and
    ``extra_files`` (``{relative name: source path}``, e.g. a loss plot).  Before the rename every file is
    checked by :func:`qalora_hf.safety.assert_folder_publishable` (no pickle, no token — ``tokens`` adds
    exact values to look for —, no local path).  Everything goes into a temporary directory beside ``output_dir`` that is
    renamed into place only when complete, so an interrupted export leaves no half-written directory:
    ``output_dir`` is either absent or the previous complete export, and at most a hidden
    ``.<name>.tmp-<pid>-<hex>`` directory beside it, which the next export to the same ``output_dir``
    removes once that process is gone.

    A model whose ``group_size`` leaves a ragged last group (``in_features`` not a multiple of it, e.g. SmolLM2's
    576 with 128) is, with ``split_ragged_groups`` (the default), first changed in place by
    :func:`qalora_hf.gptq.split_ragged_groups`: every group split into groups of 64 there, with its scale and
    zero-point, the same weights bit for bit, under a ``group_size`` that stock ``from_pretrained`` (gptqmodel's
    auto-picked kernels refuse a ragged group) and vLLM take.  ``split_ragged_groups=False`` writes the ragged groups,
    which only gptqmodel's ``backend="torch"`` loads: the quantisation cache does, so that QA-LoRA pools the groups
    GPTQ fitted.

    Returns:
        ``Path(output_dir)``.

    Raises:
        TypeError: ``model`` is a ``PeftModel`` (merge it first) or has no GPTQ layers.
        FileExistsError: ``output_dir`` exists and is not empty, and ``overwrite`` is False.
        FileNotFoundError: ``adapter_dir`` lacks ``adapter_config.json`` / ``adapter_model.safetensors``.
        ValueError: an ``extra_files`` name outside the export, or a file that would publish a pickle,
            a token or a local path (nothing is renamed into place then).
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise TypeError("export_gptq writes a plain GPTQ model; merge the adapters first with qalora_hf.merge_qalora(model).")
    qc = gptq_settings(model)
    if not gptq_layers(model):
        raise TypeError("the model has no gptqmodel quantised layers to export.")
    target = Path(output_dir).absolute()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose another output_dir or pass overwrite=True.")
    if adapter_dir is not None:
        adapter_dir = check_adapter_dir(adapter_dir)
    _check_extra_names(extra_files or {})

    if split_ragged_groups:
        split_ragged_groups_in_place(model)
        qc = gptq_settings(model)

    def write_weights(tmp: Path) -> None:
        # The export is v1 ("gptq"): label the model so, and let its state dict convert the in-memory
        # zero-points to that label (install_checkpoint_format_hooks), as every later save_pretrained will.
        set_checkpoint_format(model.config, "gptq")
        install_checkpoint_format_hooks(model)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)

    write_export_dir(target, write_weights, model=model, quantization_config=clean_quantization_config(qc), tokenizer=tokenizer,
                     card=card, adapter_dir=adapter_dir, extra_files=extra_files, base_model_id=base_model_id, tokens=tokens)
    zeros = count_zero_points_at_0(model)
    if zeros:
        logger.warning(
            "%s: %d zero-points are 0; transformers/optimum/gptqmodel read them exactly, but engines that unpack the "
            "v1 format per field (vLLM's and SGLang's ExLlama gptq kernels) misread those groups: serve the AWQ or "
            "GGUF export there (docs/gptq_format.md).", target.name, zeros,
        )
    logger.info("exported GPTQ checkpoint to %s", target)
    return target
