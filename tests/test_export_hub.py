"""End to end on a tiny model: train QA-LoRA -> merge -> export with card -> push to a local Hub -> a fresh
process loads it with stock transformers / PEFT; atomic export under SIGKILL; the `qalora-hf` CLI."""

from __future__ import annotations

import json
import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")  # before gptqmodel is imported (docs/gptq_format.md)

import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download  # noqa: E402

from qalora_hf import QALoraConfig, export_gptq, get_qalora_model, push_gptq_to_hub  # noqa: E402
from qalora_hf.card import assert_no_secrets, build_model_card, find_secrets, plot_training_loss, sanitize_training_args  # noqa: E402
from qalora_hf.cli import main as cli_main  # noqa: E402
from qalora_hf.data import token_batches  # noqa: E402
from qalora_hf.metrics import measure  # noqa: E402
from qalora_hf.pipeline import CardInfo, merge_measure_export  # noqa: E402
from qalora_hf.testing.hub_server import HubServer  # noqa: E402
from qalora_hf.testing.tiny import TINY_TEXTS, load_gptq, quantize_tiny, save_tiny_float_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPO = "local-user/tiny-qalora-gptq"
BASE_REPO = "local-user/tiny-gptq"
from conftest import HUB_TOKEN as TOKEN  # noqa: E402

# huggingface_hub's LFS PUT passes a file object as `data=`; httpx2 warns about it (client-side, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


# --------------------------------------------------------------------------------------------------
# Local Hub (same patching as tests/test_hub.py)


