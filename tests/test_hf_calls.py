"""The standard Hugging Face calls on what QALoraTrainer and the merge hand back, in the real-world cases where they
went silently wrong: `SFTConfig(seed=...)` and the default merge across fresh processes, `packing=True` through the
merge's calibration, `trainer.push_to_hub()` after `train()`, and the clear errors (kernel, `torch_fused` merge, a
BOS-adding tokenizer, a model already wrapped by PEFT)."""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")  # before gptqmodel is imported (docs/gptq_format.md)

import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from qalora_hf import QALoraConfig, QALoraSFTConfig, QALoraTrainer, get_qalora_model, merge_qalora  # noqa: E402
from qalora_hf.data import IGNORE_INDEX, collated_batches, encode_row  # noqa: E402
from qalora_hf.merge import collect_hessians, qalora_layers  # noqa: E402
from qalora_hf.testing.tiny import TINY_TEXTS, tiny_tokenizer  # noqa: E402


def prompt_completion_rows(texts=TINY_TEXTS) -> list[dict]:
    out = []
    for t in texts:
        prompt, completion = t.split("Response:")
        out.append({"prompt": prompt + "Response:", "completion": completion})
    return out


def sft_args(output_dir, **kw) -> QALoraSFTConfig:
    base = dict(
        output_dir=str(output_dir), max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1,
        max_length=64, report_to="none", bf16=False, use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
        dataloader_num_workers=0, merge_strategy="round", num_calibration_rows=8, num_holdout_rows=4,
    )
    base.update(kw)
    return QALoraSFTConfig(**base)


def _perturb_lora_b(model, seed: int = 0, std: float = 0.1) -> None:
    """A visible adapter (PEFT initialises lora_B to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def gptq_dir(gptq_checkpoint) -> str:
    return str(gptq_checkpoint(4))


# --------------------------------------------------------------------------------------------------
# Seeding: the same seed in two fresh processes gives the same adapters and the same losses

SEED_RUN = r"""
import json, sys
from datasets import Dataset
from safetensors.torch import save_file
from qalora_hf import QALoraConfig, QALoraSFTConfig, QALoraTrainer
from qalora_hf.testing.tiny import TINY_TEXTS

gptq, out, seed, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [dict(zip(("prompt", "completion"), (t.split("Response:")[0] + "Response:", t.split("Response:")[1]))) for t in TINY_TEXTS[:32]]
args = QALoraSFTConfig(output_dir=out, max_steps=max(steps, 1), learning_rate=1e-2, per_device_train_batch_size=4,
                       logging_steps=1, max_length=64, report_to="none", bf16=False, use_cpu=True, save_strategy="no",
                       seed=seed, disable_tqdm=True, dataloader_num_workers=0, merge_at_end=False)
# lora_dropout > 0: the training steps draw random numbers too
trainer = QALoraTrainer(model=gptq, qalora_config=QALoraConfig(r=4, lora_alpha=8, lora_dropout=0.1), args=args,
                        train_dataset=Dataset.from_list(rows))
