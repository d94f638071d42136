"""QALoraTrainer on tiny models: quantise -> train -> merge -> export, every TRL dataset format, resume from an
adapter-only checkpoint, input errors raised before any work, and the recipe under `accelerate launch` with 2 CPU
processes."""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")  # before gptqmodel is imported (docs/gptq_format.md)

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig  # noqa: E402

from qalora_hf import QALoraConfig, QALoraSFTConfig, QALoraTrainer, QuantizeConfig  # noqa: E402
from qalora_hf.metrics import METRIC_LABELS, format_metric  # noqa: E402
from qalora_hf.testing.tiny import TINY_TEXTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# helpers


def _split(text: str) -> tuple[str, str]:
    prompt, completion = text.split("Response:")
    return prompt + "Response:", completion


def prompt_completion_rows(texts=TINY_TEXTS) -> list[dict]:
    return [dict(zip(("prompt", "completion"), _split(t))) for t in texts]


def messages_rows(texts=TINY_TEXTS) -> list[dict]:
    out = []
    for t in texts:
        p, c = _split(t)
        out.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]})
    return out


def text_rows(texts=TINY_TEXTS) -> list[dict]:
    return [{"text": t} for t in texts]


def sft_args(output_dir, **kw) -> QALoraSFTConfig:
    base = dict(
        output_dir=str(output_dir), max_steps=3, learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1,
        max_length=64, report_to="none", bf16=False, use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return QALoraSFTConfig(**base)


def logged_losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gptq_dir(gptq_checkpoint) -> str:
    """A 4-bit g32 GPTQ checkpoint (no quantisation inside the trainer)."""
    return str(gptq_checkpoint(4))


# --------------------------------------------------------------------------------------------------
# 1. full run: float model -> GPTQ (cached) -> QA-LoRA training -> gptq merge -> export


def test_full_run_quantise_train_merge_export_and_cache_reuse(tiny_float_dir, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "cache"
    rows = prompt_completion_rows()
    train_ds, eval_ds = Dataset.from_list(rows[:48]), Dataset.from_list(rows[48:])

    def make(out, **kw):
        return QALoraTrainer(
            model=str(tiny_float_dir),
            quantize_config=QuantizeConfig(bits=4, group_size=32, num_calibration_rows=16, cache_dir=str(cache)),
            qalora_config=QALoraConfig(r=4, lora_alpha=8),
            args=sft_args(out, max_steps=10, per_device_train_batch_size=8, merge_strategy="gptq", num_calibration_rows=16,
                          num_holdout_rows=8, model_card_datasets=["local-user/tiny-facts"], **kw),
            train_dataset=train_ds, eval_dataset=eval_ds,
        )

    caplog.set_level(logging.INFO, logger="qalora_hf.quantize")
    trainer = make(tmp_path / "run")
    assert any("quantise: GPTQ 4-bit g32" in r.getMessage() for r in caplog.records)
    bases = [p for p in cache.iterdir() if p.is_dir()]
    assert len(bases) == 1 and (bases[0] / "config.json").is_file(), bases
    assert trainer.base_model_id == str(bases[0]) and trainer.float_model_id == str(tiny_float_dir)
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)

    trainer.train()

    losses = logged_losses(trainer)
    steps = sorted(losses)
    assert steps == list(range(1, 11)), steps
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[steps[-1]] < losses[steps[0]] - 0.1, losses

    m = trainer.merge_metrics
    assert m is not None and m["strategy"] == "gptq" and m["holdout_source"] == "eval_dataset" and m["holdout_rows"] == 8
    for key in ("loss_base", "loss_trained", "loss_exported", "gain_kept", "gain_kept_se", "max_logit_diff"):
        assert key in m and math.isfinite(m[key]), (key, m)
    assert 0 < m["gain_kept_se"] < 1, m  # over 8 held-out rows: uncertain, but not as large as the fraction itself
    assert m["loss_trained"] < m["loss_base"]
    assert m["gain_kept"] > 0.5, m  # the gptq merge keeps most of the fine-tuning gain (~99% here)
    assert set(m) <= set(METRIC_LABELS), set(m) - set(METRIC_LABELS)  # one set of names

    out = Path(trainer.export_dir)
    assert out == tmp_path / "run" / "export"
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "merge_report.json", "tokenizer.json"} <= names, names
    assert any(n.endswith(".safetensors") and not n.startswith("adapter/") for n in names)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["sym"] is False and qc["checkpoint_format"] == "gptq"
    assert qc["bits"] == 4 and qc["group_size"] == 32
    assert "dataset" not in qc  # calibration text does not leak into the config
    assert not list(out.parent.glob(".export.*")), "half-written export dirs left behind"
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_qalora"] is True and adapter_cfg["qalora_group_size"] == 32 and adapter_cfg["r"] == 4
    assert json.loads((out / "merge_report.json").read_text())["metrics"] == json.loads(json.dumps(m))

    # The card is built from this run's metrics: every measured value in its row, under its label, no raw names.
    card = (out / "README.md").read_text()
    rows = dict(line.strip("|").split(" | ", 1) for line in card.splitlines()
                if line.startswith("| ") and line.count(" | ") == 1)
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    for key in ("strategy", "holdout_rows", "holdout_tokens", "holdout_source", "loss_base", "loss_trained", "loss_exported",
                "gain_kept", "gain_kept_se", "max_logit_diff", "codes_changed", "zeros_changed", "layers"):
        assert rows.get(METRIC_LABELS[key]) == format_metric(key, m[key]), (key, rows.get(METRIC_LABELS[key]), m[key])
    assert rows[METRIC_LABELS["gain_kept"]].endswith("%") and "nan" not in card.lower()
    assert not set(rows) & set(METRIC_LABELS), set(rows) & set(METRIC_LABELS)  # no metric shown under its raw name
    assert "| loss_export |" not in card and "| holdout_rows |" not in card
    assert "datasets:\n- local-user/tiny-facts" in card  # the card's dataset is the one the run was given

    # stock transformers (auto-picked gptqmodel kernel) reloads the export
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.eval()
    enc = tok(TINY_TEXTS[50:52], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()

    # the same inputs again: the quantised base comes from the cache, nothing is quantised
    config_mtime = (bases[0] / "config.json").stat().st_mtime_ns
    caplog.clear()
    again = make(tmp_path / "run2", merge_at_end=False)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("reusing cached GPTQ base" in s for s in msgs), msgs
    assert not any("quantise: GPTQ" in s for s in msgs), msgs
    assert again.base_model_id == str(bases[0])
    assert [p for p in cache.iterdir()] == bases
    assert (bases[0] / "config.json").stat().st_mtime_ns == config_mtime


# --------------------------------------------------------------------------------------------------
# 2. every TRL dataset format (plus packing, gradient checkpointing) on a GPTQ checkpoint


@pytest.mark.parametrize(
    "fmt, extra",
    [
        ("text", {}),
        ("messages", {}),
        ("prompt_completion", {}),
        ("text", {"packing": True, "max_length": 128}),
        ("prompt_completion", {"gradient_checkpointing": True}),
    ],
    ids=["text", "messages", "prompt_completion", "text-packing", "prompt_completion-grad_ckpt"],
)
def test_dataset_formats_train_only_lora_params(gptq_dir, tmp_path, fmt, extra):
    rows = {"text": text_rows, "messages": messages_rows, "prompt_completion": prompt_completion_rows}[fmt]()
    trainer = QALoraTrainer(
        model=gptq_dir, qalora_config=QALoraConfig(r=4, lora_alpha=8),
        args=sft_args(tmp_path / "run", max_steps=2, merge_at_end=False, merge_strategy="round", **extra),
        train_dataset=Dataset.from_list(rows[:16]),
    )
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    if not extra.get("packing"):  # qalora_hf.data tokenises a row exactly as TRL's SFTTrainer did for training
        from qalora_hf.data import encode_row

        for i in (0, 5):
            ids, labels = encode_row(rows[i], trainer.processing_class, trainer.args.max_length)
            assert ids == list(trainer.train_dataset[i]["input_ids"]), (fmt, i)
            if "labels" in trainer.train_dataset.column_names:
                assert labels == list(trainer.train_dataset[i]["labels"]), (fmt, i)
    if extra.get("packing"):
        packed = trainer.train_dataset  # rows packed into max_length sequences
        assert len(packed) < 16 and max(len(x) for x in packed["seq_lengths"]) > 1, packed
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    if extra.get("gradient_checkpointing"):
        assert trainer.accelerator.unwrap_model(trainer.model).get_base_model().is_gradient_checkpointing
    losses = logged_losses(trainer)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values()), losses
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before), "lora_B did not move"
    assert trainer.merge_metrics is None and not (tmp_path / "run" / "export").exists()
    if fmt == "prompt_completion":  # completion-only loss: prompt tokens are masked out of the labels
        row = trainer.train_dataset[0]
        masked = sum(label == -100 for label in row["labels"])
        assert 0 < masked < len(row["input_ids"]), row


