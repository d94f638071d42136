"""The standard calls on the GPTQ models we hand back: `save_pretrained` and `push_to_hub`, reloaded in a fresh
process with stock transformers, give the logits of the model in memory (gptqmodel keeps v2 zero-points in
memory under a v1 label; without our state-dict hooks the reload is off by one zero-point everywhere)."""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from qalora_hf import QALoraConfig, export_gptq, get_qalora_model, merge_qalora  # noqa: E402
from qalora_hf.model import gptq_layers  # noqa: E402
from qalora_hf.quantize import load_gptq_model  # noqa: E402

from conftest import config_id  # noqa: E402

CONFIGS = [(4, False, False), (4, True, True), (2, False, True), (3, True, False), (8, False, False)]

RELOAD = """
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
out, kernels = {}, {}
for d in json.loads(sys.argv[1]):
    ref = load_file(d + "/../reference.safetensors")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    kernels[d] = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    with torch.no_grad():
        out[d] = (model(input_ids=ref["input_ids"]).logits - ref["logits"]).abs().max().item()
print("RESULT", json.dumps([out, kernels]))
"""


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _save(model, ids, root: Path, name: str) -> str:
    root.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids, "logits": _logits(model, ids).contiguous()}, root / "reference.safetensors")
    model.save_pretrained(root / name)
    return str(root / name)


def _reload_in_fresh_process(dirs: list[str], tmp_path, env=None) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Stock ``from_pretrained`` of each dir in one fresh process: max |logit - reference| and the kernels it picked."""
    result = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(dirs)], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    diffs, kernels = json.loads(result.stdout.split("RESULT")[-1])
    return diffs, kernels


def test_loaded_and_merged_models_save_pretrained_and_reload_to_the_same_logits(gptq_checkpoint, sample_input_ids, tmp_path):
    """... and a merged model's plain save_pretrained writes the config export_gptq writes in what matters: sym false,
    no calibration text, no load-time backend="torch" (which pinned gptqmodel's slower TorchLinear on every reload),
    so stock from_pretrained picks the same kernel for both."""
    dirs, effects, pairs = [], {}, []
    for cfg in CONFIGS:
        bits, desc_act, sym = cfg
        base = load_gptq_model(str(gptq_checkpoint(bits, desc_act, sym)))
        dirs.append(_save(base, sample_input_ids, tmp_path / f"{config_id(cfg)}-loaded", "model"))

        base_logits = _logits(base, sample_input_ids)
        torch.manual_seed(0)
        peft_model = get_qalora_model(base, QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
        for m in peft_model.modules():  # a visible update: a few quantisation steps per group
            if hasattr(m, "qalora_group_size"):
                m.lora_B["default"].weight.data.mul_(0.2)
        merged, _ = merge_qalora(peft_model, strategy="round", progress=False)
        effects[config_id(cfg)] = float((_logits(merged, sample_input_ids) - base_logits).abs().max())
        saved = _save(merged, sample_input_ids, tmp_path / f"{config_id(cfg)}-merged", "model")
        qc = json.loads((Path(saved) / "config.json").read_text())["quantization_config"]
        assert qc["sym"] is False and qc.get("backend") is None and qc.get("dataset") is None, qc
        exported = str(export_gptq(merged, tmp_path / f"{config_id(cfg)}-merged" / "export"))
        dirs += [saved, exported]
        pairs.append((saved, exported))

    diffs, kernels = _reload_in_fresh_process(dirs, tmp_path)
    print("merge effect on logits:", effects, "\nreload max|dlogit|:", diffs, "\nkernels:", kernels)
    assert all(e > 0.02 for e in effects.values())  # the merge changed the model
    assert all(d <= 1e-3 for d in diffs.values()), diffs
    for saved, exported in pairs:
        assert kernels[saved] == kernels[exported], (saved, kernels[saved], kernels[exported])


def test_state_dict_round_trip_is_the_identity_and_matches_the_label(gptq_checkpoint):
    model = load_gptq_model(str(gptq_checkpoint(4, False, False)))
    name, layer = next(iter(gptq_layers(model).items()))
    in_memory = layer.qzeros.detach().clone()
    sd = model.state_dict()
    assert type(layer).REQUIRES_FORMAT_V2 and not torch.equal(sd[f"{name}.qzeros"], in_memory)  # v1 on the way out
    model.load_state_dict(sd)
    assert torch.equal(layer.qzeros, in_memory)  # and v2 again on the way in


def test_merged_push_to_hub_reloads_from_the_hub(gptq_checkpoint, sample_input_ids, hub, tmp_path):
    base = load_gptq_model(str(gptq_checkpoint(4, False, False)))
    torch.manual_seed(1)
    peft_model = get_qalora_model(base, QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    merged, _ = merge_qalora(peft_model, strategy="round", progress=False)
    save_file({"input_ids": sample_input_ids, "logits": _logits(merged, sample_input_ids).contiguous()},
              tmp_path / "reference.safetensors")
    merged.push_to_hub("local-user/merged-push")
    script = f"""
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
ref = load_file({str(tmp_path / "reference.safetensors")!r})
model = AutoModelForCausalLM.from_pretrained("local-user/merged-push", dtype=torch.float32).eval()
with torch.no_grad():
    print("RESULT", (model(input_ids=ref["input_ids"]).logits - ref["logits"]).abs().max().item())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert float(result.stdout.split("RESULT")[-1]) <= 1e-3
