"""Scale-only distillation after the integer merge (the ``"distill"`` merge strategy).

After the integer merge (codes, zero-points and fp16 scales chosen layer by layer, see
:mod:`qalora_hf.merge`) each layer's output error is small but not zero, and the errors of 210 layers
add up along the network.  This phase tunes only the fp16 group ``scales`` of the merged layers
(codes and zero-points frozen, so the checkpoint stays a standard integer-zero-point GPTQ checkpoint)
to match the trained model's next-token distribution on calibration rows (with ``norms``, the per-channel weights of
the normalisation layers too, which the checkpoint stores unquantised: norm tweaking, Li et al. 2023):

* scale-only tuning of a quantised model: PEQA (Kim et al. 2023, "Memory-Efficient Fine-Tuning of
  Compressed Large Language Models via sub-4-bit Integer Quantization", §3);
* the objective is knowledge distillation (Hinton et al. 2015) from the trained model (adapters
  unmerged) to the merged model, ``KL(p_teacher || p_student)`` over the teacher's top-``k`` tokens per
  position plus one outcome for all other tokens (sparse distillation, :func:`topk_kl`), with a weight
  ``label_weight`` on the cross-entropy of the calibration rows' next-token labels (Hinton et al.'s hard targets;
  the merge's default 0.05, :data:`qalora_hf.merge.DISTILL_LABEL_WEIGHT`);
* the fp16 rounding of the stored scales is in the forward pass (straight-through estimator,
  Bengio et al. 2013), so what is optimised is what lands on disk.

The teacher's top-``k`` log-probabilities are recorded in the same pass that collects the merge's
Hessians (:func:`qalora_hf.merge.collect_hessians`), so the teacher is never held twice in memory.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .data import IGNORE_INDEX, forward_inputs
from .gptq_format import read_layer, write_layer

logger = logging.getLogger(__name__)


@dataclass
class TeacherTargets:
    """Top-``k`` teacher log-probabilities of one calibration batch.

    Attributes:
        batch: the model inputs (``input_ids`` [B, T] int64, optional ``attention_mask`` / ``position_ids`` [B, T]
            and the packed-sequence boundaries of :data:`qalora_hf.data.PACKED_SEQUENCE_INPUTS`).
        positions: bool [B, T], the positions that are distilled (non-padding).
        logprobs: fp16 [P, k], log-softmax of the teacher's logits at those positions (nats).
        indices: int32 [P, k], the token ids of those log-probabilities.
        rest: float32 [P], log of the teacher's probability mass outside the top-k (exact, from the logits).
        labels: int64 [P], the next token the training loss counts at each distilled position, ``IGNORE_INDEX``
            (-100) where it counts none (with ``loss_positions_only=False``, or in a batch whose loss counts no token),
            when the batch has ``labels``; else None.  Read by :func:`heldout_scores` (the cross-entropy the
            learning-rate search scores) and by :func:`distill_scales`'s ``label_weight`` term.
    """

    batch: dict
    positions: torch.Tensor
    logprobs: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    labels: Optional[torch.Tensor] = None


def teacher_topk(batch: dict, logits: torch.Tensor, k: int = 32, loss_positions_only: bool = True) -> TeacherTargets:
    """Keep the top-``k`` log-probabilities of ``logits`` [B, T, V] at the distilled positions of ``batch``.

    The distilled positions are the non-padding ones; with ``loss_positions_only`` (default) and ``labels`` [B, T] in
    ``batch``, only those whose next token is counted by the training loss (``labels[:, t + 1] != -100``: the
    completion tokens of prompt/completion rows, every token of language-modelling rows), i.e. where the fine-tuning
    gain was made and is measured.  A batch with no such position falls back to every non-padding position.
    Either way the targets keep the batch's next-token labels (:class:`TeacherTargets`), to score held-out runs.
    """
    mask = batch.get("attention_mask")
    positions = (mask.bool() if mask is not None else torch.ones(logits.shape[:2], dtype=torch.bool)).cpu()
    labels = batch.get("labels")
    next_labels = None
    if isinstance(labels, torch.Tensor) and labels.shape == positions.shape:
        nxt = torch.full(positions.shape, IGNORE_INDEX, dtype=torch.int64)
        nxt[:, :-1] = labels[:, 1:].cpu()
        counted = (nxt != IGNORE_INDEX) & positions
        if bool(counted.any()) and loss_positions_only:
            positions = counted
        next_labels = nxt[positions]  # all IGNORE_INDEX in a batch whose loss counts no token
    logp = torch.log_softmax(logits.detach().float(), dim=-1)[positions.to(logits.device)]
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    inputs = {key: v.detach() if isinstance(v, torch.Tensor) else v for key, v in forward_inputs(batch).items() if key != "use_cache"}
    return TeacherTargets(inputs, positions, vals.to(torch.float16).cpu(), idx.to(torch.int32).cpu(), rest.cpu(), next_labels)


def topk_kl(teacher: torch.Tensor, student: torch.Tensor, teacher_rest: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean KL divergence (nats) over the partition {top-k tokens, everything else}.

    Args:
        teacher / student: float32 [P, k] log-probabilities of the teacher's top-k tokens under the
            teacher and under the student (full-vocabulary log-softmax, gathered).
        teacher_rest: float32 [P], log of the teacher's mass outside the top-k (``TeacherTargets.rest``);
            default ``log(1 - sum(exp(teacher)))``.

    The remaining mass is one extra outcome, so the result is a true KL divergence (non-negative, 0 iff
    both agree on the top-k tokens and on the rest) of the coarsened distributions.  The student's
    rest is ``log(1 - sum(exp(student)))`` in float64 (clamped at 1e-12).
    """
    pt = teacher.exp()
    if teacher_rest is None:
        teacher_rest = torch.log((1 - pt.double().sum(-1)).clamp(min=1e-12))
    rest_s = torch.log((1 - student.double().exp().sum(-1)).clamp(min=1e-12))
    rest_t = teacher_rest.double()
    kl = (pt * (teacher - student)).sum(-1).double() + rest_t.exp() * (rest_t - rest_s)
    return kl.mean().to(teacher.dtype)


