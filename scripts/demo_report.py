"""Step 4 of the demo: check the pushed model as a user would, in a fresh process.

Loads ``AutoModelForCausalLM.from_pretrained(repo_id)`` from ``HF_ENDPOINT`` (the local Hub-protocol
server in the demo), the GPTQ base, and the base + the pushed adapter (``subfolder="adapter"``), then
prints the table: held-out Alpaca loss, MMLU 0-shot accuracy on a fixed subset, fraction of the
fine-tuning gain kept, max logit difference trained vs exported; then one generated answer from the
base and the exported model.  The table goes into ``--report`` and into the model card (pushed again
as a new commit).  With ``--awq-repo-id``, the AWQ export of the same integers (``qalora-hf awq``, pushed to
its ``-AWQ`` sibling repo) is loaded the same way and gets its own row; ``--awq-dir`` is its local export,
whose card gets the same table.
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
AWQ_ROW = "exported (merged, AWQ layout)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo-id", required=True)
    ap.add_argument("--run-dir", required=True, help="output_dir of the recipe run (holds run_info.json)")
    ap.add_argument("--report", required=True, help="markdown file for the results table")
    ap.add_argument("--mmlu-per-topic", type=int, default=2, help="MMLU questions per topic (57 topics)")
    ap.add_argument("--no-card-update", action="store_true")
    ap.add_argument("--awq-repo-id", help="the AWQ export's Hub repo (qalora-hf awq), evaluated like the GPTQ export")
    ap.add_argument("--awq-dir", help="local AWQ export directory whose card gets the table (with --awq-repo-id)")
    args = ap.parse_args(argv)

    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import EvalResult
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qalora_hf.evaluate import alpaca_prompt_completion, completion_loss, gain_kept, generate_answer, load_mmlu_subset, mmlu_accuracy
    from qalora_hf.fetch import default_cache_dir
    from qalora_hf.hub import push_gptq_to_hub
    from qalora_hf.model import load_qalora_adapter
    from qalora_hf.quantize import load_gptq_model

    info = json.loads(Path(args.run_dir, "run_info.json").read_text())
    rows = json.loads(Path(info["dataset_path"]).read_text())
    holdout = [alpaca_prompt_completion(r) for r in rows[-info["num_holdout_rows"] :]]
    mmlu = load_mmlu_subset(default_cache_dir() / "data" / "mmlu.jsonl", per_topic=args.mmlu_per_topic)
    max_length = info.get("max_length") or 256
    print(f"held-out Alpaca rows: {len(holdout)}; MMLU subset: {len(mmlu)} questions ({args.mmlu_per_topic} per topic, seed 0)", flush=True)

    t0 = time.time()
    print(f"loading {args.repo_id} with stock AutoModelForCausalLM.from_pretrained from {os.environ.get('HF_ENDPOINT', 'the Hub')}", flush=True)
    exported = AutoModelForCausalLM.from_pretrained(args.repo_id, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.repo_id)
    kernel = type(exported.model.layers[0].self_attn.q_proj).__name__
    awq, awq_kernel = None, None
    if args.awq_repo_id:
        print(f"loading {args.awq_repo_id} the same way", flush=True)
        awq = AutoModelForCausalLM.from_pretrained(args.awq_repo_id, dtype=torch.float32).eval()
        awq_kernel = type(awq.model.layers[0].self_attn.q_proj).__name__
    base = load_gptq_model(info["base_model"]).eval()
    trained = load_qalora_adapter(load_gptq_model(info["base_model"]), args.repo_id, subfolder="adapter").eval()
    print(f"  loaded in {time.time() - t0:.0f}s (exported model kernel: {kernel}"
          f"{f'; AWQ export kernel: {awq_kernel}' if awq is not None else ''})", flush=True)

    results = {}
    models = [("base GPTQ", base), ("trained (adapter, unmerged)", trained), ("exported (merged GPTQ)", exported)]
    if awq is not None:
        models.append((AWQ_ROW, awq))
    for name, model in models:
        t = time.time()
        loss = completion_loss(model, tok, holdout, max_length=max_length)
        acc = mmlu_accuracy(model, tok, mmlu)
        results[name] = {"heldout_loss": loss, "mmlu_acc": acc}
        print(f"  {name:30s} held-out loss {loss:.4f}  MMLU {100 * acc:.1f}%  ({time.time() - t:.0f}s)", flush=True)

    with torch.no_grad():
        diffs, awq_diffs, awq_vs_gptq = [], [], []
        for prompt, completion in holdout[:16]:
            ids = tok(prompt + completion, return_tensors="pt", truncation=True, max_length=max_length)
            lt, le = trained(**ids).logits, exported(**ids).logits
            diffs.append(float((lt - le).abs().max()))
            if awq is not None:
                la = awq(**ids).logits
                awq_diffs.append(float((lt - la).abs().max()))
                awq_vs_gptq.append(float((le - la).abs().max()))
    max_diff = max(diffs)
    lb, lt = results["base GPTQ"]["heldout_loss"], results["trained (adapter, unmerged)"]["heldout_loss"]
    for name, r in results.items():
        r["gain_kept"] = gain_kept(lb, lt, r["heldout_loss"])
    results["exported (merged GPTQ)"]["max_logit_diff_vs_trained"] = max_diff
    if awq is not None:
        results[AWQ_ROW]["max_logit_diff_vs_trained"] = max(awq_diffs)
        results[AWQ_ROW]["max_logit_diff_vs_gptq_export"] = max(awq_vs_gptq)

    strategy = info.get("merge_metrics", {}).get("strategy", "?")
    date = datetime.date.today().isoformat()
    lines = [
        f"| model | held-out Alpaca loss ({len(holdout)} rows) | MMLU 0-shot ({len(mmlu)} q) | fine-tuning gain kept | max logit diff vs trained |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        kept = "" if r["gain_kept"] is None else f"{100 * r['gain_kept']:.1f}%"
        diff = f"{r['max_logit_diff_vs_trained']:.3f}" if "max_logit_diff_vs_trained" in r else ""
        lines.append(f"| {name} | {r['heldout_loss']:.4f} | {100 * r['mmlu_acc']:.1f}% | {kept} | {diff} |")
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
    if awq is not None:
        ra = results[AWQ_ROW]
        awq_kept = "undefined" if ra["gain_kept"] is None else f"{100 * ra['gain_kept']:.1f}%"
        verdict += (f" The AWQ export (`{args.awq_repo_id}`, the same integers in AWQ's layout, kernel `{awq_kernel}`) keeps "
                    f"{awq_kept} of the gain; its logits differ from the GPTQ export's by at most "
                    f"{ra['max_logit_diff_vs_gptq_export']:.2e} on 16 held-out rows.")
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
    Path(args.report).with_suffix(".json").write_text(json.dumps({"date": date, "strategy": strategy, "results": results}, indent=2))

    if not args.no_card_update:
        cards = [(Path(info["export_dir"]), args.repo_id, results["exported (merged GPTQ)"])]
        if awq is not None and args.awq_dir:
            cards.append((Path(args.awq_dir), args.awq_repo_id, results[AWQ_ROW]))
        for export_dir, repo_id, r in cards:
            card = ModelCard.load(export_dir / "README.md")
            section = "## Demo evaluation (fresh-process check)\n\n" + report
            marker = "## Demo evaluation (fresh-process check)"
            text = card.text.split(marker)[0].rstrip() + "\n\n" + section
            card.text = text
            card.data.eval_results = [
                EvalResult(task_type="text-generation", dataset_type="cais/mmlu", dataset_name=f"MMLU (0-shot, {len(mmlu)}-question subset)",
                           metric_type="accuracy", metric_value=round(r["mmlu_acc"], 4)),
                EvalResult(task_type="text-generation", dataset_type="tatsu-lab/alpaca", dataset_name=f"Alpaca held-out ({len(holdout)} rows)",
                           metric_type="loss", metric_value=round(r["heldout_loss"], 4)),
            ]
            card.data.model_name = repo_id.split("/")[-1]
            card.save(export_dir / "README.md")
            commit = push_gptq_to_hub(export_dir, repo_id, commit_message="Add demo evaluation to the model card")
            print(f"model card of {repo_id} updated and pushed (commit {commit[:12]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