save_file({n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}, out + "/init.safetensors")
losses = {}
if steps:
    trainer.train()
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
print("RESULT", json.dumps(losses))
"""


def test_same_seed_in_two_fresh_processes_gives_identical_adapters_and_losses(gptq_dir, tmp_path):
    runs = {"a": (7, 4), "b": (7, 4), "c": (8, 0)}  # name: (seed, training steps)
    procs = {}
    for name, (seed, steps) in runs.items():
        (tmp_path / name).mkdir()
        procs[name] = subprocess.Popen([sys.executable, "-c", SEED_RUN, gptq_dir, str(tmp_path / name), str(seed), str(steps)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    losses, init = {}, {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        losses[name] = json.loads(out.split("RESULT")[-1])
        init[name] = load_file(str(tmp_path / name / "init.safetensors"))

    a_keys = [k for k in init["a"] if "lora_A" in k]
    assert a_keys and sorted(init["a"]) == sorted(init["b"]) == sorted(init["c"])
    for key in init["a"]:  # bit-identical starting adapters
        assert torch.equal(init["a"][key], init["b"][key]), key
    assert sorted(losses["a"]) == ["1", "2", "3", "4"], losses
    assert losses["a"] == losses["b"], losses  # identical per-step losses (floats compared exactly)
    assert len(set(losses["a"].values())) > 1  # the steps did train
    assert all(not torch.equal(init["a"][k], init["c"][k]) for k in a_keys)  # another seed, other lora_A


DISTILL_RUN = r"""
import sys, torch
from safetensors.torch import save_file
from qalora_hf import QALoraConfig, get_qalora_model, merge_qalora
from qalora_hf.model import gptq_layers
from qalora_hf.quantize import load_gptq_model
from qalora_hf.testing.tiny import TINY_TEXTS, tiny_tokenizer