# --------------------------------------------------------------------------------------------------
# 3. resume from an adapter-only checkpoint gives the same losses


def test_resume_from_checkpoint_reproduces_losses(gptq_dir, tmp_path):
    ds = Dataset.from_list(prompt_completion_rows()[:48])

    def make(out):
        return QALoraTrainer(
            model=gptq_dir, qalora_config=QALoraConfig(r=4, lora_alpha=8),
            args=sft_args(out, max_steps=6, save_strategy="steps", save_steps=3, seed=123, merge_at_end=False, merge_strategy="round"),
            train_dataset=ds,
        )

    first = make(tmp_path / "run")
    first.train()
    full = logged_losses(first)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]

    ckpt = tmp_path / "run" / "checkpoint-3"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
    # adapter weights only: a few KB of lora_A/lora_B, no qweight/qzeros/scales of the GPTQ base
    from safetensors import safe_open

    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys), keys
    assert (ckpt / "adapter_model.safetensors").stat().st_size < 200_000

    second = make(tmp_path / "run")
    second.train(resume_from_checkpoint=str(ckpt))
    resumed = logged_losses(second)
    # steps 1-3 come from the checkpoint's trainer_state.json, 4-6 are trained again on the reloaded adapter
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6] and second.state.global_step == 6, resumed
    assert [resumed[s] for s in (1, 2, 3)] == [full[s] for s in (1, 2, 3)]
    torch.testing.assert_close(
        torch.tensor([resumed[s] for s in (4, 5, 6)]), torch.tensor([full[s] for s in (4, 5, 6)]), rtol=1e-4, atol=1e-5
    )


