"""`QALoraSFTConfig`: TRL's `SFTConfig` plus the options of QA-LoRA's merge, export and model card."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from trl import SFTConfig

from .strategies import STRATEGIES


@dataclass
class QALoraSFTConfig(SFTConfig):
    """Everything :class:`~qalora_hf.QALoraTrainer` reads: TRL's ``SFTConfig`` (every field and default unchanged)
    plus what happens when training ends — merge into the GPTQ integers, measure, export, push.

    With ``push_to_hub=True`` the Trainer's own checkpoint pushes are switched off: only the merged export (with its
    card and ``adapter/``) is pushed, to the ``main`` branch of ``hub_model_id``.

    Raises:
        ValueError: from ``__post_init__``: an unknown ``merge_strategy``, ``num_calibration_rows < 1``,
            ``num_holdout_rows < 0``, an empty string in ``model_card_datasets``, a ``hub_model_id`` that is not a Hub
            repo id (``huggingface_hub.utils.validate_repo_id``) or a ``hub_revision`` that is not a git revision —
            each message names the field to change, before any model is loaded.
    """

    merge_at_end: bool = field(
        default=True,
        metadata={"help": "When training ends, merge the QA-LoRA adapters into the GPTQ integers, measure the merge, "
                          "export the merged model to export_dir and push it (with push_to_hub). Main process only."},
    )
    merge_strategy: str = field(
        default="distill",
        metadata={"help": "How the adapters are folded into the integers: "
                          + "; ".join(f"{s.name}: {s.summary}" for s in STRATEGIES.values()) + ".",
                  "choices": list(STRATEGIES)},
    )
    num_calibration_rows: int = field(
        default=256,
        metadata={"help": "Training rows whose activations calibrate the merge (H = X^T X, and the teacher of "
                          "'distill'). 256 = the 'distill' phase's 32 steps x 8 rows: each row is distilled once "
                          "(128 rows, each seen twice, kept 1 point less of the gain; docs/fidelity_matrix.md)."},
    )
    num_holdout_rows: int = field(
        default=32,
        metadata={"help": "Rows of eval_dataset (else the last training rows) on which the base, trained and merged "
                          "models are measured (held-out loss, gain kept, max logit difference). 0 skips the check."},
    )
    export_dir: Optional[str] = field(
        default=None, metadata={"help": "Where the merged GPTQ checkpoint is written (default: <output_dir>/export)."}
    )
    model_card_datasets: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Hub dataset ids the model card lists as training data (its `datasets` metadata); "
                          "omitted when not given."},
    )
    float_model_id: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id of the float model the GPTQ base was quantised from, for the model card "
                          "(default: the float model path given to the trainer, if any)."},
    )

    def __post_init__(self):
        from .checks import check_repo_id, check_revision

        super().__post_init__()
        if self.hub_model_id is not None:  # "not a repo" fails here, not when the export is pushed after training
            check_repo_id(self.hub_model_id, "hub_model_id")
        if self.hub_revision is not None:
            check_revision(self.hub_revision, "hub_revision")
        if self.merge_strategy not in STRATEGIES:
            raise ValueError(f"merge_strategy='{self.merge_strategy}' is unknown; choose one of {', '.join(STRATEGIES)}.")
        if self.num_calibration_rows < 1:
            raise ValueError(f"num_calibration_rows={self.num_calibration_rows}: the merge needs at least one calibration "
                             "row (a few hundred is typical).")
        if self.num_holdout_rows < 0:
            raise ValueError(f"num_holdout_rows={self.num_holdout_rows} must be >= 0 (0 skips the merge measurements).")
        if isinstance(self.model_card_datasets, str):
            self.model_card_datasets = [self.model_card_datasets]
        if self.model_card_datasets and not all(isinstance(d, str) and d.strip() for d in self.model_card_datasets):
            raise ValueError(f"model_card_datasets={self.model_card_datasets!r}: give Hub dataset ids such as "
                             "'tatsu-lab/alpaca', or leave it unset.")

    @classmethod
    def from_sft_config(cls, args: SFTConfig, **overrides) -> "QALoraSFTConfig":
        """A ``QALoraSFTConfig`` with the values of a plain ``SFTConfig`` (and ``overrides``); QA-LoRA options default."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        return cls(**{**values, **overrides})
