"""The fidelity matrix the model card cites: the measured configuration nearest to a model's, and the gain it kept.

``bench/fidelity_matrix.py`` trains, merges and exports QA-LoRA on SmolLM2-135M-Instruct + the Alpaca demo rows in
several *cells* (bits, group_size, sym, desc_act, lora_r, learning_rate, max_steps) and measures in each the fraction
of the fine-tuning gain the merged GPTQ export keeps.  A summary ships as package data,
``qalora_hf/templates/fidelity_matrix.json`` (read with ``importlib.resources``)::

    {"date": "2026-12-02", "model": "SmolLM2-135M-Instruct", "data": "...", "command": "python bench/fidelity_matrix.py",
     "strategy": "distill", "summary": {"cells": 9, "min": 0.97, "median": 0.985},
     "cells": [{"name": "b4-g32-asym-noact-r16-lr2e-4-s40", "bits": 4, "group_size": 32, "sym": false,
                "desc_act": false, "lora_r": 16, "learning_rate": 0.0002, "max_steps": 40,
                "gain": 0.17, "gain_kept": 0.981, "qlora_style_kept": 0.54, "date": "2026-12-02"}]}

``gain`` is in nats per token (held-out loss of the base minus that of the trained model), ``gain_kept`` and
``qlora_style_kept`` are fractions (1.0 = the whole gain), a cell's optional ``date`` is when it was measured
(the card cites it; else the matrix's ``date``), ``summary`` is over the cells the benchmark counts (its
``min`` and ``median`` of ``gain_kept``).  An empty matrix (``"cells": []``) makes :func:`matrix_cell` return None and
the card say nothing.
"""

from __future__ import annotations

import importlib.resources
import json
import math
from typing import Any, Optional

MATRIX = "fidelity_matrix.json"  # in qalora_hf/templates/ (package data)
QUANT_FACTORS = ("bits", "group_size", "sym", "desc_act")
TRAIN_FACTORS = ("lora_r", "learning_rate", "max_steps")
FACTORS = QUANT_FACTORS + TRAIN_FACTORS
# Equal quantisation factors count with these weights: bits outweighs the other three together (a 2-bit cell says
# little about a 4-bit model, whatever its group size).
QUANT_WEIGHTS = {"bits": 4, "group_size": 1, "sym": 1, "desc_act": 1}
MATRIX_KEYS = ("date", "model", "data", "command", "strategy", "summary", "cells")
CELL_KEYS = ("name",) + FACTORS + ("gain", "gain_kept")


def check_matrix(matrix: dict) -> dict:
    """``matrix`` itself, checked to have :data:`MATRIX_KEYS`, and in every cell :data:`CELL_KEYS`.

    Raises:
        ValueError: a key is missing (named in the message), or ``cells`` is not a list.
    """
    missing = [k for k in MATRIX_KEYS if k not in matrix]
    if missing or not isinstance(matrix.get("cells"), list):
        raise ValueError(f"fidelity matrix: missing {missing or ['cells (a list)']}.")
    for i, cell in enumerate(matrix["cells"]):
        missing = [k for k in CELL_KEYS if k not in cell]
        if missing:
            raise ValueError(f"fidelity matrix: cell {i} ({cell.get('name', '?')}) has no {', '.join(missing)}.")
    return matrix


def load_matrix(name: str = MATRIX) -> dict:
    """The fidelity matrix shipped in ``qalora_hf/templates/<name>`` (works from a wheel as from a source tree).

    Raises:
        ValueError: as :func:`check_matrix`.
    """
    text = importlib.resources.files("qalora_hf").joinpath("templates", name).read_text(encoding="utf-8")
    return check_matrix(json.loads(text))


