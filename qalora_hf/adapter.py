"""The QA-LoRA adapter on a GPTQ layer: group pooling by ``g_idx``, forward and dense delta.

Math (Xu et al. 2023, arXiv 2309.14717, §3.3 and Algorithm 1; docs/merge.md).  For a GPTQ layer with
``in_features`` K, ``out_features`` N, ``group_size`` g and G = ceil(K / g) groups, the adapter holds
``lora_A`` [r, G] and ``lora_B`` [N, r] and computes::

    y = base(x) + scaling * lora_B(lora_A(P(x)))
    P(x)[l] = c * mean(x[i] for i with g_idx[i] == l),   c = G

We use PEFT's constant ``c = K/g`` (``QALoraLinearVariant`` multiplies the group mean by the number of
groups), so adapter files are interchangeable with stock PEFT ``LoraConfig(use_qalora=True,
qalora_group_size=g)`` and, on models without act-order, stock PEFT computes the same forward.  (The
paper sums, ``c = g``; the official code averages, ``c = 1``; all three differ only by a constant
absorbed into ``lora_A``.)

A ragged last group (K not a multiple of g, e.g. SmolLM2-135M's K = 576 with g = 128: four groups of 128
and one of 64) is what GPTQ quantises there (gptqmodel stores ``ceil(K / g)`` rows of ``scales`` and
``qzeros``); its pooled feature is the mean over its own n_G < g channels, still times ``c = G``.  Stock
PEFT reshapes by ``K // g`` and cannot run such a layer; adapters of models whose adapted layers all have
K a multiple of g stay interchangeable with it.

Unlike PEFT and the official code, pooling follows ``g_idx`` rather than contiguous blocks, so the
pooling groups are exactly the quantisation groups also under act-order (``desc_act=True``), which
is what makes the adapter mergeable into the zero-points.

The equivalent dense update is constant inside each quantisation group::

    dW[o, i] = scaling * (c / n_l) * (lora_B @ lora_A)[o, l],   l = g_idx[i],  n_l = channels in group l

:func:`group_delta` returns it as ``D[l, o]`` of shape [G, N].
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.lora.config import LoraConfig
from peft.tuners.lora.gptq import GPTQLoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn


def gptq_group_size(base_layer) -> int:
    """The quantisation group size of a gptqmodel layer (``-1`` means one group per row)."""
    g = int(getattr(base_layer, "group_size", -1))
    return base_layer.in_features if g in (-1, 0) else g


def group_counts(in_features: int, group_size: int) -> list[int]:
    """Channels per quantisation group as GPTQ forms them: ``ceil(K / g)`` groups of ``g``, the last one holding
    the remaining ``K - (G - 1) * g`` (ragged when ``K`` is not a multiple of ``g``)."""
    groups = -(-in_features // group_size)
    return [group_size] * (groups - 1) + [in_features - (groups - 1) * group_size]


def pooling_permutation(g_idx: torch.Tensor, group_size: int, layer_name: str = "layer") -> Optional[torch.Tensor]:
    """Input-channel order that makes every quantisation group contiguous, or None if already so.

    Args:
        g_idx: int ``[K]``, the group of each input channel.
        group_size: g; groups ``0 .. G-2`` must hold exactly g channels and the last ``K - (G-1) g``
            (:func:`group_counts`, G = ceil(K / g)).

    Raises:
        ValueError: ``g_idx`` does not split the channels that way (a group_size other than the checkpoint's).
    """
    k = g_idx.numel()
    want = group_counts(k, group_size)
    g_idx = g_idx.detach().to("cpu", torch.int64)
    counts = torch.bincount(g_idx, minlength=len(want))
    if counts.tolist() != want:
        raise ValueError(
            f"{layer_name}: g_idx does not split the {k} input channels into groups of {want[0]} (the last of {want[-1]}); "
            "the pooling group must equal the GPTQ group. Check group_size against the model's quantization_config."
        )
    if torch.equal(g_idx, torch.arange(k) // group_size):
        return None
    return torch.argsort(g_idx, stable=True)


class QALoraGPTQVariant(LoraVariant):
    """PEFT LoRA variant for QA-LoRA on GPTQ layers, pooling by ``g_idx`` (module docstring).

    Merging goes through :func:`qalora_hf.merge.merge_qalora`, which writes the delta into the GPTQ
    integers; PEFT's float ``merge``/``unmerge`` do not apply to packed weights and raise.
    """

    @staticmethod
    def init(module: "QALoraGPTQLinear", adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        base = module.get_base_layer()
        g = int(config.qalora_group_size)
        name = kwargs.get("current_key") or type(base).__name__
        layer_g = gptq_group_size(base)
        if g != layer_g:
            raise ValueError(
                f"{name}: QA-LoRA group_size={g} differs from the layer's GPTQ group_size={layer_g}; the adapter "
                f"could not be merged. Set group_size={layer_g} (or leave it unset to read it from the model)."
            )
        perm = pooling_permutation(base.g_idx, g, name)
        if not hasattr(module, "qalora_group_size"):
            module.qalora_group_size = {}
        module.qalora_group_size[adapter_name] = g
        if "qalora_group_size" not in module.other_param_names:
            module.other_param_names = module.other_param_names + ("qalora_group_size",)
        module.register_buffer("qalora_perm", None if perm is None else perm.to(base.g_idx.device), persistent=False)
        counts = group_counts(base.in_features, g)
        old = module.lora_A[adapter_name]
        module.lora_A[adapter_name] = nn.Linear(
            len(counts), old.out_features, bias=False, device=old.weight.device, dtype=old.weight.dtype
        )
        init = config.init_lora_weights
        if init:  # PEFT's init, re-applied to the pooled lora_A (stock PEFT discards it here)
            module.reset_lora_parameters(adapter_name, init)

    @staticmethod
    def forward(module: "QALoraGPTQLinear", active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        g = module.qalora_group_size[active_adapter]
        x = dropout(x)
        if module.qalora_perm is not None:
            x = x.index_select(-1, module.qalora_perm)
        k = x.shape[-1]
        full = k // g
        summed = x[..., : full * g].reshape(*x.shape[:-1], full, g).sum(dim=-1)
        groups = full
        if full * g != k:  # ragged last group: its sum, weighted by g / n_G (so every pooled feature is g * mean)
            tail = x[..., full * g :].sum(dim=-1, keepdim=True) * (g / (k - full * g))
            summed = torch.cat([summed, tail], dim=-1)
            groups = full + 1
        # P(x) = G * group mean = (G/g) * (g * group mean); the constant rides on the final scaled add,
        # so no full-size multiply is spent on it (one fused add on the [..., N] output).
        return torch.add(result, lora_B(lora_A(summed)), alpha=module.scaling[active_adapter] * groups / g)

    @staticmethod
    def _no_float_merge(*args, **kwargs):
        raise NotImplementedError(
            "QA-LoRA on GPTQ layers merges into the integer zero-points/codes: use qalora_hf.merge_qalora(model)."
        )

    merge_safe = merge_unsafe = unmerge = get_delta_weight = _no_float_merge


class QALoraGPTQLinear(GPTQLoraLinear):
    """PEFT LoRA layer around a gptqmodel ``BaseQuantLinear`` that uses :class:`QALoraGPTQVariant`."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, **kwargs):
        if not config.use_qalora:
            raise ValueError("QALoraGPTQLinear needs LoraConfig(use_qalora=True).")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> Optional[LoraVariant]:
        return QALoraGPTQVariant()


def group_delta(module: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """The adapter's dense update per quantisation group, ``D[l, o]`` [G, N] float32.

    ``dW[o, i] = D[g_idx[i], o]``.  Works for :class:`QALoraGPTQLinear` and for stock PEFT
    ``GPTQLoraLinear`` with ``use_qalora`` (whose contiguous pooling equals ours when
    ``g_idx[i] == i // g``).

    Raises:
        ValueError: a stock PEFT adapter on an act-order layer (its contiguous pooling groups are not
            the quantisation groups, so no zero-point merge can represent it).
    """
    base = module.get_base_layer()
    g = int(module.qalora_group_size[adapter_name])
    if not isinstance(module, QALoraGPTQLinear) and pooling_permutation(base.g_idx, g) is not None:
        raise ValueError(
            "this stock PEFT use_qalora adapter pools contiguous channels, but the layer uses act-order (g_idx is "
            "permuted): its update is not constant inside quantisation groups and cannot be merged. Train with qalora_hf."
        )
    counts = torch.tensor(group_counts(base.in_features, g), dtype=torch.float32)  # n_l
    a = module.lora_A[adapter_name].weight.detach().float()  # [r, G]
    b = module.lora_B[adapter_name].weight.detach().float()  # [N, r]
    c = counts.numel()
    return (module.scaling[adapter_name] * c / counts.to(a.device)).unsqueeze(1) * (b @ a).t()
