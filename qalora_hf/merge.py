"""Merging QA-LoRA adapters into the integers of a GPTQ checkpoint.

The paper's merge (Xu et al. 2023, Appendix B) folds the group-constant update ``D[l, o]`` into the
zero-points: ``s * (q - z) + D = s * (q - (z - t))`` with ``t = D / s`` in quantisation steps.  GPTQ
zero-points are integers, and fine-tuning shifts are mostly a small fraction of a step, so rounding
``z - t`` drops most of the update.  The strategies (:data:`qalora_hf.strategies.STRATEGIES`) keep it with up to four
phases after the integer merge: calibration statistics, a scale refit, fixed-grid GPTQ and a scale
distillation (docs/merge.md has the math and the measurements):

``"round"``
    ``z' = clamp(round(z - t))``; codes unchanged.  Exact when every ``t`` is an integer and no
    zero-point is clamped.  The reference baseline.
``"gptq"``
    ``round``'s zero-points, then the codes re-chosen on the fixed grid ``(s, z')`` with GPTQ's error
    feedback (Frantar et al. 2022, Algorithm 1) under ``H = X^T X`` of calibration inputs.
``"scales"``
    As ``"gptq"``, preceded by an ``H``-weighted least-squares refit of the fp16 group scales.
``"distill"`` (default)
    ``"scales"``, then scale-only distillation of the merged model towards the trained model's
    next-token distribution and, with weight ``distill_label_weight`` (0.05), the calibration rows' labels
    (PEQA-style scale tuning, Kim et al. 2023; :func:`qalora_hf.scale_distillation.distill_scales`).

Every strategy keeps codes and zero-points in ``[0, 2**bits - 1]`` and leaves layers without an
adapter bit-identical.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from .adapter import group_delta
from .data import forward_inputs
from .gptq import check_mergeable_kernels, mark_merged, split_ragged_groups
from .gptq_format import (GPTQTensors, count_zero_points_at_0, install_checkpoint_format_hooks, rank_in_group, read_layer,
                          write_layer)
from .scale_distillation import distill_scales, distill_scales_lr_search, norm_layers, teacher_topk
from .strategies import STRATEGIES, MergeStrategy, get_strategy  # noqa: F401  (the strategies, as data)

logger = logging.getLogger(__name__)

DISTILL_LR_PER_SHIFT = 2.0  # distill_lr="auto": first peak lr tried = this * median |t| (see merge_qalora)
# distill_label_weight=None with labelled calibration: the distillation's objective is 0.95 * KL + 0.05 * CE on the labels
# (docs/fidelity_matrix.md, "Hard targets in the distillation")
DISTILL_LABEL_WEIGHT = 0.05


def distill_lr_guess(shift_abs_median: float) -> float:
    """The first distillation rate ``distill_lr="auto"`` tries: ``DISTILL_LR_PER_SHIFT *`` the median over layers of
    each layer's median ``|t|`` (``MergeReport.totals["shift_abs_median"]``, quantisation steps), floored at 1e-4."""
    return max(DISTILL_LR_PER_SHIFT * shift_abs_median, 1e-4)


@dataclass
class LayerMergeReport:
    """What the merge did to one layer.

    Attributes:
        name: qualified module name.
        shift_abs_median / shift_abs_p99 / shift_abs_max: ``|t|`` in quantisation steps.
        shift_frac_mean: mean ``|t - round(t)|`` (0 means the zero-point merge alone is exact).
        shift_frac_above_half: fraction of ``|t| > 0.5``.
        zeros_clamped: zero-points ``z - t`` that fell outside ``[1, 2**bits - 1]`` (``[0, ...]`` where the base
            zero-point is already 0) and were clamped.
        zeros_changed / codes_changed: integers rewritten; scales_changed: fp16 scales rewritten.
        max_abs_weight_error: max ``|W_int - (W_base + dW)|`` over the layer.
        rel_output_error: ``tr(E H E^T) / tr(dW H dW^T)`` with ``E = W_int - (W_base + dW)``: the output
            error relative to the adapter's own effect on the calibration inputs (0 = exact, 1 = as bad
            as dropping the adapter); None without calibration.
        exact: every weight equals ``W_base + dW`` to float precision.
    """

    name: str
    shift_abs_median: float
    shift_abs_p99: float
    shift_abs_max: float
    shift_frac_mean: float
    shift_frac_above_half: float
    zeros_clamped: int
    zeros_changed: int
    codes_changed: int
    max_abs_weight_error: float
    rel_output_error: Optional[float]
    exact: bool
    scales_changed: int = 0


