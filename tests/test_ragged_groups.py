"""A ragged last quantisation group (``in_features`` not a multiple of ``group_size``), as GPTQ makes it on
SmolLM2-135M with ``group_size=128`` (576 = 4 x 128 + 64): adapter pooling, merge, and exports that every engine loads.

The tiny model has hidden 96 and intermediate 160 with ``group_size=64``: groups of [64, 32] and [64, 64, 32].
References are written from the definition (``qalora_hf.adapter``'s module docstring), not from the library::

    P(x)[l] = G * mean(x[i] for i with g_idx[i] == l),    dW[o, i] = scaling * G / n_l * (lora_B @ lora_A)[o, l]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qalora_hf import QALoraConfig, export_gptq, get_qalora_model, merge_qalora
from qalora_hf.adapter import group_counts
from qalora_hf.gptq_format import exact_group_size, read_layer, split_groups
from qalora_hf.merge import qalora_layers
from qalora_hf.model import gptq_layers
from qalora_hf.testing.tiny import TINY_TEXTS, load_gptq, quantize_tiny, save_tiny_float_model, tiny_tokenizer

from test_adapter_merge import _RELOAD_SCRIPT, base_weight, capture_inputs, fp32_scales, logits

GROUP = 64
R, ALPHA = 4, 8
SHAPE = dict(hidden_size=96, intermediate_size=160, num_attention_heads=3, num_key_value_heads=1)
CONFIGS = {"b4-noact-asym": (4, False, False), "b3-act-sym": (3, True, True)}


@pytest.fixture(scope="module")
def ragged_checkpoint(tmp_path_factory):
    """``get(name) -> Path``: the tiny ragged model GPTQ-quantised (group 64) with CONFIGS[name], groups kept ragged."""
    root = tmp_path_factory.mktemp("ragged")
    float_dir = save_tiny_float_model(root / "float", **SHAPE)
    cache = {}

    def get(name):
        if name not in cache:
            bits, desc_act, sym = CONFIGS[name]
            cache[name] = quantize_tiny(float_dir, root / name, bits=bits, group_size=GROUP, desc_act=desc_act, sym=sym)
        return cache[name]

    return get


def _sample_ids():
    tok = tiny_tokenizer()
    ids = [tok(t)["input_ids"] for t in TINY_TEXTS[40:42]]
    n = min(len(x) for x in ids)
    return torch.tensor([x[:n] for x in ids])


def _calibration():
    tok = tiny_tokenizer()
    enc = [tok(TINY_TEXTS[i : i + 8], return_tensors="pt", padding=True) for i in range(0, 32, 8)]
    return [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in enc]


def _random_adapters(pm, seed, shift_std=None):
    gen = torch.Generator().manual_seed(seed)
    for m in qalora_layers(pm).values():
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=gen))
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
            if shift_std is not None:
                d = _reference_group_delta(m)
                b.mul_(shift_std / float((d / m.get_base_layer().scales.double()).std()))


def _reference_group_delta(m) -> torch.Tensor:
    """D [G, N] float64 from the definition: scaling * G / n_l * (B A)[:, l], n_l counted from g_idx."""
    g_idx = m.get_base_layer().g_idx.long()
    n_l = torch.bincount(g_idx).double()
    a, b = m.lora_A["default"].weight.detach().double(), m.lora_B["default"].weight.detach().double()
    return (float(m.scaling["default"]) * n_l.numel() / n_l).unsqueeze(1) * (b @ a).t()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gptq_makes_a_ragged_last_group_and_the_adapter_pools_it_by_its_mean(name, ragged_checkpoint):
    pm = get_qalora_model(load_gptq(ragged_checkpoint(name)).eval(), QALoraConfig(r=R, lora_alpha=ALPHA))
    _random_adapters(pm, seed=3)
    layers = qalora_layers(pm)
    assert len(layers) == 14
    gen = torch.Generator().manual_seed(0)
    ragged = 0
    for lname, m in layers.items():
        base = m.get_base_layer()
        k = base.in_features
        counts = torch.bincount(base.g_idx.long()).tolist()
        assert counts == group_counts(k, GROUP) == {96: [64, 32], 160: [64, 64, 32]}[k], lname  # GPTQ's own split
        ragged += counts[-1] < GROUP
        assert base.scales.shape[0] == len(counts) and m.lora_A["default"].weight.shape == (R, len(counts))
        x = torch.randn(2, 3, k, generator=gen)
        # the pooled features from the definition: G * mean over each group's channels
        pooled = torch.stack([x[..., base.g_idx.long() == grp].double().mean(-1) for grp in range(len(counts))], -1)
        a, b = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
        want = x.double() @ base_weight(base).t() + float(m.scaling["default"]) * (len(counts) * pooled) @ a.t() @ b.t()
        with torch.no_grad():
            got = m(x).double()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=lname)
        # and the dense update the merge writes is the same function of x
        d = _reference_group_delta(m)
        torch.testing.assert_close(x.double() @ d[base.g_idx.long()], want - x.double() @ base_weight(base).t(),
                                   atol=2e-5, rtol=1e-5, msg=lname)
    assert ragged == 14


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merge_and_export_load_in_a_fresh_stock_process(name, ragged_checkpoint, tmp_path):
    """'scales' (H-weighted refit, padded ragged groups) beats 'round' on every layer; the merged model's groups are
    split to 32 (the same weights), and stock from_pretrained of its export and of its save_pretrained, with no
    qalora_hf and gptqmodel's auto-picked kernel (which refuses a ragged group), reproduces its logits."""
    calibration, ids = _calibration(), _sample_ids()
    errors, merged_models = {}, {}
    for strategy in ("round", "scales"):
        pm = get_qalora_model(fp32_scales(load_gptq(ragged_checkpoint(name)).eval()), QALoraConfig(r=R, lora_alpha=ALPHA))
        _random_adapters(pm, seed=5, shift_std=0.4)
        layers = {n.removeprefix("base_model.model."): m for n, m in qalora_layers(pm).items()}
        before = {n: m.get_base_layer().scales.detach().clone() for n, m in layers.items()}
        target = {n: base_weight(m.get_base_layer()) + _reference_group_delta(m)[m.get_base_layer().g_idx.long()].t()
                  for n, m in layers.items()}
        xs = capture_inputs(pm, [f"base_model.model.{n}.base_layer" for n in layers], calibration)
        merged, report = merge_qalora(pm, strategy=strategy, calibration=calibration, progress=False)
        after = gptq_layers(merged)
        errors[strategy] = {n: float(((xs[f"base_model.model.{n}.base_layer"] @ (base_weight(after[n]) - target[n]).t()) ** 2).sum())
                            for n in layers}
        if strategy == "scales":
            assert report.totals["scales_changed"] > 0
            # the refit reaches the ragged last group's scales too
            assert any(bool((read_layer(after[n]).scales[-1] != before[n][-1]).any()) for n in layers)
        merged_models[strategy] = merged
    for n in errors["round"]:
        assert errors["scales"][n] < errors["round"][n], n

    # the merged model holds equal groups of 32 (each ragged-model group split, the same weights) ...
    merged = merged_models["scales"]
    assert merged.config.quantization_config.group_size == 32 == exact_group_size(GROUP, [96, 160])
    for n, layer in gptq_layers(merged).items():
        assert layer.group_size == 32 and torch.bincount(layer.g_idx.long()).tolist() == [32] * (layer.in_features // 32), n
    expected = logits(merged, ids)
    tok = tiny_tokenizer()
    # ... so both export_gptq and a plain save_pretrained write a checkpoint that stock from_pretrained loads
    out_dirs = [export_gptq(merged, tmp_path / "export", tokenizer=tok), tmp_path / "saved"]
    merged.save_pretrained(out_dirs[1])
    tok.save_pretrained(out_dirs[1])
    for out_dir in out_dirs:
        assert json.loads((out_dir / "config.json").read_text())["quantization_config"]["group_size"] == 32
        sd = load_file(out_dir / "model.safetensors")
        for n, layer in gptq_layers(merged).items():
            assert tuple(sd[f"{n}.scales"].shape) == (layer.in_features // 32, layer.out_features)
        ids_file, out_file, script = tmp_path / "ids.json", tmp_path / "out.pt", tmp_path / "reload.py"
        ids_file.write_text(json.dumps(ids.tolist()))
        script.write_text(_RELOAD_SCRIPT)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["GPTQMODEL_CPU_WORKERS"] = "1"
        proc = subprocess.run([sys.executable, str(script), str(out_dir), str(ids_file), str(out_file)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        got = torch.load(out_file)["logits"]
        assert (got - expected).abs().max().item() <= 1e-3 * max(1.0, expected.abs().max().item()), out_dir.name


def test_split_groups_keeps_every_weight_and_gives_equal_groups():
    gen = torch.Generator().manual_seed(0)
    k, n, g, a = 160, 8, 64, 32
    for act_order in (False, True):
        g_idx = torch.arange(k) // g
        if act_order:  # GPTQ's act-order: g_idx[perm[i]] = i // g
            perm = torch.randperm(k, generator=gen)
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[perm] = torch.arange(k) // g
        scales = torch.rand(3, n, generator=gen) + 0.1
        z = torch.randint(0, 16, (3, n), generator=gen)
        q = torch.randint(0, 16, (k, n), generator=gen)
        new_g_idx, rows = split_groups(g_idx, g, a)
        assert torch.bincount(new_g_idx).tolist() == [a] * (k // a)
        assert torch.equal(rows[new_g_idx], g_idx)  # every new group lies inside one old group
        if not act_order:
            assert torch.equal(new_g_idx, torch.arange(k) // a)
        w_old = scales[g_idx] * (q - z[g_idx])
        w_new = scales[rows][new_g_idx] * (q - z[rows][new_g_idx])
        assert torch.equal(w_old, w_new)
    with pytest.raises(ValueError, match="must divide"):
        split_groups(torch.arange(k) // g, g, 48)
    assert exact_group_size(128, [576, 1536]) == 64 and exact_group_size(128, [1536]) == 128
    assert exact_group_size(64, [96], sizes=(128,)) is None


def test_check_group_size_takes_128_on_576_and_refuses_a_group_wider_than_the_layer():
    from qalora_hf.checks import check_group_size

    shapes = {"q_proj": (576, 576), "down_proj": (1536, 576)}
    check_group_size(128, shapes, shapes, bits=4)  # SmolLM2-135M with group 128: four groups of 128 and one of 64
    with pytest.raises(ValueError, match=r"q_proj has in_features=576, fewer than group_size=1024.*: 16, 32, 64, 128, 256, 512\."):
        check_group_size(1024, shapes, shapes, bits=4)