class _ScaleOnlyMatmul(torch.autograd.Function):
    """``y = x @ W`` with ``W[i, o] = v[i, o] * s[g_idx[i], o]``; gradients for ``x`` and ``s`` only.

    Saves the integer ``v = q - z`` (int8, int16 for 8 bits) instead of the float weight, and rebuilds ``W`` in backward.
    """

    @staticmethod
    def forward(ctx, x, v, s, g_idx):
        w = v.to(s.dtype) * s[g_idx]
        ctx.save_for_backward(x, v, s, g_idx)
        return x.to(w.dtype) @ w

    @staticmethod
    def backward(ctx, gy):
        x, v, s, g_idx = ctx.saved_tensors
        gx = gs = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ (v.to(s.dtype) * s[g_idx]).t()).to(x.dtype)
        if ctx.needs_input_grad[2]:
            gw = x.reshape(-1, x.shape[-1]).to(gy.dtype).t() @ gy.reshape(-1, gy.shape[-1])  # [K, N]
            gs = torch.zeros_like(s).index_add_(0, g_idx, gw * v.to(gw.dtype))
        return gx, None, gs, None


class ScaleTunedLinear(nn.Module):
    """A merged GPTQ layer with frozen integer codes/zero-points and trainable scales.

    ``W[o, i] = s[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])`` with ``s = fp16(s0 * (1 + u / maxq))`` and ``u`` [G, N]
    (float32, initialised to 0) the only trainable tensor; the fp16 rounding uses a straight-through
    gradient.  ``s0`` are the layer's stored scales.  Computes in float32.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        t = read_layer(layer)
        self.layer = layer
        self.maxq = t.maxq
        dev = layer.qweight.device
        v_dtype = torch.int8 if t.bits < 8 else torch.int16  # q - z spans [-(2**bits - 1), 2**bits - 1]
        self.register_buffer("v", (t.q - t.z[t.g_idx]).to(v_dtype).to(dev), persistent=False)  # [K, N]
        self.register_buffer("g_idx", t.g_idx.to(dev), persistent=False)
        self.register_buffer("s0", t.scales.to(dev), persistent=False)
        self.u = nn.Parameter(torch.zeros_like(self.s0))
        self.bias = getattr(layer, "bias", None)

    def scales(self) -> torch.Tensor:
        s = self.s0 * (1 + self.u / self.maxq)
        return s + (s.to(torch.float16).to(s.dtype) - s).detach()  # what is stored (fp16), STE gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ScaleOnlyMatmul.apply(x, self.v, self.scales(), self.g_idx)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def write_back(self) -> torch.Tensor:
        """Store the tuned scales (fp16) in the wrapped GPTQ layer; returns them as float32 [G, N]."""
        with torch.no_grad():
            s = (self.s0 * (1 + self.u / self.maxq)).to(torch.float16).to(torch.float32)
        write_layer(self.layer, scales=s.cpu())
        return s.cpu()


class _RelativeWeight(nn.Module):
    """Parametrisation ``weight = weight0 * (1 + u / maxq)`` of a normalisation layer's weight [C] (norm tweaking), with
    ``u`` [C] (float32, initialised to 0) trainable: the same relative step per unit of ``u`` as the scales'."""

    def __init__(self, weight: torch.Tensor, maxq: int):
        super().__init__()
        self.maxq = maxq
        self.u = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (1 + self.u / self.maxq).to(weight.dtype)