# --------------------------------------------------------------------------------------------------
# 4. bad input fails before quantisation or training, saying what to change


def _bad_case(case, tiny_float_dir, tmp_path):
    rows = prompt_completion_rows()[:16]
    kw = dict(
        model=str(tiny_float_dir),
        quantize_config=QuantizeConfig(bits=4, group_size=32, num_calibration_rows=8, cache_dir=str(tmp_path / "cache")),
        qalora_config=QALoraConfig(r=4, lora_alpha=8),
        args=sft_args(tmp_path / "run", merge_strategy="round"),
        train_dataset=Dataset.from_list(rows),
    )
    if case == "peft_config":
        from peft import LoraConfig

        kw["peft_config"] = LoraConfig(r=4)
        return kw, r"qalora_config=QALoraConfig"
    if case == "empty_train":
        kw["train_dataset"] = Dataset.from_dict({"prompt": [], "completion": []})
        return kw, r"train_dataset is empty"
    if case == "empty_eval":
        kw["eval_dataset"] = Dataset.from_dict({"text": []})
        return kw, r"eval_dataset is empty"
    if case == "wrong_columns":
        kw["train_dataset"] = Dataset.from_list([{"foo": t} for t in TINY_TEXTS[:8]])
        return kw, r"columns \['foo'\].*'text'.*'messages'.*'prompt' and 'completion'"
    if case == "no_train_dataset":
        kw["train_dataset"] = None
        return kw, r"train_dataset is required"
    if case == "float_without_quantize_config":
        kw["quantize_config"] = None
        return kw, r"float model: pass quantize_config=QuantizeConfig"
    if case == "max_length_shorter_than_prompt":
        kw["args"] = sft_args(tmp_path / "run", max_length=8, merge_strategy="round")
        return kw, r"max_length=8 is not longer than the longest prompt .*Raise max_length"
    if case == "group_size_mismatch":
        kw["qalora_config"] = QALoraConfig(r=4, lora_alpha=8, group_size=64)
        return kw, r"QALoraConfig.group_size=64 differs from QuantizeConfig.group_size=32"
    if case == "push_without_hub_model_id":
        kw["args"] = sft_args(tmp_path / "run", push_to_hub=True)
        return kw, r"push_to_hub=True needs hub_model_id"
    if case == "plain_sft_config_with_push":  # a plain SFTConfig is converted, and checked the same way
        kw["args"] = SFTConfig(**{f: getattr(sft_args(tmp_path / "run"), f) for f in ("output_dir", "report_to", "use_cpu")},
                               bf16=False, push_to_hub=True)
        return kw, r"push_to_hub=True needs hub_model_id"
    if case == "unknown_merge_strategy":  # the config's __post_init__ refuses it, before the trainer exists
        kw["args"] = lambda: sft_args(tmp_path / "run", merge_strategy="average")
        return kw, r"merge_strategy='average' is unknown; choose one of"
    raise AssertionError(case)