def model_config(quantization_config: dict, qalora_config: Optional[dict] = None,
                 training_args: Optional[dict] = None) -> dict:
    """The matrix factors of a run: ``bits``, ``group_size``, ``sym``, ``desc_act`` from the GPTQ base's
    ``quantization_config`` (before the merge: the merged model is always ``sym=False``), ``lora_r`` from the adapter
    config's ``r``, ``learning_rate`` and ``max_steps`` from the training arguments (None when unknown, or when
    ``max_steps`` <= 0, i.e. training ran by epochs)."""
    qc, lora, args = quantization_config, qalora_config or {}, training_args or {}
    steps = args.get("max_steps")
    return {
        "bits": int(qc["bits"]), "group_size": int(qc.get("group_size", -1)), "sym": bool(qc.get("sym", True)),
        "desc_act": bool(qc.get("desc_act", False)), "lora_r": lora.get("r"), "learning_rate": args.get("learning_rate"),
        "max_steps": steps if isinstance(steps, int) and steps > 0 else None,
    }


def lr_text(lr: float) -> str:
    """``2e-4`` for 0.0002, ``1.5e-5`` for 1.5e-05 (as in the matrix's cell names and the card)."""
    mantissa, exp = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def cell_name(config: dict) -> str:
    """A cell's name from its seven factors, e.g. ``b4-g64-sym-act-r16-lr2e-4-s40``."""
    c = config
    return (f"b{c['bits']}-g{c['group_size']}-{'sym' if c['sym'] else 'asym'}-{'act' if c['desc_act'] else 'noact'}"
            f"-r{c['lora_r']}-lr{lr_text(c['learning_rate'])}-s{c['max_steps']}")


def _same(factor: str, a: Any, b: Any) -> bool:
    if factor == "learning_rate":
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    if factor in ("sym", "desc_act"):
        return bool(a) == bool(b)
    return int(a) == int(b)


def matrix_cell(config: dict, matrix: Optional[dict] = None) -> Optional[dict]:
    """The measured cell of the fidelity matrix that matches ``config``, else the nearest one.

    Nearest: the most equal quantisation factors, weighted by :data:`QUANT_WEIGHTS` (bits more than the other three
    together), then the most equal training factors; among equals, the first cell of the matrix.  A training factor
    that is None or absent in ``config`` is unknown: compared with no cell, never in ``differs``.

    Args:
        config: ``bits``, ``group_size`` (int), ``sym``, ``desc_act`` (bool) of the GPTQ base, and optionally
            ``lora_r`` (int), ``learning_rate`` (float) and ``max_steps`` (int) of the training (see :func:`model_config`).
        matrix: a matrix in the module's format (default: the shipped one, :func:`load_matrix`).

    Returns:
        None when the matrix has no cells; else ``{"cell": <the cell's dict>, "exact": bool (all seven factors known
        and equal), "differs": [names of the factors, in :data:`FACTORS` order, whose value differs], "summary":
        <the matrix's summary>}``.

    Raises:
        ValueError: ``config`` lacks a quantisation factor, or the matrix is malformed (:func:`check_matrix`).
    """
    missing = [k for k in QUANT_FACTORS if config.get(k) is None]
    if missing:
        raise ValueError(f"matrix_cell: the configuration has no {', '.join(missing)}.")
    matrix = load_matrix() if matrix is None else check_matrix(matrix)
    if not matrix["cells"]:
        return None
    known = [k for k in FACTORS if config.get(k) is not None]

    def score(cell: dict) -> tuple[int, int]:
        quant = sum(QUANT_WEIGHTS[k] for k in QUANT_FACTORS if _same(k, config[k], cell[k]))
        train = sum(1 for k in TRAIN_FACTORS if k in known and _same(k, config[k], cell[k]))
        return quant, train

    cell = max(matrix["cells"], key=score)  # max keeps the first of equal scores
    differs = [k for k in known if not _same(k, config[k], cell[k])]
    return {"cell": cell, "exact": not differs and len(known) == len(FACTORS), "differs": differs,
            "summary": matrix.get("summary")}
