"""bench/fidelity_matrix.py's bookkeeping (issue 17): the design covers every pair of factor levels, and the card's
matrix keeps the shipped cells a fresh clone did not re-measure while replacing the ones it did."""

from __future__ import annotations

import datetime
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fm():
    spec = importlib.util.spec_from_file_location("fidelity_matrix_bench", REPO / "bench" / "fidelity_matrix.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def test_design_is_a_pairwise_covering_array(fm):
    assert fm.pair_coverage(fm.DESIGN) == []
    # Without the 2-bit asymmetric act-order cell, pairs only it held are reported missing.
    missing = fm.pair_coverage([c for c in fm.DESIGN if c.name != "b2-g32-asym-act-r64-lr2e-5-s40"])
    assert "bits=2 x group_size=32" in missing and "bits=2 x learning_rate=2e-05" in missing


def _fidelity(root: Path, cell, base: float, trained: float, export: float, requant: float, label_weight=None) -> None:
    d = root / cell.name
    d.mkdir(parents=True)
    distill = {} if label_weight is None else {"distill": {"label_weight": label_weight}}
    res = {"base GPTQ": {"heldout_loss": base}, "trained (adapter, unmerged)": {"heldout_loss": trained},
           "export: distill": {"heldout_loss": export, **distill}, "QLoRA-style: float-merge + fresh GPTQ": {"heldout_loss": requant}}
    (d / "fidelity.json").write_text(json.dumps({"results": res}))


def test_card_matrix_keeps_unmeasured_cells_and_replaces_measured_ones(fm, tmp_path):
    demo, weak, third = fm.DESIGN[0], fm.DESIGN[1], fm.DESIGN[2]
    old_cell = lambda c, kept: {"name": c.name, **fm.asdict(c), "gain": 0.1, "gain_kept": kept, "qlora_style_kept": None}
    shipped = {"date": "2026-11-30", "model": "SmolLM2-135M-Instruct", "data": "d", "command": "c", "strategy": "distill",
               "summary": {"cells": 2, "min": 0.5, "median": 0.6},
               "cells": [old_cell(demo, 0.5), {**old_cell(weak, 0.7), "date": "2026-11-29"}]}
    out = tmp_path / "fidelity_matrix.json"
    out.write_text(json.dumps(shipped))
    root = tmp_path / "results"
    _fidelity(root, demo, 2.0, 1.8, 1.802, 1.9)     # 99 % kept, QLoRA-style 50 %
    _fidelity(root, third, 3.0, 2.0, 2.05, 2.5, label_weight=0.05)     # 95 % kept

    fm.write_card_matrix("distill", root=root, out=out)
    got = json.loads(out.read_text())
    today = datetime.date.today().isoformat()
    by = {c["name"]: c for c in got["cells"]}
    assert [c["name"] for c in got["cells"]] == [demo.name, weak.name, third.name]  # DESIGN order
    assert by[demo.name]["gain_kept"] == pytest.approx(0.99) and by[demo.name]["qlora_style_kept"] == pytest.approx(0.5)
    assert by[demo.name]["gain"] == pytest.approx(0.2) and by[demo.name]["date"] == today
    assert by[weak.name] == {**shipped["cells"][1]}  # not on disk: kept as shipped, with its own date
    assert by[third.name]["gain_kept"] == pytest.approx(0.95)
    assert by[third.name]["distill_label_weight"] == 0.05 and by[demo.name]["distill_label_weight"] is None
    assert got["summary"]["cells"] == 3 and got["summary"]["min"] == pytest.approx(0.7)
    assert got["summary"]["median"] == pytest.approx(0.95)
    assert not list(tmp_path.glob("*.tmp"))

    # A shipped matrix of another strategy is not mixed in: only what is measured for this one.
    out.write_text(json.dumps({**shipped, "strategy": "round"}))
    fm.write_card_matrix("distill", root=root, out=out)
    assert [c["name"] for c in json.loads(out.read_text())["cells"]] == [demo.name, third.name]


def test_table_reads_the_gguf_export_of_base_plus_adapter(fm, tmp_path):
    demo, act = fm.DESIGN[0], fm.DESIGN[1]
    assert fm.gguf_holds(demo) and not fm.gguf_holds(act)
    root = tmp_path / "results"
    _fidelity(root, demo, 2.0, 1.8, 1.803, 1.9)  # the GPTQ merge keeps 98.5 %
    _fidelity(root, act, 2.0, 1.9, 1.901, 1.95)
    (root / demo.name / "gguf.json").write_text(json.dumps({
        "loss": {"base": 2.0, "trained": 1.8, "gguf_transformers": 1.8001, "gguf_llama_cpp": 1.81, "base_gguf_llama_cpp": 2.008},
        "gain_kept_transformers": 0.9995, "gain_kept_llama_cpp": 0.99}))
    row = fm.measured(demo, root)
    assert row[fm.GGUF]["gain_kept"] == pytest.approx(0.9995) and row[fm.GGUF_LLAMA]["loss"] == pytest.approx(1.81)
    md, payload = fm.table([demo, act], ["distill"], root)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| b")}
    assert "98.5% (−0.5)" in lines[demo.name] and "99.95% ✓" in lines[demo.name] and "99.00% ✓" in lines[demo.name]
    assert lines[act.name].count("no Q4_1 (act-order)") == 2
    assert payload["summary"][fm.GGUF] == {"cells": 1, "min": pytest.approx(0.9995), "median": pytest.approx(0.9995)}

    # A GGUF miss of a few hundredths of a point reads as one, not as "(−0.0)" or a rounded-up 99.0 % minimum.
    gguf = json.loads((root / demo.name / "gguf.json").read_text())
    (root / demo.name / "gguf.json").write_text(json.dumps({**gguf, "gain_kept_llama_cpp": 0.9896}))
    md, _ = fm.table([demo, act], ["distill"], root)
    assert "98.96% (−0.04)" in md and f"{fm.GGUF_LLAMA}: min 98.96 %" in md