def _fresh_env(url: str, hf_home: Path) -> dict:
    """A clean environment for a process that must not see qalora_hf on its path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_")) and k != "PYTHONPATH"}
    env.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HOME=str(hf_home), GPTQMODEL_CPU_WORKERS="1")
    return env


# --------------------------------------------------------------------------------------------------
# The pipeline, built once: quantise -> train -> save adapter -> merge_measure_export (gptq: measure, merge, card, export)


FIDELITY_MATRIX = {
    "date": "2026-12-02", "model": "tiny", "data": "tiny texts", "command": "python bench/fidelity_matrix.py",
    "strategy": "distill", "summary": {"cells": 1, "min": 0.99, "median": 0.99},
    "cells": [{"name": "b4-g32-asym-noact-r8-lr1e-2-s15", "bits": 4, "group_size": 32, "sym": False, "desc_act": False,
               "lora_r": 8, "learning_rate": 1e-2, "max_steps": 15, "gain": 0.4, "gain_kept": 0.99, "qlora_style_kept": 0.5}],
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("e2e")
    gptq_dir = quantize_tiny(save_tiny_float_model(root / "float"), root / "gptq", bits=4, group_size=32)
    tok = AutoTokenizer.from_pretrained(gptq_dir)
    model = get_qalora_model(load_gptq(gptq_dir, 4), QALoraConfig(r=8, lora_alpha=16))

    torch.manual_seed(0)
    enc = tok(TINY_TEXTS[:16], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    log_history = []
    for step in range(1, 16):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        log_history.append({"step": step, "loss": loss.item()})
        if step % 5 == 0:
            with torch.no_grad():
                model.eval()
                log_history.append({"step": step, "eval_loss": float(model(**enc, labels=labels).loss)})
                model.train()
    model.eval()

    adapter_dir = root / "adapter"
    model.save_pretrained(adapter_dir)
    (adapter_dir / "trainer_state.json").write_text(json.dumps({"log_history": log_history}))

    probe = tok(TINY_TEXTS[40:44], return_tensors="pt", padding=True)
    probe = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
    with torch.no_grad():
        trained_logits = model(**probe).logits

    card = CardInfo(
        repo_id=REPO, base_model=BASE_REPO, float_model=None, license="apache-2.0", datasets=["local-user/tiny-texts"],
        training_args={"learning_rate": 1e-2, "max_steps": 15, "optim": "adam", "output_dir": str(root / "run"),
                       "hub_token": TOKEN},
        # a metric name as the value: filled in from the pipeline's measurements
        eval_results=[{"dataset_name": "tiny texts", "dataset_type": "local-user/tiny-texts", "metric_type": "loss",
                       "metric_value": "loss_exported"},
                      {"model": "base", "dataset_name": "tiny texts", "metric_type": "loss", "metric_value": "loss_base"}],
    )
    with pytest.MonkeyPatch.context() as mp:  # a fidelity matrix holding this run's cell, for the card to cite
        mp.setattr("qalora_hf.card.load_matrix", lambda: FIDELITY_MATRIX)
        result = merge_measure_export(
            model, tok, root / "export", card=card, strategy="gptq",
            calibration=token_batches([{"text": t} for t in TINY_TEXTS[:32]], tok, 64),
            holdout=token_batches([{"text": t} for t in TINY_TEXTS[48:56]], tok, 64), holdout_source="tiny texts 48-55",
            adapter_dir=adapter_dir, log_history=log_history, progress=False,
        )
    merged = result.merged_model
    with torch.no_grad():
        merged_logits = merged(**probe).logits
    torch.save({**probe, "merged": merged_logits, "trained": trained_logits}, root / "probe.pt")
    return {"root": root, "gptq_dir": gptq_dir, "adapter_dir": adapter_dir, "export_dir": result.export_dir, "merged": merged,
            "tok": tok, "log_history": log_history, "probe": root / "probe.pt", "metrics": result.metrics}


def test_training_lowered_the_loss_and_export_has_everything(pipeline):
    losses = [e["loss"] for e in pipeline["log_history"] if "loss" in e]
    evals = [e["eval_loss"] for e in pipeline["log_history"] if "eval_loss" in e]
    # A random tiny model with 2-4 pooled groups per layer has little adapter capacity: ~0.4 nat in 15 steps.
    assert losses[-1] < losses[0] - 0.2 and evals == sorted(evals, reverse=True)
    m = pipeline["metrics"]
    print({k: m[k] for k in ("loss_base", "loss_trained", "loss_exported", "max_logit_diff", "codes_changed")})
    assert m["loss_trained"] < m["loss_base"]
    assert m["holdout_rows"] == 8 and m["holdout_source"] == "tiny texts 48-55" and m["strategy"] == "gptq"
    out = pipeline["export_dir"]
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "README.md", "loss.png", "tokenizer.json",
            "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= names
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "merge_report.json").read_text())
    assert report["metrics"] == json.loads(json.dumps(m)) and report["totals"]["strategy"] == "gptq"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq" and qc["sym"] is False and qc["bits"] == 4
    # The card cites the fidelity matrix's cell of this run: quantisation from the base, r from the adapter, lr and
    # steps from the training arguments.
    assert ("the same configuration (`b4-g32-asym-noact-r8-lr1e-2-s15`) kept 99.0% of the fine-tuning gain"
            in (out / "README.md").read_text())


def test_push_then_fresh_process_loads_with_stock_libraries(pipeline, hub, tmp_path):
    base_commit = push_gptq_to_hub(pipeline["gptq_dir"], BASE_REPO, backoff_s=0.01)
    commit = push_gptq_to_hub(pipeline["export_dir"], REPO, backoff_s=0.01)
    assert len(commit) == 40 and len(base_commit) == 40

    script = tmp_path / "load_stock.py"
    script.write_text(f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig
from peft import PeftModel
ref = torch.load({str(pipeline['probe'])!r}, weights_only=True)
probe = {{"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}}
model = AutoModelForCausalLM.from_pretrained({REPO!r}, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained({REPO!r})
assert tok({TINY_TEXTS[40]!r})["input_ids"] == ref["input_ids"][0][ref["attention_mask"][0].bool()].tolist()
with torch.no_grad():
    merged_diff = (model(**probe).logits - ref["merged"]).abs().max().item()
base = AutoModelForCausalLM.from_pretrained({BASE_REPO!r}, quantization_config=GPTQConfig(bits=4, backend="torch"),
                                            dtype=torch.float32)
peft_model = PeftModel.from_pretrained(base, {REPO!r}, subfolder="adapter").eval()
with torch.no_grad():
    adapter_diff = (peft_model(**probe).logits - ref["trained"]).abs().max().item()
leaked = sorted(m for m in sys.modules if m.startswith("qalora_hf"))
print("RESULT", merged_diff, adapter_diff, len(leaked))
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env=_fresh_env(hub.url, tmp_path / "fresh_home"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    merged_diff, adapter_diff, leaked = result.stdout.split("RESULT")[-1].split()
    print(f"fresh process: merged max|dlogit| {merged_diff}, stock-PEFT adapter max|dlogit| {adapter_diff}")
    assert int(leaked) == 0  # the loader never touched qalora_hf
    assert float(merged_diff) <= 1e-5
    assert float(adapter_diff) <= 1e-4  # stock PEFT use_qalora reproduces the trained (unmerged) model

    card = ModelCard.load(REPO)
    data = card.data.to_dict()
    assert data["base_model"] == [BASE_REPO] and data["base_model_relation"] == "finetune"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0" and data["datasets"] == ["local-user/tiny-texts"]
    assert {"qalora", "gptq", "4-bit", "trl", "sft"} <= set(data["tags"])
    (result_entry,) = card.data.eval_results  # the base model's row is in the table, not in model-index
    assert result_entry.metric_type == "loss" and result_entry.dataset_type == "local-user/tiny-texts"
    text = str(card)
    assert find_secrets(text) == [] and TOKEN not in text and str(pipeline["root"]) not in text
    assert "| output_dir | run |" in text  # the absolute path was reduced to its name
    for needle in ("GPTQMODEL_CPU_WORKERS", 'subfolder="adapter"', 'backend="torch"', "2309.14717", "![",
                   "Merge fidelity", "integer zero-points"):
        assert needle in text, needle


def test_second_push_makes_new_commit_and_old_revision_keeps_old_weights(pipeline, hub, tmp_path):
    from safetensors.torch import load_file, save_file

    first = push_gptq_to_hub(pipeline["export_dir"], REPO, backoff_s=0.01)
    changed = tmp_path / "changed"
    shutil.copytree(pipeline["export_dir"], changed)
    weights = load_file(changed / "model.safetensors")
    key = next(k for k in weights if k.endswith("scales"))
    weights[key] = weights[key] * 1.5
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    second = push_gptq_to_hub(changed, REPO, backoff_s=0.01, commit_message="changed scales")
    assert second != first
    commits = [c.commit_id for c in HfApi().list_repo_commits(REPO)]
    assert commits[:2] == [second, first]
    old = Path(hf_hub_download(REPO, "model.safetensors", revision=first)).read_bytes()
    new = Path(hf_hub_download(REPO, "model.safetensors")).read_bytes()
    assert old == (pipeline["export_dir"] / "model.safetensors").read_bytes()
    assert new == (changed / "model.safetensors").read_bytes() != old


# --------------------------------------------------------------------------------------------------
# Atomic export


KILL_DRIVER = """
import os, sys, time
os.environ["GPTQMODEL_CPU_WORKERS"] = "1"
from transformers import AutoTokenizer
from qalora_hf.export import export_gptq
from qalora_hf.testing.tiny import load_gptq
src, out, marker = sys.argv[1:4]
model, tok = load_gptq(src, 4), AutoTokenizer.from_pretrained(src)
def slow_save(*args, **kwargs):  # the weights are written; hang while "writing" the tokenizer
    open(marker, "w").close()
    time.sleep(600)
