"""Fidelity matrix: train, merge, export and reload QA-LoRA across base and training configurations (issue 17).

    python bench/fidelity_matrix.py                      # every cell of DESIGN and GROUP_128 (hours on 2 CPU cores)
    python bench/fidelity_matrix.py --quick              # the smoke-test subset (QUICK)
    python bench/fidelity_matrix.py --cells b4-g64-sym-act-r16-lr2e-4-s40,...
    python bench/fidelity_matrix.py --table              # only print the table of what has been measured

Each cell is one (bits, group_size, sym, desc_act, lora_r, learning_rate, max_steps) of SmolLM2-135M-Instruct on
the Alpaca demo rows (everything else as `recipes/configs/smollm2_135m_cpu.yaml`). A cell runs, each step in its
own process and each skipped when its result is already on disk (so an interrupted run continues where it stopped):

1. ``recipes/sft_alpaca.py --merge_at_end false`` with the cell's options: quantises the float model with
   gptqmodel (cached per configuration) and trains the adapter, exactly as a user's run does;
2. ``bench/merge_fidelity.py`` on that base and adapter: held-out loss (the recipe's 99 held-out rows) of the
   base, the trained model (adapter unmerged) and each merge strategy's export (written with ``export_gptq`` and
   reloaded), and the QLoRA-style baseline (float-merge, then a fresh GPTQ of the merged float model);
3. where GGUF ``Q4_1`` holds the base (act-order off, group a multiple of 32), ``bench/gguf_fidelity.py`` on the
   same base and adapter: the GGUF written from base + unmerged adapter (``export_gguf(..., adapter=...)``, no
   merge), decoded by transformers' GGUF loader on the same rows, and run by llama.cpp when it is installed
   (``gguf.json``).

"gain kept" = (loss_base - loss_export) / (loss_base - loss_trained). The goal (issue 17): >= 99 % in every cell
whose gain is at least 0.02 nats, and above the QLoRA-style baseline everywhere.

**The design** (DESIGN below) is not full-factorial (2 x 3 x 2 x 2 x 2 x 2 x 2 = 192 cells): 9 cells in which every
level of every factor appears and every *pair* of levels of any two factors appears at least once (a strength-2
covering array, checked by :func:`pair_coverage`) over groups 32 and 64, plus GROUP_128: group 128, where
SmolLM2-135M's hidden size 576 (not a multiple of 128) gives every 576-wide layer a ragged last group of 64. The first
cell is the demo's configuration, the second the configuration where the default merge was first seen to keep only
94.5 %.

Results: ``bench/results/fidelity_matrix/<cell>/`` (``run/`` = the training run, ``fidelity.json``), and the table in
``bench/results/fidelity_matrix.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "bench" / "results" / "fidelity_matrix"
CONFIG = REPO / "recipes" / "configs" / "smollm2_135m_cpu.yaml"
MIN_GAIN = 0.02  # nats: below this, "gain kept" is noise (issue 17)
GOAL = 0.99
REQUANT = "QLoRA-style: float-merge + fresh GPTQ"  # bench/merge_fidelity.py's row of the QLoRA-style baseline
GGUF = "GGUF Q4_1 (base + adapter, no merge)"  # bench/gguf_fidelity.py, decoded by transformers' GGUF loader
GGUF_LLAMA = "same GGUF in llama.cpp"


@dataclass(frozen=True)
class Cell:
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    lora_r: int
    learning_rate: float
    max_steps: int

    @property
    def name(self) -> str:
        from qalora_hf.fidelity import cell_name

        return cell_name(asdict(self))


FACTORS = {
    "bits": (4, 3, 2),
    "group_size": (32, 64),
    "sym": (False, True),
    "desc_act": (False, True),
    "lora_r": (16, 64),
    "learning_rate": (2e-4, 2e-5),
    "max_steps": (40, 200),
}

DESIGN = [
    Cell(4, 32, False, False, 16, 2e-4, 40),   # the demo's configuration
    Cell(4, 64, True, True, 16, 2e-4, 40),     # where the default first kept 94.5 %
    Cell(3, 32, True, True, 64, 2e-4, 40),
    Cell(3, 64, False, False, 16, 2e-5, 40),
    Cell(2, 32, False, True, 64, 2e-5, 40),
    Cell(2, 64, True, False, 64, 2e-4, 40),
    Cell(4, 32, True, False, 64, 2e-5, 200),
    Cell(3, 64, True, False, 16, 2e-4, 200),
    Cell(2, 64, False, True, 16, 2e-4, 200),
]
# Group 128: SmolLM2-135M's 576 = 4 x 128 + 64, so GPTQ makes a ragged last group, which QA-LoRA pools as its own
# group (qalora_hf.adapter.group_counts).  Not in the covering array (its pairs with every other level would take at
# least three more cells): the Hub's most common GPTQ setting (4-bit, symmetric, act-order) trained as the demo is,
# its opposite in the quantisation factors (3-bit, asymmetric, act-order off; r64), and a third with the levels those
# lack (2 bits, lr 2e-5, 200 steps; asymmetric with act-order).  Together they hold group 128 with every level of
# every other factor (not every pair).  They count in the summary and the card's matrix like design cells.
GROUP_128 = [
    Cell(4, 128, True, True, 16, 2e-4, 40),
    Cell(3, 128, False, False, 64, 2e-4, 40),
    Cell(2, 128, False, True, 16, 2e-5, 200),
]
MATRIX_CELLS = DESIGN + GROUP_128  # the cells the summary, the README and the model card report
QUICK = [DESIGN[0].name, DESIGN[1].name]
# Not in the design: neighbours of the weak cell that change one factor each, to tell which factor weakens it.
DIAGNOSTIC = [
    Cell(4, 64, False, True, 16, 2e-4, 40),    # as DESIGN[1], asymmetric
    Cell(4, 64, True, False, 16, 2e-4, 40),    # as DESIGN[1], act-order off
    Cell(4, 32, True, True, 16, 2e-4, 40),     # as DESIGN[1], group 32
]


def pair_coverage(design: list[Cell]) -> list[str]:
    """Pairs of factor levels that no cell of ``design`` holds (empty: a strength-2 covering array)."""
    missing = []
    for (fa, la), (fb, lb) in itertools.combinations(FACTORS.items(), 2):
        seen = {(getattr(c, fa), getattr(c, fb)) for c in design}
        missing += [f"{fa}={a} x {fb}={b}" for a in la for b in lb if (a, b) not in seen]
    return missing


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "1"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "TORCHDYNAMO_DISABLE": "1"}  # gptqmodel's torch kernel would recompile per layer (same numbers eagerly)
    t = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if rc:
        raise SystemExit(f"fidelity_matrix: {' '.join(cmd[:3])} ... failed (exit {rc}); see {log}")
    print(f"   done in {time.time() - t:.0f} s", flush=True)


def run_cell(cell: Cell, strategies: str, requant: bool, python: str, train_only: bool = False, gguf: bool = True) -> dict:
    d = ROOT / cell.name
    d.mkdir(parents=True, exist_ok=True)
    run = d / "run"
    if not (run / "run_info.json").is_file():
        print(f"== {cell.name}: quantise + train", flush=True)
        _run([python, "recipes/sft_alpaca.py", "--config", str(CONFIG), "--output_dir", str(run), "--merge_at_end", "false",
              "--bits", str(cell.bits), "--group_size", str(cell.group_size), "--sym", str(cell.sym).lower(),
              "--desc_act", str(cell.desc_act).lower(), "--lora_r", str(cell.lora_r),
              "--learning_rate", str(cell.learning_rate), "--max_steps", str(cell.max_steps)], d / "train.log")
    if train_only:
        return {}
    info = json.loads((run / "run_info.json").read_text())
    from qalora_hf.checkpoints import last_complete_checkpoint

    adapter = last_complete_checkpoint(run)
    if adapter is None:
        raise SystemExit(f"fidelity_matrix: {run} holds no complete checkpoint")
    out = d / "fidelity.json"
    done = json.loads(out.read_text()) if out.is_file() else None
    wanted = [s for s in strategies.split(",") if s]
    have = set(done["results"]) if done else set()
    todo = [s for s in wanted if f"export: {s}" not in have]
    need_requant = requant and REQUANT not in have
    if todo or need_requant:
        print(f"== {cell.name}: merge {','.join(todo) or '-'}{' + QLoRA-style baseline' if need_requant else ''}", flush=True)
        part = d / "fidelity.part.json"
        _run([python, "bench/merge_fidelity.py", "--base", info["base_model"], "--adapter", str(adapter),
              "--strategies", ",".join(todo), "--label", cell.name, "--out", str(part)] + (["--requant"] if need_requant else []),
             d / "merge.log")
        new = json.loads(part.read_text())
        if done:  # keep what was measured before; base/trained rows are re-measured identically
            new["results"] = {**done["results"], **new["results"]}
        new["cell"] = asdict(cell)
        tmp = d / "fidelity.json.tmp"
        tmp.write_text(json.dumps(new, indent=2))
        tmp.replace(out)
        part.unlink()
        done = new
    gguf_out = d / "gguf.json"
    if gguf and gguf_holds(cell) and not gguf_out.is_file():
        print(f"== {cell.name}: GGUF Q4_1 from base + adapter (no merge)", flush=True)
        _run([python, "bench/gguf_fidelity.py", "--base", info["base_model"], "--adapter", str(adapter), "--out", str(gguf_out)],
             d / "gguf.log")
    return done


def gguf_holds(cell: Cell) -> bool:
    """Whether GGUF Q4_1 holds the cell's base exactly (the exporter's rule: its bits, act-order off, whole blocks)."""
    from qalora_hf.gguf_export import Q4_1_BITS, QK4_1

    return cell.bits in Q4_1_BITS and not cell.desc_act and cell.group_size % QK4_1 == 0


def measured(cell: Cell, root: Path = ROOT) -> Optional[dict]:
    """A measured cell's ``loss_base``, ``loss_trained``, ``gain`` (nats), ``date`` (of its ``fidelity.json``'s last
    measurement; None if it has none) and, per merge strategy and for ``"QLoRA-style"``, ``loss`` and ``gain_kept``;
    None when the cell has no ``fidelity.json`` yet.  A strategy's ``gain_kept_se`` is the paired-bootstrap standard
    error over the held-out rows (``qalora_hf.metrics.gain_kept_se``; None in results written before it existed)."""
    from qalora_hf.metrics import gain_kept

    f = root / cell.name / "fidelity.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    res = data["results"]
    lb, lt = res["base GPTQ"]["heldout_loss"], res["trained (adapter, unmerged)"]["heldout_loss"]
    out = {"loss_base": lb, "loss_trained": lt, "gain": lb - lt, "date": data.get("date")}
    for key, r in res.items():
        name = "QLoRA-style" if key == REQUANT else key.removeprefix("export: ") if key.startswith("export: ") else None
        if name:
            out[name] = {"loss": r["heldout_loss"], "gain_kept": gain_kept(lb, lt, r["heldout_loss"]),
                         "gain_kept_se": r.get("gain_kept_se"),  # over the held-out rows (measured since 2026-12-07)
                         # the distillation's hard-target weight; None: measured before it existed (the KL alone)
                         "distill_label_weight": (r.get("distill") or {}).get("label_weight")}
    g = root / cell.name / "gguf.json"
    if g.is_file():  # bench/gguf_fidelity.py, base + adapter: gain kept against its own base/trained losses (same rows)
        data = json.loads(g.read_text())
        out[GGUF] = {"loss": data["loss"]["gguf_transformers"], "gain_kept": data["gain_kept_transformers"]}
        if data.get("gain_kept_llama_cpp") is not None:
            out[GGUF_LLAMA] = {"loss": data["loss"]["gguf_llama_cpp"], "gain_kept": data["gain_kept_llama_cpp"]}
    return out


def _digits(column: str) -> int:
    """Decimals of a gain-kept percentage: two for the GGUF columns, which sit within hundredths of a point of 100 %."""
    return 2 if column in (GGUF, GGUF_LLAMA) else 1


def table(cells: list[Cell], strategies: list[str], root: Path = ROOT) -> tuple[str, dict]:
    head = ["cell", "bits", "group", "sym", "act-order", "r", "lr", "steps", "base", "trained", "gain (nats)"]
    head += [f"{s} kept" for s in strategies] + ["QLoRA-style kept", f"{GGUF} kept", f"{GGUF_LLAMA} kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary: dict = {s: [] for s in strategies + [GGUF, GGUF_LLAMA]}
    rows = {}
    for c in cells:
        row = measured(c, root)
        if row is None:
            continue
        gain = row["gain"]
        cells_out = [c.name + ("" if c in MATRIX_CELLS else " (diagnostic)"), str(c.bits), str(c.group_size), "sym" if c.sym else "asym", "on" if c.desc_act else "off",
                     str(c.lora_r), f"{c.learning_rate:g}", str(c.max_steps), f"{row['loss_base']:.4f}", f"{row['loss_trained']:.4f}", f"{gain:.4f}"]
        for s in strategies + ["QLoRA-style", GGUF, GGUF_LLAMA]:
            if s not in row:
                cells_out.append(("no Q4_1 (act-order)" if c.desc_act else "no Q4_1") if s in (GGUF, GGUF_LLAMA) and not gguf_holds(c) else "")
                continue
            kept = row[s]["gain_kept"]
            digits = _digits(s)
            mark = "" if s == "QLoRA-style" or gain < MIN_GAIN else (" ✓" if kept >= GOAL else f" (−{100 * (GOAL - kept):.{digits}f})")
            se = row[s].get("gain_kept_se")
            cells_out.append(f"{100 * kept:.{digits}f}%" + (f" ± {100 * se:.1f}" if se else "") + mark)
            if s in summary and gain >= MIN_GAIN and c in MATRIX_CELLS:
                summary[s].append(kept)
        rows[c.name] = row
        lines.append("| " + " | ".join(cells_out) + " |")
    stats = {s: {"cells": len(v), "min": min(v), "median": statistics.median(v)} for s, v in summary.items() if v}
    foot = [f"{s}: min {100 * v['min']:.{_digits(s)}f} %, median {100 * v['median']:.{_digits(s)}f} % over {v['cells']} "
            f"cells with a gain >= {MIN_GAIN} nats (design and group-128 cells; not the diagnostic ones)" for s, v in stats.items()]
    return "\n".join(lines + [""] + foot), {"rows": rows, "summary": stats}


def write_card_matrix(strategy: str, root: Path = ROOT, out: Optional[Path] = None) -> Path:
    """Write the package-data summary the model card cites (``qalora_hf/templates/fidelity_matrix.json``, read by
    ``qalora_hf/fidelity.py``): every design cell's ``gain`` (nats), ``gain_kept`` of ``strategy`` and of the
    QLoRA-style baseline, the distillation's ``distill_label_weight`` (None: measured before it existed, the KL
    alone), the ``date`` it was measured, and the min/median over the cells with a gain >= MIN_GAIN.

    A cell measured on this machine (``bench/results/fidelity_matrix/<cell>/fidelity.json``) replaces the shipped
    entry; a shipped cell of the same ``strategy`` that is not on disk is kept as it was (results are git-ignored,
    so a fresh clone that measures one cell must not drop the others).  ``root``/``out``: the results folder and the
    file written (default: the package's; tests point both elsewhere)."""
    import datetime

    from qalora_hf.fidelity import MATRIX, check_matrix

    today = datetime.date.today().isoformat()
    out = REPO / "qalora_hf" / "templates" / MATRIX if out is None else out
    shipped = check_matrix(json.loads(out.read_text())) if out.is_file() else None
    old = ({c["name"]: {**c, "date": c.get("date", shipped["date"])} for c in shipped["cells"]}
           if shipped and shipped["strategy"] == strategy else {})
    cells = []
    for c in MATRIX_CELLS:
        row = measured(c, root)
        if row is not None and strategy in row:
            cells.append({"name": c.name, **asdict(c), "gain": row["gain"], "gain_kept": row[strategy]["gain_kept"],
                          "qlora_style_kept": row["QLoRA-style"]["gain_kept"] if "QLoRA-style" in row else None,
                          "distill_label_weight": row[strategy]["distill_label_weight"],
                          "date": row["date"] or today})
        elif c.name in old:
            cells.append(old[c.name])
    counted = [c["gain_kept"] for c in cells if c["gain"] >= MIN_GAIN]
    matrix = check_matrix({
        "date": today, "model": "SmolLM2-135M-Instruct",
        "data": "Alpaca demo rows (900 train / 99 held out)", "command": "python bench/fidelity_matrix.py",
        "strategy": strategy,
        "summary": {"cells": len(counted), "min": min(counted), "median": statistics.median(counted)} if counted else None,
        "cells": cells,
    })
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(matrix, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out} ({len(cells)} cells, {sum(c['date'] == today for c in cells)} measured today)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, without the QLoRA-style baseline")
    ap.add_argument("--cells", default=None, help="comma-separated cell names of DESIGN, GROUP_128 or DIAGNOSTIC "
                                                  "(default: all of DESIGN and GROUP_128)")
    ap.add_argument("--strategies", default="distill", help="merge strategies to measure in every cell (merge_fidelity.py syntax)")
    ap.add_argument("--no-requant", action="store_true", help="skip the QLoRA-style baseline (a GPTQ run per cell)")
    ap.add_argument("--no-gguf", action="store_true", help="skip the GGUF Q4_1 export from base + adapter")
    ap.add_argument("--table", action="store_true", help="only print the table of the cells measured so far")
    ap.add_argument("--train-only", action="store_true", help="only quantise and train the cells (merge them later)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--update-card-matrix", metavar="STRATEGY", default=None,
                    help="write the measured design cells' results for STRATEGY (the default merge) into "
                         "qalora_hf/templates/fidelity_matrix.json, the summary every model card cites (cells not "
                         "measured here keep their shipped entry); alone, it runs nothing")
    args = ap.parse_args(argv)

    missing = pair_coverage(DESIGN)
    if missing:
        raise SystemExit(f"DESIGN misses level pairs: {missing}")
    by_name = {c.name: c for c in MATRIX_CELLS + DIAGNOSTIC}
    names = QUICK if args.quick else (args.cells.split(",") if args.cells else [c.name for c in MATRIX_CELLS])
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; the design's cells: {', '.join(by_name)}")
    strategies = [s for s in args.strategies.split(",") if s]
    print(f"design: {len(DESIGN)} cells, every pair of levels of every two factors covered, and {len(GROUP_128)} group-128 "
          f"cell(s); running {len(names)}", flush=True)
    run = not args.table and not (args.update_card_matrix and not (args.cells or args.quick))
    if run:  # --update-card-matrix alone writes what is measured; it never starts the whole design
        for n in names:
            run_cell(by_name[n], args.strategies, requant=not (args.no_requant or args.quick), python=args.python,
                     train_only=args.train_only, gguf=not args.no_gguf)
    if args.update_card_matrix:
        write_card_matrix(args.update_card_matrix)
    md, payload = table(MATRIX_CELLS + [c for c in DIAGNOSTIC if c.name in names or (ROOT / c.name / "fidelity.json").is_file()], strategies)
    print("\n" + md)
    (ROOT.parent / "fidelity_matrix.md").write_text(md + "\n")
    (ROOT.parent / "fidelity_matrix.json").write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
