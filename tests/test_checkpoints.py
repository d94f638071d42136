"""Resume picks the newest *complete* checkpoint: a save killed half-way (or a full disk) never blocks a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qalora_hf.checkpoints import checkpoint_problem, checkpoints, last_complete_checkpoint


def _checkpoint(root: Path, step: int) -> Path:
    """The files Trainer._save_checkpoint writes for a PEFT model, in its order."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    save_file({"lora_A": torch.randn(4, 2), "lora_B": torch.randn(8, 4)}, path / "adapter_model.safetensors")
    torch.save({"state": {0: torch.randn(16)}}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    torch.save({"python": 1}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 40}))
    return path


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_newest_complete_checkpoint_wins_and_incomplete_ones_say_why(tmp_path, caplog):
    assert last_complete_checkpoint(tmp_path / "missing") is None and last_complete_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40, 50, 60):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-100").mkdir()  # killed ~20 ms after the directory appeared
    (tmp_path / "checkpoint-60" / "trainer_state.json").unlink()  # killed before the state was written
    _truncate(tmp_path / "checkpoint-50" / "trainer_state.json")
    _truncate(tmp_path / "checkpoint-40" / "adapter_model.safetensors")  # disk full while saving the adapter
    _truncate(tmp_path / "checkpoint-30" / "optimizer.pt")
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 19}))
    assert [p.name for p in checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in (10, 20, 30, 40, 50, 60, 100)]

    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    reasons = {
        "checkpoint-100": "no trainer_state.json", "checkpoint-60": "no trainer_state.json",
        "checkpoint-50": "trainer_state.json is truncated", "checkpoint-40": "adapter_model.safetensors is truncated",
        "checkpoint-30": "optimizer.pt is truncated", "checkpoint-20": "names step 19",
    }
    for name, why in reasons.items():
        assert why in checkpoint_problem(tmp_path / name), name
        assert f"not resuming from {name}: " in caplog.text
    assert checkpoint_problem(tmp_path / "checkpoint-10") is None