tok.save_pretrained = slow_save
export_gptq(model, out, tokenizer=tok, overwrite=True)
"""


def _tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_sigkill_mid_export_leaves_old_export_and_next_export_cleans_up(pipeline, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pipeline["export_dir"], out)  # a previous, complete export
    before = _tree(out)
    marker = tmp_path / "writing"
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), str(pipeline["gptq_dir"]), str(out), str(marker)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "export never reached the tokenizer"
            time.sleep(0.2)
        (tmp,) = tmp_path.glob(".out.tmp-*")
        assert (tmp / "model.safetensors").is_file() and tmp.name.startswith(f".out.tmp-{proc.pid}-")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # The killed export left the old directory untouched and only its hidden tmp dir beside it.
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [tmp.name]

    # The next export to the same target removes the dead process's tmp dir.
    export_gptq(pipeline["merged"], out, tokenizer=pipeline["tok"], overwrite=True)
    assert not tmp.exists() and not list(tmp_path.glob(".out.*"))
    assert (out / "config.json").is_file() and not (out / "README.md").exists()


def test_existing_output_dir_without_overwrite_fails_before_writing(pipeline, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gptq(pipeline["merged"], out, tokenizer=pipeline["tok"])
    assert _tree(out) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------------------------
# Card helpers


def test_assert_no_secrets_and_sanitizer(tmp_path):
    assert_no_secrets("load it with AutoModelForCausalLM.from_pretrained('user/model'); see https://arxiv.org/abs/2309.14717")
    for bad in ("token hf_abcdefghijklmnopqrstuvwx here", "saved in /tmp/run1", "output_dir: /home/alice/x",
                f"cwd {os.getcwd()}/x", f"see {Path.home()}/models", "stored under ~/models/x"):
        with pytest.raises(ValueError, match="would publish"):
            assert_no_secrets(bad)
    clean = sanitize_training_args({"output_dir": "/work/runs/sft-1/", "hub_token": "hf_x", "logging_dir": "~/logs/a",
                                    "learning_rate": 2e-4, "report_to": ["none"]})
    assert clean == {"output_dir": "sft-1", "logging_dir": "a", "learning_rate": 2e-4, "report_to": ["none"]}


def test_card_refuses_leaks_it_cannot_strip(tmp_path):
    kwargs = dict(repo_id="user/m", base_model="user/base", qalora_config={"r": 8}, training_args={},
                  merge_metrics=None, eval_results=None, loss_plot=None, framework_versions={}, bits=4, group_size=32,
                  desc_act=False)
    card = build_model_card(**kwargs)
    assert "No merge measurements" in str(card) and "No evaluation results" in str(card)
    with pytest.raises(ValueError, match="would publish"):
        build_model_card(**{**kwargs, "training_args": {"run_name": f"run in {tmp_path}/x"}})
    with pytest.raises(ValueError, match="relative"):
        build_model_card(**{**kwargs, "loss_plot": str(tmp_path / "loss.png")})
    low = build_model_card(**{**kwargs, "merge_metrics": {"strategy": "round", "loss_base": 2.0, "loss_trained": 1.0,
                                                          "loss_exported": 1.9}})
    assert "10.0%" in str(low) and "keeps only 10%" in str(low)


def test_card_without_a_gain_says_so_and_prints_no_nan():
    """A run whose training did not lower the held-out loss: gain_kept is undefined (None, or NaN from older code); the
    card leaves the row out and says why, instead of printing "nan%"."""
    kwargs = dict(repo_id="user/m", base_model="user/base", qalora_config={"r": 8}, training_args={}, framework_versions={},
                  bits=4, group_size=32, desc_act=False)
    for kept in (None, float("nan")):
        metrics = {"strategy": "round", "loss_base": 1.5, "loss_trained": 1.6, "loss_exported": 1.55, "gain_kept": kept}
        text = str(build_model_card(**kwargs, merge_metrics=metrics))
        assert "nan" not in text.lower() and "fraction of the fine-tuning loss gain" not in text, text
        assert "Training did not lower the held-out loss" in text
        assert "| held-out loss, exported (merged INT model) | 1.55 |" in text


def test_card_extra_sections_render_before_limitations():
    kwargs = dict(repo_id="user/m", base_model="user/base", qalora_config={"r": 8}, training_args={}, framework_versions={},
                  bits=4, group_size=32, desc_act=False)
    text = str(build_model_card(**kwargs, extra_sections=[("Run it with llama.cpp", "```bash\nllama-cli -m model.gguf\n```")]))
    assert text.index("## Evaluation") < text.index("## Run it with llama.cpp\n\n```bash\nllama-cli") < text.index("## Limitations")
    with pytest.raises(ValueError, match="would publish"):
        build_model_card(**kwargs, extra_sections=[("Files", "written to /home/someone/model")])


def test_plot_training_loss_needs_losses(tmp_path):
    with pytest.raises(ValueError, match="no 'loss'"):
        plot_training_loss([{"step": 1, "learning_rate": 1e-3}], tmp_path / "x.png")
    path = plot_training_loss([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], tmp_path / "x.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------------
# CLI


def _cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "qalora_hf.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_cli_merge_round_end_to_end(pipeline, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXTS[:24]))
    out = tmp_path / "cli-export"
    result = _cli("merge", "--base", pipeline["gptq_dir"], "--adapter", pipeline["adapter_dir"], "--output-dir", out,
                  "--strategy", "round", "--calibration-file", calib, "--num-calibration", 16, "--num-eval", 8,
                  "--max-length", 64, "--base-model-id", BASE_REPO, "--license", "apache-2.0")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "gain_kept" in result.stdout and "max_logit_diff" in result.stdout
    report = json.loads((out / "merge_report.json").read_text())
    assert report["totals"]["strategy"] == "round" and report["metrics"]["loss_trained"] < report["metrics"]["loss_base"]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "loss.png").is_file()
    text = (out / "README.md").read_text()
    assert find_secrets(text) == [] and "| merge strategy | round |" in text and "![" in text

    # The written checkpoint is the model the CLI measured: same loss on the same held-out rows (16..23).
    loss = measure(load_gptq(out, 4), token_batches([{"text": t} for t in TINY_TEXTS[16:24]], pipeline["tok"], 64)).loss
    assert loss == pytest.approx(report["metrics"]["loss_exported"], abs=1e-5)
    assert report["metrics"]["holdout_rows"] == 8 and report["metrics"]["holdout_source"] == "rows after the calibration rows"


@pytest.mark.parametrize("case", ["no-base", "plain-lora", "nonempty-out", "gptq-needs-calibration", "bad-repo-id",
                                  "bad-calibration", "card-would-leak-a-path", "push-missing-folder"])
def test_cli_bad_input_is_one_line_error(pipeline, tmp_path, capsys, case):
    out = tmp_path / "out"
    base, adapter = pipeline["gptq_dir"], pipeline["adapter_dir"]
    args = ["merge", "--base", base, "--adapter", adapter, "--output-dir", out, "--strategy", "round"]
    expect = {
        "no-base": "no such directory",
        "plain-lora": "plain LoRA",
        "nonempty-out": "--overwrite",
        "gptq-needs-calibration": "--strategy round",
        "bad-repo-id": "not a valid repo id",
        "bad-calibration": "neither 'text'",
        "card-would-leak-a-path": "would publish a local",
        "push-missing-folder": "not an exported model directory",
    }[case]
    if case == "no-base":
        args[2] = tmp_path / "missing"
    elif case == "plain-lora":
        plain = tmp_path / "plain"
        shutil.copytree(adapter, plain)
        config = json.loads((plain / "adapter_config.json").read_text())
        (plain / "adapter_config.json").write_text(json.dumps({**config, "use_qalora": False}))
        args[4] = plain
    elif case == "nonempty-out":
        out.mkdir()
        (out / "x").write_text("x")
    elif case == "gptq-needs-calibration":
        args = args[:-2]
    elif case == "bad-repo-id":
        args += ["--push-to-hub", "not a repo"]
    elif case == "bad-calibration":
        bad = tmp_path / "c.json"
        bad.write_text(json.dumps([{"prompt": "x"}]))
        args += ["--calibration-file", bad]
    elif case == "card-would-leak-a-path":  # caught before the model is loaded
        leaky = tmp_path / "leaky"
        shutil.copytree(adapter, leaky)
        (leaky / "training_args.json").write_text(json.dumps({"run_name": f"run at {tmp_path}/x"}))
        args[4] = leaky
    elif case == "push-missing-folder":
        args = ["push", tmp_path / "nothing", "user/name"]

    if case == "gptq-needs-calibration":  # once through a real process: exit status, no traceback
        result = _cli(*args)
        code, err = result.returncode, result.stderr
    else:
        code = cli_main([str(a) for a in args])
        err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qalora-hf: error:") and expect in lines[0], err
    assert not out.exists() or case == "nonempty-out"


def test_push_rejects_a_card_with_broken_yaml(hub, tmp_path):
    from qalora_hf.hub import HubPushError

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("---\nbase_model: [unclosed\n---\n# card\n")
    with pytest.raises(HubPushError, match="Invalid metadata") as info:
        push_gptq_to_hub(folder, REPO, backoff_s=0.01)
    assert info.value.attempts == 1


# --------------------------------------------------------------------------------------------------
# No token, pickle or local path in anything exported or pushed


def _realistic_token() -> str:
    import secrets
    import string

    return "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))


def _checkpoint_with_pickles(adapter_dir: Path, dest: Path, secret: str) -> Path:
    """What `Trainer` writes as checkpoint-N: the adapter next to pickles that hold `hub_token`."""
    from transformers import TrainingArguments

    shutil.copytree(adapter_dir, dest)
    torch.save(TrainingArguments(output_dir=str(dest.parent), hub_token=secret, report_to=[]), dest / "training_args.bin")
    torch.save({"state": {}, "note": secret}, dest / "optimizer.pt")
    torch.save({"python": 0}, dest / "rng_state.pth")
    assert secret.encode() in (dest / "training_args.bin").read_bytes()  # the trap is real
    return dest


def test_cli_merge_and_push_from_a_checkpoint_never_publishes_the_token(pipeline, hub, tmp_path):
    secret = _realistic_token()
    ckpt = _checkpoint_with_pickles(pipeline["adapter_dir"], tmp_path / "run" / "checkpoint-15", secret)
    local_base = json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(local_base).is_absolute()  # PEFT recorded the local GPTQ directory
    out = tmp_path / "export"
    code = cli_main([str(a) for a in ("merge", "--base", pipeline["gptq_dir"], "--adapter", ckpt, "--output-dir", out,
                                      "--strategy", "round", "--push-to-hub", "local-user/leak-check",
                                      "--base-model-id", BASE_REPO)])
    assert code == 0
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_REPO
    stored = [p for p in Path(hub.storage_dir).rglob("*") if p.is_file()]
    assert stored
    for needle in (secret, TOKEN, local_base, str(tmp_path)):
        hits = [p.name for p in stored if needle.encode() in p.read_bytes()]
        assert hits == [], (needle[:6], hits)
    pickles = [p.name for p in stored if p.read_bytes()[:1] == b"\x80"]
    assert pickles == []


def test_export_refuses_a_leaking_file_and_keeps_the_previous_export(pipeline, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pipeline["export_dir"], out)
    before = _tree(out)
    notes = tmp_path / "notes.txt"
    notes.write_text(f"pushed with {_realistic_token()}\n")
    with pytest.raises(ValueError, match="refusing to publish: notes.txt: a Hugging Face token"):
        export_gptq(pipeline["merged"], out, tokenizer=pipeline["tok"], extra_files={"notes.txt": notes}, overwrite=True)
    with pytest.raises(ValueError, match="must be a relative path inside the export"):
        export_gptq(pipeline["merged"], out, extra_files={"../escape.txt": notes}, overwrite=True)
    assert _tree(out) == before and not (tmp_path / "escape.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_push_refuses_a_folder_with_a_pickle_before_any_request(hub, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"x": 1}, folder / "training_args.bin")
    with pytest.raises(ValueError, match="training_args.bin: a pickle"):
        push_gptq_to_hub(folder, "local-user/pickled", backoff_s=0.01)
    assert hub.requests == []
    assert not HfApi().repo_exists("local-user/pickled")
