"""Merge fidelity of every merge strategy on one trained QA-LoRA adapter (docs/benchmarks.md, #4).

    python bench/merge_fidelity.py --base <GPTQ base dir> --adapter <adapter dir> [--requant]

Rows: base GPTQ, trained (adapter unmerged), float-merged reference (dequantised W + dW in a float
model), each merge strategy's export (merged in memory, written with export_gptq and reloaded), and
with ``--requant`` the "QLoRA-style" baseline (float-merge, then a fresh gptqmodel GPTQ quantisation).
Columns: held-out Alpaca loss, fraction of the fine-tuning gain kept, MMLU subset accuracy, codes /
scales / zero-points changed, zero-points clamped, merge seconds.  Also the distribution of the shift
t = D/s in quantisation steps.  Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the demo's MMLU scorer (demo/evaluation.py)


def float_reference(peft_model):
    """A float ``LlamaForCausalLM``-style model with ``W = dequant(base) + dW`` in every adapted layer."""
    from transformers import AutoModelForCausalLM

    from qalora_hf.adapter import group_delta
    from qalora_hf.gptq_format import read_layer
    from qalora_hf.merge import qalora_layers
    from qalora_hf.gptq import gptq_layers

    base = peft_model.get_base_model()
    cfg = copy.deepcopy(base.config)
    del cfg.quantization_config
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {k: v for k, v in base.state_dict().items() if not any(x in k for x in ("qweight", "qzeros", "scales", "g_idx", "wf_unsqueeze", "lora_"))}
    sd = {k.replace(".base_layer", ""): v for k, v in sd.items()}
    adapted = {n.removeprefix("base_model.model."): m for n, m in qalora_layers(peft_model).items()}
    for name, layer in gptq_layers(base).items():
        name = name.replace(".base_layer", "")
        t = read_layer(layer)
        w = t.dequantize()
        if name in adapted:
            w = w + group_delta(adapted[name])[t.g_idx].t()
        sd[f"{name}.weight"] = w
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"float reference: missing {missing[:5]}, unexpected {unexpected[:5]}")
    ref.tie_weights()
    return ref.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", default=None, help="Alpaca JSON (default: the fetch cache)")
    ap.add_argument("--holdout", type=int, default=99)
    ap.add_argument("--calibration", type=int, default=256, help="training rows for H = X^T X and the teacher targets (the default of a strategy's ROWS field; 256 = the trainer's num_calibration_rows)")
    ap.add_argument("--gptq-calibration", type=int, default=128, help="training rows of the QLoRA-style baseline's fresh GPTQ (the recipe's gptq_calibration_rows)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--strategies", default="round,gptq,scales,distill", help="comma-separated; distill@N = distill with N steps, distill@N@LR also sets its learning rate ('auto', 'rule' = one run at 2 x the median shift, or a number), distill@N@LR@all distils every non-padding position (default: the loss positions; the labels still score the auto search), distill@N@LR@POS@ROWS calibrates on the first ROWS training rows (default --calibration), distill@N@LR@POS@ROWS@norms also tunes the normalisation layers' weights (norm tweaking)")
    ap.add_argument("--distill-steps", type=int, default=32)
    ap.add_argument("--distill-lr", type=lambda v: v if v == "auto" else float(v), default="auto", help="'auto' (merge_qalora's default) or a number")
    ap.add_argument("--mmlu-per-topic", type=int, default=0, help="0 = skip MMLU")
    ap.add_argument("--requant", action="store_true", help="also run the QLoRA-style float-merge + fresh GPTQ baseline")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default="bench/results/merge_fidelity.json")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from demo.evaluation import load_mmlu_subset, mmlu_accuracy
    from qalora_hf.cache import default_cache_dir
    from qalora_hf.data import read_rows, token_batches
    from qalora_hf.export import export_gptq
    from qalora_hf.metrics import Measurement, gain_kept, gain_kept_se, measure
    from qalora_hf.merge import collect_hessians, merge_qalora, qalora_layers
    from qalora_hf.model import load_qalora_adapter
    from qalora_hf.gptq import load_gptq_model
    from qalora_hf.data import forward_inputs
    from qalora_hf.scale_distillation import heldout_scores, teacher_topk
    from qalora_hf.strategies import get_strategy

    data = args.data or str(default_cache_dir() / "data" / "alpaca_en_demo.json")
    rows = read_rows(data)
    tok = AutoTokenizer.from_pretrained(args.base)
    holdout = token_batches(rows[-args.holdout :], tok, args.max_length)
    cal_rows = rows[: args.gptq_calibration]  # the QLoRA-style baseline's GPTQ rows
    mmlu = load_mmlu_subset(default_cache_dir() / "data" / "mmlu.jsonl", per_topic=args.mmlu_per_topic) if args.mmlu_per_topic else []

    def evaluate(model, kl_to_trained: bool = True):
        m = measure(model, holdout)  # per-row losses kept for the gain kept's standard error (gain_kept_se)
        out = {"heldout_loss": m.loss, "row_loss_sums": m.row_loss_sums, "row_tokens": m.row_tokens}
        if kl_to_trained:  # how far from the trained model: top-k KL to it on the held-out rows' loss positions
            out["heldout_kl_to_trained"] = heldout_scores(model, trained_targets)["kl"]
        if mmlu:
            out["mmlu_acc"] = mmlu_accuracy(model, tok, mmlu)
        return out

    peft_model = load_qalora_adapter(load_gptq_model(args.base), args.adapter).eval()
    with torch.no_grad():  # the trained model's top-k next-token log-probabilities on the held-out rows
        trained_targets = [teacher_topk(b, peft_model(**forward_inputs(b)).logits) for b in holdout]
    results = {}
    t = time.time()
    with peft_model.disable_adapter():
        results["base GPTQ"] = evaluate(peft_model, kl_to_trained=False)
    results["trained (adapter, unmerged)"] = evaluate(peft_model, kl_to_trained=False)
    print(f"base / trained evaluated ({time.time() - t:.0f}s): {_brief(results)}", flush=True)
    ref = float_reference(peft_model)
    results["float-merged reference"] = evaluate(ref)
    t = time.time()
    layers = qalora_layers(peft_model)
    names = [s for s in args.strategies.split(",") if s]
    # "distill@32@auto@loss@256": the fifth field is the number of calibration rows (default --calibration); the
    # statistics are collected once per distinct count, in chunks of rows, and summed (H of 256 rows = H of the first
    # 128 + H of the next 128), so every count sees the same first rows
    counts = sorted({int((n.split("@") + [""] * 4)[4] or args.calibration) for n in names} | {args.calibration})
    stats = {}  # rows -> (hessians, input sums, targets at the loss positions, targets at every position)
    hessians, sums, targets, targets_all, done = {}, {}, [], [], 0

    def record(batch, logits):
        targets.append(teacher_topk(batch, logits))  # the trained model's top-k next-token log-probabilities
        targets_all.append(teacher_topk(batch, logits, loss_positions_only=False))  # the "@all" variant's

    for count in counts:
        chunk = token_batches(rows[done:count], tok, args.max_length)
        more_sums = {}
        more = collect_hessians(peft_model, [f"{n}.base_layer" for n in layers], chunk, on_output=record, input_sums=more_sums)
        hessians = {k: hessians[k] + v if k in hessians else v for k, v in more.items()}
        sums = {k: sums[k] + v if k in sums else v for k, v in more_sums.items()}
        stats[count] = (dict(hessians), dict(sums), list(targets), list(targets_all))
        done = count
        print(f"H and teacher targets collected on {count} rows in {time.time() - t:.0f}s", flush=True)

    shift_stats = None
    for name in names:
        # "distill@64": the distill strategy with 64 steps; "distill@32@2e-3": 32 steps at distill_lr 2e-3;
        # "distill@32@auto@all": distilled at every non-padding position instead of the loss positions only;
        # "distill@32@auto@loss@256": on 256 calibration rows; "distill@32@auto@loss@256@norms": with norm tweaking;
        # "...@bias": with bias correction after the integer merge; "...@keepcodes": the base's codes kept (diagnostic);
        # "...@cd4": up to 4 sweeps of coordinate descent on the codes after the GPTQ pass (QuantEase)
        # "...@ce0.5": half KL, half cross-entropy on the labels (hard targets; default 0.05, "@ce0" = the KL alone)
        strategy, steps, lr, positions, count, extra = (name.split("@") + [""] * 5)[:6]
        # "rule": the earlier default, one run at 2 x the median shift (merge_qalora's first guess) on every batch
        lr = args.distill_lr if not lr else (lr if lr == "auto" else _rule_lr(peft_model) if lr == "rule" else float(lr))
        hessians, sums, targets, targets_all = stats[int(count or args.calibration)]
        if extra == "keepcodes":  # diagnostic: the base's codes kept (no GPTQ code pass)
            strategy = dataclasses.replace(get_strategy(strategy), rechoose_codes=False)
        elif extra.startswith("cd"):  # "...@cd4": up to 4 sweeps of coordinate descent on the codes after the GPTQ pass
            strategy = dataclasses.replace(get_strategy(strategy), refine_codes=int(extra[2:] or 4))
        # "...@ce0.5": distillation objective 0.5 * KL + 0.5 * cross-entropy on the calibration rows' labels; "...@ce0":
        # the KL alone (the default before 2026-12-07's "Hard targets"); else merge_qalora's default (0.05)
        label_weight = float(extra[2:]) if extra.startswith("ce") else None
        model = copy.deepcopy(peft_model)
        t = time.time()
        merged, report = merge_qalora(model, strategy=strategy, hessians=hessians, teacher_targets=targets_all if positions == "all" else targets,
                                      progress=False, distill_steps=int(steps or args.distill_steps), distill_lr=lr,
                                      distill_norms=extra == "norms", bias_correction=extra == "bias", input_sums=sums,
                                      distill_label_weight=label_weight)
        seconds = time.time() - t
        with tempfile.TemporaryDirectory() as tmp:  # evaluate what lands on disk, reloaded
            export_gptq(merged, Path(tmp) / "m", tokenizer=tok)
            reloaded = load_gptq_model(str(Path(tmp) / "m")).eval()
            r = evaluate(reloaded)
        tot = report.totals
        r.update({k: tot[k] for k in ("codes_changed", "scales_changed", "zeros_changed", "zeros_clamped", "rel_output_error_mean")})
        if report.distill:
            r["distill"] = report.distill
        r["merge_seconds"] = seconds
        results[f"export: {name}"] = r
        if shift_stats is None:
            shift_stats = _shift_distribution(peft_model)
        print(f"{name}: {_brief(r)}", flush=True)
        del model, merged, reloaded

    if args.requant:
        results["QLoRA-style: float-merge + fresh GPTQ"] = _requant_baseline(ref, tok, cal_rows, args, evaluate)

    lb = results["base GPTQ"]["heldout_loss"]
    lt = results["trained (adapter, unmerged)"]["heldout_loss"]
    rows = {name: Measurement(loss=r["heldout_loss"], tokens=sum(r["row_tokens"]), rows=len(r["row_tokens"]),
                              row_loss_sums=r["row_loss_sums"], row_tokens=r["row_tokens"]) for name, r in results.items()}
    for name, r in results.items():
        r["gain_kept"] = gain_kept(lb, lt, r["heldout_loss"])
        # paired bootstrap over the held-out rows: how much of a difference between two rows here the rows explain
        r["gain_kept_se"] = gain_kept_se(rows["base GPTQ"], rows["trained (adapter, unmerged)"], rows[name])
    _print_table(results, shift_stats, args, args.holdout, len(mmlu))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "label": args.label, "args": vars(args), "shift": shift_stats, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


def _brief(d: dict) -> dict:
    """``d`` without the per-row lists (kept in the JSON, too long for the log)."""
    return {k: _brief(v) if isinstance(v, dict) else v for k, v in d.items() if k not in ("row_loss_sums", "row_tokens")}


def _rule_lr(peft_model) -> float:
    """merge_qalora's first guess of the distillation rate (distill_lr_guess of the median over layers of each
    layer's median |D/s|), from the adapters before any merge."""
    from qalora_hf.adapter import group_delta
    from qalora_hf.merge import distill_lr_guess, qalora_layers

    meds = sorted(float((group_delta(m) / m.get_base_layer().scales.float()).abs().median()) for m in qalora_layers(peft_model).values())
    return distill_lr_guess(meds[len(meds) // 2])


def _shift_distribution(peft_model) -> dict:
    from qalora_hf.adapter import group_delta
    from qalora_hf.merge import qalora_layers

    from qalora_hf.gptq_format import read_layer

    ts, along = [], []
    for m in qalora_layers(peft_model).values():
        ts.append((group_delta(m) / m.get_base_layer().scales.float()).abs().flatten())
        # How much of a constant shift inside a group a change of that group's scale can express: cos^2 of the
        # angle between the group's codes v = q - z and the all-ones vector (1 = all of it, 0 = none).
        lt = read_layer(m.get_base_layer())
        v = (lt.q - lt.z[lt.g_idx]).double()  # [K, N]
        groups = lt.scales.shape[0]
        sums = torch.zeros(groups, v.shape[1], dtype=torch.float64).index_add_(0, lt.g_idx, v)
        sq = torch.zeros_like(sums).index_add_(0, lt.g_idx, v * v)
        along.append((sums**2 / (sq.clamp(min=1e-12) * (v.shape[0] // groups))).flatten())
    t = torch.cat(ts).double()
    q = torch.quantile(t[torch.randperm(t.numel())[:1_000_000]], torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "frac_above_0.5": float((t > 0.5).double().mean()), "n": t.numel(),
            "shift_along_codes_mean": float(torch.cat(along).mean())}


def _requant_baseline(ref, tok, cal_rows, args, evaluate) -> dict:
    from transformers import AutoModelForCausalLM, GPTQConfig

    from qalora_hf.data import row_to_text
    from qalora_hf.gptq import TRAINABLE_BACKEND

    qc = json.loads((Path(args.base) / "config.json").read_text())["quantization_config"]
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(Path(tmp) / "float")
        tok.save_pretrained(Path(tmp) / "float")
        gptq = GPTQConfig(bits=qc["bits"], group_size=qc["group_size"], desc_act=qc.get("desc_act", False), sym=qc.get("sym", False),
                          dataset=[row_to_text(r) for r in cal_rows], tokenizer=tok, backend=TRAINABLE_BACKEND)
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "float", quantization_config=gptq, dtype=torch.float32).eval()
        r = evaluate(model)
    r["merge_seconds"] = time.time() - t
    return r


def _print_table(results, shift, args, n_holdout, n_mmlu):
    head = f"| model | held-out loss ({n_holdout}) | gain kept (± s.e. over rows) |" + (f" MMLU ({n_mmlu}) |" if n_mmlu else "") + " codes changed | scales changed | zeros changed / clamped | rel. output error | merge s |"
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, r in results.items():
        kept = "" if r.get("gain_kept") is None else f"{100 * r['gain_kept']:.1f}%"
        if r.get("gain_kept_se"):
            kept += f" ± {100 * r['gain_kept_se']:.1f}"
        cells = [name, f"{r['heldout_loss']:.4f}", kept]
        if n_mmlu:
            cells.append(f"{100 * r['mmlu_acc']:.1f}%")
        cells += [
            str(r.get("codes_changed", "")), str(r.get("scales_changed", "")),
            f"{r['zeros_changed']} / {r['zeros_clamped']}" if "zeros_changed" in r else "",
            f"{r['rel_output_error_mean']:.3f}" if r.get("rel_output_error_mean") is not None else "",
            f"{r['merge_seconds']:.0f}" if "merge_seconds" in r else "",
        ]
        print("| " + " | ".join(cells) + " |")
    if shift:
        print(f"\nshift |t| = |D/s| in quantisation steps: median {shift['median']:.4f}, p90 {shift['p90']:.4f}, p99 {shift['p99']:.4f}, "
              f"fraction > 0.5: {shift['frac_above_0.5']:.2e} ({shift['n']:,} zero-points); mean cos^2(q - z, 1) per group "
              f"(the part of a constant shift a scale change can express): {shift.get('shift_along_codes_mean', float('nan')):.3f}")


if __name__ == "__main__":
    sys.exit(main())