BAD_CASES = [
    "peft_config", "empty_train", "empty_eval", "wrong_columns", "no_train_dataset", "float_without_quantize_config",
    "max_length_shorter_than_prompt", "group_size_mismatch", "push_without_hub_model_id", "plain_sft_config_with_push",
    "unknown_merge_strategy",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_before_quantisation(case, tiny_float_dir, tmp_path, monkeypatch):
    import qalora_hf.quantize as quantize_mod
    import qalora_hf.trainer as trainer_mod

    def no_work(*a, **k):
        raise AssertionError("quantisation/loading started before the input was checked")

    monkeypatch.setattr(trainer_mod, "quantize_model", no_work)
    monkeypatch.setattr(trainer_mod, "load_gptq_model", no_work)
    monkeypatch.setattr(quantize_mod, "quantize_model", no_work)
    kw, pattern = _bad_case(case, tiny_float_dir, tmp_path)
    with pytest.raises(ValueError, match=pattern):
        QALoraTrainer(**{**kw, "args": kw["args"]() if callable(kw["args"]) else kw["args"]})
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_use_cpu_keeps_the_base_on_cpu_when_cuda_exists(tmp_path, monkeypatch):
    """With use_cpu=True the GPTQ base must load where the Trainer trains (CPU, fp32), even on a CUDA machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = sft_args(tmp_path, use_cpu=True)
    assert QALoraTrainer._device_map(args) is None
    assert QALoraTrainer._load_dtype(args) == torch.float32


# --------------------------------------------------------------------------------------------------
# 5. the recipe under `accelerate launch` with 2 CPU processes


def test_recipe_under_accelerate_two_processes(tiny_float_dir, tmp_path):
    import yaml

    facts = [("sun", "hot"), ("moon", "grey"), ("sea", "salty"), ("sky", "blue"), ("grass", "green")]
    rows = [
        {"instruction": f"Give fact number {i} about the {w}.", "input": "" if i % 2 else f"The {w}.", "output": f"The {w} is {a}."}
        for i, (w, a) in enumerate(facts * 8)
    ]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    cache = tmp_path / "qcache"
    config = {
        "model_name_or_path": str(tiny_float_dir), "dataset_path": str(data), "num_holdout_rows": 8, "group_size": 32,
        "lora_r": 4, "lora_alpha": 8, "max_steps": 3, "per_device_train_batch_size": 2, "max_length": 256,
        "output_dir": str(out), "save_strategy": "no", "report_to": "none", "bf16": False, "merge_strategy": "round",
        "num_calibration_rows": 8, "gptq_calibration_rows": 6, "learning_rate": 1e-3, "logging_steps": 1, "disable_tqdm": True,
        "seed": 0,
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "QALORA_HF_CACHE": str(cache), "GPTQMODEL_CPU_WORKERS": "1", "TORCHDYNAMO_DISABLE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2",
        "--config_file", str(ROOT / "recipes/accelerate_configs/cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
        str(ROOT / "recipes/sft_alpaca.py"), "--config", str(cfg),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    log = proc.stdout + proc.stderr
    (tmp_path / "launch.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]

    # both ranks ran, one quantised, the other reused the cache
    assert log.count("quantise: GPTQ 4-bit g32") == 1, log[-6000:]
    # GPTQ on gptq_calibration_rows, the merge on num_calibration_rows (8 rows = one batch of 8)
    assert "on 6 calibration rows" in log and "on 1 calibration batches" in log, log[-6000:]
    assert log.count("quantise: reusing cached GPTQ base") == 1, log[-6000:]
    bases = [p for p in (cache / "gptq").iterdir()]
    assert len(bases) == 1 and (bases[0] / "config.json").is_file(), bases
    assert not list((cache / "gptq").glob(".*")), "half-written quantised base left in the cache"

    # one export, written once, atomically
    configs = sorted(p.relative_to(out).as_posix() for p in out.rglob("config.json"))
    assert configs == ["export/config.json"], configs
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    qc = json.loads((out / "export" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["group_size"] == 32
    assert (out / "export" / "README.md").is_file() and (out / "export" / "adapter" / "adapter_config.json").is_file()
    assert log.count("QA-LoRA merged model exported to") == 1, log[-6000:]
    assert log.count("merge metrics:") == 1, log[-6000:]
    info = json.loads((out / "run_info.json").read_text())
    assert Path(info["export_dir"]) == out / "export"
    assert info["float_model"] == str(tiny_float_dir) and info["num_holdout_rows"] == 8
    assert math.isfinite(info["merge_metrics"]["loss_exported"]) and info["merge_metrics"]["holdout_rows"] == 8
    card = (out / "export" / "README.md").read_text()
    assert "datasets:" not in card and "alpaca" not in card.lower()  # no dataset id was passed: none is claimed
    assert not list(out.glob("checkpoint-*"))
    assert "| world_size | 2 |" in (out / "export" / "README.md").read_text()  # really trained on 2 ranks


def test_quantize_true_sequential_flag(tiny_float_dir, tmp_path):
    """QuantizeConfig(true_sequential=False) reaches optimum (a different GPTQ result, its own cache entry) and still
    quantises well: both bases reconstruct the float weights to within a few percent."""
    from transformers import AutoModelForCausalLM

    from qalora_hf.gptq_format import read_layer
    from qalora_hf.gptq import gptq_layers, load_gptq_model
    from qalora_hf.quantize import quantize_model

    texts = list(TINY_TEXTS[:16])
    dirs = {ts: quantize_model(str(tiny_float_dir), QuantizeConfig(num_calibration_rows=16, cache_dir=str(tmp_path), true_sequential=ts), texts)
            for ts in (True, False)}
    assert dirs[True] != dirs[False]
    assert json.loads((dirs[False] / "config.json").read_text())["quantization_config"]["true_sequential"] is False
    ref = {n: m.weight.detach() for n, m in AutoModelForCausalLM.from_pretrained(tiny_float_dir, dtype=torch.float32).named_modules()
           if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    codes = {}
    for ts, d in dirs.items():
        layers = gptq_layers(load_gptq_model(str(d)))
        assert sorted(layers) == sorted(ref)
        for n, layer in layers.items():
            t = read_layer(layer)
            rel = float((t.dequantize() - ref[n]).norm() / ref[n].norm())
            assert rel < 0.15, (ts, n, rel)
        codes[ts] = torch.cat([read_layer(layer).q.flatten() for layer in layers.values()])
    assert not torch.equal(codes[True], codes[False])  # calibrated on different inputs: some codes differ


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "recipes/configs").glob("*.yaml")))
def test_shipped_recipe_configs_parse(config, monkeypatch):
    """Every shipped config is read by the recipe's own TrlParser (a misspelt or retired argument fails here,
    not after a long quantisation)."""
    import importlib.util

    from trl import ModelConfig, TrlParser

    spec = importlib.util.spec_from_file_location("sft_alpaca_recipe", ROOT / "recipes/sft_alpaca.py")
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, recipe)  # dataclasses look their module up there
    spec.loader.exec_module(recipe)
    argv = ["sft_alpaca.py", "--config", str(ROOT / "recipes/configs" / config)]
    if not torch.cuda.is_available():
        argv += ["--bf16", "false"]  # the GPU configs ask for bf16, which TrainingArguments refuses on a CPU
    monkeypatch.setattr(sys, "argv", argv)
    script_args, training_args, model_args = TrlParser((recipe.ScriptArguments, QALoraSFTConfig, ModelConfig)).parse_args_and_config()
    assert training_args.merge_strategy in ("distill", "scales", "gptq", "round")
    assert training_args.max_steps > 0 and script_args.bits in (2, 3, 4, 8)
    assert training_args.model_card_datasets == ["tatsu-lab/alpaca"] and training_args.num_holdout_rows == 99
    # the merge distils each calibration batch of 8 rows once over its 32 steps; GPTQ keeps its own 128 rows
    assert training_args.num_calibration_rows == 256 and script_args.gptq_calibration_rows == 128
    qalora = QALoraConfig.from_model_config(model_args)  # the adapter options come from ModelConfig's lora_* fields
    assert qalora.target_modules == "all-linear" and qalora.lora_dropout == 0.0 and qalora.r in (16, 64)
