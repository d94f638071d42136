"""Reruns that never get stuck and never retrain, and bad input that fails before any expensive work.

* the recipe (``recipes/sft_alpaca.py``, in-process through its own ``cli``, and once in a real process killed with
  SIGKILL while it writes a checkpoint): a half-written newest checkpoint is skipped and the one before resumed; a
  finished run, rerun, does nothing; a run trained to the end without an export exports without training; a
  checkpoint of another run is refused with the way out; ``--retrain`` starts over;
* bad inputs to ``QALoraTrainer``, the recipe and ``qalora-hf``: each one is refused with a one-line message before
  quantisation, training or the merge starts;
* an adapter trained on another GPTQ base (same shapes) is refused on load and by ``qalora-hf merge``, unless asked.
"""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")  # before gptqmodel is imported (docs/gptq_format.md)

import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from qalora_hf import QALoraConfig, QALoraSFTConfig, QALoraTrainer, QuantizeConfig  # noqa: E402
from qalora_hf.checkpoints import checkpoint_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACTS = [("sun", "hot"), ("moon", "grey"), ("sea", "salty"), ("sky", "blue"), ("grass", "green"), ("snow", "cold")]


def alpaca_rows(n: int = 36) -> list[dict]:
    return [{"instruction": f"Give fact number {i} about the {w}.", "input": "" if i % 2 else f"The {w}.",
             "output": f"The {w} is {a}."} for i, (w, a) in enumerate((FACTS * 10)[:n])]


