"""The merge's measurements and their names, defined once.

:data:`METRIC_LABELS` is the one set of metric names (with the label the model card shows for each): the
pipeline writes them into ``merge_report.json`` (``"metrics"``), the recipe into ``run_info.json``
(``"merge_metrics"``), and the card, the CLI summary and the demo report read them (docs/conventions.md,
"Metric names").  :func:`measure` is the one held-out measurement.

Plain functions over tensors: ``evaluate.load(...)`` fetches metric scripts from the Hub at run time
(docs/conventions.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

from .data import IGNORE_INDEX, forward_inputs, token_batches

# name -> label on the model card, in display order.
METRIC_LABELS: dict[str, str] = {
    "strategy": "merge strategy",
    "holdout_rows": "held-out rows measured",
    "holdout_tokens": "tokens the held-out loss counts",
    "holdout_source": "held-out rows taken from",
    "loss_base": "held-out loss, base GPTQ model (no adapter)",
    "loss_trained": "held-out loss, trained (adapter, unmerged)",
    "loss_exported": "held-out loss, exported (merged INT model)",
    "gain_kept": "fraction of the fine-tuning loss gain kept by the export",
    "gain_kept_se": "standard error of that fraction over the held-out rows (paired bootstrap)",
    "max_logit_diff": "max abs. logit difference, trained (adapter, unmerged) vs exported, over real tokens",
    "codes_changed": "integer codes changed",
    "zeros_changed": "zero-points changed",
    "zeros_clamped": "zero-points clamped to the integer range",
    "zero_points_at_0": "zero-points equal to 0 (read exactly by transformers/gptqmodel; misread by engines that unpack "
                        "GPTQ v1 per field, e.g. vLLM's ExLlama gptq kernels: use the AWQ or GGUF export there)",
    "layers": "layers merged",
    "exact_layers": "layers merged exactly",
    "shift_abs_median": "median abs. zero-point shift (quantisation steps)",
    "shift_abs_p99_max": "largest per-layer 99th percentile of the abs. shift (quantisation steps)",
    "shift_frac_above_half": "fraction of shifts above half a step",
    "rel_output_error_mean": "mean relative output error per layer (0 exact, 1 = adapter dropped)",
    "scales_changed": "fp16 scales changed",
    "distill_steps": "scale-distillation steps (strategy `distill`)",
    "distill_lr": "scale-distillation peak learning rate (default: chosen on held-out calibration batches)",
    "distill_heldout_kl_before": "top-k KL to the trained model before the distillation (nats/token, held-out calibration batches)",
    "distill_heldout_loss_before": "cross-entropy on the labels before the distillation (nats/token, held-out calibration batches)",
    "distill_lr_criterion": "what chose the distillation's learning rate on the held-out batches (loss: labels' cross-entropy; kl: top-k KL)",
    "distill_heldout_batches": "calibration batches held out to choose the distillation's learning rate",
    "distill_kl_first": "top-k KL to the trained model, first distillation step (nats/token, calibration rows)",
    "distill_kl_last": "top-k KL to the trained model, last distillation step (nats/token, calibration rows)",
    "distill_scales_changed": "fp16 scales changed by the distillation",
    "distill_diverged": "scale distillation diverged (scales kept from before it)",
}

def gain_kept(loss_base: float, loss_trained: float, loss_other: float) -> Optional[float]:
    """Fraction of the fine-tuning gain (held-out loss drop) that ``loss_other`` keeps; None when training did not
    lower the loss (the fraction is not defined)."""
    gain = loss_base - loss_trained
    return (loss_base - loss_other) / gain if gain > 0 else None


def gain_kept_se(base: "Measurement", trained: "Measurement", other: "Measurement", resamples: int = 2000,
                 seed: int = 0) -> Optional[float]:
    """Standard error of :func:`gain_kept` over the held-out rows: a paired bootstrap (Efron & Tibshirani 1993, ch. 6).

    The three measurements must come from the same batches (same rows, same order).  Each resample draws the rows
    with replacement, the same draw for all three models, and recomputes each loss as (sum of the drawn rows' token
    losses) / (their token count) and then the fraction; the result is the standard deviation of the fraction over
    ``resamples`` draws (a fraction: 0.005 = half a point).  It says how much of a difference between two merges
    measured on the same rows could be the choice of rows.

    Returns:
        None when a measurement has no per-row losses (``row_loss_sums``), the row counts differ, there are fewer than
        2 rows, or the gain is not positive.

    Raises:
        ValueError: the row token counts differ (the measurements are not on the same rows).
    """
    ms = (base, trained, other)
    if any(m.row_loss_sums is None for m in ms) or len({len(m.row_loss_sums) for m in ms}) != 1 or len(base.row_loss_sums) < 2:
        return None
    if not (base.row_tokens == trained.row_tokens == other.row_tokens):
        raise ValueError("gain_kept_se: the three measurements count different tokens per row; measure them on the same batches.")
    if gain_kept(base.loss, trained.loss, other.loss) is None:
        return None
    sums = torch.tensor([m.row_loss_sums for m in ms], dtype=torch.float64)  # [3, R]
    tokens = torch.tensor(base.row_tokens, dtype=torch.float64)  # [R]
    gen = torch.Generator().manual_seed(seed)
    kept = []
    for start in range(0, resamples, 200):  # in chunks: [3, 200, R] float64 at a time, whatever the row count
        idx = torch.randint(0, tokens.numel(), (min(200, resamples - start), tokens.numel()), generator=gen)  # [S, R]
        losses = sums[:, idx].sum(-1) / tokens[idx].sum(-1).clamp(min=1)  # [3, S]
        gain = losses[0] - losses[1]
        kept.append(((losses[0] - losses[2]) / gain)[gain > 0])
    kept = torch.cat(kept)
    return float(kept.std()) if kept.numel() > 1 else None


def format_metric(name: str, value) -> Optional[str]:
    """``value`` as the card and the CLI show it: ``gain_kept`` as a percentage, ``gain_kept_se`` in percentage points
    (``± 0.5 points``), floats to 4 significant digits;
    None for a missing or undefined value (None, NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if name == "gain_kept":
        return f"{100 * value:.1f}%"
    if name == "gain_kept_se":
        return f"± {100 * value:.1f} points"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if value != 0 else "0"
    return str(value)


@dataclass
class Measurement:
    """What :func:`measure` found on a set of batches.

    Attributes:
        loss: mean next-token cross-entropy (nats per counted token) over the positions whose label is not
            :data:`~qalora_hf.data.IGNORE_INDEX` (``labels``; default: every real token).
        tokens: the number of tokens the loss counts.
        rows: the number of rows measured.
        logits: with ``keep_logits=True``, per batch the float32 CPU logits [P, V] of its P real (non-padding) positions.
        max_logit_diff: with a ``reference``, max abs. difference of the logits over the real positions and the vocabulary.
        reference_loss: the loss of a ``reference`` model on the same batches.
        row_loss_sums: per row, in batch order, the sum of its counted tokens' cross-entropy (nats); a packed row of a
            trainer's batch counts as one row.  For :func:`gain_kept_se`.
        row_tokens: per row, the number of tokens its loss counts.
    """

    loss: float
    tokens: int
    rows: int
    logits: Optional[list[torch.Tensor]] = None
    max_logit_diff: Optional[float] = None
    reference_loss: Optional[float] = None
    row_loss_sums: Optional[list[float]] = None
    row_tokens: Optional[list[int]] = None


def _real(batch: dict, logits: torch.Tensor) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return logits[mask.to(logits.device).bool()] if mask is not None else logits.reshape(-1, logits.shape[-1])


@torch.no_grad()
def measure(model, batches: Iterable[dict], *, keep_logits: bool = False,
            reference: Union[None, torch.nn.Module, Sequence[torch.Tensor]] = None) -> Measurement:
    """Held-out loss of ``model`` on ``batches``, and optionally its logits or their distance to a reference.

    Args:
        model: a causal LM (a ``PeftModel`` too); run in eval mode under ``torch.no_grad``.
        batches: dicts with ``input_ids`` [B, T] and optional ``attention_mask``, ``position_ids`` and ``labels``
            [B, T] (:func:`qalora_hf.data.token_batches`, or a trainer's collated batches). Without ``labels``
            every real token counts. Padded positions (``attention_mask == 0``) never count.
        keep_logits: keep the logits of the real positions (float32, CPU), e.g. as the reference of a later call.
        reference: the logits kept by an earlier ``measure(..., keep_logits=True)`` on the same batches, or a
            model run on each batch here (its loss is returned as ``reference_loss``).

    Returns:
        :class:`Measurement`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ref_total = 0.0
    kept, max_diff = [], None
    row_sums: list[float] = []
    row_tokens: list[int] = []
    try:
        for i, batch in enumerate(batches):
            inputs = forward_inputs(batch, device)  # as the training step runs it (packed rows apart)
            labels = batch.get("labels")
            if labels is None:
                mask = inputs.get("attention_mask")
                labels = inputs["input_ids"] if mask is None else inputs["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
            labels = labels.to(device)
            logits = model(**inputs).logits.float()
            row_sums += _loss_sums(logits, labels).tolist()  # [B]
            row_tokens += (labels[:, 1:] != IGNORE_INDEX).sum(-1).tolist()
            real = _real(inputs, logits)
            if keep_logits:
                kept.append(real.cpu())
            if reference is not None:
                if isinstance(reference, torch.nn.Module):
                    ref_logits = reference(**forward_inputs(inputs, next(reference.parameters()).device)).logits.float().to(device)
                    ref_total += float(_loss_sums(ref_logits, labels).sum())
                    ref = _real(inputs, ref_logits)
                else:
                    ref = reference[i].to(device)
                diff = float((real - ref).abs().max()) if real.numel() else 0.0
                max_diff = diff if max_diff is None else max(max_diff, diff)
    finally:
        model.train(was_training)
    count = sum(row_tokens)
    return Measurement(
        loss=sum(row_sums) / max(count, 1), tokens=count, rows=len(row_tokens), logits=kept if keep_logits else None, max_logit_diff=max_diff,
        reference_loss=ref_total / max(count, 1) if isinstance(reference, torch.nn.Module) else None,
        row_loss_sums=row_sums, row_tokens=row_tokens,
    )


def _loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed next-token cross-entropy (nats) of ``logits`` [B, T, V] on ``labels`` [B, T]: float64 [B]."""
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    return ce.double().sum(-1).cpu()


def completion_loss(model, tokenizer, pairs: Iterable[tuple[str, str]], max_length: int = 256, batch_size: int = 8) -> float:
    """Mean token cross-entropy (nats) of the completions given the prompts, as TRL's completion-only loss
    computes it: :func:`measure` on :func:`qalora_hf.data.token_batches` of ``{"prompt", "completion"}`` rows."""
    rows = [{"prompt": p, "completion": c} for p, c in pairs]
    return measure(model, token_batches(rows, tokenizer, max_length, batch_size)).loss


def merge_metrics(strategy: str, totals: dict, *, base: Optional[Measurement] = None, trained: Optional[Measurement] = None,
                  exported: Optional[Measurement] = None, holdout_source: Optional[str] = None) -> dict:
    """The metrics of one merge under the names of :data:`METRIC_LABELS`.

    Args:
        strategy: the merge strategy.
        totals: ``MergeReport.totals``.
        base / trained / exported: :func:`measure` of the GPTQ base (adapters off), the trained model and the merged
            model (the last with ``reference`` = the trained model's logits); all None when nothing was measured.
        holdout_source: where the held-out rows came from (docs/conventions.md).
    """
    metrics: dict = {"strategy": strategy}
    if trained is not None:
        metrics.update(
            holdout_rows=trained.rows, holdout_tokens=trained.tokens, holdout_source=holdout_source,
            loss_base=base.loss, loss_trained=trained.loss, loss_exported=exported.loss,
            gain_kept=gain_kept(base.loss, trained.loss, exported.loss), gain_kept_se=gain_kept_se(base, trained, exported),
            max_logit_diff=exported.max_logit_diff,
        )
    metrics.update({k: v for k, v in totals.items() if k != "strategy"})
    return metrics