tok = tiny_tokenizer()
calibration = [dict(tok(TINY_TEXTS[i:i + 8], return_tensors="pt", padding=True)) for i in range(0, 32, 8)]
torch.manual_seed(0)
model = get_qalora_model(load_gptq_model(sys.argv[1]), QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
for name, p in model.named_parameters():
    if "lora_B" in name:
        p.data.mul_(0.2)
merged, report = merge_qalora(model, strategy="distill", calibration=calibration, progress=False)
assert report.totals["scales_changed"] > 0
save_file({f"{n}.{k}": getattr(layer, k).detach().contiguous() for n, layer in gptq_layers(merged).items()
           for k in ("qweight", "qzeros", "scales", "g_idx")}, sys.argv[2])
"""


def test_the_default_merge_of_one_adapter_in_two_fresh_processes_writes_identical_integers_and_scales(gptq_checkpoint, tmp_path):
    """`distill` (line search over step sizes, shuffled targets, code flips) is seeded: the same adapter merged in two
    fresh processes gives bit-identical qweight, qzeros, scales and g_idx (act-order base, so g_idx is not trivial)."""
    gptq = str(gptq_checkpoint(4, True, True))
    outs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.safetensors"
        proc = subprocess.run([sys.executable, "-c", DISTILL_RUN, gptq, str(out)], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs.append(load_file(str(out)))
    assert sorted(outs[0]) == sorted(outs[1]) and any(k.endswith(".scales") for k in outs[0])
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


# --------------------------------------------------------------------------------------------------
# packing=True: the merge's calibration / measurement / distillation forwards are the training forward


def test_packed_calibration_forward_is_the_training_forward(gptq_dir, tmp_path):
    rows = [{"text": t} for t in TINY_TEXTS[:24]]
    # use_cache=True (a TrainingArguments option, e.g. for generation during evaluation) is copied into the model's
    # config by the Trainer; training itself runs without a cache (TRL's compute_loss).
    trainer = QALoraTrainer(
        model=gptq_dir, qalora_config=QALoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
        args=sft_args(tmp_path / "run", packing=True, max_length=128, use_cache=True, merge_strategy="distill",
                      num_calibration_rows=24, num_holdout_rows=8),
        train_dataset=Dataset.from_list(rows),
    )
    model = trainer.model
    _perturb_lora_b(model)
    batch = collated_batches(trainer.train_dataset, range(len(trainer.train_dataset)), trainer.data_collator)[0]
    assert "position_ids" in batch and "attention_mask" not in batch  # TRL's padding-free packed batch
    starts = int((batch["position_ids"][0] == 0).sum())
    assert starts > 3, starts  # several rows packed into one sequence

    # The training forward, as Trainer.training_step runs it (compute_loss uses a fused lm_head: capture its input).
    decoder = model.get_base_model().model
    captured = {}
    handle = decoder.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("hidden", out.detach()))
    model.train()
    with torch.no_grad():
        trainer.compute_loss(model, trainer._prepare_inputs(dict(batch)))
    handle.remove()
    train_logits = model.get_base_model().lm_head(captured["hidden"]).float()

    # The merge's calibration pass on the same packed batch.
    names = [f"{n}.base_layer" for n in qalora_layers(model)]
    calib = []
    h_packed = collect_hessians(model, names, [batch], on_output=lambda b, logits: calib.append(logits.float()))
    diff = float((calib[0] - train_logits).abs().max())
    print("calibration vs training forward, max |dlogit|:", diff)
    assert diff <= 1e-4, diff

    # Without position_ids the packed rows would be one long sequence: the statistics change.
    flat = [{k: v for k, v in batch.items() if k in ("input_ids", "labels")}]
    h_flat = collect_hessians(model, names, flat)
    o_proj = next(n for n in names if ".layers.1." in n and "o_proj" in n)
    rel = float((h_packed[o_proj] - h_flat[o_proj]).norm() / h_packed[o_proj].norm())
    print("H with vs without position_ids (layer 1 o_proj), relative difference:", rel)
    assert rel > 1e-2, rel

    # Every forward of the merge (measurements, statistics, distillation) gets position_ids and runs without a cache.
    calls = []

    def record(module, args, kwargs):
        calls.append(("position_ids" in kwargs and kwargs["position_ids"] is not None, kwargs.get("use_cache"),
                      torch.is_grad_enabled()))

    handle = decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        trainer.merge_and_export()
    finally:
        handle.remove()
    assert any(grad for _, _, grad in calls) and any(not grad for _, _, grad in calls)  # distillation and the no-grad passes
    assert calls and all(pos and cache is False for pos, cache, _ in calls), calls
    assert trainer.merge_report.distill["steps"] > 0


# --------------------------------------------------------------------------------------------------
# trainer.push_to_hub(): the merged export, nothing else


def test_trainer_push_to_hub_after_train_leaves_the_repo_the_merged_export(gptq_dir, hub, tmp_path, caplog):
    from huggingface_hub import HfApi, hf_hub_download

    repo = "local-user/tiny-push"
    trainer = QALoraTrainer(
        model=gptq_dir, qalora_config=QALoraConfig(r=4, lora_alpha=8),
        args=sft_args(tmp_path / "run", push_to_hub=True, hub_model_id=repo),
        train_dataset=Dataset.from_list(prompt_completion_rows()[:16]),
    )
    trainer.train()  # merges, exports and pushes the export
    api = HfApi()
    export = Path(trainer.export_dir)
    local = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()}
    pushed_by_train = set(api.list_repo_files(repo)) - {".gitattributes"}
    assert pushed_by_train == local, pushed_by_train ^ local

    # alignment-handbook's last steps: save the model, then push with card options
    trainer.save_model()
    assert (tmp_path / "run" / "adapter_config.json").is_file() and (tmp_path / "run" / "training_args.bin").is_file()
    caplog.set_level(logging.WARNING, logger="qalora_hf.trainer")
    commit = trainer.push_to_hub(finetuned_from="tiny", tags=["qalora"])
    assert isinstance(commit, str) and len(commit) == 40
    assert any("finetuned_from, tags not used" in r.getMessage() for r in caplog.records)

    files = set(api.list_repo_files(repo, revision=commit)) - {".gitattributes"}
    assert files == local, files ^ local  # exactly the export
    assert "adapter_config.json" not in files and "adapter_model.safetensors" not in files  # no adapter at the root
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))], files  # no pickles
    assert not [f for f in files if f.startswith("export/")], files  # no second copy
    card = Path(hf_hub_download(repo, "README.md", revision=commit)).read_text()
    assert card == (export / "README.md").read_text()  # our card, unchanged
    assert "Model Card for" not in card and "merge" in card.lower()

    # blocking=False: a Future of the commit id, same files
    future = trainer.push_to_hub(blocking=False, commit_message="again")
    again = future.result(timeout=120)
    assert set(api.list_repo_files(repo, revision=again)) - {".gitattributes"} == local


def test_trainer_push_to_hub_before_the_merge_says_what_to_do(gptq_dir, hub, tmp_path):
    ds = Dataset.from_list(prompt_completion_rows()[:8])
    for merge_at_end in (True, False):
        trainer = QALoraTrainer(
            model=gptq_dir, qalora_config=QALoraConfig(r=4, lora_alpha=8),
            args=sft_args(tmp_path / f"run-{merge_at_end}", push_to_hub=True, hub_model_id="local-user/early",
                          merge_at_end=merge_at_end),
            train_dataset=ds,
        )
        with pytest.raises(ValueError, match=r"nothing has been merged yet.*merge_and_export\(\).*qalora-hf merge"):
            trainer.push_to_hub()
    assert [r for r in hub.requests if "/telemetry/" not in r[1]] == []  # refused before any request (TRL's own telemetry aside)


# --------------------------------------------------------------------------------------------------
# Clear errors


def test_kernel_log_names_the_kernel_and_an_inference_only_kernel_is_refused(gptq_checkpoint, tiny_tok, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, GPTQConfig

    from qalora_hf.gptq import gptq_layers

    path = str(gptq_checkpoint(8))
    ds = Dataset.from_list(prompt_completion_rows()[:8])
    caplog.set_level(logging.INFO, logger="qalora_hf")
    QALoraTrainer(model=path, qalora_config=QALoraConfig(r=4, lora_alpha=8), args=sft_args(tmp_path / "a"), train_dataset=ds)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("QA-LoRA: kernel TorchLinear (trainable, mergeable);") for m in msgs), msgs
    assert any(m.startswith("load: ") and m.endswith("kernel TorchLinear (trainable, mergeable)") for m in msgs), msgs

    # An inference-only kernel (gptqmodel's own flag), loaded by the user and passed in.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=GPTQConfig(bits=8, backend="torch_int8"))
    kernel = type(next(iter(gptq_layers(model).values())))
    assert kernel.__name__ == "TorchInt8Linear" and kernel.SUPPORTS_TRAINING is False
    caplog.clear()
    with pytest.raises(ValueError, match=r"TorchInt8Linear, an inference-only kernel .*backend=\"torch\""):
        QALoraTrainer(model=model, processing_class=tiny_tok, qalora_config=QALoraConfig(r=4, lora_alpha=8),
                      args=sft_args(tmp_path / "b"), train_dataset=ds)
    assert not any("trainable" in r.getMessage() for r in caplog.records)
    with pytest.raises(NotImplementedError):  # what training would have hit
        model.train()


def test_merge_on_torch_fused_is_refused_before_any_work(gptq_checkpoint, calibration_batches, tiny_tok, tmp_path):
    from transformers import AutoModelForCausalLM, GPTQConfig

    from qalora_hf.pipeline import CardInfo, merge_measure_export

    model = AutoModelForCausalLM.from_pretrained(str(gptq_checkpoint(4)), dtype=torch.float32,
                                                 quantization_config=GPTQConfig(bits=4, backend="torch_fused"))
    peft_model = get_qalora_model(model, QALoraConfig(r=4, lora_alpha=8))
    layers = {n: m.get_base_layer() for n, m in qalora_layers(peft_model).items()}
    if {type(m).__name__ for m in layers.values()} != {"TorchFusedLinear"}:
        pytest.skip("gptqmodel's torch_fused kernel is not available here")
    _perturb_lora_b(peft_model)
    before = {n: m.qweight.detach().clone() for n, m in layers.items()}
    pattern = r"TorchFusedLinear, which repacks the weights.*GPTQConfig\(bits=\.\.\., backend=\"torch\"\)"
    with pytest.raises(ValueError, match=pattern):
        merge_measure_export(peft_model, tiny_tok, tmp_path / "export", card=CardInfo(repo_id="local-user/x", base_model=None),
                             strategy="gptq", calibration=calibration_batches, holdout=calibration_batches[:1], progress=False)
    with pytest.raises(ValueError, match=pattern):
        merge_qalora(peft_model, strategy="gptq", calibration=calibration_batches, progress=False)
    # nothing ran: no layer took its fused inference path (which repacks qweight), nothing was written
    assert all(m.linear_mode is None and torch.equal(m.qweight, before[n]) for n, m in layers.items())
    assert not (tmp_path / "export").exists()

    with pytest.raises(ValueError, match=pattern):  # the trainer refuses it before training, when it would merge
        QALoraTrainer(model=model, processing_class=tiny_tok, qalora_config=QALoraConfig(r=4, lora_alpha=8),
                      args=sft_args(tmp_path / "run"), train_dataset=Dataset.from_list(prompt_completion_rows()[:8]))


def _bos_tokenizer():
    """The tiny tokenizer with a post-processor that adds BOS, as Llama's and Mistral's do."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def test_prompt_length_check_counts_the_bos_trl_adds(gptq_dir, tmp_path, monkeypatch):
    import qalora_hf.trainer as trainer_mod

    tok = _bos_tokenizer()
    rows = prompt_completion_rows()[:16]
    assert tok("fact")["input_ids"][0] == tok.bos_token_id

    def trl_prompt_tokens(row):  # where the completion starts in TRL's tokenisation (encode_row, checked against TRL in test_trainer)
        labels = encode_row(row, tok)[1]
        return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)

    plain = max(len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows)
    longest = max(trl_prompt_tokens(r) for r in rows)
    assert longest == plain + 1  # the BOS
    row = max(rows, key=trl_prompt_tokens)
    ids, labels = encode_row(row, tok, max_length=longest)  # TRL's tokenisation cut at max_length = the longest prompt
    assert len(ids) == longest and all(label == IGNORE_INDEX for label in labels)  # nothing left to learn on that row

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the prompt lengths were checked")

    monkeypatch.setattr(trainer_mod, "load_gptq_model", no_work)
    with pytest.raises(ValueError, match=rf"max_length={longest} is not longer than the longest prompt \({longest} tokens\)"):
        QALoraTrainer(model=gptq_dir, processing_class=tok, args=sft_args(tmp_path / "run", max_length=longest),
                      train_dataset=Dataset.from_list(rows))

    from qalora_hf.data import prompt_length

    assert [prompt_length(r, tok) for r in rows] == [trl_prompt_tokens(r) for r in rows]


