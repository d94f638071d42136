"""merge → measure → export → push, written once.

:func:`merge_measure_export` is the only place that measures the base and the trained model, merges the
adapters into the GPTQ integers, measures the export, writes ``merge_report.json``, the loss plot and the
model card, exports and pushes.  Its callers only gather inputs: :class:`~qalora_hf.QALoraTrainer` (through
:class:`~qalora_hf.QALoraMergeCallback` at the end of training) hands it its own collated batches, the
``qalora-hf merge`` command batches rows from a file, the tests a tiny model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .card import build_model_card, plot_training_loss
from .export import export_gptq
from .fidelity import model_config
from .gptq import check_mergeable_kernels, gptq_settings
from .hub import push_gptq_to_hub
from .merge import MergeReport, get_strategy, merge_qalora
from .metrics import METRIC_LABELS, format_metric, measure, merge_metrics
from .safety import check_adapter_dir

logger = logging.getLogger(__name__)


@dataclass
class CardInfo:
    """What the model card says beyond the measurements (the arguments of :func:`~qalora_hf.card.build_model_card`).

    Attributes:
        repo_id: the Hub repo the card is for (``namespace/name``; used in the loading snippets).
        base_model: the GPTQ model the adapter was trained on (Hub id, or a local path: shown by name only).
        float_model: the float model the GPTQ base was quantised from, when known.
        license: licence id (e.g. ``apache-2.0``).
        datasets: Hub dataset ids of the training data (omitted from the card when empty).
        qalora_config: adapter options shown in the card (default: the adapter's ``adapter_config.json``).
        training_args: SFT settings shown in the card (tokens dropped, paths reduced to their name).
        eval_results: extra evaluation rows (see :func:`~qalora_hf.card.build_model_card`); a ``metric_value`` that
            is a metric name of :data:`qalora_hf.metrics.METRIC_LABELS` (e.g. ``"loss_exported"``) is filled in from
            the pipeline's measurements (rows whose metric was not measured are left out).
        extra_sections: ``(title, markdown)`` sections after "Evaluation".
    """

    repo_id: str
    base_model: Optional[str]
    float_model: Optional[str] = None
    license: Optional[str] = None
    datasets: Sequence[str] = ()
    qalora_config: Optional[dict] = None
    training_args: dict = field(default_factory=dict)
    eval_results: Optional[list[dict]] = None
    extra_sections: Sequence[tuple[str, str]] = ()

    def build(self, *, bits: int, group_size: int, desc_act: bool, merge_metrics: Optional[dict] = None,
              loss_plot: Optional[str] = None, qalora_config: Optional[dict] = None, fidelity_config: Optional[dict] = None):
        """The :class:`huggingface_hub.ModelCard`; ``fidelity_config``: the run's configuration, for the card's
        citation of the fidelity matrix (:func:`qalora_hf.fidelity.model_config`).

        Raises:
            ValueError: the card would publish a token, a local path or the user name.
        """
        return build_model_card(
            repo_id=self.repo_id, base_model=self.base_model, float_model=self.float_model, license=self.license,
            datasets=list(self.datasets or ()), qalora_config=self.qalora_config or qalora_config or {},
            training_args=dict(self.training_args), merge_metrics=merge_metrics,
            eval_results=_fill_eval_results(self.eval_results, merge_metrics),
            loss_plot=loss_plot, bits=bits, group_size=group_size, desc_act=desc_act, extra_sections=self.extra_sections,
            fidelity_config=fidelity_config,
        )

    def check(self) -> None:
        """Build a card without measurements, so a card that would leak fails before any work.

        Raises:
            ValueError: as :meth:`build`.
        """
        self.build(bits=4, group_size=32, desc_act=False)


def _fill_eval_results(eval_results: Optional[list[dict]], metrics: Optional[dict]) -> Optional[list[dict]]:
    """Eval results with metric names as values replaced by the measured values (a placeholder 0.0 while there are no
    measurements yet, for :meth:`CardInfo.check`)."""
    if not eval_results:
        return eval_results
    out = []
    for r in eval_results:
        value = r.get("metric_value", r.get("value"))
        if isinstance(value, str) and value in METRIC_LABELS:
            value = 0.0 if metrics is None else metrics.get(value)
            if value is None:
                continue
            r = {**{k: v for k, v in r.items() if k != "value"}, "metric_value": round(float(value), 4)}
        out.append(r)
    return out


@dataclass
class PipelineResult:
    """What :func:`merge_measure_export` produced.

    Attributes:
        export_dir: the export (a stock-loadable GPTQ v1 checkpoint with card, ``adapter/``, ``merge_report.json``).
        metrics: the merge's metrics under the names of :data:`qalora_hf.metrics.METRIC_LABELS`.
        report: the :class:`~qalora_hf.merge.MergeReport`.
        merged_model: the merged plain transformers GPTQ model, in memory.
        commit: the Hub commit id when pushed, else None.
    """

    export_dir: Path
    metrics: dict
    report: MergeReport
    merged_model: Any
    commit: Optional[str] = None


def merge_measure_export(
    model,
    tokenizer,
    export_dir: str | os.PathLike,
    *,
    card: CardInfo,
    strategy: str = "distill",
    calibration: Optional[Sequence[dict]] = None,
    holdout: Sequence[dict] = (),
    holdout_source: Optional[str] = None,
    adapter_dir: Optional[str | os.PathLike] = None,
    log_history: Optional[list[dict]] = None,
    base_model_id: Optional[str] = None,
    push_to_hub: Optional[str] = None,
    hub_private: bool = False,
    hub_token: Optional[str] = None,
    overwrite: bool = False,
    merge_kwargs: Optional[dict] = None,
    progress: bool = True,
) -> PipelineResult:
    """Measure, merge, measure again, export (and push) a trained QA-LoRA model.

    Steps: check every input (strategy, ``export_dir``, the card without measurements); save the adapter unless
    ``adapter_dir`` holds it; measure the GPTQ base (adapters off) and the trained model on ``holdout``;
    :func:`~qalora_hf.merge.merge_qalora`; measure the merged model (loss, and the max logit difference to the
    trained model over the real tokens); write ``merge_report.json`` (``{"metrics": ..., "totals", "distill",
    "layers"}``), ``loss.png`` (from ``log_history``, when it has losses) and the card; :func:`~qalora_hf.export.export_gptq`
    (atomic); push with :func:`~qalora_hf.hub.push_gptq_to_hub` when ``push_to_hub`` is a repo id.

    Args:
        model: a ``PeftModel`` with QA-LoRA adapters on a GPTQ model (loaded with the trainable kernel); merged in
            place (its PEFT wrapper is gone afterwards; use ``PipelineResult.merged_model``).
        tokenizer: saved with the export.
        export_dir: where the export goes.
        card: what the card says (see :class:`CardInfo`).
        strategy: the merge strategy (:data:`qalora_hf.merge.STRATEGIES`).
        calibration: batches for the merge (dicts of ``input_ids`` [B, T] and optional ``attention_mask`` /
            ``position_ids`` / ``labels``, on the model's device): ``qalora_hf.data.token_batches`` or a trainer's
            collated batches.  Every forward (measurements, statistics, distillation) runs them as the training
            step does (:func:`qalora_hf.data.forward_inputs`): packed rows attend only to themselves.
        holdout: batches in the same form for the measurements; empty = no measurements.
        holdout_source: where the held-out rows come from (recorded as ``holdout_source``).
        adapter_dir: the adapter as saved by ``save_pretrained`` (copied into ``adapter/`` of the export: only
            ``adapter_config.json`` and ``adapter_model.safetensors``); default: saved here to a temporary directory.
        log_history: a Trainer's ``state.log_history`` for the loss plot.
        base_model_id: Hub id written as ``base_model_name_or_path`` of the exported adapter.
        push_to_hub / hub_private / hub_token: push the export to this repo (token: ``hub_token`` or the
            environment/login); ``hub_token`` is also looked for in every exported file.
        overwrite: replace a non-empty ``export_dir``.
        merge_kwargs: more arguments of :func:`~qalora_hf.merge.merge_qalora` (``distill_steps``, ``distill_lr``, ...).
        progress: progress bars of the merge.

    Returns:
        :class:`PipelineResult`.

    Raises:
        ValueError: unknown strategy, a calibrated strategy without calibration (from ``merge_qalora``), a card
            that would publish a token or a local path, or GPTQ layers on a kernel the merge cannot read
            (:func:`qalora_hf.gptq.check_mergeable_kernels`) — all before any model work; a file that would be published
            with a pickle or a token (nothing is written then).
        FileExistsError: ``export_dir`` is not empty and ``overwrite`` is False (before any work).
        TypeError: ``model`` is not a QA-LoRA ``PeftModel`` on a GPTQ model.
    """
    spec = get_strategy(strategy)
    target = Path(export_dir)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose another export directory or pass overwrite=True.")
    card.check()
    base_qc = dict(gptq_settings(model))  # TypeError for a model that is not GPTQ, before any work; sym before the merge
    check_mergeable_kernels(model)  # before the measurements: torch_fused repacks on its first eval forward
    holdout = list(holdout)
    if spec.needs_calibration and not calibration and "hessians" not in (merge_kwargs or {}):
        raise ValueError(f"strategy='{spec.name}' needs calibration batches (a few hundred training rows), or use strategy='round'.")

    with contextlib.ExitStack() as stack:
        # gptqmodel's torch kernel compiles its dequantisation per layer instance; the eval-mode passes below would
        # recompile all of them (and hit dynamo's recompile limit): run them eagerly (docs/gptq_format.md).
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qalora-export-")))
        model.eval()
        if adapter_dir is None:
            adapter_dir = scratch / "adapter"
            model.save_pretrained(adapter_dir)
        adapter_dir = check_adapter_dir(adapter_dir)
        qalora_config = card.qalora_config or json.loads((adapter_dir / "adapter_config.json").read_text())

        base = trained = exported = None
        if holdout:
            logger.info("merge: held-out loss of the base and the trained model (%d batches) before merging", len(holdout))
            with model.disable_adapter():
                base = measure(model, holdout)
            trained = measure(model, holdout, keep_logits=True)
        merged, report = merge_qalora(model, strategy=spec, calibration=calibration, progress=progress, **(merge_kwargs or {}))
        if holdout:
            exported = measure(merged, holdout, reference=trained.logits)
            trained.logits = None
        metrics = merge_metrics(spec.name, report.totals, base=base, trained=trained, exported=exported, holdout_source=holdout_source)
        logger.info("merge (%s): %s", spec.name, ", ".join(f"{k} {format_metric(k, metrics.get(k))}" for k in
                                                       ("loss_base", "loss_trained", "loss_exported", "gain_kept", "gain_kept_se", "max_logit_diff")))

        extra_files = {"merge_report.json": scratch / "merge_report.json"}
        extra_files["merge_report.json"].write_text(json.dumps({"metrics": metrics, **report.to_dict()}, indent=2, default=str) + "\n")
        loss_plot = None
        if log_history:
            try:
                extra_files["loss.png"] = plot_training_loss(log_history, scratch / "loss.png")
                loss_plot = "loss.png"
            except ValueError:  # no logged loss yet (very short runs)
                pass
        qc = gptq_settings(merged)
        model_card = card.build(bits=int(qc["bits"]), group_size=int(qc.get("group_size", -1)), desc_act=bool(qc.get("desc_act", False)),
                                merge_metrics=metrics, loss_plot=loss_plot, qalora_config=qalora_config,
                                fidelity_config=model_config(base_qc, qalora_config, card.training_args))
        out = export_gptq(merged, target, tokenizer=tokenizer, card=model_card, adapter_dir=adapter_dir, extra_files=extra_files,
                          overwrite=overwrite, base_model_id=base_model_id, tokens=(hub_token,))

    commit = None
    if push_to_hub:
        commit = push_gptq_to_hub(out, push_to_hub, private=hub_private, token=hub_token)
        logger.info("pushed %s to %s (commit %s)", out, push_to_hub, commit)
    return PipelineResult(export_dir=out, metrics=metrics, report=report, merged_model=merged, commit=commit)
