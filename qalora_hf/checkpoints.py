"""Which ``checkpoint-N`` directory of a Trainer run can be resumed from, and whether a run has finished.

transformers' ``get_last_checkpoint`` returns the highest-numbered ``checkpoint-N`` whatever its state, so a
run killed while ``checkpoint-N`` was being written (or a disk that filled during a save) makes every rerun
fail with "Can't find a valid checkpoint" until the directory is deleted by hand.  The Trainer writes a
checkpoint in this order: the model (adapter) files, ``optimizer.pt`` / ``scheduler.pt`` / ``rng_state*.pth``,
then ``trainer_state.json`` (``Trainer._save_checkpoint``), so a checkpoint is complete when its
``trainer_state.json`` parses and names step N, and every file before it reads back whole.
:func:`checkpoint_mismatch` tells whether a complete checkpoint belongs to the model about to resume from it.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zipfile
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def _safetensors_whole(path: Path) -> bool:
    """The header parses and the file is as long as the header says."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, struct.error, TypeError):
        return False


def _torch_zip_whole(path: Path) -> bool:
    """A ``torch.save`` file (a zip archive) whose central directory reads back."""
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def checkpoint_problem(path: str | Path) -> Optional[str]:
    """Why ``path`` (a ``checkpoint-N`` directory) cannot be resumed from, or ``None`` when it is complete."""
    path = Path(path)
    match = _CHECKPOINT.match(path.name)
    if not match or not path.is_dir():
        return "not a checkpoint-N directory"
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE} (the save was interrupted)"
    except (OSError, ValueError):
        return f"{TRAINER_STATE} is truncated or unreadable"
    if state.get("global_step") != int(match.group(1)):
        return f"{TRAINER_STATE} names step {state.get('global_step')}, not {match.group(1)}"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no model or adapter weights (*.safetensors)"
    for f in weights:
        if not _safetensors_whole(f):
            return f"{f.name} is truncated"
    for f in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")):
        if not _torch_zip_whole(f):
            return f"{f.name} is truncated"
    return None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` directory of ``output_dir``, oldest (smallest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def last_complete_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete ``checkpoint-N`` of ``output_dir`` (see :func:`checkpoint_problem`), or ``None``.

    Newer incomplete checkpoints are skipped with a warning that names them and says why.
    """
    for path in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("not resuming from %s: %s; falling back to the checkpoint before it", path.name, problem)
    return None


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def checkpoint_mismatch(path: str | Path, model) -> Optional[str]:
    """Why the adapter of checkpoint ``path`` does not belong to ``model`` (a ``peft.PeftModel``), or ``None``.

    Compared: the adapter's tensors (names and shapes, from the safetensors header, against
    ``peft.get_peft_model_state_dict(model)``), then the GPTQ base it was trained on (``qalora_base`` in its
    ``adapter_config.json`` against the model's, see :func:`qalora_hf.model.base_fingerprint`).  A checkpoint of
    another run in the same ``output_dir`` (another rank ``r``, other ``target_modules``, another base) would
    otherwise fail inside the Trainer's resume with a size-mismatch traceback, or resume silently onto another base.
    """
    from peft import get_peft_model_state_dict

    from .config import BASE_KEY

    path = Path(path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return "no adapter_model.safetensors (not a PEFT adapter checkpoint)"
    have = _safetensors_shapes(weights)
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        name = (missing or extra)[0]
        return (f"{len(missing)} adapter tensors missing and {len(extra)} unexpected, e.g. {name}: other "
                "target_modules or another model")
    for key in sorted(want):
        if want[key] != have[key]:
            return f"{key} has shape {list(have[key])} there, {list(want[key])} here: another lora_r or model"
    try:
        recorded = json.loads((path / "adapter_config.json").read_text()).get(BASE_KEY)
    except (OSError, ValueError):
        recorded = None
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    current = getattr(config, BASE_KEY, None)
    if recorded and current and recorded.get("sha256") != current.get("sha256"):
        return (f"trained on another GPTQ base ({BASE_KEY} sha256 {str(recorded.get('sha256'))[:16]}... there, "
                f"{str(current.get('sha256'))[:16]}... here)")
    return None


def checkpoint_global_step(path: str | Path) -> int:
    """``global_step`` recorded in a checkpoint's ``trainer_state.json``."""
    return int(json.loads((Path(path) / TRAINER_STATE).read_text())["global_step"])