def test_a_model_already_wrapped_by_peft_is_refused_with_what_to_pass(load_tiny_gptq, tiny_tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    from qalora_hf import load_qalora_adapter

    peft_model = get_qalora_model(load_tiny_gptq(4), QALoraConfig(r=4, lora_alpha=8))
    pattern = r"got a PeftModelForCausalLM: .*Pass the GPTQ model itself"
    with pytest.raises(ValueError, match=pattern):
        get_qalora_model(peft_model, QALoraConfig(r=4, lora_alpha=8))
    with pytest.raises(ValueError, match=pattern):
        QALoraTrainer(model=peft_model, processing_class=tiny_tok, args=sft_args(tmp_path / "run"),
                      train_dataset=Dataset.from_list(prompt_completion_rows()[:8]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=pattern):
        load_qalora_adapter(peft_model, str(tmp_path / "adapter"))

    # adapter layers injected in place (no PeftModel wrapper): refused too
    injected = get_peft_model(load_tiny_gptq(4), LoraConfig(r=4, target_modules=["q_proj"])).base_model.model
    with pytest.raises(ValueError, match=r"got a model with PEFT adapter layers injected: .*Pass the GPTQ model itself"):
        get_qalora_model(injected, QALoraConfig(r=4, lora_alpha=8))