@dataclass
class MergeReport:
    """Per-layer :class:`LayerMergeReport` plus totals."""

    strategy: str
    layers: list[LayerMergeReport] = field(default_factory=list)
    distill: Optional[dict] = None  # the "distill" phase: steps, kl_first, kl_last, scales_changed
    zero_points_at_0: Optional[int] = None  # over every GPTQ layer of the merged model (see count_zero_points_at_0)

    @property
    def totals(self) -> dict:
        n = len(self.layers)
        errs = [lr.rel_output_error for lr in self.layers if lr.rel_output_error is not None]
        return {
            "strategy": self.strategy,
            "layers": n,
            "exact_layers": sum(lr.exact for lr in self.layers),
            "zeros_clamped": sum(lr.zeros_clamped for lr in self.layers),
            "zeros_changed": sum(lr.zeros_changed for lr in self.layers),
            "codes_changed": sum(lr.codes_changed for lr in self.layers),
            "scales_changed": sum(lr.scales_changed for lr in self.layers),
            "shift_abs_median": _median([lr.shift_abs_median for lr in self.layers]),
            "shift_abs_p99_max": max((lr.shift_abs_p99 for lr in self.layers), default=0.0),
            "shift_frac_above_half": sum(lr.shift_frac_above_half for lr in self.layers) / max(n, 1),
            "rel_output_error_mean": sum(errs) / len(errs) if errs else None,
            "zero_points_at_0": self.zero_points_at_0,
            **({f"distill_{k}": v for k, v in self.distill.items() if not isinstance(v, (list, dict))} if self.distill else {}),
        }

    def to_dict(self) -> dict:
        return {"totals": self.totals, "distill": self.distill, "layers": [asdict(lr) for lr in self.layers]}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


# --------------------------------------------------------------------------------------------------
# Phase 1: calibration statistics


