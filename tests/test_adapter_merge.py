"""QA-LoRA adapter forward, integer merge, stock-loadable export and PEFT interop on tiny GPTQ models.

References are built independently of the library: W_base from gptqmodel's own
``dequantize_weight()`` and dW from the module docstring of ``qalora_hf.adapter``::

    dW[o, i] = scaling * (K/g) / g * (lora_B @ lora_A)[o, g_idx[i]]
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch.nn.utils import parametrize
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from qalora_hf import QALoraConfig, get_qalora_model, load_qalora_adapter, merge_qalora
from qalora_hf.adapter import QALoraGPTQLinear, pooling_permutation
from qalora_hf.export import export_gptq
from qalora_hf.gptq_format import read_layer
from qalora_hf.merge import qalora_layers
from qalora_hf.scale_distillation import ScaleTunedLinear
from qalora_hf.gptq import gptq_layers, gptq_settings

from conftest import GPTQ_CONFIGS, config_id

G_SIZE = 32
R, ALPHA = 4, 8  # scaling 2; with G = K/32 in {2, 4}, scaling * (K/g) / g is a power of two


# --------------------------------------------------------------------------------------------------
# helpers


def _adapted(pm, name="default"):
    """{short name: PEFT layer} for every layer holding a QA-LoRA adapter (sorted, deterministic)."""
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "qalora_group_size")}
    assert layers, "no QA-LoRA layers found"
    return dict(sorted(layers.items()))


def _scaling(module, name="default"):
    return float(module.scaling[name])


def reference_delta(module, name="default") -> torch.Tensor:
    """dW [N, K] float64 from the docstring formula (independent of qalora_hf.adapter.group_delta)."""
    base = module.get_base_layer()
    k = base.in_features
    a = module.lora_A[name].weight.detach().double()  # [r, G]
    b = module.lora_B[name].weight.detach().double()  # [N, r]
    ba = b @ a  # [N, G]
    g_idx = base.g_idx.detach().long().cpu()
    return _scaling(module, name) * (k / G_SIZE) / G_SIZE * ba[:, g_idx]


def base_weight(layer) -> torch.Tensor:
    """gptqmodel's own dequantisation, [N, K] float64."""
    return layer.dequantize_weight().detach().double().t().contiguous()


def randomize_adapters(pm, seed: int, shift_std: float | None = None, name="default"):
    """Random lora_A / lora_B on every adapted layer; with ``shift_std`` rescale B so std(D / s) == shift_std."""
    gen = torch.Generator().manual_seed(seed)
    for _, m in _adapted(pm, name).items():
        a, b = m.lora_A[name].weight, m.lora_B[name].weight
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=gen))
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
            if shift_std is not None:
                base = m.get_base_layer()
                s = base.scales.detach().double()  # [G, N]
                groups = base.in_features // G_SIZE
                d = _scaling(m, name) * (base.in_features / G_SIZE) / G_SIZE * (b.double() @ a.double()).t()  # [G, N]
                assert d.shape == s.shape and groups == s.shape[0]
                b.mul_(shift_std / float((d / s).std()))


def integer_shift_adapters(pm, seed: int, name="default"):
    """Set A = [I_G; 0], B[:, :G] = k * s / c' so that every shift D / s is an integer k in {-1, 0, 1} with z - k in range
    (the merge's range: [1, maxq], or [0, maxq] where z is already 0)."""
    gen = torch.Generator().manual_seed(seed)
    n_nonzero = 0
    for _, m in _adapted(pm, name).items():
        base = m.get_base_layer()
        t = read_layer(base)
        groups, n = t.scales.shape
        r = m.lora_A[name].weight.shape[0]
        assert r >= groups
        k = torch.randint(-1, 2, (groups, n), generator=gen)
        k = torch.where((t.z - k < t.z.clamp(max=1)) | (t.z - k > t.maxq), torch.zeros_like(k), k)
        n_nonzero += int((k != 0).sum())
        d = k.double() * t.scales.double()  # [G, N]
        factor = _scaling(m, name) * (base.in_features / G_SIZE) / G_SIZE
        a = torch.zeros(r, groups, dtype=torch.float64)
        a[:groups, :groups] = torch.eye(groups)
        b = torch.zeros(n, r, dtype=torch.float64)
        b[:, :groups] = d.t() / factor
        with torch.no_grad():
            m.lora_A[name].weight.copy_(a)
            m.lora_B[name].weight.copy_(b)
    assert n_nonzero > 0


def fp32_scales(model):
    """Hold the GPTQ scales in float32 (an exact copy of the fp16 values).

    gptqmodel dequantises in the scales' dtype, so with fp16 scales ``s * (q - z)`` is rounded to 11 bits
    and ``fp16(s*(q-z)) + k*s`` differs from ``fp16(s*(q-z+k))`` by fp16 rounding (~1.5e-4 on these
    logits) although the merged integers are exact.  In float32 every product is exact, which isolates
    the merge itself.
    """
    for layer in gptq_layers(model).values():
        layer.scales.data = layer.scales.data.float()
        for hook in ("clear_weight_cache", "_stream_reset_cache"):
            if callable(getattr(layer, hook, None)):
                getattr(layer, hook)()
    return model


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.detach().float()