def norm_layers(model: nn.Module) -> list[str]:
    """Qualified names of ``model``'s normalisation layers with a per-channel ``weight`` [C] (``*RMSNorm`` /
    ``*LayerNorm`` modules: Llama's ``input_layernorm``, ``post_attention_layernorm`` and final ``norm``), the
    layers :func:`distill_scales` can tune with ``norms``."""
    return [n for n, m in model.named_modules()
            if type(m).__name__.endswith(("RMSNorm", "LayerNorm")) and isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.dim() == 1]


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace submodule ``name`` by ``new`` under every attribute of its parent that holds it (PEFT's
    ``GPTQLoraLinear`` keeps the GPTQ layer as both ``base_layer`` and ``quant_linear_module``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    for attr, module in list(parent._modules.items()):
        if module is old:
            setattr(parent, attr, new)
    return old


def distill_scales(
    model: nn.Module,
    layer_names: list[str],
    targets: list[TeacherTargets],
    steps: int = 32,
    lr: float = 1.5e-2,
    seed: int = 0,
    progress: bool = True,
    on_step: Optional[Callable[[int, float], None]] = None,
    norms: Sequence[str] = (),
    label_weight: float = 0.0,
) -> dict:
    """Tune the fp16 scales of ``layer_names`` (GPTQ layers of ``model``) to match the teacher targets.

    Args:
        model: the model whose forward is the merged model (for a ``PeftModel``, with the QA-LoRA layers'
            adapters disabled); its GPTQ layers must be loaded with a v2 kernel (``backend="torch"``).
        layer_names: qualified names of the GPTQ layers to tune (the merged ones).
        targets: :func:`teacher_topk` of the trained model on calibration batches.
        steps: optimiser steps.  With at most ``steps`` targets, one calibration batch per step (cycling through
            ``targets`` in shuffled order); with more, the shuffled targets are split into ``steps`` near-equal
            chunks and each step distils one chunk (gradients accumulated, the KL averaged over the chunk's
            positions), so every batch is distilled exactly once.
        lr: peak Adam learning rate (cosine decay to 0) on ``u``, where ``s = s0 * (1 + u / maxq)``: a change of
            ``u`` by 1 moves the weights at the end of the code range (``|q - z| = maxq``) by one
            quantisation step, whatever the bit width.  1.5e-2 for 4 bits is a relative scale change of 1e-3.
        seed: shuffling seed.
        on_step: called as ``on_step(step, kl)`` after each optimiser step (1-based).
        norms: qualified names of normalisation layers (:func:`norm_layers`) whose per-channel ``weight`` [C] is tuned
            jointly with the scales, as ``weight0 * (1 + u / maxq)`` at the same rate (norm tweaking: Li et al. 2023,
            "Norm Tweaking: High-performance Low-bit Quantization of Large Language Models", §3).  These weights are
            stored unquantised (float), so the checkpoint stays a standard GPTQ checkpoint.  Default: none.
        label_weight: ``w`` in ``(1 - w) * KL + w * CE``, where CE is the cross-entropy (nats per counted token) on the
            targets' next-token ``labels`` (distillation with hard targets, Hinton et al. 2015, §2; scales trained on the
            task loss as in PEQA, Kim et al. 2023, §3, and EfficientQAT's E2E-QP, Chen et al. 2024, §3.3).  0 (default):
            the KL alone.  Every target needs ``labels`` (:func:`teacher_topk` of batches with ``labels``).

    Returns:
        ``{"steps", "kl_first", "kl_last", "scales_changed", "norms_tuned", "diverged"}``: the mean top-k KL (nats per
        position) of the first and last step, the number of stored fp16 scales that changed and of normalisation
        layers tuned.  The tuned scales are written into the GPTQ layers (and the norm weights into their layers) in
        place; codes and zero-points are untouched.  If the KL becomes non-finite, nothing is written (the layers keep
        their scales and weights) and ``diverged`` is True.

    Memory: per tuned layer an integer copy of ``q - z`` (1 byte per weight, 2 for 8 bits) and a float32
    ``u`` per group, plus the layer inputs saved for backward.
    """
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"label_weight must be in [0, 1], got {label_weight}.")
    if label_weight and any(t.labels is None for t in targets):
        raise ValueError("label_weight > 0 needs next-token labels in every target: build them with teacher_topk() on "
                         "batches that have 'labels', or use label_weight=0.")
    if not targets or steps <= 0:
        return {"steps": 0, "kl_first": None, "kl_last": None, "scales_changed": 0, "norms_tuned": 0, "diverged": False}
    flags = {p: p.requires_grad for p in model.parameters()}
    originals: dict[str, nn.Module] = {}
    parametrized: list[nn.Module] = []
    completed = False  # the tuned values are kept only after a distillation that ran to its end
    was_training = model.training
    rng = random.Random(seed)
    order: list[int] = []
    kl_first = kl_last = None
    changed = 0
    diverged = False
    try:
        from tqdm.auto import tqdm

        tuned = {n: ScaleTunedLinear(model.get_submodule(n)) for n in layer_names}
        for p in flags:
            p.requires_grad_(False)
        for n, m in tuned.items():
            originals[n] = _swap(model, n, m)
        maxq = next(iter(tuned.values())).maxq if tuned else 15
        for n in norms:
            norm = model.get_submodule(n)
            parametrize.register_parametrization(norm, "weight", _RelativeWeight(norm.weight, maxq))
            parametrized.append(norm)
        opt = torch.optim.Adam([m.u for m in tuned.values()] + [m.parametrizations.weight[0].u for m in parametrized], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))  # cosine to 0
        model.eval()  # no dropout: the merged forward exactly
        in_dev = model.get_input_embeddings().weight.device
        bar = tqdm(range(steps), desc="Distilling scales", disable=not progress)
        if len(targets) > steps:  # more batches than steps: each step distils its share, each batch once
            order = list(range(len(targets)))
            rng.shuffle(order)
            per_step = [order[i * len(order) // steps:(i + 1) * len(order) // steps] for i in range(steps)]
        for step in bar:
            if len(targets) > steps:
                chunk = [targets[i] for i in per_step[step]]
            else:
                if not order:
                    order = list(range(len(targets)))
                    rng.shuffle(order)
                chunk = [targets[order.pop()]]
            total = max(sum(int(t.positions.sum()) for t in chunk), 1)
            opt.zero_grad(set_to_none=True)
            kl_sum = 0.0
            for t in chunk:  # gradient accumulation: the step's KL is the mean over all its distilled positions
                with torch.enable_grad():
                    out = model(**forward_inputs(t.batch, in_dev))  # the teacher's forward: packed rows stay apart
                    dev = out.logits.device
                    logp = torch.log_softmax(out.logits.float()[t.positions.to(dev)], dim=-1)  # [P, V]
                    kl = topk_kl(t.logprobs.to(dev).float(), logp.gather(-1, t.indices.to(dev).long()), t.rest.to(dev))
                    loss = kl
                    if label_weight:  # hard targets: the next-token cross-entropy where the training loss counts one
                        nll, n = _label_nll(logp, t.labels.to(dev))
                        loss = (1 - label_weight) * kl + label_weight * (nll / max(n, 1))
                    diverged = not math.isfinite(float(loss.detach()))
                    if diverged:
                        break
                    weight = int(t.positions.sum()) / total  # exactly 1.0 for a chunk of one batch
                    (loss * weight).backward()
                kl_sum += float(kl.detach()) * weight
            if diverged:
                logger.warning("scale distillation diverged at step %d (non-finite KL): keeping the scales from before it; "
                               "lower distill_lr.", step + 1)
                break
            opt.step()
            sched.step()
            kl_last = kl_sum
            kl_first = kl_last if kl_first is None else kl_first
            bar.set_postfix(kl=f"{kl_last:.4f}")
            if on_step is not None:
                on_step(step + 1, kl_last)
        if not diverged:
            for m in tuned.values():
                before = m.layer.scales.detach().clone()
                m.write_back()
                changed += int((m.layer.scales != before).sum())
            completed = True
    finally:
        for norm in parametrized:  # the tuned weight stays only after a completed distillation
            parametrize.remove_parametrizations(norm, "weight", leave_parametrized=completed)
        for n, old in originals.items():
            _swap(model, n, old)
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    norms_tuned = len(parametrized) if completed else 0
    logger.info("scale distillation: %d steps, top-k KL %s -> %s, %d scales changed, %d norm layers tuned", steps, kl_first,
                kl_last, changed, norms_tuned)
    return {"steps": steps, "kl_first": kl_first, "kl_last": kl_last, "scales_changed": changed,
            "norms_tuned": norms_tuned, "diverged": diverged}


def _label_nll(logp: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (nats) of ``logp`` [P, V] on ``labels`` [P] (``IGNORE_INDEX`` skipped), and the
    number of labels counted."""
    keep = labels != IGNORE_INDEX
    return -logp[keep].gather(-1, labels[keep].view(-1, 1)).sum(), int(keep.sum())


def heldout_scores(model: nn.Module, targets: list[TeacherTargets]) -> dict:
    """``{"kl", "loss"}`` of ``model`` on ``targets``, forward only, in eval mode: the mean top-k KL to the teacher
    (:func:`topk_kl`, nats per distilled position) and the mean next-token cross-entropy on the labels (nats per
    counted token, ``IGNORE_INDEX`` labels skipped; None unless every batch has ``labels``)."""
    was_training = model.training
    model.eval()
    in_dev = model.get_input_embeddings().weight.device
    kl_sum, ce_sum, count, ce_count = 0.0, 0.0, 0, 0
    with_labels = all(t.labels is not None for t in targets)
    try:
        with torch.no_grad():
            for t in targets:
                logits = model(**forward_inputs(t.batch, in_dev)).logits
                dev = logits.device
                logp = torch.log_softmax(logits.float()[t.positions.to(dev)], dim=-1)
                kl = topk_kl(t.logprobs.to(dev).float(), logp.gather(-1, t.indices.to(dev).long()), t.rest.to(dev))
                n = int(t.positions.sum())
                kl_sum, count = kl_sum + float(kl) * n, count + n
                if with_labels:
                    nll, n = _label_nll(logp, t.labels.to(dev))
                    ce_sum, ce_count = ce_sum + float(nll), ce_count + n
    finally:
        model.train(was_training)
    if not count:
        return {"kl": float("nan"), "loss": None}
    return {"kl": kl_sum / count, "loss": ce_sum / ce_count if with_labels and ce_count else None}


def distill_scales_lr_search(
    model: nn.Module,
    layer_names: list[str],
    targets: list[TeacherTargets],
    lr: float,
    steps: int = 32,
    factor: float = 3.0,
    max_runs: int = 3,
    holdout_every: int = 8,
    seed: int = 0,
    progress: bool = True,
    norms: Sequence[str] = (),
    label_weight: float = 0.0,
) -> dict:
    """:func:`distill_scales` with the peak learning rate chosen on held-out calibration batches.

    Every ``holdout_every``-th batch of ``targets`` is kept out of the distillation.  The search starts at ``lr``
    (a guess from the adapter, see :func:`qalora_hf.merge.merge_qalora`), then ``lr * factor``, and goes on in the
    direction that scored better (``lr / factor`` if the larger rate was worse), for at most ``max_runs`` full
    distillations of ``steps`` steps each, every one from the same starting scales.  The score
    (:func:`heldout_scores`) is the held-out cross-entropy on the training labels, the quantity whose drop is the
    fine-tuning gain the merge must keep, when the targets carry labels (:func:`teacher_topk` at the loss
    positions), else the held-out top-k KL to the teacher.  The best-scoring rate is then run once more on every
    batch (held-out ones included) and those scales are written; none are if no run beats the starting scales.
    (On SmolLM2-135M, fitting 7/8 of 128 rows instead of all of them cost 0.5 points of gain kept at the same
    rate, docs/fidelity_matrix.md.)  Why not the KL when labels exist: on SmolLM2-135M (INT4, group 64,
    symmetric, act-order) the held-out KL was lowest at a rate whose merge kept 95 % of the gain, and 3x higher at
    the rate that kept 98 % (docs/fidelity_matrix.md).  The KL still bounds the choice (fidelity guard): under the
    cross-entropy criterion a run whose held-out KL ends above the starting scales' is rejected, since it has moved
    the merge further from the trained model than where it started, however low its loss (with ``label_weight`` > 0
    and a small gain, the label term alone can do that: docs/fidelity_matrix.md, "The fidelity guard").

    Args:
        lr: the first peak learning rate tried (> 0).
        factor: ratio between successive rates tried (> 1).
        max_runs: search distillations at most (>= 1); the cost is up to ``max_runs + 1`` times that of
            :func:`distill_scales` (the search, then the refit on every batch).
        holdout_every: the held-out batches are ``targets[holdout_every - 1 :: holdout_every]`` (at least one;
            with fewer than two batches there is no search: one run at ``lr`` on all of them).
        steps / seed / progress / norms / label_weight: as in :func:`distill_scales`; every run starts from the same norm weights too.

    Returns:
        The refit's :func:`distill_scales` dict plus ``"lr"`` (the rate chosen; None if the starting scales
        were kept), ``"lr_criterion"`` (``"loss"`` or ``"kl"``), ``"lr_search"`` (list of ``{"lr", "heldout_kl",
        "heldout_loss", "rejected"}`` per run, in order; ``rejected``: by the fidelity guard),
        ``"heldout_kl_before"`` / ``"heldout_loss_before"`` (the starting scales') and ``"heldout_batches"``.
    """
    if len(targets) < 2:
        return {**distill_scales(model, layer_names, targets, steps=steps, lr=lr, seed=seed, progress=progress, norms=norms,
                              label_weight=label_weight),
                "lr": lr, "lr_criterion": None, "lr_search": [], "heldout_kl_before": None, "heldout_loss_before": None,
                "heldout_batches": 0}
    k = max(2, min(holdout_every, len(targets)))
    held = targets[k - 1 :: k]
    fit = [t for i, t in enumerate(targets) if i % k != k - 1]
    layers = {n: model.get_submodule(n) for n in layer_names}
    norm_modules = {n: model.get_submodule(n) for n in norms}

    def snapshot() -> dict:
        return {**{n: m.scales.detach().clone() for n, m in layers.items()},
                **{n: m.weight.detach().clone() for n, m in norm_modules.items()}}

    def restore(saved):
        for n, m in layers.items():
            write_layer(m, scales=saved[n].float().cpu())
        with torch.no_grad():
            for n, m in norm_modules.items():
                m.weight.copy_(saved[n])

    start = snapshot()

    before = heldout_scores(model, held)
    criterion = "loss" if before["loss"] is not None else "kl"  # a cross-entropy exists when the targets have labels
    best = {"score": before[criterion], "lr": None, "scales": start, "run": None}
    search: list[dict] = []
    tried: dict[float, float] = {}

    def run(rate: float) -> float:
        restore(start)
        out = distill_scales(model, layer_names, fit, steps=steps, lr=rate, seed=seed, progress=progress, norms=norms,
                             label_weight=label_weight)
        scores = {"kl": float("inf"), "loss": float("inf")} if out["diverged"] else heldout_scores(model, held)
        # Fidelity guard: a run whose held-out KL to the trained model ends above the starting scales' has moved the
        # merge away from the fine-tuning (the label term fitting the calibration rows), however low its loss.
        rejected = criterion == "loss" and not scores["kl"] <= before["kl"]
        search.append({"lr": rate, "heldout_kl": scores["kl"], "heldout_loss": scores["loss"], "rejected": rejected})
        tried[rate] = float("inf") if rejected else scores[criterion]
        logger.info("scale distillation at lr %.3g: held-out %s %.5f, KL %.6f (before: %.5f, KL %.6f)%s", rate, criterion,
                    scores[criterion], scores["kl"], before[criterion], before["kl"],
                    " - rejected: further from the trained model than the starting scales" if rejected else "")
        if tried[rate] < best["score"]:
            best.update(score=tried[rate], lr=rate, scales=snapshot(), run=out)
        return tried[rate]

    rate = lr
    run(rate)
    direction = factor
    for _ in range(max_runs - 1):
        nxt = rate * direction
        if run(nxt) < tried[rate]:
            rate = nxt  # keep going this way
        elif direction > 1 and len(tried) == 2:
            direction, rate = 1 / factor, lr  # the larger rate was worse: try smaller ones
        else:
            break
    restore(start)
    if best["lr"] is None:  # no rate beat the starting scales on the held-out batches: keep them
        chosen = {"steps": 0, "kl_first": None, "kl_last": None, "scales_changed": 0, "norms_tuned": 0, "diverged": False}
    else:  # the chosen rate, refitted on every batch (held-out ones included: 1/8 more rows to fit)
        chosen = distill_scales(model, layer_names, targets, steps=steps, lr=best["lr"], seed=seed, progress=progress, norms=norms,
                                label_weight=label_weight)
        if chosen["diverged"]:  # cannot happen where the same rate converged on 7/8 of the rows; keep that run
            restore(best["scales"])
            chosen = {**best["run"], "scales_changed": sum(int((layers[n].scales != start[n]).sum()) for n in layers)}
    return {**chosen, "lr": best["lr"], "lr_criterion": criterion, "lr_search": search, "heldout_kl_before": before["kl"],
            "heldout_loss_before": before["loss"], "heldout_batches": len(held)}
