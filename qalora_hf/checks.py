"""Every check that can run before the expensive work (GPTQ quantisation, training, the merge), in one place.

:func:`check_trainer_inputs` is called once by :class:`~qalora_hf.QALoraTrainer` before it quantises or loads
anything; ``recipes/sft_alpaca.py`` and ``qalora-hf`` call the single checks on their own inputs.  Each check raises
``ValueError`` with one message that says what is wrong and what to change (docs/reliability.md lists them).

What is checked:

* names: a Hub repo id (``huggingface_hub.utils.validate_repo_id``), a git revision (``git check-ref-format``'s
  rules), a model given as a local path that does not exist (instead of the Hub client's "Repo id must be in the
  form ..." for a path);
* the model's layers, read from a meta-device skeleton of the *float* model (``AutoConfig`` +
  ``AutoModelForCausalLM.from_config`` under ``accelerate.init_empty_weights``: no weights are read), with the same
  functions optimum's ``GPTQQuantizer`` uses to pick the layers it quantises: ``target_modules`` must name quantised
  layers, the group size must be one gptqmodel's trainable kernel takes (``TorchLinear.validate``), and every
  adapted layer's ``in_features`` must be a multiple of it (QA-LoRA pools whole quantisation groups);
* a GPTQ checkpoint given together with quantisation options that disagree with its ``quantization_config``;
* row values: ``None`` or non-text values in the columns SFT reads (the message names the row);
* directories: ``output_dir`` and the export's parent can be written (a probe directory is created and removed).

No torch import at module level.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# names


def check_repo_id(repo_id: Any, what: str = "hub_model_id", *, namespace_required: bool = False) -> str:
    """``repo_id`` checked with ``huggingface_hub.utils.validate_repo_id`` (1-96 characters of ``[A-Za-z0-9._-]``,
    ``name`` or ``namespace/name``, no ``--`` / ``..``); ``namespace_required`` asks for ``namespace/name``.

    Raises:
        ValueError: naming ``what`` and the rule that is broken.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"{what}={repo_id!r} is not a Hub repo id; give 'namespace/name', e.g. 'you/model-qalora-gptq'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{what}={repo_id!r} is not a valid repo id ({str(err).splitlines()[0]}); give "
                         "'namespace/name', e.g. 'you/model-qalora-gptq'.") from None
    if namespace_required and repo_id.count("/") != 1:
        raise ValueError(f"{what}={repo_id!r} must be 'namespace/name', e.g. 'you/model-qalora-gptq'.")
    return repo_id


_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_revision(revision: Any, what: str = "revision") -> str:
    """A branch, tag or commit name following ``git check-ref-format`` (the Hub applies git's rules): not empty, at
    most 255 bytes, no control character, space or ``~^:?*[\\``, no ``..``, ``//`` or ``@{``, not ``@``, not starting
    with ``-`` or ``/``, not ending with ``/`` or ``.``, no component starting with ``.`` or ending with ``.lock``.

    Raises:
        ValueError: naming ``what`` and the rule that is broken.
    """
    problem = None
    if not isinstance(revision, str) or not revision:
        problem = "it is empty"
    elif len(revision.encode()) > 255:
        problem = "it is longer than 255 bytes"
    elif _REF_FORBIDDEN.search(revision):
        problem = "it contains a control character, a space or one of ~^:?*[\\"
    elif revision.startswith(("-", "/")) or revision.endswith(("/", ".")):
        problem = "it starts with '-' or '/', or ends with '/' or '.'"
    elif ".." in revision or "//" in revision or "@{" in revision or revision == "@":
        problem = "it contains '..', '//' or '@{', or is '@'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        problem = "a '/'-separated part starts with '.' or ends with '.lock'"
    if problem:
        raise ValueError(f"{what}={revision!r} is not a valid git revision: {problem}. Give a branch, tag or commit "
                         "such as 'main', 'v1.0' or 'int4-g32'.")
    return revision


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be meant as a local path: it starts with ``.``, ``/`` or ``~``, holds a backslash or
    more than one ``/`` (a Hub id is ``name`` or ``namespace/name``)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)