def collect_hessians(
    model: torch.nn.Module, layer_names: list[str], batches: Iterable[dict], on_output: Optional[Callable[[dict, torch.Tensor], None]] = None,
    input_sums: Optional[dict[str, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """``H = sum_x x x^T`` (float64 [K, K]) of the inputs of each named layer over ``batches``.

    Args:
        model: the model to run (the trained PEFT model, adapters active).
        layer_names: qualified names of the modules whose *input* is recorded.
        batches: dicts of model inputs (``input_ids`` [B, T], optional ``attention_mask`` / ``position_ids``
            [B, T] and the packed-sequence boundaries of TRL's padding-free collator; other keys such as ``labels``
            are ignored), run as the training step runs them (:func:`qalora_hf.data.forward_inputs`: packed rows
            attend only to themselves); padded positions (``attention_mask == 0``) are excluded.
        on_output: called as ``on_output(batch, logits)`` after each batch (used to record the teacher
            targets of the ``"distill"`` strategy in the same pass).
        input_sums: if given, filled in the same pass with ``{name: float64 [K + 1]}``: the sum of each layer's
            inputs over the counted positions, then their count (the input mean for ``merge_qalora``'s
            ``bias_correction``).
    """
    modules = dict(model.named_modules())
    hessians: dict[str, torch.Tensor] = {}
    mask_holder: dict[str, Optional[torch.Tensor]] = {"mask": None}
    shared: dict[int, tuple] = {}  # q/k/v (and gate/up) see the same input: compute once per call

    def hook(name):
        def fn(_module, args):
            x = args[0]
            key = id(x)
            if key not in shared or shared[key][0] is not x:  # the reference kept in `shared` pins the id
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                mask = mask_holder["mask"]
                if mask is not None and mask.numel() == x2.shape[0]:
                    x2 = x2[mask.reshape(-1).bool()]
                sums = torch.cat([x2.sum(0).to(torch.float64), torch.tensor([float(x2.shape[0])], dtype=torch.float64)])
                shared[key] = (x, (x2.t() @ x2).to(torch.float64), sums)  # fp32 product per batch, fp64 sum
            h = shared[key][1]
            hessians[name] = hessians[name] + h if name in hessians else h.clone()
            if input_sums is not None:
                input_sums[name] = input_sums[name] + shared[key][2] if name in input_sums else shared[key][2].clone()

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in layer_names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask_holder["mask"] = batch.get("attention_mask")
                shared.clear()
                out = model(**forward_inputs(batch))
                if on_output is not None:
                    on_output(batch, out.logits)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return hessians


# --------------------------------------------------------------------------------------------------
# Phases 2-4: the layer-wise merge


def _fixed_grid_gptq(
    target: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    maxq: int,
    hessian: torch.Tensor,
    fallback_codes: torch.Tensor,
    damp: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """Integer codes ``Q`` [K, N] minimising ``||X (W_Q - target)^T||`` on a fixed grid.

    ``W_Q[o, i] = scales[g_idx[i], o] * (Q[i, o] - zeros[g_idx[i], o])`` with ``Q`` in ``[0, maxq]``.
    GPTQ (Frantar et al. 2022, Algorithm 1: lazy-batch Cholesky form, dampening ``damp * mean(diag H)``,
    act-order) with the per-column quantiser replaced by rounding onto the given scales and
    zero-points instead of fitting new ones.

    Args:
        target: float32 [N, K], ``W_base + dW``.
        scales / zeros: [G, N] (zeros may be float or int; here the integer ``z'``).
        hessian: float64 [K, K], ``X^T X``.
        fallback_codes: [K, N] codes used for columns with no activation (``H[i, i] == 0``).
    """
    w = target.to(torch.float64).clone()  # [N, K]
    k = w.shape[1]
    s_cols = scales.to(torch.float64)[g_idx].t()  # [N, K]
    z_cols = zeros.to(torch.float64)[g_idx].t()
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=torch.float64)
    perm = torch.argsort(torch.diag(h), descending=True)
    w, s_cols, z_cols, h = w[:, perm], s_cols[:, perm], z_cols[:, perm], h[perm][:, perm]
    dead_p = dead[perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(w)
    fallback = fallback_codes.t().to(torch.float64)[:, perm]
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if dead_p[col]:
                c = fallback[:, col]
            else:
                c = torch.clamp(torch.round(w1[:, j] / s_cols[:, col] + z_cols[:, col]), 0, maxq)
            codes[:, col] = c
            qv = s_cols[:, col] * (c - z_cols[:, col])
            e = (w1[:, j] - qv) / hinv1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * hinv1[j, j:].unsqueeze(0)
            err1[:, j] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.t().to(torch.int64).contiguous()


def _refine_codes(
    codes: torch.Tensor,
    target: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    maxq: int,
    hessian: torch.Tensor,
    sweeps: int,
) -> torch.Tensor:
    """Cyclic coordinate descent on the codes for ``||X (W_Q - target)^T||^2`` on a fixed grid (QuantEase: Behdin et al.
    2023, "QuantEase: Optimization-based Quantization for Language Models", §3, started from GPTQ's solution as there).

    Each output row's error ``e = W_Q[o] - target[o]`` costs ``e H e^T``; for one weight the exact minimiser over the
    grid, the others fixed, is the grid point nearest to ``w - (e H)_i / H_ii``.  Columns are visited in the order of
    ``diag(H)`` (largest first), all rows at once (rows are independent), for at most ``sweeps`` sweeps or until a
    sweep changes no code.  Every update lowers the layer's error or leaves it, so the result is never worse than
    ``codes``.

    Args:
        codes: int64 [K, N] (e.g. :func:`_fixed_grid_gptq`'s).
        target: float32 [N, K], ``W_base + dW``.
        scales / zeros: [G, N] float / int.
        hessian: float64 [K, K], ``X^T X``; columns with ``H_ii == 0`` keep their codes.
    Returns:
        int64 [K, N] codes in ``[0, maxq]``.
    """
    s_cols = scales.to(torch.float64)[g_idx].t()  # [N, K]
    z_cols = zeros.to(torch.float64)[g_idx].t()
    q = codes.t().to(torch.float64).clone()  # [N, K]
    w = s_cols * (q - z_cols)
    h = hessian.to(torch.float64)
    g = (w - target.to(torch.float64)) @ h  # [N, K]: the error's gradient / 2
    diag = torch.diag(h)
    order = [int(i) for i in torch.argsort(diag, descending=True) if diag[i] > 0]
    for _ in range(sweeps):
        moved = 0
        for i in order:
            c = torch.clamp(torch.round((w[:, i] - g[:, i] / diag[i]) / s_cols[:, i] + z_cols[:, i]), 0, maxq)
            rows = (c != q[:, i]).nonzero().squeeze(1)
            if rows.numel():
                dw = s_cols[rows, i] * (c[rows] - q[rows, i])
                g[rows] += dw.unsqueeze(1) * h[i].unsqueeze(0)
                w[rows, i] += dw
                q[rows, i] = c[rows]
                moved += rows.numel()
        if not moved:
            break
    return q.t().to(torch.int64).contiguous()


def _refit_scales(
    target: torch.Tensor, t: GPTQTensors, z: torch.Tensor, hessian: torch.Tensor, damp: float = 1e-4, max_rel: float = 0.5, chunk: int = 16
) -> torch.Tensor:
    """Per-group scales ``s'`` [G, N] minimising ``||X (W(s') - target)^T||`` with codes and zero-points fixed.

    ``W(s')[o, i] = s'[l, o] * v[i, o]`` with ``v = q - z'`` and ``l = g_idx[i]``, so each output row ``o`` is a
    linear least-squares problem in its G scales under the metric ``H = X^T X``::

        (A_o^T H A_o + lambda I) s'_o = A_o^T H target_o,    A_o[i, l] = v[i, o] [g_idx[i] == l]

    This is the closed-form, calibration-weighted version of the "scale correction that absorbs the part of
    the constant shift lying along (q - z)" (docs/merge.md; scale-only tuning as in PEQA, Kim et al. 2023), solved
    jointly over the groups of a row so cross-group correlations in ``H`` are used.  Changes are limited to
    ``max_rel`` of the old scale, and the result is rounded to fp16 as stored.
    """
    k, n = t.q.shape
    groups = t.scales.shape[0]
    g_idx = t.g_idx.to(torch.int64)
    counts = torch.bincount(g_idx, minlength=groups)
    g = int(counts.max())
    # channel i goes to slot g_idx[i] * g + (its rank inside its group): groups padded to g slots, the padding
    # (a ragged last group's missing channels) with v = 0 and H = 0, so it adds nothing to either side
    slot = g_idx * g + rank_in_group(g_idx)  # [K], one slot per channel
    v = torch.zeros(n, groups * g)
    v[:, slot] = (t.q - z[t.g_idx]).to(torch.float32).t()
    v = v.reshape(n, groups, g)  # [N, G, g]
    hessian = hessian.to(torch.float32)
    h = torch.zeros(groups * g, groups * g)
    h[slot.unsqueeze(1), slot.unsqueeze(0)] = hessian
    h4 = h.reshape(groups, g, groups, g)
    rhs_full = torch.zeros(n, groups * g)
    rhs_full[:, slot] = target.to(torch.float32) @ hessian  # [N, K] in slots
    rhs = (rhs_full.reshape(n, groups, g) * v).sum(-1)  # [N, G]
    new = torch.empty(n, groups, dtype=torch.float32)
    for o1 in range(0, n, chunk):
        vv = v[o1 : o1 + chunk]
        m = torch.einsum("nla,lamb,nmb->nlm", vv, h4, vv)
        diag = torch.diagonal(m, dim1=1, dim2=2)
        lam = damp * diag.mean(dim=1, keepdim=True).clamp(min=1e-12)
        m = m + torch.diag_embed(lam.expand_as(diag))
        # regularise towards the old scales: solve for the change only
        old = t.scales[:, o1 : o1 + chunk].t().to(torch.float32)
        b = rhs[o1 : o1 + chunk] - torch.einsum("nlm,nm->nl", m - torch.diag_embed(lam.expand_as(diag)), old)
        new[o1 : o1 + chunk] = old + torch.linalg.solve(m, b.unsqueeze(-1)).squeeze(-1)
    old = t.scales.t()
    new = torch.maximum(torch.minimum(new, old + max_rel * old.abs()), old - max_rel * old.abs())
    return new.t().to(torch.float16).to(torch.float32).contiguous()


def _merge_layer(name: str, t: GPTQTensors, delta: torch.Tensor, spec: MergeStrategy, hessian: Optional[torch.Tensor]):
    """Integer merge of one layer, then ``spec``'s optional scale refit and fixed-grid GPTQ.

    ``delta`` is D [G, N].  Returns the new (q, z, scales) and the layer report.
    """
    shift = delta / t.scales  # t in quantisation steps, [G, N]
    z_new = torch.round(t.z.to(torch.float64) - shift.to(torch.float64))
    # Never make a new zero-point 0: the v1 format stores z - 1, and a 0 only survives gptqmodel's word
    # arithmetic (engines that unpack v1 per field misread it and its neighbours; docs/gptq_format.md).
    # A base zero-point that is already 0 may stay 0.  The calibrated strategies absorb the clamp.
    floor = t.z.clamp(max=1).to(z_new.dtype)
    clamped = int(((z_new < floor) | (z_new > t.maxq)).sum())
    z_new = torch.maximum(z_new, floor).clamp(max=t.maxq).to(torch.int64)
    target = t.dequantize() + delta[t.g_idx].t()  # [N, K]
    s_new = _refit_scales(target, t, z_new, hessian) if spec.refit_scales else t.scales
    q_new = _fixed_grid_gptq(target, s_new, z_new, t.g_idx, t.maxq, hessian, t.q) if spec.rechoose_codes else t.q
    if spec.refine_codes and hessian is not None:
        q_new = _refine_codes(q_new, target, s_new, z_new, t.g_idx, t.maxq, hessian, spec.refine_codes)
    merged = GPTQTensors(q=q_new, z=z_new, scales=s_new, g_idx=t.g_idx, bits=t.bits)
    return q_new, z_new, s_new, _layer_report(name, t, merged, delta, hessian, clamped, target=target)


def _layer_report(name: str, t: GPTQTensors, merged: GPTQTensors, delta: torch.Tensor, hessian: Optional[torch.Tensor], clamped: int,
                  target: Optional[torch.Tensor] = None) -> LayerMergeReport:
    """Compare the merged integers ``merged`` with the target ``dequant(t) + dW`` [N, K] (see :class:`LayerMergeReport`;
    ``target`` is computed when not given)."""
    target = (t.dequantize() + delta[t.g_idx].t() if target is None else target).to(torch.float64)
    err = merged.dequantize().to(torch.float64) - target
    rel = None
    if hessian is not None:
        h32 = hessian.to(torch.float32)
        dw = delta[t.g_idx].t().to(torch.float32)
        e32 = err.to(torch.float32)
        denom = float(((dw @ h32) * dw).sum(dtype=torch.float64))
        num = float(((e32 @ h32) * e32).sum(dtype=torch.float64))
        rel = num / denom if denom > 0 else (0.0 if num == 0 else math.inf)
    shift = delta / t.scales
    abs_shift = shift.abs().flatten().to(torch.float64)
    frac = (shift - torch.round(shift)).abs()
    tol = 1e-6 * float(t.scales.abs().max())
    return LayerMergeReport(
        name=name,
        shift_abs_median=float(abs_shift.median()),
        shift_abs_p99=float(torch.quantile(abs_shift, 0.99)) if abs_shift.numel() < 16_000_000 else float(abs_shift.max()),
        shift_abs_max=float(abs_shift.max()),
        shift_frac_mean=float(frac.mean()),
        shift_frac_above_half=float((abs_shift > 0.5).double().mean()),
        zeros_clamped=clamped,
        zeros_changed=int((merged.z != t.z).sum()),
        codes_changed=int((merged.q != t.q).sum()),
        max_abs_weight_error=float(err.abs().max()),
        rel_output_error=rel,
        exact=bool(err.abs().max() <= tol),
        scales_changed=int((merged.scales != t.scales).sum()),
    )


def qalora_layers(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.nn.Module]:
    """The PEFT layers of ``model`` that hold a QA-LoRA adapter ``adapter_name`` on a GPTQ base."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "qalora_group_size") and adapter_name in getattr(m, "lora_A", {}) and hasattr(m.get_base_layer(), "qzeros"):
            out[name] = m
    return out


# --------------------------------------------------------------------------------------------------
# The orchestration


def merge_qalora(
    model: PeftModel,
    strategy: Union[str, MergeStrategy] = "distill",
    calibration: Optional[Iterable[dict]] = None,
    adapter_name: str = "default",
    progress: bool = True,
    hessians: Optional[dict[str, torch.Tensor]] = None,
    teacher_targets: Optional[list] = None,
    distill_steps: int = 32,
    distill_lr: Union[float, str] = "auto",
    distill_topk: int = 32,
    distill_norms: bool = False,
    bias_correction: bool = False,
    input_sums: Optional[dict[str, torch.Tensor]] = None,
    distill_label_weight: Optional[float] = None,
):
    """Fold every QA-LoRA adapter into the integers of its GPTQ layer and drop the PEFT wrapper.

    Args:
        model: a ``PeftModel`` from :func:`qalora_hf.get_qalora_model` or
            :func:`qalora_hf.load_qalora_adapter` (stock PEFT ``use_qalora`` adapters included).
        strategy: a name in :data:`STRATEGIES` (``"distill"``, the default, ``"scales"`` and ``"gptq"`` need
            ``calibration``; ``"round"`` does not) or a :class:`MergeStrategy`; see the module docstring.
        calibration: batches (dicts with ``input_ids`` [B, T] and optional ``attention_mask`` / ``position_ids``
            [B, T] tensors) from the training distribution, run once through the trained model to collect
            ``H = X^T X`` per layer (and, for ``"distill"``, the teacher's top-k next-token log-probabilities).
            With ``"round"`` they only feed ``rel_output_error`` in the report.
        hessians: precomputed :func:`collect_hessians` output (keys ``"<layer name>.base_layer"``), used
            instead of ``calibration`` (e.g. to compare strategies on the same statistics).
        teacher_targets: precomputed :func:`qalora_hf.scale_distillation.teacher_topk` list for ``"distill"``
            (with ``hessians``, instead of ``calibration``).
        distill_steps / distill_lr / distill_topk: the ``"distill"`` phase (one calibration batch per
            step; peak Adam learning rate on the scale change in quantisation steps at the end of the code
            range; teacher tokens kept per position); see :func:`qalora_hf.scale_distillation.distill_scales`.
            Give at least ``distill_steps`` calibration batches (256 rows in batches of 8 for the default 32 steps; with
            more, each step distils several batches, each batch once): a batch distilled twice over-fits the calibration rows (on SmolLM2-135M, 128 rows kept 97.5 % of the gain and
            256 rows 98.5 %; 256 rows over 64 steps 97.5 %; docs/fidelity_matrix.md).
            ``distill_lr="auto"`` (default) chooses the rate on held-out calibration batches
            (:func:`qalora_hf.scale_distillation.distill_scales_lr_search`: every 8th batch is held out; 2-3
            distillations starting at ``DISTILL_LR_PER_SHIFT *`` the median over layers of each layer's median
            ``|t|``, floored at ``1e-4``, then 3x larger or smaller; docs/merge.md).  A number runs one
            distillation at that rate on every batch.  The hard-target weight used is in
            ``report.distill["label_weight"]``, the rate in ``report.distill["lr"]`` (None when no distillation
            beat the ``"scales"`` merge on the held-out batches), the search in ``report.distill["lr_search"]``.
        distill_norms: also tune the per-channel weights of the model's normalisation layers in the distillation
            (norm tweaking, :func:`qalora_hf.scale_distillation.norm_layers`); they are stored unquantised, so the
            checkpoint stays a standard GPTQ one.  Off by default: on the demo's SmolLM2-135M adapter it kept 98.76 % of
            the gain against 98.70 % for the scales alone (docs/fidelity_matrix.md, "Norm tweaking").
        bias_correction: after the integer merge (before any distillation), give each merged layer the output bias
            ``b = (W_trained - W_merged) @ mean(x)`` [N] (fp16), ``mean(x)`` the layer's mean input on the calibration
            rows: the merge's error on the mean input is removed (empirical bias correction, Nagel et al. 2019,
            "Data-Free Quantization Through Weight Equalization and Bias Correction", §4.2).  The checkpoint then has
            biases: the config's ``attention_bias`` / ``mlp_bias`` are set and the other projections of the same
            block get zero biases.  Only for configs with those two fields (Llama-style).  Off by default.
        input_sums: precomputed ``collect_hessians(..., input_sums=...)`` output, with ``hessians`` and
            ``bias_correction``.
        distill_label_weight: ``w`` in the distillation's objective ``(1 - w) * KL + w * CE``: KL to the trained model
            and CE, the cross-entropy (nats per counted token) on the calibration rows' next-token ``labels`` (hard
            targets, Hinton et al. 2015, §2; scales trained on the task loss as in PEQA, Kim et al. 2023, §3, and
            EfficientQAT's E2E-QP, Chen et al. 2024, §3.3; :func:`qalora_hf.scale_distillation.distill_scales`).
            None (default): ``DISTILL_LABEL_WEIGHT`` (0.05) when every calibration batch (or precomputed target) has
            labels, else 0 (the KL alone; logged).  On SmolLM2-135M it lifted the two cells of the fidelity matrix that
            kept under 99 % of the gain to 103.5 % and 99.5 % (+4.5 ± 0.4 and +1.8 ± 0.2 points at the same rate); the
            merged model then also learns from those rows, so it can score better than the adapter on held-out rows
            (docs/fidelity_matrix.md, "Hard targets in the distillation").  0: the KL alone, the merged model as
            close to the trained one as the integers allow.

    Returns:
        ``(merged_model, report)``: the plain transformers GPTQ model (no PEFT wrapper, no adapter
        modules; ``quantization_config.sym`` set to False) and a :class:`MergeReport`.

    Raises:
        TypeError: ``model`` is not a ``PeftModel`` with QA-LoRA layers.
        ValueError: unknown strategy, a calibrated strategy without calibration, ``distill_steps < 1``, a
            ``distill_lr`` that is neither ``"auto"`` nor a positive number, a ``distill_label_weight`` outside [0, 1]
            or above 0 with calibration batches (or targets) without ``labels``, or GPTQ layers on a kernel whose integers
            cannot be read (:func:`qalora_hf.gptq.check_mergeable_kernels`: load with ``GPTQConfig(backend="torch")``)
            — all before any work.  ``bias_correction`` on a config without ``attention_bias`` / ``mlp_bias``, or
            with precomputed ``hessians`` but no ``input_sums``: ValueError, before any work.
    """
    calibration = list(calibration) if calibration is not None else None
    spec, layers = _check_merge_inputs(model, strategy, calibration, hessians, teacher_targets, adapter_name, distill_steps, distill_lr)
    label_weight = _label_weight(spec, calibration, hessians, teacher_targets, distill_label_weight)
    if bias_correction:
        _check_bias_correction(model, calibration, hessians, input_sums)
    sums = dict(input_sums or {})
    hessians, targets = _statistics(model, layers, spec, calibration, hessians, teacher_targets, distill_topk,
                                    sums if bias_correction and not input_sums else None)

    report = MergeReport(strategy=spec.name)
    originals: dict[str, GPTQTensors] = {}  # the integers before, for the report after a distillation
    for name, module in tqdm(layers.items(), desc=f"Merging QA-LoRA ({spec.name})", disable=not progress):
        before, layer_report = _merge_into_layer(name, module, spec, hessians.get(f"{name}.base_layer"), adapter_name)
        report.layers.append(layer_report)
        if bias_correction:
            _correct_bias(module, before, group_delta(module, adapter_name), sums[f"{name}.base_layer"])
        if spec.distill:
            originals[name] = before

    if spec.distill:
        norms = norm_layers(model) if distill_norms else []
        _distill(model, layers, targets, report, originals, hessians, adapter_name, distill_steps, distill_lr, progress, norms,
                 label_weight)
    if bias_correction:
        _complete_biases(model)
    return _unload(model, report)


_BIAS_GROUPS = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


def _check_bias_correction(model, calibration, hessians, input_sums) -> None:
    cfg = model.get_base_model().config
    missing = [f for f in _BIAS_GROUPS if not hasattr(cfg, f)]
    if missing:
        raise ValueError(f"bias_correction=True needs a Llama-style config with {' and '.join(missing)} (this is "
                         f"{type(cfg).__name__}); merge without it.")
    if hessians and not calibration and not input_sums:
        raise ValueError("bias_correction=True with precomputed hessians needs input_sums (collect_hessians(..., input_sums={})).")


def _correct_bias(module, before: GPTQTensors, delta: torch.Tensor, sums: torch.Tensor) -> None:
    """Set ``module``'s GPTQ layer bias to ``(W_trained - W_merged) @ mean(x)`` (plus any bias it had)."""
    base = module.get_base_layer()
    mean = (sums[:-1] / sums[-1].clamp(min=1)).to(torch.float64)
    t0 = GPTQTensors(q=before.q.to(torch.int64), z=before.z.to(torch.int64), scales=before.scales, g_idx=before.g_idx, bits=before.bits)
    trained = t0.dequantize().to(torch.float64) + delta[t0.g_idx].t().to(torch.float64)
    err = trained - read_layer(base).dequantize().to(torch.float64)  # [N, K]
    _set_bias(base, err @ mean)


def _set_bias(layer, b: torch.Tensor) -> None:
    old = getattr(layer, "bias", None)
    dev = layer.qweight.device
    new = (b.to(torch.float32) + (old.to(torch.float32).cpu() if old is not None else 0)).to(torch.float16).to(dev)
    if "bias" not in layer._buffers and hasattr(layer, "bias"):
        delattr(layer, "bias")
    layer.register_buffer("bias", new)


def _complete_biases(model) -> None:
    """Zero biases on the other projections of every block that got one, and the config field that loads them."""
    base = model.get_base_model()
    layers = {n: m for n, m in base.named_modules() if hasattr(m, "qweight")}
    for flag, suffixes in _BIAS_GROUPS.items():
        group = {n: m for n, m in layers.items() if n.removesuffix(".base_layer").rsplit(".", 1)[-1] in suffixes}
        if any(getattr(m, "bias", None) is not None for m in group.values()):
            for m in group.values():
                if getattr(m, "bias", None) is None:
                    _set_bias(m, torch.zeros(m.qweight.shape[1]))
            setattr(base.config, flag, True)


def _check_merge_inputs(model, strategy, calibration, hessians, teacher_targets, adapter_name, distill_steps, distill_lr):
    """``(strategy, QA-LoRA layers to merge)`` after every argument check (nothing is touched before)."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_qalora expects a peft.PeftModel with QA-LoRA adapters, got {type(model).__name__}.")
    spec = get_strategy(strategy)
    layers = qalora_layers(model, adapter_name)
    if not layers:
        raise TypeError("the model has no QA-LoRA layers on GPTQ layers (was it built with get_qalora_model?).")
    check_mergeable_kernels(model)  # e.g. torch_fused repacks on its first eval forward: refuse before any forward
    precomputed = bool(hessians) and (not spec.distill or bool(teacher_targets))
    if spec.needs_calibration and not calibration and not precomputed:
        raise ValueError(
            f"strategy='{spec.name}' needs calibration batches (a few hundred training rows); pass calibration=... "
            "or use strategy='round'."
        )
    if spec.distill and distill_steps < 1:
        raise ValueError(f"distill_steps={distill_steps}: the 'distill' strategy needs at least one step (or use strategy='scales').")
    if spec.distill and not (distill_lr == "auto" or (isinstance(distill_lr, (int, float)) and not isinstance(distill_lr, bool) and distill_lr > 0)):
        raise ValueError(f"distill_lr={distill_lr!r}: pass 'auto' (scaled to the adapter's shifts) or a positive number such as 1.5e-2.")
    return spec, layers


def _label_weight(spec, calibration, hessians, teacher_targets, weight) -> float:
    """The distillation's hard-target weight (``merge_qalora(distill_label_weight=...)``), checked before any work."""
    if not spec.distill:
        return 0.0
    if teacher_targets and hessians:  # the precomputed targets are what the distillation reads
        labelled = all(t.labels is not None for t in teacher_targets)
    else:
        labelled = bool(calibration) and all(isinstance(b.get("labels"), torch.Tensor) for b in calibration)
    if weight is None:
        if not labelled:
            logger.info("merge: the calibration batches have no 'labels': the distillation fits the trained model's "
                        "next-token distribution alone (distill_label_weight=0)")
        return DISTILL_LABEL_WEIGHT if labelled else 0.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"distill_label_weight={weight!r}: pass a number in [0, 1] (0 = the KL to the trained model "
                         f"alone) or None (the default, {DISTILL_LABEL_WEIGHT} with labelled calibration batches).")
    if weight and not labelled:
        raise ValueError(f"distill_label_weight={weight} needs next-token 'labels' [B, T] in every calibration batch "
                         "(-100 where the loss counts no token, as the trainer's collator gives them); add them, or pass "
                         "distill_label_weight=0.")
    return float(weight)


def _statistics(model, layers, spec, calibration, hessians, teacher_targets, topk, input_sums=None) -> tuple[dict, list]:
    """Phase 1: ``H`` per layer and (``distill``) the teacher's top-k targets, in one pass over ``calibration``
    unless precomputed."""
    hessians = dict(hessians or {})
    targets = list(teacher_targets or [])
    want_teacher = spec.distill and not targets
    if calibration and (not hessians or want_teacher or input_sums is not None):
        logger.info("merge: collecting input statistics of %d layers on %d calibration batches", len(layers), len(calibration))
        on_output = (lambda b, logits: targets.append(teacher_topk(b, logits, topk))) if want_teacher else None
        collected = collect_hessians(model, [f"{n}.base_layer" for n in layers], calibration, on_output=on_output, input_sums=input_sums)
        hessians = hessians or collected
    return hessians, targets


def _merge_into_layer(name, module, spec, hessian, adapter_name) -> tuple[GPTQTensors, LayerMergeReport]:
    """Phases 2-4 on one layer, written in place.  Returns a compact copy of the layer's integers before (uint8
    codes and zero-points, kept for the report after a distillation) and the layer report."""
    base = module.get_base_layer()
    tensors = read_layer(base)
    q_new, z_new, s_new, layer_report = _merge_layer(name.removeprefix("base_model.model."), tensors, group_delta(module, adapter_name), spec, hessian)
    write_layer(base, q=q_new if layer_report.codes_changed else None, z=z_new, scales=s_new if s_new is not tensors.scales else None)
    before = GPTQTensors(q=tensors.q.to(torch.uint8), z=tensors.z.to(torch.uint8), scales=tensors.scales, g_idx=tensors.g_idx, bits=tensors.bits)
    return before, layer_report


def _distill(model, layers, targets, report, originals, hessians, adapter_name, steps, lr, progress, norms=(),
             label_weight=0.0) -> None:
    """Phase 5: scale-only distillation of the merged layers, then the per-layer report of what was written."""
    # The forward must be the merged model: switch off only the QA-LoRA layers (model.disable_adapter()
    # would also swap modules_to_save back to their untrained originals).
    for module in layers.values():
        module.enable_adapters(False)
    names = [f"{n}.base_layer" for n in layers]
    if len(targets) < steps:
        logger.info("merge: %d calibration batches for %d distillation steps: each batch is distilled about %.1f times; "
                    "as many batches as steps (256 rows in batches of 8 for 32 steps) distil each once, which kept about "
                    "1 point more of the gain on SmolLM2-135M (docs/fidelity_matrix.md)", len(targets), steps, steps / len(targets))
    elif len(targets) > steps:
        logger.info("merge: %d calibration batches for %d distillation steps: each step distils about %.1f batches, each batch once",
                    len(targets), steps, len(targets) / steps)
    try:
        if lr == "auto":  # a first guess from the adapter, then the rate the held-out calibration batches prefer
            guess = distill_lr_guess(report.totals["shift_abs_median"])
            report.distill = distill_scales_lr_search(model, names, targets, lr=guess, steps=steps, progress=progress, norms=norms,
                                                      label_weight=label_weight)
        else:
            report.distill = distill_scales(model, names, targets, steps=steps, lr=float(lr), progress=progress, norms=norms,
                                            label_weight=label_weight)
            report.distill["lr"] = float(lr)
        report.distill["label_weight"] = label_weight
    finally:
        for module in layers.values():
            module.enable_adapters(True)
    for i, (name, module) in enumerate(layers.items()):
        t0 = originals.pop(name)
        t0 = GPTQTensors(q=t0.q.to(torch.int64), z=t0.z.to(torch.int64), scales=t0.scales, g_idx=t0.g_idx, bits=t0.bits)
        old = report.layers[i]
        report.layers[i] = _layer_report(old.name, t0, read_layer(module.get_base_layer()), group_delta(module, adapter_name),
                                         hessians.get(f"{name}.base_layer"), old.zeros_clamped)


def _unload(model: PeftModel, report: MergeReport):
    """Phase 6: drop the PEFT wrapper; the merged model is asymmetric, its config free of load-time options."""
    merged = model.unload()
    split_ragged_groups(merged)  # the adapter is gone: store a ragged last group as equal groups every kernel loads
    mark_merged(merged)  # sym: false, no load-time backend pin (after the split: a group left ragged keeps it)
    report.zero_points_at_0 = count_zero_points_at_0(merged)
    install_checkpoint_format_hooks(merged)  # merged.save_pretrained / push_to_hub write a correct checkpoint
    logger.info("merge: %s", report.totals)
    return merged, report