def capture_inputs(model, names, batches) -> dict[str, torch.Tensor]:
    """Inputs [tokens, K] (padding removed) of the named modules over ``batches``."""
    modules = dict(model.named_modules())
    store: dict[str, list] = {n: [] for n in names}
    mask = {}

    def hook(n):
        def fn(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            store[n].append(x[mask["m"].reshape(-1).bool()])

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                mask["m"] = batch["attention_mask"]
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def _qc_get(qc, key):
    return qc[key] if isinstance(qc, dict) else getattr(qc, key)


# --------------------------------------------------------------------------------------------------
# 1. forward matches the paper


@pytest.mark.parametrize("cfg", GPTQ_CONFIGS + [(4, True, False, True)], ids=config_id)
def test_forward_matches_dense_reference(cfg, load_tiny_gptq):
    bits, desc_act, sym, *rest = cfg
    bias = bool(rest and rest[0])
    pm = get_qalora_model(load_tiny_gptq(bits, desc_act, sym, bias), QALoraConfig(r=R, lora_alpha=ALPHA))
    randomize_adapters(pm, seed=bits)
    layers = _adapted(pm)
    assert len(layers) == 14  # all-linear: 7 projections x 2 blocks, lm_head excluded
    gen = torch.Generator().manual_seed(1)
    permuted = 0
    for name, m in layers.items():
        assert isinstance(m, QALoraGPTQLinear)
        base = m.get_base_layer()
        k, n = base.in_features, base.out_features
        g_idx = base.g_idx.long()
        assert m.lora_A["default"].weight.shape == (R, k // G_SIZE)
        assert m.lora_B["default"].weight.shape == (n, R)
        assert _scaling(m) == ALPHA / R
        if not torch.equal(g_idx, torch.arange(k) // G_SIZE):
            permuted += 1
        dw = reference_delta(m)
        # dW is constant inside every quantisation group (and differs between groups).
        for grp in range(k // G_SIZE):
            cols = dw[:, g_idx == grp]
            assert cols.shape[1] == G_SIZE
            assert torch.equal(cols, cols[:, :1].expand_as(cols)), name
        assert not torch.allclose(dw[:, g_idx == 0][:, 0], dw[:, g_idx == 1][:, 0])
        w = base_weight(base) + dw
        x = torch.randn(3, 5, k, generator=gen)
        with torch.no_grad():
            y = m(x).double()
        ref = x.double() @ w.t()
        if bias:
            assert base.bias is not None
            ref = ref + base.bias.detach().double()
        else:
            assert getattr(base, "bias", None) is None
        torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-5, msg=name)
        # and the adapter really contributes
        assert (y - x.double() @ base_weight(base).t() - (base.bias.double() if bias else 0)).abs().max() > 1e-3
    if desc_act:
        assert permuted == len(layers), "act-order model without permuted g_idx: the act-order test would be vacuous"
    else:
        assert permuted == 0


# --------------------------------------------------------------------------------------------------
# 2. merge: exact with integer shifts, bounded otherwise


@pytest.mark.parametrize("cfg", GPTQ_CONFIGS + [(4, True, False, True)], ids=config_id)
def test_merge_exact_for_integer_shifts(cfg, load_tiny_gptq, sample_input_ids):
    bits, desc_act, sym, *rest = cfg
    bias = bool(rest and rest[0])
    pm = get_qalora_model(fp32_scales(load_tiny_gptq(bits, desc_act, sym, bias)), QALoraConfig(r=R, lora_alpha=ALPHA))
    integer_shift_adapters(pm, seed=10 + bits)
    layers = _adapted(pm)
    expected = {n: base_weight(m.get_base_layer()) + reference_delta(m) for n, m in layers.items()}
    before = logits(pm, sample_input_ids)
    base_only = None
    with pm.disable_adapter():
        base_only = logits(pm, sample_input_ids)
    assert (before - base_only).abs().max() > 1e-3  # the adapter changes the output

    merged, report = merge_qalora(pm, strategy="round", progress=False)
    after = logits(merged, sample_input_ids)
    assert (after - before).abs().max().item() <= 1e-4

    assert report.strategy == "round"
    assert len(report.layers) == len(layers)
    for lr in report.layers:
        assert lr.exact, lr
        assert lr.zeros_clamped == 0
        assert lr.codes_changed == 0
        assert lr.shift_frac_mean < 1e-6
        assert lr.max_abs_weight_error <= 1e-6
    totals = report.totals
    assert totals["exact_layers"] == len(layers) and totals["zeros_clamped"] == 0 and totals["zeros_changed"] > 0
    merged_layers = gptq_layers(merged)
    for name, w in expected.items():
        torch.testing.assert_close(base_weight(merged_layers[name]), w, atol=1e-6, rtol=0, msg=name)
    assert not isinstance(merged, PeftModel)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert _qc_get(merged.config.quantization_config, "sym") is False


def _shift_bound(t, delta_gn: torch.Tensor) -> torch.Tensor:
    """Per-(group, column) bound on |W_round - (W_base + dW)| for the round strategy: s * max(1/2, distance of z - t to
    [floor, maxq]), floor = min(z, 1) (the merge never makes a new zero-point 0)."""
    zf = t.z.double() - delta_gn / t.scales.double()
    floor = t.z.double().clamp(max=1)
    outside = (zf - torch.maximum(zf, floor).clamp(max=t.maxq)).abs() + 0.5 * (zf < floor)
    return t.scales.double() * torch.maximum(torch.full_like(zf, 0.5), outside)


@pytest.mark.parametrize("cfg", [(4, False, False), (3, True, True), (2, True, False), (8, True, True), (4, True, False, True)], ids=config_id)
def test_merge_fractional_shifts_round_vs_gptq(cfg, load_tiny_gptq, calibration_batches):
    bits, desc_act, sym, *rest = cfg
    bias = bool(rest and rest[0])
    results = {}
    for strategy in ("round", "gptq"):
        # float32 scales: compare gptqmodel's weights with the report's float claims exactly (see fp32_scales)
        pm = get_qalora_model(fp32_scales(load_tiny_gptq(bits, desc_act, sym, bias)), QALoraConfig(r=R, lora_alpha=ALPHA))
        randomize_adapters(pm, seed=100 + bits, shift_std=0.7)
        layers = _adapted(pm)
        before = {n: read_layer(m.get_base_layer()) for n, m in layers.items()}
        w_base = {n: base_weight(m.get_base_layer()) for n, m in layers.items()}
        dw = {n: reference_delta(m) for n, m in layers.items()}
        xs = capture_inputs(pm, [f"base_model.model.{n}.base_layer" for n in layers], calibration_batches)
        merged, report = merge_qalora(pm, strategy=strategy, calibration=calibration_batches, progress=False)
        merged_layers = gptq_layers(merged)
        by_name = {lr.name: lr for lr in report.layers}
        assert set(by_name) == set(layers)
        out_err = {}
        for n in layers:
            layer = merged_layers[n]
            lr = by_name[n]
            target = w_base[n] + dw[n]
            w_m = base_weight(layer)
            err = (w_m - target).abs()
            assert err.max().item() <= lr.max_abs_weight_error * (1 + 1e-5) + 1e-7, n
            assert err.max().item() >= lr.max_abs_weight_error * (1 - 1e-4) - 1e-7, n
            assert not lr.exact
            t = read_layer(layer)
            assert int(t.q.min()) >= 0 and int(t.q.max()) <= t.maxq
            assert int(t.z.min()) >= 0 and int(t.z.max()) <= t.maxq
            torch.testing.assert_close(t.dequantize().double(), w_m, atol=1e-6, rtol=0)  # read_layer agrees with gptqmodel
            torch.testing.assert_close(t.scales, before[n].scales, atol=0, rtol=0)
            if strategy == "round":
                assert torch.equal(t.q, before[n].q)
                delta_gn = dw[n][:, [int((before[n].g_idx == grp).nonzero()[0]) for grp in range(t.scales.shape[0])]].t()
                bound = _shift_bound(before[n], delta_gn)[before[n].g_idx].t()  # [N, K]
                assert bool((err <= bound + 1e-6).all()), n
                rounded = torch.round(before[n].z.double() - delta_gn / before[n].scales.double())
                clamped = int(((rounded < before[n].z.clamp(max=1)) | (rounded > t.maxq)).sum())
                assert lr.zeros_clamped == clamped
            x = xs[f"base_model.model.{n}.base_layer"]
            out_err[n] = float(((x @ (w_m - target).t()) ** 2).sum())
            assert lr.rel_output_error is not None and lr.rel_output_error > 0
        results[strategy] = (by_name, out_err)
        assert _qc_get(merged.config.quantization_config, "sym") is False
    (rep_r, err_r), (rep_g, err_g) = results["round"], results["gptq"]
    for n in rep_r:
        assert rep_g[n].rel_output_error < rep_r[n].rel_output_error, n
        assert err_g[n] < err_r[n], n
        assert rep_g[n].codes_changed > 0
    assert sum(err_g.values()) < 0.7 * sum(err_r.values())


def test_merge_leaves_unadapted_layers_bit_identical(load_tiny_gptq, calibration_batches):
    model = load_tiny_gptq(4, True, False)
    before = {n: (l.qweight.clone(), l.qzeros.clone(), l.scales.clone(), l.g_idx.clone()) for n, l in gptq_layers(model).items()}
    pm = get_qalora_model(model, QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(pm, seed=3, shift_std=0.7)
    assert sorted(_adapted(pm)) == sorted(n for n in before if n.endswith(("q_proj", "v_proj")))
    merged, report = merge_qalora(pm, strategy="gptq", calibration=calibration_batches, progress=False)
    assert len(report.layers) == 4
    after = gptq_layers(merged)
    assert sorted(after) == sorted(before)
    for n, (qw, qz, sc, gi) in before.items():
        layer = after[n]
        assert torch.equal(layer.scales, sc) and torch.equal(layer.g_idx, gi)
        if n.endswith(("q_proj", "v_proj")):
            assert not torch.equal(layer.qzeros, qz), n
        else:
            assert torch.equal(layer.qweight, qw), n
            assert torch.equal(layer.qzeros, qz), n
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert _qc_get(merged.config.quantization_config, "sym") is False



@pytest.mark.parametrize("cfg", [(4, False, False), (3, True, True), (8, False, False)], ids=config_id)
def test_merge_scales_strategy(cfg, load_tiny_gptq, calibration_batches):
    """'scales' refits the fp16 group scales by H-weighted least squares, then re-chooses codes: it must beat
    'round' on the calibration activations, keep every integer in range, and touch only adapted layers."""
    bits, desc_act, sym = cfg
    errs = {}
    for strategy in ("round", "scales"):
        model = fp32_scales(load_tiny_gptq(bits, desc_act, sym))
        untouched = {n: (l.qweight.clone(), l.qzeros.clone(), l.scales.clone()) for n, l in gptq_layers(model).items()
                     if not n.endswith(("q_proj", "down_proj"))}
        pm = get_qalora_model(model, QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "down_proj"]))
        randomize_adapters(pm, seed=7 + bits, shift_std=0.3)
        layers = _adapted(pm)
        target = {n: base_weight(m.get_base_layer()) + reference_delta(m) for n, m in layers.items()}
        xs = capture_inputs(pm, [f"base_model.model.{n}.base_layer" for n in layers], calibration_batches)
        merged, report = merge_qalora(pm, strategy=strategy, calibration=calibration_batches, progress=False)
        after = gptq_layers(merged)
        errs[strategy] = {}
        for n in layers:
            t = read_layer(after[n])
            assert 0 <= int(t.q.min()) and int(t.q.max()) <= t.maxq
            assert 0 <= int(t.z.min()) and int(t.z.max()) <= t.maxq
            assert bool((t.scales > 0).all())
            x = xs[f"base_model.model.{n}.base_layer"]
            errs[strategy][n] = float(((x @ (base_weight(after[n]) - target[n]).t()) ** 2).sum())
        for n, (qw, qz, sc) in untouched.items():
            assert torch.equal(after[n].qweight, qw) and torch.equal(after[n].qzeros, qz) and torch.equal(after[n].scales, sc), n
        if strategy == "scales":
            assert report.totals["scales_changed"] > 0
    for n in errs["round"]:
        assert errs["scales"][n] < errs["round"][n], n

def _kl_to(teacher_logits: list[torch.Tensor], model, batches) -> float:
    """Mean full-vocabulary KL(teacher || model) over the non-padding positions of ``batches``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t_logits, b in zip(teacher_logits, batches):
            mask = b["attention_mask"].bool()
            lt = torch.log_softmax(t_logits.double(), -1)[mask]
            ls = torch.log_softmax(model(**b).logits.double(), -1)[mask]
            total += float((lt.exp() * (lt - ls)).sum())
            count += int(mask.sum())
    return total / count


@pytest.mark.parametrize("cfg", [(4, False, False), (3, True, True), (8, False, False)], ids=config_id)
def test_merge_distill_strategy(cfg, load_tiny_gptq, calibration_batches):
    """'distill' = 'scales' + scale-only distillation: same codes and zero-points as 'scales', fp16-representable
    scales, untouched layers bit-identical, a report that describes what was written, and (2-4 bits) a merged
    model closer to the trained one (full KL on the calibration rows)."""
    bits, desc_act, sym = cfg
    kls, ints, scales = {}, {}, {}
    for strategy in ("scales", "distill"):
        model = fp32_scales(load_tiny_gptq(bits, desc_act, sym))
        with torch.no_grad():  # a random tiny model predicts almost uniformly (KL ~1e-7, float32 noise): sharpen its logits
            model.model.norm.weight.mul_(30.0)
        untouched = {n: (l.qweight.clone(), l.qzeros.clone(), l.scales.clone()) for n, l in gptq_layers(model).items()
                     if not n.endswith(("q_proj", "down_proj"))}
        before = {n: read_layer(l) for n, l in gptq_layers(model).items()}
        pm = get_qalora_model(model, QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "down_proj"]))
        randomize_adapters(pm, seed=11 + bits, shift_std=0.3)
        with torch.no_grad():
            teacher = [pm(**b).logits for b in calibration_batches]
        merged, report = merge_qalora(pm, strategy=strategy, calibration=calibration_batches, progress=False,
                                      distill_steps=24, distill_lr=3e-2)
        after = gptq_layers(merged)
        kls[strategy] = _kl_to(teacher, merged, calibration_batches)
        ints[strategy] = {n: (l.qweight.clone(), l.qzeros.clone()) for n, l in after.items()}
        scales[strategy] = {n: l.scales.clone() for n, l in after.items()}
        for n, layer in after.items():
            t = read_layer(layer)
            assert 0 <= int(t.q.min()) and int(t.q.max()) <= t.maxq and 0 <= int(t.z.min()) and int(t.z.max()) <= t.maxq
            assert bool((t.scales > 0).all())
            torch.testing.assert_close(t.scales, t.scales.half().float(), atol=0, rtol=0)  # what a fp16 checkpoint stores
        for n, (qw, qz, sc) in untouched.items():
            assert torch.equal(after[n].qweight, qw) and torch.equal(after[n].qzeros, qz) and torch.equal(after[n].scales, sc), n
        # the report describes what was written (recomputed after the distillation for 'distill')
        final = {n: read_layer(after[n]) for n in before}
        assert report.totals["scales_changed"] == sum(int((final[n].scales != before[n].scales).sum()) for n in before)
        assert report.totals["codes_changed"] == sum(int((final[n].q != before[n].q).sum()) for n in before)
        assert not any(isinstance(m, (BaseTunerLayer, ScaleTunedLinear)) for m in merged.modules())
        if strategy == "distill":
            assert not report.distill["diverged"]
            assert report.distill["scales_changed"] > 0 or bits == 8
            assert all(lr.rel_output_error is not None for lr in report.layers)
    for n in ints["scales"]:
        assert torch.equal(ints["scales"][n][0], ints["distill"][n][0]) and torch.equal(ints["scales"][n][1], ints["distill"][n][1]), n
    if bits < 8:
        assert any(not torch.equal(scales["scales"][n], scales["distill"][n]) for n in scales["scales"])
        assert kls["distill"] < 0.5 * kls["scales"], kls
    else:  # 8-bit: 'scales' is already within float noise (KL ~1e-9) and one fp16 step of a scale moves the
        # extreme codes by ~0.1 quantisation steps, so the distillation may leave it unchanged; never worse
        assert kls["distill"] <= 1.05 * kls["scales"], kls


def test_distill_divergence_keeps_the_scales(load_tiny_gptq, calibration_batches):
    """A diverging distillation (non-finite KL) writes nothing: the result equals the 'scales' merge."""
    out = {}
    for strategy, lr in (("scales", 0.0), ("distill", 1e30)):
        pm = get_qalora_model(load_tiny_gptq(4, False, False), QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"]))
        randomize_adapters(pm, seed=5, shift_std=0.3)
        merged, report = merge_qalora(pm, strategy=strategy, calibration=calibration_batches, progress=False, distill_lr=lr)
        out[strategy] = {n: (l.qweight.clone(), l.qzeros.clone(), l.scales.clone()) for n, l in gptq_layers(merged).items()}
    assert report.distill["diverged"] and report.distill["scales_changed"] == 0
    for n, tensors in out["scales"].items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, out["distill"][n])), n


def test_distill_auto_lr_search_starts_at_the_shift_size(load_tiny_gptq, calibration_batches):
    """distill_lr="auto": the first rate tried is DISTILL_LR_PER_SHIFT * median over layers of each layer's median
    |D/s| (recomputed here from the adapters before the merge; 10x smaller adapters start 10x lower), the next ones
    3x apart, and the rate kept is the tried one with the lowest held-out KL."""
    from qalora_hf.adapter import group_delta
    from qalora_hf.merge import DISTILL_LR_PER_SHIFT, qalora_layers

    first = {}
    for shift_std in (0.3, 0.03):
        pm = get_qalora_model(load_tiny_gptq(4, False, False), QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "down_proj"]))
        randomize_adapters(pm, seed=3, shift_std=shift_std)
        medians = sorted(float((group_delta(m) / m.get_base_layer().scales.float()).abs().median()) for m in qalora_layers(pm).values())
        expected = DISTILL_LR_PER_SHIFT * medians[len(medians) // 2]
        _, report = merge_qalora(pm, strategy="distill", calibration=calibration_batches, progress=False, distill_steps=2)
        search = report.distill["lr_search"]
        assert report.distill["heldout_batches"] == 1 and 2 <= len(search) <= 3
        assert search[0]["lr"] == pytest.approx(expected, rel=1e-3)
        assert search[1]["lr"] == pytest.approx(3 * expected, rel=1e-6)
        assert report.distill["lr_criterion"] == "kl"  # these batches have no labels
        best = min(search, key=lambda r: r["heldout_kl"])
        if best["heldout_kl"] < report.distill["heldout_kl_before"]:
            assert report.distill["lr"] == best["lr"] and report.totals["distill_lr"] == best["lr"]
        else:
            assert report.distill["lr"] is None and report.distill["scales_changed"] == 0
        assert "distill_lr_search" not in report.totals  # totals stay scalars
        first[shift_std] = search[0]["lr"]
    assert first[0.03] == pytest.approx(first[0.3] / 10, rel=0.2)


def _labelled_distill_setup(load_tiny_gptq, calibration_batches, prompt_tokens: int):
    """A sharpened tiny INT4 model with random adapters, its calibration batches with labels (the first
    ``prompt_tokens`` and the padding ignored), their Hessians and the teacher's top-k targets at the loss positions
    and at every position."""
    from qalora_hf.merge import collect_hessians
    from qalora_hf.scale_distillation import teacher_topk

    batches = []
    for b in calibration_batches:
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        labels[:, :prompt_tokens] = -100
        batches.append({**b, "labels": labels})
    model = fp32_scales(load_tiny_gptq(4, False, False))
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)  # sharpen the random model's logits (see test_merge_distill_strategy)
    pm = get_qalora_model(model, QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(pm, seed=13, shift_std=0.3)
    targets, targets_all = [], []

    def record(b, logits):
        targets.append(teacher_topk(b, logits))
        targets_all.append(teacher_topk(b, logits, loss_positions_only=False))  # every position, labels to score

    hessians = collect_hessians(pm, [f"{n}.base_layer" for n in qalora_layers(pm)], batches, on_output=record)
    return pm, batches, hessians, targets, targets_all


def test_distill_lr_search_writes_the_best_held_out_run(load_tiny_gptq, calibration_batches):
    """With labels, the rate is chosen on the held-out batch's cross-entropy (targets[3::4] of 4): the starting loss
    reported is the 'scales' merge's, recomputed with F.cross_entropy on the shifted labels; the rate kept is the
    tried one with the lowest held-out loss, which beats the start; the scales written are bit-identical to one
    distillation at that rate on every batch (the refit)."""
    import torch.nn.functional as F

    from qalora_hf.scale_distillation import heldout_scores

    pm, batches, hessians, targets, targets_all = _labelled_distill_setup(load_tiny_gptq, calibration_batches, prompt_tokens=3)
    # The KL alone (label_weight=0): on this random model the labels are noise, and the label term's runs all end
    # further from the teacher (the fidelity guard's test below).
    merged, report = merge_qalora(copy.deepcopy(pm), strategy="distill", hessians=hessians, teacher_targets=targets, progress=False,
                                  distill_steps=12, distill_label_weight=0.0)
    scales_only, _ = merge_qalora(copy.deepcopy(pm), strategy="scales", hessians=hessians, progress=False)
    held = batches[3]

    def loss(m):
        with torch.no_grad():
            logits = m(input_ids=held["input_ids"], attention_mask=held["attention_mask"]).logits
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), held["labels"][:, 1:].flatten(), ignore_index=-100))

    assert report.distill["lr_criterion"] == "loss"
    kept = [r for r in report.distill["lr_search"] if not r["rejected"]]  # the fidelity guard: see the next test
    assert all(r["heldout_kl"] <= report.distill["heldout_kl_before"] for r in kept)
    best = min(kept, key=lambda r: r["heldout_loss"])
    assert report.distill["lr"] == best["lr"] and best["heldout_loss"] < report.distill["heldout_loss_before"]
    assert loss(scales_only) == pytest.approx(report.distill["heldout_loss_before"], rel=1e-4)
    assert heldout_scores(scales_only, targets[3:4])["loss"] == pytest.approx(loss(scales_only), rel=1e-4)
    # Distilled at every position, scored on the counted labels only: the same cross-entropy, more KL positions.
    assert heldout_scores(scales_only, targets_all[3:4])["loss"] == pytest.approx(loss(scales_only), rel=1e-4)
    assert int(targets_all[3].positions.sum()) > int(targets[3].positions.sum())
    refit, _ = merge_qalora(copy.deepcopy(pm), strategy="distill", hessians=hessians, teacher_targets=targets, progress=False,
                            distill_steps=12, distill_lr=best["lr"], distill_label_weight=0.0)
    for (n, a), b in zip(gptq_layers(merged).items(), gptq_layers(refit).values()):
        assert torch.equal(a.scales, b.scales), n
    assert loss(merged) == loss(refit)


def test_distill_lr_search_fidelity_guard_rejects_runs_that_leave_the_teacher(load_tiny_gptq, calibration_batches):
    """The fidelity guard: trained on the labels alone (label_weight=1), the distillation lowers the held-out
    cross-entropy while its held-out KL to the trained model rises above the starting scales'.  Such a run is
    rejected whatever its loss: the rate kept is the lowest-loss run among those whose KL did not rise, or none (the
    starting scales are kept, bit for bit)."""
    pm, _, hessians, targets, _ = _labelled_distill_setup(load_tiny_gptq, calibration_batches, prompt_tokens=0)
    start, _ = merge_qalora(copy.deepcopy(pm), strategy="scales", hessians=hessians, progress=False)
    merged, report = merge_qalora(copy.deepcopy(pm), strategy="distill", hessians=hessians, teacher_targets=targets,
                                  progress=False, distill_steps=12, distill_label_weight=1.0)
    d = report.distill
    assert d["lr_criterion"] == "loss" and d["label_weight"] == 1.0
    for r in d["lr_search"]:
        assert r["rejected"] == (r["heldout_kl"] > d["heldout_kl_before"])
    rejected = [r for r in d["lr_search"] if r["rejected"]]
    assert rejected and any(r["heldout_loss"] < d["heldout_loss_before"] for r in rejected)  # lower loss, yet refused
    kept = [r for r in d["lr_search"] if not r["rejected"] and r["heldout_loss"] < d["heldout_loss_before"]]
    if kept:
        assert d["lr"] == min(kept, key=lambda r: r["heldout_loss"])["lr"]
    else:
        assert d["lr"] is None and d["scales_changed"] == 0
        for (n, a), b in zip(gptq_layers(merged).items(), gptq_layers(start).values()):
            assert torch.equal(a.scales, b.scales), n


def test_teacher_targets_at_the_loss_positions(tiny_tok):
    """teacher_topk keeps the positions whose next token the loss counts (labels[t + 1] != -100, not padding), the
    log-softmax of the logits there; loss_positions_only=False (or no labels) keeps every non-padding position."""
    from qalora_hf.scale_distillation import teacher_topk

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 7, 8, 9], [-100, -100, 5, 6, -100, -100]])
    logits = torch.randn(2, 6, 50)
    t = teacher_topk({"input_ids": ids, "attention_mask": mask, "labels": labels}, logits, k=4)
    want = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(t.positions, want)
    ref = torch.log_softmax(logits, -1)[want].topk(4, -1)
    torch.testing.assert_close(t.logprobs.float(), ref.values, atol=1e-3, rtol=0)
    assert torch.equal(t.indices.long(), ref.indices)
    assert torch.equal(t.labels, torch.tensor([7, 8, 9, 5, 6]))  # the next token at each kept position
    for kwargs, batch in (({"loss_positions_only": False}, {"labels": labels}), ({}, {})):
        t_all = teacher_topk({"input_ids": ids, "attention_mask": mask, **batch}, logits, k=4, **kwargs)
        assert torch.equal(t_all.positions, mask.bool())
    # Every position distilled, the labels kept to score: -100 where the loss counts no next token.
    every = teacher_topk({"input_ids": ids, "attention_mask": mask, "labels": labels}, logits, k=4, loss_positions_only=False)
    assert torch.equal(every.labels, torch.tensor([-100, -100, 7, 8, 9, -100, -100, 5, 6, -100]))
    assert teacher_topk({"input_ids": ids, "attention_mask": mask}, logits, k=4).labels is None


@pytest.mark.parametrize("bad", ["fast", 0.0, -1e-3, True])
def test_distill_lr_rejected_before_any_work(bad, load_tiny_gptq):
    pm = get_qalora_model(load_tiny_gptq(4, False, False), QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"]))
    randomize_adapters(pm, seed=5, shift_std=0.3)
    before = {n: l.scales.clone() for n, l in gptq_layers(pm).items()}
    with pytest.raises(ValueError, match="distill_lr"):
        merge_qalora(pm, strategy="distill", calibration=[], distill_lr=bad, hessians={"x": torch.eye(2)}, teacher_targets=[object()])
    assert all(torch.equal(l.scales, before[n]) for n, l in gptq_layers(pm).items())


def test_scale_only_matmul_gradients():
    """scale_distillation._ScaleOnlyMatmul against autograd through the dense weight (float64, act-order g_idx, 8-bit range)."""
    from qalora_hf.scale_distillation import _ScaleOnlyMatmul

    g = torch.Generator().manual_seed(0)
    k, n, groups = 12, 5, 3
    g_idx = torch.randperm(k, generator=g) % groups
    v = torch.randint(-255, 256, (k, n), generator=g).to(torch.int16)
    x = torch.randn(2, 3, k, generator=g, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(groups, n, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    y = _ScaleOnlyMatmul.apply(x, v, s, g_idx)
    y_ref = x @ (v.double() * s[g_idx])
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn_like(y)
    gx, gs = torch.autograd.grad(y, (x, s), gy)
    gx_ref, gs_ref = torch.autograd.grad(y_ref, (x, s), gy)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gs, gs_ref)


def test_topk_kl_is_a_divergence():
    """The partition KL of scale_distillation.topk_kl: 0 for identical distributions, > 0 otherwise, and equal to the full
    KL when k covers the vocabulary."""
    from qalora_hf.scale_distillation import topk_kl

    g = torch.Generator().manual_seed(0)
    lt = torch.log_softmax(torch.randn(5, 50, generator=g), -1)
    ls = torch.log_softmax(torch.randn(5, 50, generator=g), -1)
    idx = lt.topk(8, -1).indices
    assert float(topk_kl(lt.gather(-1, idx), lt.gather(-1, idx))) == pytest.approx(0.0, abs=1e-6)
    assert float(topk_kl(lt.gather(-1, idx), ls.gather(-1, idx))) > 0
    full = float((lt.exp() * (lt - ls)).sum(-1).mean())
    all_idx = lt.topk(50, -1).indices
    assert float(topk_kl(lt.gather(-1, all_idx), ls.gather(-1, all_idx))) == pytest.approx(full, rel=1e-4, abs=1e-6)
    assert float(topk_kl(lt.gather(-1, idx), ls.gather(-1, idx))) <= full + 1e-6  # coarsening never increases KL


# --------------------------------------------------------------------------------------------------
# 3. export -> fresh-process stock reload

_RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    model_dir, ids_file, out_file = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    ids = torch.tensor(json.load(open(ids_file)))
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    assert not any(m.startswith("qalora_hf") for m in sys.modules), "qalora_hf was imported"
    torch.save({"logits": out, "dtype": str(model.dtype)}, out_file)
    """
)


@pytest.mark.parametrize("cfg", [(3, True, True), (2, False, True), (4, True, False, True)], ids=config_id)
def test_export_round_trip_fresh_process(cfg, load_tiny_gptq, tiny_tok, sample_input_ids, tmp_path):
    bits, desc_act, sym, *rest = cfg
    bias = bool(rest and rest[0])
    pm = get_qalora_model(load_tiny_gptq(bits, desc_act, sym, bias), QALoraConfig(r=R, lora_alpha=ALPHA))
    randomize_adapters(pm, seed=7, shift_std=0.7)
    merged, _ = merge_qalora(pm, strategy="round", progress=False)
    expected = logits(merged, sample_input_ids)
    out_dir = export_gptq(merged, tmp_path / "export", tokenizer=tiny_tok)

    config = json.loads((out_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert qc["sym"] is False and qc["bits"] == bits and qc["group_size"] == G_SIZE and qc["desc_act"] == desc_act
    assert "dataset" not in qc and "tokenizer" not in qc

    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(sample_input_ids.tolist()))
    out_file = tmp_path / "out.pt"
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["GPTQMODEL_CPU_WORKERS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script), str(out_dir), str(ids_file), str(out_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out_file)
    assert got["dtype"] == "torch.float32"
    assert (got["logits"] - expected).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------------
# 4. stock PEFT interop (no act-order)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_stock_peft_adapter_loads_and_merges(load_tiny_gptq, sample_input_ids, tmp_path):
    stock = get_peft_model(
        load_tiny_gptq(4, False, False),
        LoraConfig(use_qalora=True, qalora_group_size=G_SIZE, r=R, lora_alpha=ALPHA, target_modules=TARGETS),
    )
    stock.eval()
    randomize_adapters(stock, seed=21)
    assert not any(isinstance(m, QALoraGPTQLinear) for m in stock.modules())
    stock_logits = logits(stock, sample_input_ids)
    with stock.disable_adapter():
        assert (logits(stock, sample_input_ids) - stock_logits).abs().max() > 1e-3
    stock.save_pretrained(tmp_path / "random")

    ours = load_qalora_adapter(load_tiny_gptq(4, False, False), str(tmp_path / "random"))
    assert sum(isinstance(m, QALoraGPTQLinear) for m in ours.modules()) == 6
    assert (logits(ours, sample_input_ids) - stock_logits).abs().max().item() <= 1e-5

    # integer shifts, built on the stock model: our merge reproduces stock PEFT's forward
    integer_shift_adapters(stock, seed=22)
    fp32_scales(stock)  # see fp32_scales: compare the merge, not fp16 dequantisation rounding
    stock_logits = logits(stock, sample_input_ids)
    stock.save_pretrained(tmp_path / "integer")
    ours = load_qalora_adapter(fp32_scales(load_tiny_gptq(4, False, False)), str(tmp_path / "integer"))
    merged, report = merge_qalora(ours, strategy="round", progress=False)
    assert all(lr.exact for lr in report.layers) and report.totals["zeros_clamped"] == 0
    assert (logits(merged, sample_input_ids) - stock_logits).abs().max().item() <= 1e-4


def test_our_adapter_loads_in_stock_peft(load_tiny_gptq, sample_input_ids, tmp_path):
    ours = get_qalora_model(load_tiny_gptq(4, False, False), QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    randomize_adapters(ours, seed=31)
    ours_logits = logits(ours, sample_input_ids)
    ours.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_qalora"] is True and saved["qalora_group_size"] == G_SIZE and saved["r"] == R

    stock = PeftModel.from_pretrained(load_tiny_gptq(4, False, False), str(tmp_path / "adapter"))
    stock.eval()
    assert not any(isinstance(m, QALoraGPTQLinear) for m in stock.modules())
    n_stock = sum(1 for m in stock.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "qalora_group_size"))
    assert n_stock == 6
    assert (logits(stock, sample_input_ids) - ours_logits).abs().max().item() <= 1e-5


def test_adapter_files_record_their_pooling_and_stock_act_order_adapters_are_refused(load_tiny_gptq, gptq_checkpoint, sample_input_ids,
                                                                                     tmp_path, capsys):
    # ours on an act-order base: marked, and reloads to the same logits
    ours = get_qalora_model(load_tiny_gptq(4, True, False), QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    randomize_adapters(ours, seed=41)
    ours_logits = logits(ours, sample_input_ids)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["qalora_pooling"] == "g_idx"
    again = load_qalora_adapter(load_tiny_gptq(4, True, False), str(tmp_path / "ours"))
    assert (logits(again, sample_input_ids) - ours_logits).abs().max().item() <= 1e-5
    again.save_pretrained(tmp_path / "ours-again")  # the mark survives a load -> save
    assert json.loads((tmp_path / "ours-again" / "adapter_config.json").read_text())["qalora_pooling"] == "g_idx"

    # stock PEFT on the same act-order base pools contiguously: loading it with g_idx pooling would change its output
    stock = get_peft_model(load_tiny_gptq(4, True, False),
                           LoraConfig(use_qalora=True, qalora_group_size=G_SIZE, r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    randomize_adapters(stock, seed=42)
    stock.save_pretrained(tmp_path / "stock")
    assert "qalora_pooling" not in json.loads((tmp_path / "stock" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="stock PEFT use_qalora adapter .* act-order"):
        load_qalora_adapter(load_tiny_gptq(4, True, False), str(tmp_path / "stock"))
    from qalora_hf.cli import main as cli_main

    code = cli_main(["merge", "--base", str(gptq_checkpoint(4, True, False)), "--adapter", str(tmp_path / "stock"),
                     "--output-dir", str(tmp_path / "out"), "--strategy", "round"])
    assert code == 2 and "stock PEFT use_qalora adapter" in capsys.readouterr().err and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# 5. errors with actionable messages


def test_float_model_rejected(tiny_float_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_float_dir)
    with pytest.raises(TypeError, match="not GPTQ-quantised"):
        get_qalora_model(model, QALoraConfig(r=R))
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(TypeError, match="bitsandbytes"):
        get_qalora_model(model, QALoraConfig(r=R))


def test_config_and_target_errors(load_tiny_gptq):
    model = load_tiny_gptq(4, False, False)
    with pytest.raises(ValueError, match="group_size"):
        get_qalora_model(model, QALoraConfig(r=R, group_size=64))
    with pytest.raises(ValueError, match="matches no module"):
        get_qalora_model(model, QALoraConfig(r=R, target_modules=["qq_proj"]))
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(ValueError, match="not a GPTQ"):
        get_qalora_model(model, QALoraConfig(r=R, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="not a GPTQ"):
        get_qalora_model(model, QALoraConfig(r=R, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="r must be"):
        QALoraConfig(r=0)
    # nothing was wrapped by the failed attempts
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_unsupported_bits_and_group_errors():
    from qalora_hf import gptq_format

    with pytest.raises(ValueError, match="bits=5"):
        gptq_format.pack(torch.zeros(32, 4, dtype=torch.int64), bits=5, dim=0)
    fake = SimpleNamespace(config=SimpleNamespace(quantization_config={"quant_method": "gptq", "bits": 5, "group_size": 32}))
    with pytest.raises(ValueError, match="bits=5"):
        gptq_settings(fake)
    with pytest.raises(ValueError, match="does not split the 48 input channels into groups of 32 \\(the last of 16\\)"):
        pooling_permutation(torch.arange(48) // 16, 32)
    assert pooling_permutation(torch.arange(48) // 32, 32) is None  # a ragged last group of 16 is GPTQ's own split


def test_merge_argument_errors(load_tiny_gptq):
    pm = get_qalora_model(load_tiny_gptq(4, False, False), QALoraConfig(r=R, lora_alpha=ALPHA))
    with pytest.raises(ValueError, match="calibration"):
        merge_qalora(pm, strategy="gptq", progress=False)
    with pytest.raises(ValueError, match="unknown merge strategy"):
        merge_qalora(pm, strategy="nearest", progress=False)
    with pytest.raises(TypeError, match="PeftModel"):
        merge_qalora(pm.get_base_model(), strategy="round", progress=False)
    assert isinstance(pm, PeftModel) and qalora_layers(pm)  # untouched by the failures


def test_merge_never_creates_a_zero_point_0_and_reports_the_ones_there_are(load_tiny_gptq, tmp_path, caplog):
    from qalora_hf.card import build_model_card
    from qalora_hf.gptq_format import count_zero_points_at_0, write_layer

    pm = get_qalora_model(fp32_scales(load_tiny_gptq(4, False, False)), QALoraConfig(r=R, lora_alpha=ALPHA))
    base_zeros = count_zero_points_at_0(pm)
    pushed = 0
    for m in _adapted(pm).values():  # shift every group by exactly its zero-point: z - t = 0
        base = m.get_base_layer()
        t = read_layer(base)
        groups, n = t.scales.shape
        r = m.lora_A["default"].weight.shape[0]
        factor = _scaling(m, "default") * (base.in_features / G_SIZE) / G_SIZE
        a = torch.zeros(r, groups, dtype=torch.float64)
        a[:groups, :groups] = torch.eye(groups)
        b = torch.zeros(n, r, dtype=torch.float64)
        b[:, :groups] = (t.z.double() * t.scales.double()).t() / factor
        with torch.no_grad():
            m.lora_A["default"].weight.copy_(a)
            m.lora_B["default"].weight.copy_(b)
        pushed += int((t.z >= 1).sum())
    assert pushed > 0
    merged, report = merge_qalora(pm, strategy="round", progress=False)
    assert report.totals["zeros_clamped"] == pushed  # every would-be 0 was held at 1
    assert report.totals["zero_points_at_0"] == count_zero_points_at_0(merged) == base_zeros
    for layer in gptq_layers(merged).values():
        assert int(read_layer(layer).z.min()) >= 1 or base_zeros

    # a 0 that is there (e.g. from the base) is reported: in the export's log and in the card
    name, layer = next(iter(gptq_layers(merged).items()))
    z = read_layer(layer).z
    z[0, :3] = 0
    write_layer(layer, z=z)
    with caplog.at_level("WARNING", logger="qalora_hf.export"):
        export_gptq(merged, tmp_path / "export")
    assert f"{base_zeros + 3} zero-points are 0" in caplog.text and "vLLM" in caplog.text
    card = build_model_card(repo_id="u/m", base_model="u/b", qalora_config={}, training_args={},
                            merge_metrics={"zero_points_at_0": count_zero_points_at_0(merged)}, framework_versions={},
                            bits=4, group_size=32, desc_act=False)
    assert "zero-points equal to 0" in str(card) and "vLLM" in str(card)


def test_distill_more_batches_than_steps_distils_each_batch_once(load_tiny_gptq, calibration_batches):
    """With more calibration batches than steps, the shuffled batches are split over the steps: every batch is run
    through the model exactly once, and a step's KL is the mean over all its chunk's distilled positions (one step on
    4 batches reports the same KL as heldout_scores on the 4, which weights each batch by its positions)."""
    from qalora_hf.scale_distillation import distill_scales, heldout_scores, teacher_topk

    model = fp32_scales(load_tiny_gptq(4, False, False))
    with torch.no_grad():  # sharpen the random model's logits (see test_merge_distill_strategy)
        model.model.norm.weight.mul_(30.0)
    names = [n for n in gptq_layers(model) if n.endswith(("q_proj", "down_proj"))]
    with torch.no_grad():
        teacher = copy.deepcopy(model)
        for n in names:  # the teacher: the same model with its scales 2 % larger
            teacher.get_submodule(n).scales.mul_(1.02)
        targets = [teacher_topk(b, teacher(**b).logits, k=8) for b in calibration_batches]
    assert len({t.batch["input_ids"].shape[1] for t in targets}) > 1  # batches of different lengths and position counts
    seen: list[int] = []

    def record(module, args, kwargs):
        ids = kwargs["input_ids"]
        seen.extend(i for i, t in enumerate(targets) if t.batch["input_ids"].shape == ids.shape and torch.equal(t.batch["input_ids"], ids))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    out = distill_scales(model, names, targets, steps=2, lr=1e-2, progress=False)
    hook.remove()
    assert sorted(seen) == [0, 1, 2, 3] and out["scales_changed"] > 0
    one_step = distill_scales(copy.deepcopy(model), names, targets, steps=1, lr=1e-2, progress=False)
    assert one_step["kl_first"] == pytest.approx(heldout_scores(model, targets)["kl"], rel=1e-5)
    out = distill_scales(copy.deepcopy(model), names, targets, steps=4, lr=1e-2, progress=False)  # one batch per step
    assert out["kl_first"] in [pytest.approx(heldout_scores(model, [t])["kl"], rel=1e-5) for t in targets]


def test_refine_codes_reaches_a_coordinate_minimum_and_never_raises_the_error():
    """_refine_codes (cyclic coordinate descent, QuantEase) from the fixed-grid GPTQ codes: the H-weighted error
    ``sum_o e_o H e_o^T`` never rises, and after convergence no single code moved by +-1 lowers it (checked by brute
    force); columns with H_ii == 0 keep their codes; codes stay in [0, maxq]."""
    from qalora_hf.merge import _fixed_grid_gptq, _refine_codes

    gen = torch.Generator().manual_seed(0)
    n, k, gs, maxq = 12, 64, 16, 7
    x = torch.randn(256, k, generator=gen) * torch.rand(k, generator=gen) * 3
    x[:, 5] = 0  # a dead input channel
    h = (x.T @ x).double()
    g_idx = torch.arange(k) // gs
    scales = torch.rand(k // gs, n, generator=gen) * 0.01 + 0.01
    zeros = torch.randint(2, 6, (k // gs, n), generator=gen)
    q0 = torch.randint(0, maxq + 1, (k, n), generator=gen)
    s_cols, z_cols = scales[g_idx].t().double(), zeros[g_idx].t().double()
    target = (s_cols * (q0.t() - z_cols) + 0.3 * s_cols * torch.randn(n, k, generator=gen, dtype=torch.float64)).float()

    def err(q):
        e = s_cols * (q.t().double() - z_cols) - target.double()
        return float(((e @ h) * e).sum())

    start = _fixed_grid_gptq(target, scales, zeros, g_idx, maxq, h, q0)
    one = _refine_codes(start, target, scales, zeros, g_idx, maxq, h, sweeps=1)
    done = _refine_codes(start, target, scales, zeros, g_idx, maxq, h, sweeps=50)
    assert err(done) <= err(one) <= err(start) and err(done) < err(start)
    assert int(done.min()) >= 0 and int(done.max()) <= maxq and torch.equal(done[5], start[5])
    best = err(done)
    for i in range(k):
        if i == 5:
            continue
        for o in range(n):
            for step in (-1, 1):
                c = int(done[i, o]) + step
                if 0 <= c <= maxq:
                    q = done.clone()
                    q[i, o] = c
                    assert err(q) >= best - 1e-9 * abs(best), (i, o, step)


def test_distill_norms_tunes_the_norm_weights(load_tiny_gptq, calibration_batches):
    """distill_norms=True (norm tweaking): the normalisation layers' weights are tuned with the scales, the model keeps
    its plain modules and state-dict keys (a standard checkpoint), codes and zero-points equal the scale-only run's,
    and a diverging run leaves the norm weights bit-identical."""
    from qalora_hf.scale_distillation import norm_layers

    out = {}
    for norms, lr in ((False, 3e-2), (True, 3e-2), (True, 1e30)):
        model = fp32_scales(load_tiny_gptq(4, False, False))
        with torch.no_grad():  # sharpen the random model's logits (see test_merge_distill_strategy)
            model.model.norm.weight.mul_(30.0)
        before = {n: model.get_submodule(n).weight.detach().clone() for n in norm_layers(model)}
        keys = set(model.state_dict())
        pm = get_qalora_model(model, QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "down_proj"]))
        randomize_adapters(pm, seed=7, shift_std=0.3)
        with torch.no_grad():
            teacher = [pm(**b).logits for b in calibration_batches]
        merged, report = merge_qalora(pm, strategy="distill", calibration=calibration_batches, progress=False,
                                      distill_steps=24, distill_lr=lr, distill_norms=norms)
        assert set(merged.state_dict()) == keys
        assert not any(parametrize.is_parametrized(m) for m in merged.modules())
        after = {n: merged.get_submodule(n).weight.detach() for n in before}
        out[(norms, lr)] = (_kl_to(teacher, merged, calibration_batches), report.distill, before, after,
                            {n: (l.qweight.clone(), l.qzeros.clone()) for n, l in gptq_layers(merged).items()})
    _, d_plain, b0, a0, ints_plain = out[(False, 3e-2)]
    kl_norms, d_norms, b1, a1, ints_norms = out[(True, 3e-2)]
    _, d_div, b2, a2, _ = out[(True, 1e30)]
    assert len(b1) == 2 * 2 + 1  # the tiny model's 2 decoder layers x (input, post-attention) + the final norm
    assert d_plain["norms_tuned"] == 0 and all(torch.equal(b0[n], a0[n]) for n in b0)
    assert d_norms["norms_tuned"] == len(b1) and all(not torch.equal(b1[n], a1[n]) for n in b1)
    for n in ints_plain:
        assert all(torch.equal(a, b) for a, b in zip(ints_plain[n], ints_norms[n])), n
    # whether it lowers the KL is the fidelity matrix's question: this tiny model's scale-only merge is within float
    # noise of the teacher (KL ~1e-8), where the extra freedom helps at some rates and not at others
    assert kl_norms == kl_norms and d_norms["kl_last"] is not None and not d_norms["diverged"]
    assert d_div["diverged"] and d_div["norms_tuned"] == 0 and all(torch.equal(b2[n], a2[n]) for n in b2)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_bias_correction_matches_the_trained_layers_mean_output_and_reloads(bias, load_tiny_gptq, calibration_batches, tiny_tok,
                                                                            sample_input_ids, tmp_path):
    """bias_correction=True: layer 0's q_proj (whose input the merge does not change) has the trained layer's mean output
    on the calibration rows, to fp16 rounding of the bias (plus any bias the base had); the other projections of each
    block get zero biases and the config the flags that load them: the export reloads in a fresh process with the
    in-memory logits."""
    model = fp32_scales(load_tiny_gptq(4, False, False, bias))  # the layer's own forward exact (see fp32_scales)
    pm = get_qalora_model(model, QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(pm, seed=7, shift_std=0.3)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    layer = pm.get_submodule(name)
    x = capture_inputs(pm, [name], calibration_batches)[name]
    with torch.no_grad():
        trained_mean = layer(x.float()).double().mean(0)
    old_bias = layer.get_base_layer().bias.clone() if bias else None
    merged, _ = merge_qalora(pm, strategy="round", calibration=calibration_batches, progress=False, bias_correction=True)
    q_proj = merged.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        merged_mean = q_proj(x.float()).double().mean(0)
    ulp = q_proj.bias.abs().double() * 2**-10  # the bias is stored in fp16
    assert ((merged_mean - trained_mean).abs() <= ulp + 1e-6).all()
    # the round merge of fractional shifts changes the mean output: the correction is not zero
    assert (q_proj.bias.double() - (old_bias.double() if bias else 0)).abs().max() > 10 * ulp.max()
    assert merged.config.attention_bias and merged.config.mlp_bias
    k_proj = merged.get_submodule("model.layers.0.self_attn.k_proj")
    assert k_proj.bias is not None and (bias or not k_proj.bias.any())

    for layer in gptq_layers(merged).values():  # back to the stored fp16 scales (fp32_scales), as reloaded
        layer.scales.data = layer.scales.data.half()
        for hook in ("clear_weight_cache", "_stream_reset_cache"):
            if callable(getattr(layer, hook, None)):
                getattr(layer, hook)()
    expected = logits(merged, sample_input_ids)
    out_dir = export_gptq(merged, tmp_path / "export", tokenizer=tiny_tok)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(sample_input_ids.tolist()))
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["GPTQMODEL_CPU_WORKERS"] = "1"
    proc = subprocess.run([sys.executable, str(script), str(out_dir), str(ids_file), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (torch.load(tmp_path / "out.pt")["logits"] - expected).abs().max().item() <= 1e-5


def test_bias_correction_refused_before_any_work(load_tiny_gptq, calibration_batches, monkeypatch):
    pm = get_qalora_model(load_tiny_gptq(4, False, False), QALoraConfig(r=R, lora_alpha=ALPHA))
    hessians = {"x": torch.zeros(1, 1)}
    with pytest.raises(ValueError, match="input_sums"):
        merge_qalora(pm, strategy="round", hessians=hessians, progress=False, bias_correction=True)
    config = pm.get_base_model().config  # an architecture without the field (its Linear layers take no bias flag)
    monkeypatch.delattr(type(config), "mlp_bias", raising=False)
    monkeypatch.delattr(config, "mlp_bias", raising=False)
    assert not hasattr(config, "mlp_bias")
    with pytest.raises(ValueError, match="mlp_bias"):
        merge_qalora(pm, strategy="round", calibration=calibration_batches, progress=False, bias_correction=True)


def test_distill_label_weight_trains_the_scales_on_the_labels(load_tiny_gptq, calibration_batches):
    """label_weight=1 distils on the next-token cross-entropy of the targets' labels alone: from the same start, rate
    and steps it ends lower in that cross-entropy than the KL-only run, which ends lower in KL to the teacher; a weight
    outside [0, 1], or a weight on targets without labels, is refused before any scale changes."""
    from qalora_hf.scale_distillation import distill_scales, heldout_scores, teacher_topk

    model = fp32_scales(load_tiny_gptq(4, False, False))
    with torch.no_grad():  # sharpen the random model's logits (see test_merge_distill_strategy)
        model.model.norm.weight.mul_(30.0)
    names = [n for n in gptq_layers(model) if n.endswith(("q_proj", "down_proj"))]
    batches = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in calibration_batches]
    with torch.no_grad():
        teacher = copy.deepcopy(model)
        for n in names:  # the teacher: the same model with its scales 2 % larger
            teacher.get_submodule(n).scales.mul_(1.02)
        targets = [teacher_topk(b, teacher(**b).logits, k=8) for b in batches]
    assert all(t.labels is not None for t in targets)
    before = heldout_scores(model, targets)
    runs = {}
    for w in (0.0, 1.0):
        m = copy.deepcopy(model)
        out = distill_scales(m, names, targets, steps=8, lr=5e-2, progress=False, label_weight=w)
        assert out["scales_changed"] > 0 and not out["diverged"]
        runs[w] = heldout_scores(m, targets)
    assert runs[1.0]["loss"] < before["loss"] and runs[1.0]["loss"] < runs[0.0]["loss"]
    assert runs[0.0]["kl"] < before["kl"] and runs[0.0]["kl"] < runs[1.0]["kl"]

    scales = {n: model.get_submodule(n).scales.clone() for n in names}
    with pytest.raises(ValueError, match=r"label_weight must be in \[0, 1\]"):
        distill_scales(model, names, targets, steps=2, progress=False, label_weight=1.5)
    no_labels = [teacher_topk(b, teacher(**b).logits.detach(), k=8) for b in calibration_batches]
    with pytest.raises(ValueError, match="needs next-token labels"):
        distill_scales(model, names, no_labels, steps=2, progress=False, label_weight=0.5)
    assert all(torch.equal(model.get_submodule(n).scales, s) for n, s in scales.items())


def test_merge_distill_label_weight_default_and_checks(load_tiny_gptq, calibration_batches):
    """merge_qalora's distill_label_weight: None uses DISTILL_LABEL_WEIGHT on labelled calibration batches and the KL
    alone without labels (report.distill["label_weight"]); a weight outside [0, 1], or above 0 without labels, is
    refused before any layer is touched."""
    from qalora_hf.merge import DISTILL_LABEL_WEIGHT

    labelled = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in calibration_batches]
    for batches, want in ((labelled, DISTILL_LABEL_WEIGHT), (calibration_batches, 0.0)):
        model = get_qalora_model(load_tiny_gptq(4, False, False), QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"]))
        randomize_adapters(model, seed=5, shift_std=0.3)
        _, report = merge_qalora(model, strategy="distill", calibration=batches, progress=False, distill_steps=2, distill_lr=1e-2)
        assert report.distill["label_weight"] == want and not report.distill["diverged"]
    for weight, batches, match in ((1.5, labelled, r"pass a number in \[0, 1\]"), (0.5, calibration_batches, "needs next-token 'labels'")):
        model = get_qalora_model(load_tiny_gptq(4, False, False), QALoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"]))
        before = {n: m.scales.clone() for n, m in gptq_layers(model).items()}
        with pytest.raises(ValueError, match=match):
            merge_qalora(model, strategy="distill", calibration=batches, progress=False, distill_label_weight=weight)
        assert all(torch.equal(m.scales, before[n]) for n, m in gptq_layers(model).items())