def check_model_source(model: Any, what: str = "model_name_or_path") -> str:
    """``model`` as a local path that exists or a Hub repo id.

    Raises:
        ValueError: a local path that does not exist ("... does not exist", not the Hub client's "Repo id must be in
            the form ..."), or a name that is neither an existing path nor a valid repo id.
    """
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ValueError(f"{what}={model!r}: give a local model directory or a Hub repo id 'namespace/name'.")
    name = str(model)
    if os.path.exists(os.path.expanduser(name)):
        return name
    if looks_like_path(name):
        raise ValueError(f"{what}={name!r}: the path {os.path.expanduser(name)} does not exist; give an existing model "
                         "directory or a Hub repo id 'namespace/name'.")
    try:
        return check_repo_id(name, what)
    except ValueError:
        raise ValueError(f"{what}={name!r} is neither an existing local directory nor a valid Hub repo id "
                         "('namespace/name'); check the path or the id.") from None


# --------------------------------------------------------------------------------------------------
# directories


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(path: Union[str, os.PathLike], what: str = "output_dir", *, for_rename: bool = False) -> Path:
    """``path`` can be created (if missing) and written: a probe directory is made (and removed) in it, or in its
    nearest existing ancestor when it does not exist yet.  With ``for_rename`` (a directory written beside itself
    and renamed into place, as the export is) the probe goes into its parent.  Root bypasses file modes, so only a
    real write tells (``os.access`` would not).

    Raises:
        ValueError: ``path`` is a file, or the probe fails (read-only file system, permissions, ...), naming the
            directory and the OS error.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {path} exists and is not a directory; choose a directory.")
    places = [_nearest_existing(p.parent if for_rename else p)]
    if for_rename and p.is_dir():
        places.append(p)  # replaced by a rename, and its old files removed: it must be writable too
    for where in places:
        if not where.is_dir():
            raise ValueError(f"{what} {path}: {where} is not a directory; choose another {what}.")
        try:
            probe = tempfile.mkdtemp(prefix=".qalora-write-probe-", dir=where)
            os.rmdir(probe)
        except OSError as err:
            raise ValueError(f"{what} {path} cannot be written ({err.strerror or err} in {where}); choose a directory "
                             "on a writable disk.") from None
    return p


# --------------------------------------------------------------------------------------------------
# the model's layers, before any weight is read


def _gptq_kernel():
    """gptqmodel's trainable GPTQ kernel class (``BACKEND.TORCH``), whose ``validate`` the checks call."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    return TorchLinear


def supported_group_sizes() -> list[int]:
    """The positive group sizes gptqmodel's trainable kernel takes (``TorchLinear.SUPPORTS_GROUP_SIZE``)."""
    return sorted(g for g in _gptq_kernel().SUPPORTS_GROUP_SIZE if g > 0)


def quantised_layer_shapes(model_path: str, **config_kwargs) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """The layers GPTQ quantises in ``model_path`` (a float model or a GPTQ checkpoint), from a meta-device skeleton.

    The skeleton is ``AutoModelForCausalLM.from_config`` under ``accelerate.init_empty_weights`` (no weights read);
    the layers are the ones optimum's ``GPTQQuantizer`` picks: ``optimum.gptq.utils.get_layers`` under
    ``get_block_name_with_pattern`` (every ``nn.Linear`` inside the transformer blocks; ``lm_head`` is outside),
    limited to a GPTQ checkpoint's ``modules_in_block_to_quantize`` when it has one.

    Returns:
        ``({qualified name: (in_features, out_features)}, {qualified name of every module: its class name})``.
    """
    from accelerate import init_empty_weights
    from optimum.gptq.utils import get_block_name_with_pattern, get_layers
    from transformers import AutoConfig, AutoModelForCausalLM

    from .gptq import quantization_config_dict

    config = AutoConfig.from_pretrained(model_path, **config_kwargs)
    qc = quantization_config_dict(getattr(config, "quantization_config", None))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain skeleton: from_config does not quantise
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    block = qc.get("block_name_to_quantize") or get_block_name_with_pattern(skeleton)
    layers = get_layers(skeleton, prefix=block)
    keep = qc.get("modules_in_block_to_quantize")
    if keep:
        names = {n for group in keep for n in group}
        layers = {k: v for k, v in layers.items() if any(k.endswith("." + n) for n in names)}
    shapes = {name: (int(m.in_features), int(m.out_features)) for name, m in layers.items()}
    return shapes, {name: type(m).__name__ for name, m in skeleton.named_modules()}


