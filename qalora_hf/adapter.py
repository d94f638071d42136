"""The QA-LoRA adapter on a GPTQ layer: group pooling by ``g_idx``, forward and dense delta.

Math (Xu et al. 2023, arXiv 2309.14717, §3.3 and Algorithm 1; docs/merge.md).  For a GPTQ layer with
``in_features`` K, ``out_features`` N, ``group_size`` g and G = K / g groups, the adapter holds
``lora_A`` [r, G] and ``lora_B`` [N, r] and computes::

    y = base(x) + scaling * lora_B(lora_A(P(x)))
    P(x)[l] = c * mean(x[i] for i with g_idx[i] == l),   c = K / g   (= G)

We use PEFT's constant ``c = K/g`` (``QALoraLinearVariant`` multiplies the group mean by the number of
groups), so adapter files are interchangeable with stock PEFT ``LoraConfig(use_qalora=True,
qalora_group_size=g)`` and, on models without act-order, stock PEFT computes the same forward.  (The
paper sums, ``c = g``; the official code averages, ``c = 1``; all three differ only by a constant
absorbed into ``lora_A``.)

Unlike PEFT and the official code, pooling follows ``g_idx`` rather than contiguous blocks, so the
pooling groups are exactly the quantisation groups also under act-order (``desc_act=True``), which
is what makes the adapter mergeable into the zero-points.

The equivalent dense update is constant inside each quantisation group::

    dW[o, i] = scaling * (c / g) * (lora_B @ lora_A)[o, g_idx[i]]

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


def pooling_permutation(g_idx: torch.Tensor, group_size: int, layer_name: str = "layer") -> Optional[torch.Tensor]:
    """Input-channel order that makes every quantisation group contiguous, or None if already so.

    Args:
        g_idx: int ``[K]``, the group of each input channel.
        group_size: g; every group must hold exactly g channels.

    Raises:
        ValueError: ``K`` is not a multiple of ``group_size``, or ``g_idx`` has a group of another size.
    """
    k = g_idx.numel()
    if k % group_size:
        raise ValueError(
            f"{layer_name}: in_features={k} is not a multiple of group_size={group_size}; QA-LoRA pools whole "
            "quantisation groups. Quantise with a group_size that divides in_features, or leave this layer out of target_modules."
        )
    g_idx = g_idx.detach().to("cpu", torch.int64)
    counts = torch.bincount(g_idx, minlength=k // group_size)
    if counts.numel() != k // group_size or not bool((counts == group_size).all()):
        raise ValueError(
            f"{layer_name}: g_idx does not split the {k} input channels into {k // group_size} groups of {group_size}; "
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
        old = module.lora_A[adapter_name]
        module.lora_A[adapter_name] = nn.Linear(
            base.in_features // g, old.out_features, bias=False, device=old.weight.device, dtype=old.weight.dtype
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
        groups = x.shape[-1] // g
        summed = x.reshape(*x.shape[:-1], groups, g).sum(dim=-1)
        # P(x) = (K/g) * group mean = (G/g) * group sum; the constant rides on the final scaled add,
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
    k = base.in_features
    a = module.lora_A[adapter_name].weight.detach().float()  # [r, G]
    b = module.lora_B[adapter_name].weight.detach().float()  # [N, r]
    c = k // g
    return (module.scaling[adapter_name] * c / g) * (b @ a).t().contiguous()
