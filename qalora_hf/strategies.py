"""The merge strategies as data: which phases each one runs after the integer zero-point merge.

:func:`qalora_hf.merge.merge_qalora` reads these flags; it never compares strategy names.  docs/merge.md has
the math of each phase.  No torch import here, so option parsers (the CLI, :class:`~qalora_hf.QALoraSFTConfig`)
can list the strategies cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class MergeStrategy:
    """Which phases a merge strategy runs after the integer zero-point merge (docs/merge.md, "Strategies").

    Attributes:
        name: the strategy's name (``merge_qalora(strategy=name)``).
        refit_scales: ``H``-weighted least-squares refit of the fp16 group scales (``qalora_hf.merge._refit_scales``).
        rechoose_codes: codes re-chosen on the fixed grid by GPTQ's error feedback (``qalora_hf.merge._fixed_grid_gptq``).
        distill: scale-only distillation of the whole merged model (:func:`~qalora_hf.scale_distillation.distill_scales`).
        summary: one line for ``--help`` texts.
        refine_codes: sweeps of cyclic coordinate descent on the codes after the fixed-grid GPTQ pass
            (``qalora_hf.merge._refine_codes``: QuantEase, Behdin et al. 2023); 0 (every shipped strategy) = none.
    """

    name: str
    refit_scales: bool
    rechoose_codes: bool
    distill: bool
    summary: str
    refine_codes: int = 0

    @property
    def needs_calibration(self) -> bool:
        """Whether the strategy needs calibration batches (``H``, and the teacher's targets for ``distill``)."""
        return self.refit_scales or self.rechoose_codes or self.distill


STRATEGIES: dict[str, MergeStrategy] = {
    s.name: s
    for s in (
        MergeStrategy("round", refit_scales=False, rechoose_codes=False, distill=False,
                      summary="zero-points only (the paper's merge rounded to integers; reference)"),
        MergeStrategy("gptq", refit_scales=False, rechoose_codes=True, distill=False,
                      summary="zero-points, then codes re-chosen on the fixed grid by GPTQ"),
        MergeStrategy("scales", refit_scales=True, rechoose_codes=True, distill=False,
                      summary="as gptq, after a calibration-weighted refit of the fp16 scales"),
        MergeStrategy("distill", refit_scales=True, rechoose_codes=True, distill=True,
                      summary="scales, then scale-only distillation towards the trained model and the labels (default)"),
    )
}


def get_strategy(strategy: Union[str, MergeStrategy]) -> MergeStrategy:
    """The :class:`MergeStrategy` named ``strategy`` (or ``strategy`` itself).

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(strategy, MergeStrategy):
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown merge strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}.")
    return STRATEGIES[strategy]