def resolve_targets(target_modules: Union[str, Sequence[str]], layers: Iterable[str], modules: Mapping[str, str]) -> list[str]:
    """``target_modules`` (``"all-linear"`` or module names / suffixes) as the qualified names of quantised layers.

    Args:
        layers: qualified names of the GPTQ-quantised layers.
        modules: ``{qualified name: class name}`` of every module (to say what a wrong target matched).

    Raises:
        ValueError: a target that matches no module, or matches one that is not a quantised layer (PEFT would train
            plain LoRA there, which cannot be merged into GPTQ); the message lists the valid names.
    """
    layers = list(layers)
    valid = sorted({n.split(".")[-1] for n in layers})
    if isinstance(target_modules, (list, tuple)) and list(target_modules) == ["all-linear"]:
        target_modules = "all-linear"
    if target_modules == "all-linear":
        names = [n for n in layers if n.split(".")[-1] != "lm_head"]
        if not names:
            raise ValueError("the model has no GPTQ linear layers to adapt.")
        return names
    chosen: list[str] = []
    layer_set = set(layers)
    for target in ([target_modules] if isinstance(target_modules, str) else target_modules):
        hits = [n for n in modules if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(f"target module '{target}' matches no module of the model; valid GPTQ layer names end in: "
                             f"{valid} (or use 'all-linear').")
        not_gptq = [n for n in hits if n not in layer_set]
        if not_gptq:
            raise ValueError(
                f"target module '{target}' matches {not_gptq[0]} ({modules[not_gptq[0]]}), which is not a GPTQ quantised "
                f"layer; PEFT would train plain LoRA there, which cannot be merged into GPTQ. Remove it from "
                f"target_modules; valid names end in: {valid}."
            )
        chosen.extend(hits)
    return sorted(set(chosen))


def check_group_size(group_size: int, shapes: Mapping[str, tuple[int, int]], targets: Iterable[str], *, bits: int,
                     desc_act: bool = False, sym: bool = False, source: str = "the model") -> None:
    """``group_size`` works for GPTQ on every layer and for QA-LoRA on every adapted layer.

    * gptqmodel's trainable kernel must take it on each quantised layer (``TorchLinear.validate``: its
      ``SUPPORTS_GROUP_SIZE``, bits, shapes), so a group size it refuses fails before the GPTQ pass, not after;
    * no adapted layer may be narrower than one group: QA-LoRA pools each quantisation group into one feature, and
      ``group_size=-1`` or a group wider than ``in_features`` would leave a single, partial one.
      A shorter last group (``in_features`` not a multiple of ``group_size``, e.g. 576 with 128) is what GPTQ
      quantises there, and the adapter and merge pool it as its own group (:func:`qalora_hf.adapter.group_counts`).

    Raises:
        ValueError: naming the layer, and the group sizes that would work on every layer.
    """
    import torch

    kernel = _gptq_kernel()
    targets = list(targets)
    ok_sizes = [g for g in supported_group_sizes() if all(shapes[n][0] >= g for n in targets)]
    hint = (f"group sizes that gptqmodel's kernel takes and that are not wider than any adapted layer's in_features: "
            f"{', '.join(map(str, ok_sizes))}" if ok_sizes else "no group size gptqmodel's kernel takes fits every "
            "adapted layer's in_features; adapt fewer layers (target_modules)")
    if group_size in (-1, 0):
        raise ValueError(f"group_size={group_size} (one group per row) leaves QA-LoRA a single pooled feature per layer; "
                         f"use one of the {hint}.")
    for name, (k, n) in sorted(shapes.items(), key=lambda kv: kv[1]):
        ok, err = kernel.validate(bits=int(bits), group_size=int(group_size), desc_act=bool(desc_act), sym=bool(sym),
                                  in_features=k, out_features=n, pack_dtype=torch.int32, trainable=True)
        if not ok:
            msg = str(err).replace(f"{kernel}", kernel.__name__)
            raise ValueError(f"group_size={group_size}, bits={bits} is refused by gptqmodel's GPTQ kernel for {name} "
                             f"([{n}, {k}]): {msg}; use one of the {hint}.")
    for name in targets:
        k = shapes[name][0]
        if k < group_size:
            raise ValueError(
                f"{source}: {name} has in_features={k}, fewer than group_size={group_size}: GPTQ would quantise each row "
                f"as one partial group, leaving QA-LoRA a single pooled feature. Use one of the {hint}."
            )


def check_quantize_options(checkpoint_qc: Mapping[str, Any], requested: Mapping[str, Any], source: str,
                           how: str = "leave them unset") -> None:
    """Quantisation options given for a model that is already a GPTQ checkpoint must match its
    ``quantization_config`` (they cannot change it; ignoring them would train on something else than asked).

    Args:
        requested: ``{"bits": ..., "group_size": ..., "desc_act": ..., "sym": ...}``; ``None`` values are not compared.

    Raises:
        ValueError: listing each option that differs, with the checkpoint's value.
    """
    differ = []
    for key in ("bits", "group_size", "desc_act", "sym"):
        want = requested.get(key)
        have = checkpoint_qc.get(key)
        if want is None or have is None:
            continue
        if (bool(want) != bool(have)) if key in ("desc_act", "sym") else int(want) != int(have):
            differ.append(f"{key}={want!r} (the checkpoint has {have!r})")
    if differ:
        raise ValueError(f"{source} is already a GPTQ checkpoint, so it is not quantised again, but the options given "
                         f"disagree with its quantization_config: {', '.join(differ)}. Pass a float model to quantise "
                         f"with these options, or {how}.")


# --------------------------------------------------------------------------------------------------
# rows


_MISSING = object()


def _describe(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key, _MISSING)
    if value is _MISSING:
        return f"no '{key}'"
    return f"'{key}' " + ("null" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})")


