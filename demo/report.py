"""Step 4 of the demo: check the pushed model as a user would, in a fresh process.

    python -m demo.report --repo-id USER/NAME --run-dir OUTPUT_DIR --report results.md

Loads ``AutoModelForCausalLM.from_pretrained(repo_id)`` from ``HF_ENDPOINT`` (the local Hub-protocol
server in the demo), the GPTQ base, and the base + the pushed adapter (``subfolder="adapter"``), then
prints the table: held-out Alpaca loss, MMLU 0-shot accuracy on a fixed subset, fraction of the
fine-tuning gain kept, max logit difference trained vs exported over the real tokens of the held-out
rows (the library's :func:`qalora_hf.metrics.measure`, the same rows and names as the trainer's merge
metrics); then one generated answer from the base and the exported model.  The table goes into
``--report`` and into the model card (pushed again as a new commit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
# gptqmodel's torch kernels torch.compile their dequantisation per layer instance; for three models of
# 210 layers each that is minutes of compilation and dynamo's recompile limit.  Eager gives the same numbers.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

INSTRUCTION = "Give three tips for staying healthy."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo-id", required=True)
    ap.add_argument("--run-dir", required=True, help="output_dir of the recipe run (holds run_info.json)")
    ap.add_argument("--report", required=True, help="markdown file for the results table")
    ap.add_argument("--mmlu-per-topic", type=int, default=2, help="MMLU questions per topic (57 topics)")
    ap.add_argument("--no-card-update", action="store_true")
    args = ap.parse_args(argv)

    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import EvalResult
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qalora_hf.cache import default_cache_dir
    from qalora_hf.data import read_rows, token_batches
    from qalora_hf.gptq import load_gptq_model
    from qalora_hf.hub import push_gptq_to_hub
    from qalora_hf.metrics import Measurement, gain_kept, measure, merge_metrics
    from qalora_hf.model import load_qalora_adapter

    from demo.evaluation import generate_answer, load_mmlu_subset, mmlu_accuracy

    info = json.loads(Path(args.run_dir, "run_info.json").read_text())
    holdout = read_rows(info["dataset_path"])[-info["num_holdout_rows"] :]
    mmlu = load_mmlu_subset(default_cache_dir() / "data" / "mmlu.jsonl", per_topic=args.mmlu_per_topic)
    max_length = info.get("max_length") or 256
    print(f"held-out Alpaca rows: {len(holdout)}; MMLU subset: {len(mmlu)} questions ({args.mmlu_per_topic} per topic, seed 0)", flush=True)

    t0 = time.time()
    print(f"loading {args.repo_id} with stock AutoModelForCausalLM.from_pretrained from {os.environ.get('HF_ENDPOINT', 'the Hub')}", flush=True)
    exported = AutoModelForCausalLM.from_pretrained(args.repo_id, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.repo_id)
    kernel = type(exported.model.layers[0].self_attn.q_proj).__name__
    base = load_gptq_model(info["base_model"]).eval()
    trained = load_qalora_adapter(load_gptq_model(info["base_model"]), args.repo_id, subfolder="adapter").eval()
    print(f"  loaded in {time.time() - t0:.0f}s (exported model kernel: {kernel})", flush=True)

    # One pass over the held-out batches per model; the exported model's pass also runs the trained one, for the
    # logit difference over the real tokens (the trainer's merge metrics measure the same rows the same way).
    batches = token_batches(holdout, tok, max_length)
    t = time.time()
    m_base = measure(base, batches)
    m_exported = measure(exported, batches, reference=trained)
    m_trained = Measurement(loss=m_exported.reference_loss, tokens=m_exported.tokens, rows=m_exported.rows)
    strategy = info.get("merge_metrics", {}).get("strategy", "?")
    metrics = merge_metrics(strategy, {}, base=m_base, trained=m_trained, exported=m_exported, holdout_source="last dataset rows")
    print(f"  held-out loss: base {metrics['loss_base']:.4f}, trained {metrics['loss_trained']:.4f}, exported "
          f"{metrics['loss_exported']:.4f}; max logit diff {metrics['max_logit_diff']:.3f} ({time.time() - t:.0f}s)", flush=True)
    results = {}
    for name, model, loss in (("base GPTQ", base, "loss_base"), ("trained (adapter, unmerged)", trained, "loss_trained"),
                              ("exported (merged GPTQ)", exported, "loss_exported")):
        t = time.time()
        acc = mmlu_accuracy(model, tok, mmlu)
        results[name] = {"loss": metrics[loss], "mmlu_acc": acc,
                         "gain_kept": gain_kept(metrics["loss_base"], metrics["loss_trained"], metrics[loss])}
        print(f"  {name:30s} MMLU {100 * acc:.1f}%  ({time.time() - t:.0f}s)", flush=True)
    results["exported (merged GPTQ)"]["max_logit_diff"] = metrics["max_logit_diff"]

    date = datetime.date.today().isoformat()
    lines = [
        f"| model | held-out Alpaca loss ({len(holdout)} rows) | MMLU 0-shot ({len(mmlu)} q) | fine-tuning gain kept | max logit diff vs trained |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        kept = "" if r["gain_kept"] is None else f"{100 * r['gain_kept']:.1f}%"
        diff = f"{r['max_logit_diff']:.3f}" if "max_logit_diff" in r else ""
        lines.append(f"| {name} | {r['loss']:.4f} | {100 * r['mmlu_acc']:.1f}% | {kept} | {diff} |")
    kept = results["exported (merged GPTQ)"]["gain_kept"]
    verdict = (
        f"The exported INT4 model keeps {100 * kept:.1f}% of the fine-tuning gain (merge strategy `{strategy}`)."
        if kept is not None
        else "Training did not lower the held-out loss, so the gain kept is undefined."
    )
    if kept is not None and kept < 0.9:
        verdict += " That is well short of the trained adapter: the integer merge loses part of the fine-tuning."
    elif kept is not None and kept < 0.95:
        verdict += (f" That is below the project's goal of 95%: the integer merge loses {100 * (1 - kept):.1f}% of the "
                    "fine-tuning gain.")
    table = "\n".join(lines)
    gen_base = generate_answer(base, tok, INSTRUCTION)
    gen_export = generate_answer(exported, tok, INSTRUCTION)

    report = (
        f"Measured {date} by `make demo` (SmolLM2-135M-Instruct, GPTQ 4-bit g32 asym, QA-LoRA r16, "
        f"merge `{strategy}`; exported model loaded from the Hub-protocol server with stock `AutoModelForCausalLM`, kernel `{kernel}`).\n\n"
        f"{table}\n\n{verdict}\n\n"
        f"Instruction: *{INSTRUCTION}*\n\n- base: {gen_base!r}\n- exported: {gen_export!r}\n"
    )
    print("\n" + report, flush=True)
    Path(args.report).write_text(report)
    Path(args.report).with_suffix(".json").write_text(json.dumps({"date": date, "metrics": metrics, "results": results}, indent=2))

    if not args.no_card_update:
        export_dir = Path(info["export_dir"])
        card = ModelCard.load(export_dir / "README.md")
        section = "## Demo evaluation (fresh-process check)\n\n" + report
        marker = "## Demo evaluation (fresh-process check)"
        text = card.text.split(marker)[0].rstrip() + "\n\n" + section
        card.text = text
        r = results["exported (merged GPTQ)"]
        heldout_type = (info.get("datasets") or [Path(info["dataset_path"]).stem])[0]  # what the run was told its data is
        card.data.eval_results = [
            EvalResult(task_type="text-generation", dataset_type="cais/mmlu", dataset_name=f"MMLU (0-shot, {len(mmlu)}-question subset)",
                       metric_type="accuracy", metric_value=round(r["mmlu_acc"], 4)),
            EvalResult(task_type="text-generation", dataset_type=heldout_type, dataset_name=f"Alpaca held-out ({len(holdout)} rows)",
                       metric_type="loss", metric_value=round(r["loss"], 4)),
        ]
        card.data.model_name = args.repo_id.split("/")[-1]
        card.save(export_dir / "README.md")
        commit = push_gptq_to_hub(export_dir, args.repo_id, commit_message="Add demo evaluation to the model card")
        print(f"model card updated and pushed (commit {commit[:12]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