@pytest.fixture(scope="module")
def recipe():
    """``recipes/sft_alpaca.py`` as a module (its ``cli(argv)`` is what ``python recipes/sft_alpaca.py`` runs)."""
    spec = importlib.util.spec_from_file_location("sft_alpaca_recipe_rel", ROOT / "recipes/sft_alpaca.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("alpaca") / "alpaca.json"
    path.write_text(json.dumps(alpaca_rows()))
    return path


@pytest.fixture(scope="module")
def gptq_dir(gptq_checkpoint) -> str:
    return str(gptq_checkpoint(4))


def recipe_args(model, data, out, **overrides) -> list[str]:
    values = {
        "model_name_or_path": model, "dataset_path": data, "output_dir": out, "num_holdout_rows": 8, "lora_r": 4,
        "lora_alpha": 8, "max_steps": 4, "save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 4,
        "max_length": 256, "merge_strategy": "round", "num_calibration_rows": 8, "learning_rate": 1e-2,
        "logging_steps": 1, "report_to": "none", "use_cpu": True, "bf16": False, "seed": 0, "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    argv = []
    for k, v in values.items():
        argv += [f"--{k}", str(v)]
    return argv


def losses(state_file: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in json.loads(state_file.read_text())["log_history"] if "loss" in e}


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_training(monkeypatch):
    """Make any training step fail loudly (a rerun that must not train)."""
    from transformers import Trainer

    def refuse(self, *a, **k):
        raise AssertionError("training ran")

    monkeypatch.setattr(Trainer, "training_step", refuse)


@pytest.fixture(scope="module")
def finished_run(recipe, gptq_dir, data_file, tmp_path_factory):
    """One finished recipe run (4 steps, checkpoints at 2 and 4, export, run_info.json); tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    recipe.cli(recipe_args(gptq_dir, data_file, out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "export" / "config.json").is_file() and json.loads((out / "run_info.json").read_text())["finished"]
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    info = json.loads((dst / "run_info.json").read_text())
    info["export_dir"] = str(dst / "export")
    (dst / "run_info.json").write_text(json.dumps(info))
    return dst


# --------------------------------------------------------------------------------------------------
# 3. a half-written newest checkpoint: the rerun resumes from the one before, without manual cleanup


def _half_write(ckpt: Path, how: str) -> None:
    if how == "empty_dir":  # killed ~20 ms after the directory appeared
        for p in ckpt.iterdir():
            p.unlink()
    elif how == "no_trainer_state":  # killed before the Trainer wrote its state
        (ckpt / "trainer_state.json").unlink()
    elif how == "truncated_adapter":  # disk full while the adapter was written
        f = ckpt / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "truncated_optimizer":
        f = ckpt / "optimizer.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


@pytest.mark.parametrize("how", ["empty_dir", "no_trainer_state", "truncated_adapter", "truncated_optimizer"])
def test_half_written_checkpoint_rerun_resumes_from_the_one_before(recipe, finished_run, gptq_dir, data_file, tmp_path,
                                                                   how, caplog):
    out = _copy_run(finished_run, tmp_path / "run")
    reference = losses(out / "checkpoint-4" / "trainer_state.json")
    # the state a kill during the final checkpoint's save leaves: checkpoint-4 half-written, no merge, no export
    shutil.rmtree(out / "export")
    (out / "run_info.json").unlink()
    _half_write(out / "checkpoint-4", how)
    assert checkpoint_problem(out / "checkpoint-4") is not None

    caplog.set_level(logging.INFO)
    recipe.cli(recipe_args(gptq_dir, data_file, out))

    assert "not resuming from checkpoint-4: " in caplog.text and "falling back" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert checkpoint_problem(out / "checkpoint-4") is None  # written again, whole
    resumed = losses(out / "checkpoint-4" / "trainer_state.json")
    assert sorted(resumed) == [1, 2, 3, 4]
    # steps 3-4 trained again from checkpoint-2 give the losses of the uninterrupted run
    torch.testing.assert_close(torch.tensor([resumed[s] for s in (3, 4)]), torch.tensor([reference[s] for s in (3, 4)]),
                               rtol=1e-4, atol=1e-5)
    assert (out / "export" / "config.json").is_file() and json.loads((out / "run_info.json").read_text())["finished"]


def _free_env(tmp_path: Path) -> dict:
    return {**os.environ, "QALORA_HF_CACHE": str(tmp_path / "qcache"), "GPTQMODEL_CPU_WORKERS": "1",
            "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_kill_9_while_a_checkpoint_is_written_then_rerun(recipe, gptq_dir, data_file, tmp_path, caplog):
    """A real process, SIGKILLed as soon as checkpoint-4 appears (mid-save, most of the time); the rerun finishes."""
    out = tmp_path / "run"
    argv = recipe_args(gptq_dir, data_file, out, max_steps=6)
    proc = subprocess.Popen([sys.executable, str(ROOT / "recipes/sft_alpaca.py"), *argv], cwd=tmp_path, env=_free_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint-4").exists():
            assert proc.poll() is None, "the run ended before checkpoint-4 was written"
            assert time.time() < deadline
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    problem = checkpoint_problem(out / "checkpoint-4")
    assert not (out / "run_info.json").exists() and not (out / "export").exists()

    caplog.set_level(logging.INFO)
    recipe.cli(argv)
    if problem is not None:  # killed mid-save: skipped, resumed from checkpoint-2
        assert "not resuming from checkpoint-4: " in caplog.text
        assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    else:  # the save had completed before the kill landed
        assert f"resuming from {out / 'checkpoint-4'}" in caplog.text
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and sorted(losses(out / "checkpoint-6" / "trainer_state.json")) == [1, 2, 3, 4, 5, 6]
    assert (out / "export" / "config.json").is_file() and json.loads((out / "run_info.json").read_text())["global_step"] == 6
    print(f"checkpoint-4 at the kill: {problem or 'complete'}")


# --------------------------------------------------------------------------------------------------
# 4. a finished run, rerun, does nothing; trained but not exported: export only; --retrain starts over


def test_finished_run_rerun_does_nothing(recipe, finished_run, gptq_dir, data_file, tmp_path, caplog, monkeypatch):
    out = _copy_run(finished_run, tmp_path / "run")
    before = tree_digest(out)
    _no_training(monkeypatch)
    import qalora_hf.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "load_gptq_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    caplog.set_level(logging.INFO)
    recipe.cli(recipe_args(gptq_dir, data_file, out))
    assert "run already finished" in caplog.text and "--retrain" in caplog.text
    assert tree_digest(out) == before  # no checkpoint-5, the same export, the same run_info.json


def test_finished_run_with_other_settings_is_refused(recipe, finished_run, gptq_dir, data_file, tmp_path):
    out = _copy_run(finished_run, tmp_path / "run")
    before = tree_digest(out)
    with pytest.raises(SystemExit, match=r"holds a finished run with other settings \(max_steps: 4 there, 6 now\).*--retrain"):
        recipe.cli(recipe_args(gptq_dir, data_file, out, max_steps=6))
    with pytest.raises(SystemExit, match=r"lora_r: 4 there, 8 now"):
        recipe.cli(recipe_args(gptq_dir, data_file, out, lora_r=8))
    assert tree_digest(out) == before


def _export_tensors(export: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(export.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_trained_but_not_exported_exports_without_training(recipe, finished_run, gptq_dir, data_file, tmp_path, caplog,
                                                           monkeypatch):
    out = _copy_run(finished_run, tmp_path / "run")
    reference = _export_tensors(out / "export")
    checkpoints_before = tree_digest(out / "checkpoint-4")
    shutil.rmtree(out / "export")  # killed during the merge: training done, no export, no run_info.json
    (out / "run_info.json").unlink()
    _no_training(monkeypatch)
    caplog.set_level(logging.INFO)
    recipe.cli(recipe_args(gptq_dir, data_file, out))

    assert "training already finished" in caplog.text and "exporting it without training again" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert tree_digest(out / "checkpoint-4") == checkpoints_before
    exported = _export_tensors(out / "export")
    assert sorted(exported) == sorted(reference)
    for name, tensor in reference.items():  # the same merged integers as the uninterrupted run
        assert torch.equal(exported[name], tensor), name
    info = json.loads((out / "run_info.json").read_text())
    assert info["finished"] and info["global_step"] == 4 and info["merge_metrics"]["strategy"] == "round"
    assert (out / "export" / "loss.png").is_file()  # the restored trainer state feeds the loss plot


def test_retrain_starts_over(recipe, finished_run, gptq_dir, data_file, tmp_path, caplog):
    out = _copy_run(finished_run, tmp_path / "run")
    (out / "checkpoint-6").mkdir()  # a stray newer checkpoint of an older run: deleted, not resumed from later
    old = {name: (out / name / "adapter_model.safetensors").stat().st_mtime_ns for name in ("checkpoint-2", "checkpoint-4")}
    old_info = (out / "run_info.json").read_text()
    caplog.set_level(logging.INFO)
    recipe.cli(recipe_args(gptq_dir, data_file, out, retrain=True))
    assert "--retrain: deleting" in caplog.text and "resuming from" not in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(losses(out / "checkpoint-4" / "trainer_state.json")) == [1, 2, 3, 4]  # trained from step 1
    for name, mtime in old.items():  # written again by the new training (copytree kept the old files' times)
        assert (out / name / "adapter_model.safetensors").stat().st_mtime_ns > mtime, name
    assert (out / "run_info.json").read_text() != old_info  # written again at the end


# --------------------------------------------------------------------------------------------------
# 7. a checkpoint of another run in output_dir: a clear refusal, not a size-mismatch traceback


def test_checkpoint_of_another_run_is_refused(recipe, finished_run, gptq_dir, data_file, tmp_path):
    out = _copy_run(finished_run, tmp_path / "run")
    (out / "run_info.json").unlink()
    shutil.rmtree(out / "export")
    (out / "checkpoint-4").rename(out / "checkpoint-3")  # an unfinished run of lora_r 4
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 3}))
    shutil.rmtree(out / "checkpoint-2")
    with pytest.raises(SystemExit) as err:
        recipe.cli(recipe_args(gptq_dir, data_file, out, lora_r=8))
    msg = str(err.value)
    assert "holds checkpoint-3 of another run" in msg and "shape [4, " in msg and "--retrain" in msg, msg
    assert "\n" not in msg


def test_kill_9_during_the_merge_then_rerun_exports_without_training(recipe, gptq_dir, data_file, tmp_path, caplog,
                                                                      monkeypatch):
    """A real process, SIGKILLed once training ended and the merge began (``<output_dir>/adapter`` written first);
    the rerun exports from the final checkpoint and never trains."""
    out = tmp_path / "run"
    argv = recipe_args(gptq_dir, data_file, out, merge_strategy="gptq")
    proc = subprocess.Popen([sys.executable, str(ROOT / "recipes/sft_alpaca.py"), *argv], cwd=tmp_path, env=_free_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (out / "adapter" / "adapter_model.safetensors").exists():
            assert proc.poll() is None, "the run ended before the merge began"
            assert time.time() < deadline
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "run_info.json").exists() and checkpoint_problem(out / "checkpoint-4") is None
    exported_before_kill = (out / "export" / "config.json").is_file()

    _no_training(monkeypatch)
    caplog.set_level(logging.INFO)
    recipe.cli(argv)
    assert "training already finished" in caplog.text and "exporting it without training again" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((out / "run_info.json").read_text())["global_step"] == 4
    assert (out / "export" / "config.json").is_file() and (out / "export" / "adapter" / "adapter_config.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    print(f"export complete at the kill: {exported_before_kill}")


# --------------------------------------------------------------------------------------------------
# 5-7. bad input: refused before quantisation / loading / training, with a message that says what to change


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nothing can be written into: mode 0555, or as root (which bypasses modes) the immutable flag."""
    d = tmp_path / "readonly"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        undo = lambda: d.chmod(0o755)  # noqa: E731
    else:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
            pytest.skip("cannot make a read-only directory here (root without chattr +i)")
        undo = lambda: subprocess.run(["chattr", "-i", str(d)], check=True)  # noqa: E731
    try:
        (d / "probe").mkdir()
    except OSError:
        pass
    else:
        undo()
        pytest.skip("the directory stayed writable")
    yield d
    undo()


def sft_args(output_dir, **kw) -> QALoraSFTConfig:
    base = dict(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, max_length=64, report_to="none",
                bf16=False, use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, merge_strategy="round",
                num_calibration_rows=8, num_holdout_rows=4)
    base.update(kw)
    return QALoraSFTConfig(**base)


def smollm2_shaped_config(path: Path) -> Path:
    """A config.json only (no weights): SmolLM2-135M's layer shapes (hidden 576, intermediate 1536), one block."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=320, hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64).save_pretrained(path)
    return path


def prompt_completion(n=16) -> list[dict]:
    return [{"prompt": f"Instruction: give fact {i} about the {w}. Response:", "completion": f" the {w} is {a}."}
            for i, (w, a) in enumerate((FACTS * 4)[:n])]


TRAINER_CASES = {
    "hub_model_id_not_a_repo": r"hub_model_id='not a repo' is not a valid repo id",
    "target_module_unknown": r"target module 'nope_proj' matches no module of the model; valid GPTQ layer names end in",
    "target_module_not_quantised": r"target module 'lm_head' matches lm_head \(Linear\), which is not a GPTQ quantised layer",
    "group_size_48": r"group_size=48, bits=4 is refused by gptqmodel's GPTQ kernel .*use one of the group sizes .*: 16, 32, 64",
    "group_size_1024_on_576": r"in_features=576, fewer than group_size=1024.*group sizes .*: 16, 32, 64, 128, 256, 512\.",
    "completion_null": r"train_dataset: row 5 has 'completion' null",
    "completion_int": r"train_dataset: column 'completion' holds int64 values, not text",
    "eval_text_null": r"eval_dataset: row 1 has 'text' null",
    "readonly_output_dir": r"output_dir .* cannot be written \(.*\); choose a directory on a writable disk",
    "readonly_export_dir": r"export_dir .* cannot be written",
    "gptq_checkpoint_other_quantize_config": r"already a GPTQ checkpoint.*bits=8 \(the checkpoint has 4\), group_size=64 "
                                             r"\(the checkpoint has 32\).*drop quantize_config",
    "missing_local_path": r"the path .*no/such/model does not exist",
    "r_not_integer": r"r must be a positive integer .*got 4\.5",
    "num_calibration_rows_0": r"num_calibration_rows=0",
}


def _trainer_case(case, tiny_float_dir, gptq_dir, tmp_path, readonly_dir):
    kw = dict(model=str(tiny_float_dir), quantize_config=QuantizeConfig(num_calibration_rows=8, cache_dir=str(tmp_path / "cache")),
              qalora_config=QALoraConfig(r=4, lora_alpha=8), args=lambda: sft_args(tmp_path / "run"),
              train_dataset=Dataset.from_list(prompt_completion()))
    if case == "hub_model_id_not_a_repo":
        kw["args"] = lambda: sft_args(tmp_path / "run", push_to_hub=True, hub_model_id="not a repo")
    elif case == "target_module_unknown":
        kw["qalora_config"] = QALoraConfig(r=4, target_modules=["nope_proj"])
    elif case == "target_module_not_quantised":
        kw["qalora_config"] = QALoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    elif case == "group_size_48":
        kw["quantize_config"] = QuantizeConfig(group_size=48, cache_dir=str(tmp_path / "cache"))
    elif case == "group_size_1024_on_576":
        kw["model"] = str(smollm2_shaped_config(tmp_path / "smollm2-shaped"))
        kw["quantize_config"] = QuantizeConfig(group_size=1024, cache_dir=str(tmp_path / "cache"))
    elif case == "completion_null":
        rows = prompt_completion()
        rows[5]["completion"] = None
        kw["train_dataset"] = Dataset.from_list(rows)
    elif case == "completion_int":
        kw["train_dataset"] = Dataset.from_dict({"prompt": ["a", "b"], "completion": [1, 2]})
    elif case == "eval_text_null":
        kw["eval_dataset"] = Dataset.from_list([{"text": "x"}, {"text": None}])
    elif case == "readonly_output_dir":
        kw["args"] = lambda: sft_args(readonly_dir / "run")
    elif case == "readonly_export_dir":
        kw["args"] = lambda: sft_args(tmp_path / "run", export_dir=str(readonly_dir / "export"))
    elif case == "gptq_checkpoint_other_quantize_config":
        kw["model"] = gptq_dir
        kw["quantize_config"] = QuantizeConfig(bits=8, group_size=64)
    elif case == "missing_local_path":
        kw["model"] = str(tmp_path / "no" / "such" / "model")
    elif case == "r_not_integer":
        kw["qalora_config"] = lambda: QALoraConfig(r=4.5)
    elif case == "num_calibration_rows_0":
        kw["args"] = lambda: sft_args(tmp_path / "run", num_calibration_rows=0)
    return kw


@pytest.mark.parametrize("case", sorted(TRAINER_CASES))
def test_trainer_refuses_bad_input_before_any_work(case, tiny_float_dir, gptq_dir, tmp_path, monkeypatch, request):
    import qalora_hf.quantize as quantize_mod
    import qalora_hf.trainer as trainer_mod

    def no_work(*a, **k):
        raise AssertionError("quantisation/loading started before the input was checked")

    for mod, name in ((trainer_mod, "quantize_model"), (trainer_mod, "load_gptq_model"), (quantize_mod, "quantize_model")):
        monkeypatch.setattr(mod, name, no_work)
    readonly = request.getfixturevalue("readonly_dir") if case.startswith("readonly") else None
    kw = _trainer_case(case, tiny_float_dir, gptq_dir, tmp_path, readonly)
    with pytest.raises(ValueError, match=TRAINER_CASES[case]) as err:
        QALoraTrainer(**{k: v() if callable(v) else v for k, v in kw.items()})
    assert "\n" not in str(err.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


RECIPE_CASES = {
    "missing_model_path": r"--model_name_or_path=.*nope/model.*does not exist",
    "group_size_48": r"group_size=48, bits=4 is refused by gptqmodel's GPTQ kernel",
    "output_null": r"alpaca-bad\.json: row 3 has 'output' null; Alpaca rows need text",
    "output_int": r"alpaca-bad\.json: row 2 has 'output' a int \('3'\)",
    "instruction_null": r"alpaca-bad\.json: row 1 has 'instruction' null",
    "bits_vs_gptq_checkpoint": r"already a GPTQ checkpoint.*bits=8 \(the checkpoint has 4\).*leave --bits/--group_size",
    "lora_r_4_5_in_yaml": r"r must be a positive integer .*got 4\.5",
    "hub_model_id_not_a_repo": r"hub_model_id='not a repo' is not a valid repo id",
    "model_revision_dotdot": r"--model_revision='a\.\.b' is not a valid git revision",
    "readonly_output_dir": r"output_dir .* cannot be written",
    "target_module_unknown": r"target module 'nope_proj' matches no module",
    "invalid_json": r"alpaca-bad\.json is not valid JSON",
    "missing_dataset": r"dataset .*missing\.json not found",
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_recipe_refuses_bad_input_in_one_line_before_any_work(case, recipe, tiny_float_dir, gptq_dir, data_file, tmp_path,
                                                              monkeypatch, request):
    import qalora_hf.quantize as quantize_mod
    import qalora_hf.trainer as trainer_mod

    def no_work(*a, **k):
        raise AssertionError("quantisation/loading started before the input was checked")

    for mod, name in ((trainer_mod, "quantize_model"), (trainer_mod, "load_gptq_model"), (quantize_mod, "quantize_model")):
        monkeypatch.setattr(mod, name, no_work)
    out, bad = tmp_path / "run", tmp_path / "alpaca-bad.json"
    over = {}
    rows = alpaca_rows()
    model = str(tiny_float_dir)
    extra = []
    if case == "missing_model_path":
        model = str(tmp_path / "nope" / "model")
    elif case == "group_size_48":
        over["group_size"] = 48
    elif case in ("output_null", "output_int", "instruction_null"):
        rows[{"output_null": 3, "output_int": 2, "instruction_null": 1}[case]].update(
            {"output_null": {"output": None}, "output_int": {"output": 3}, "instruction_null": {"instruction": None}}[case])
    elif case == "bits_vs_gptq_checkpoint":
        model, over["bits"] = gptq_dir, 8
    elif case == "lora_r_4_5_in_yaml":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("lora_r: 4.5\n")
        extra = ["--config", str(cfg)]
    elif case == "hub_model_id_not_a_repo":
        over.update(push_to_hub=True, hub_model_id="not a repo")
    elif case == "model_revision_dotdot":
        over["model_revision"] = "a..b"
    elif case == "readonly_output_dir":
        out = request.getfixturevalue("readonly_dir") / "run"
    elif case == "target_module_unknown":
        over["lora_target_modules"] = "nope_proj"
    elif case == "invalid_json":
        bad.write_text(json.dumps(rows)[:-10])
    data = data_file
    if case in ("output_null", "output_int", "instruction_null"):
        bad.write_text(json.dumps(rows))
    if case in ("output_null", "output_int", "instruction_null", "invalid_json"):
        data = bad
    if case == "missing_dataset":
        data = tmp_path / "missing.json"
    argv = recipe_args(model, data, out, **over)
    if case == "lora_r_4_5_in_yaml":  # the YAML value, not overridden on the command line
        i = argv.index("--lora_r")
        argv = extra + argv[:i] + argv[i + 2:]
    with pytest.raises(SystemExit) as err:
        recipe.cli(argv)
    msg = str(err.value)
    assert msg.startswith("sft_alpaca: error: ") and "\n" not in msg, msg
    assert __import__("re").search(RECIPE_CASES[case], msg), msg
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------------------------------
# 6. an adapter trained on another base (same shapes) is refused on load and by `qalora-hf merge`


@pytest.fixture(scope="module")
def adapter_on_base_a(gptq_checkpoint, tmp_path_factory):
    from qalora_hf.model import get_qalora_model
    from qalora_hf.testing.tiny import load_gptq

    torch.manual_seed(0)
    model = get_qalora_model(load_gptq(gptq_checkpoint(4), 4), QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter-a") / "adapter"
    model.save_pretrained(path)
    return path


def test_adapter_records_its_base_and_another_base_is_refused(adapter_on_base_a, gptq_checkpoint):
    from qalora_hf.model import base_fingerprint, load_qalora_adapter
    from qalora_hf.testing.tiny import load_gptq

    recorded = json.loads((adapter_on_base_a / "adapter_config.json").read_text())["qalora_base"]
    assert len(recorded["sha256"]) == 64 and recorded["bits"] == 4 and recorded["group_size"] == 32
    first, last = recorded["layers"]  # the first and the last adapted layer
    assert first.startswith("model.layers.0.") and last.startswith("model.layers.1."), recorded

    same = load_gptq(gptq_checkpoint(4), 4)
    assert base_fingerprint(same, recorded["layers"])["sha256"] == recorded["sha256"]  # a fresh load: the same digest
    from qalora_hf.gptq import load_gptq_model

    bf16 = load_gptq_model(str(gptq_checkpoint(4)), dtype=torch.bfloat16)  # trained in bf16, merged in fp32: the same base
    assert base_fingerprint(bf16, recorded["layers"])["sha256"] == recorded["sha256"]
    load_qalora_adapter(same, str(adapter_on_base_a))  # the base it was trained on: accepted

    other = load_gptq(gptq_checkpoint(4, sym=True), 4)  # same shapes, other integers
    with pytest.raises(ValueError, match=r"was trained on another GPTQ base.*allow_other_base=True"):
        load_qalora_adapter(other, str(adapter_on_base_a))
    peft = load_qalora_adapter(load_gptq(gptq_checkpoint(4, sym=True), 4), str(adapter_on_base_a), allow_other_base=True)
    from safetensors.torch import load_file

    saved = load_file(str(adapter_on_base_a / "adapter_model.safetensors"))
    key = next(k for k in saved if "lora_B" in k)
    loaded = dict(peft.named_parameters())[key.replace(".weight", ".default.weight")]
    assert torch.equal(loaded.detach(), saved[key])  # loaded as asked


def test_cli_merge_refuses_another_base_unless_asked(adapter_on_base_a, gptq_checkpoint, tmp_path, capsys):
    from qalora_hf.cli import main as cli_main

    args = ["merge", "--base", str(gptq_checkpoint(4, sym=True)), "--adapter", str(adapter_on_base_a), "--strategy", "round",
            "--num-eval", "0"]
    code = cli_main(args + ["--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on another GPTQ base" in err and "--allow-other-base" in err, err
    assert len([line for line in err.splitlines() if line.startswith("qalora-hf: error:")]) == 1
    assert not (tmp_path / "out").exists()
    assert cli_main(args + ["--output-dir", str(tmp_path / "out2"), "--allow-other-base"]) == 0
    assert (tmp_path / "out2" / "config.json").is_file()


def _cli_error(capsys, args) -> tuple[int, str]:
    from qalora_hf.cli import main as cli_main

    code = cli_main([str(a) for a in args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, "\n".join(lines)


def test_cli_bad_input_is_refused_before_loading(adapter_on_base_a, gptq_checkpoint, tmp_path, capsys, monkeypatch,
                                                 readonly_dir):
    import qalora_hf.gptq as gptq_mod

    monkeypatch.setattr(gptq_mod, "load_gptq_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    merge = ["merge", "--base", gptq_checkpoint(4), "--adapter", adapter_on_base_a, "--strategy", "round"]
    cases = {
        "readonly_output_dir": (merge + ["--output-dir", readonly_dir / "out"], "--output-dir .* cannot be written"),
        "readonly_existing_output_dir": (merge + ["--output-dir", readonly_dir, "--overwrite"], "cannot be written"),
        "calibration_text_null": (merge + ["--output-dir", tmp_path / "o", "--strategy", "gptq", "--calibration-file",
                                           tmp_path / "calib.jsonl"], r"calib\.jsonl: row 1 has 'text' null"),
        "calibration_output_null": (merge + ["--output-dir", tmp_path / "o", "--strategy", "gptq", "--calibration-file",
                                             tmp_path / "calib.json"], r"calib\.json: row 0 has 'output' null"),
        "push_revision_dotdot": (["push", tmp_path / "folder", "user/name", "--revision", "a..b"],
                                 r"--revision='a\.\.b' is not a valid git revision"),
        "push_to_hub_not_a_repo": (merge + ["--output-dir", tmp_path / "o", "--push-to-hub", "not a repo"],
                                   "is not a valid repo id"),
    }
    (tmp_path / "calib.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n" + json.dumps({"text": None}) + "\n")
    (tmp_path / "calib.json").write_text(json.dumps([{"instruction": "x", "output": None}]))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    import re

    for name, (args, pattern) in cases.items():
        code, err = _cli_error(capsys, args)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("qalora-hf: error:"), (name, err)
        assert re.search(pattern, err), (name, err)
        assert not (tmp_path / "o").exists(), name