def _alpaca_problem(row: Mapping[str, Any]) -> Optional[str]:
    for key in ("instruction", "output", "input"):
        value = row.get(key)
        if not isinstance(value, str) and not (key == "input" and value is None):
            return (f"has {_describe(row, key)}; Alpaca rows need text in 'instruction' and 'output' ('input' may "
                    "be empty)")
    return None


def check_alpaca_rows(rows: Sequence[Mapping[str, Any]], source: str) -> None:
    """Alpaca rows (Taori et al. 2023): ``instruction`` and ``output`` strings, ``input`` a string, null or missing.

    Raises:
        ValueError: the first bad row, by index and field (e.g. ``output`` null).
    """
    for i, row in enumerate(rows):
        problem = _alpaca_problem(row)
        if problem:
            raise ValueError(f"{source}: row {i} {problem}. Fix or drop that row.")


def check_rows(rows: Sequence[Mapping[str, Any]], source: str) -> None:
    """Rows of any supported format (:func:`qalora_hf.data.row_format`) hold text where text is read: ``text`` a
    string, ``messages`` a list, ``prompt`` / ``completion`` strings or message lists, Alpaca rows as in
    :func:`check_alpaca_rows`.

    Raises:
        ValueError: the first bad row, by index and field.
    """
    from .data import row_format

    for i, row in enumerate(rows):
        fmt = row_format(row)
        problem = _alpaca_problem(row) if fmt == "alpaca" else next(
            (f"has {_describe(row, key)}; it needs text there" for key in _SFT_COLUMNS.get(fmt or "", ())
             if not isinstance(row.get(key), (str, list))), None)
        if problem:
            raise ValueError(f"{source}: row {i} {problem}. Fix or drop that row.")


_SFT_COLUMNS = {"text": ("text",), "messages": ("messages",), "prompt_completion": ("prompt", "completion")}


