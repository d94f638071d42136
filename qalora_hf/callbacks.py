"""`QALoraMergeCallback`: merge, measure, export and push when training ends."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class QALoraMergeCallback(TrainerCallback):
    """At ``on_train_end``, the main process calls ``trainer.merge_and_export()``
    (:func:`qalora_hf.pipeline.merge_measure_export`); the others wait.

    ``on_train_end`` runs on every rank.  Only world process zero merges, measures, exports and
    pushes (no collective operation runs inside that block: the merge and the fidelity check use the
    unwrapped model on local data), then every rank meets at one barrier outside it.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            out = self.trainer.merge_and_export()
            logger.info("QA-LoRA merged model exported to %s", out)
        self.trainer.accelerator.wait_for_everyone()
        return control