def check_dataset_values(dataset, what: str = "train_dataset") -> None:
    """The columns SFT reads (``text``; ``messages``; ``prompt``/``completion``) hold no null and, when not
    conversational lists, text.  Read through Arrow (``with_format("arrow")``), so a large dataset is checked in one
    pass over its column buffers.  Streaming (iterable) datasets and tokenised ones (``input_ids``) are not checked.

    Raises:
        ValueError: the first row holding a null (or a number), by index and column.
    """
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, ds in dataset.items():
            check_dataset_values(ds, f"{what}[{key!r}]")
        return
    if not hasattr(dataset, "with_format") or not hasattr(dataset, "__len__") or "input_ids" in (dataset.column_names or []):
        return
    import pyarrow as pa
    import pyarrow.compute as pc

    from .data import row_format

    columns = _SFT_COLUMNS.get(row_format(dataset.column_names or []) or "", ())
    if not columns:
        return
    table = dataset.with_format("arrow")[:]
    for col in columns:
        array = table.column(col)
        kind = array.type
        if array.null_count:
            row = pc.index(pc.is_null(array), True).as_py()
            raise ValueError(f"{what}: row {row} has '{col}' null; every row needs a value there. Fix or drop that row.")
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_list(kind)
                or pa.types.is_large_list(kind)):
            raise ValueError(f"{what}: column '{col}' holds {kind} values, not text; cast it to strings "
                             f"(dataset.cast_column('{col}', Value('string'))) or fix the rows.")


# --------------------------------------------------------------------------------------------------
# the trainer's inputs


def _requested_quantize_options(quantize_config) -> dict:
    return {k: getattr(quantize_config, k) for k in ("bits", "group_size", "desc_act", "sym")} if quantize_config else {}


def check_trainer_inputs(model, args, qalora_config, quantize_config=None, train_dataset=None, eval_dataset=None,
                         formatting_func=None) -> None:
    """Every check :class:`~qalora_hf.QALoraTrainer` can make before it quantises, loads or trains (one call from its
    ``__init__``): the model source; for a GPTQ checkpoint, quantisation options that disagree with it; the layers
    of the float model or checkpoint against ``target_modules`` and the group size; row values; ``output_dir`` and
    the export's directory writable.

    Raises:
        ValueError: the first problem found, saying what to change.
    """
    from .gptq import check_gptq_config, quantization_config_dict

    if formatting_func is None:
        check_dataset_values(train_dataset, "train_dataset")
        check_dataset_values(eval_dataset, "eval_dataset")
    if args is not None:
        check_writable_dir(args.output_dir, "output_dir")
        if getattr(args, "merge_at_end", False):
            check_writable_dir(getattr(args, "export_dir", None) or os.path.join(args.output_dir, "export"), "export_dir",
                               for_rename=True)

    if isinstance(model, (str, os.PathLike)):
        model_id = check_model_source(str(model), "model")
        from transformers import AutoConfig

        qc = quantization_config_dict(getattr(AutoConfig.from_pretrained(model_id), "quantization_config", None))
        if str(qc.get("quant_method", "")).lower().endswith("gptq"):
            qc = check_gptq_config(qc)
            if quantize_config is not None:
                check_quantize_options(qc, _requested_quantize_options(quantize_config), model_id,
                                       how="drop quantize_config")
            settings, label = qc, f"GPTQ checkpoint {model_id}"
        elif quantize_config is None:
            return  # the trainer says: a float model needs quantize_config
        else:
            settings, label = _requested_quantize_options(quantize_config), f"{model_id} (QuantizeConfig)"
        shapes, modules = quantised_layer_shapes(model_id)
    else:
        from .gptq import gptq_layers, gptq_settings

        try:
            settings = gptq_settings(model)
        except (TypeError, ValueError):
            return  # the trainer raises its own error for a non-GPTQ model
        layers = gptq_layers(model)
        shapes = {n: (int(m.in_features), int(m.out_features)) for n, m in layers.items()}
        modules = {n: type(m).__name__ for n, m in model.named_modules()}
        label = "the model"
    if not shapes:
        return
    targets = resolve_targets(qalora_config.target_modules, shapes, modules)
    group_size = int(settings.get("group_size", -1))
    if qalora_config.group_size is not None and qalora_config.group_size != group_size:
        given = f"QuantizeConfig.group_size={group_size}" if label.endswith("(QuantizeConfig)") else \
            f"the GPTQ group_size={group_size} of {label}"
        raise ValueError(f"QALoraConfig.group_size={qalora_config.group_size} differs from {given}; the adapter pools "
                         "whole GPTQ groups. Make them equal or leave group_size unset.")
    check_group_size(group_size, shapes, targets, bits=int(settings["bits"]), desc_act=bool(settings.get("desc_act")),
                     sym=bool(settings.get("sym", True)), source=label)
    logger.debug("checks passed: %d quantised layers, %d adapted, group_size %d", len(shapes), len(targets), group_size)

