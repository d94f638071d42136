"""Wall time of merging a QA-LoRA adapter into the GPTQ integers and exporting, against plain checkpoint I/O
(docs/benchmarks.md, #3).

    python bench/merge_export.py [--quick] [--threads N] [--repeats 3] [--calibration-rows 32] [--tiny]

Setup (untimed): the GPTQ base loaded with load_gptq_model, a QA-LoRA adapter (r=16) with a random small
lora_B (std --lora-b-std, seeded), one untimed forward (so a first-call torch.compile is not charged to
the merge).  Then --repeats interleaved rounds of:

  read+write   safetensors load_file() of the checkpoint's *.safetensors, then save_file() of the same tensors
               into a temporary dir on the same filesystem as the export
  round        merge_qalora(strategy='round') + export_gptq (with tokenizer)
  gptq         collect_hessians on --calibration-rows Alpaca rows (batches of 8, <= 256 tokens; this is what
               merge_qalora(calibration=...) runs) + merge_qalora(strategy='gptq') + export_gptq

Each merge works on a deep copy of the adapted model (copy untimed).  Everything runs in this one
process; medians over the rounds.  Timings are noisy under machine load.

Target: merge + export <= 2x read + write, for each strategy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_model_args,
    calibration_texts,
    current_rss_mb,
    markdown_table,
    median_of,
    metadata,
    peak_rss_mb,
    resolve_models,
    set_threads,
    setup_env,
    target,
    targets_table,
    write_results,
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3, 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="1 round")
    ap.add_argument("--calibration-rows", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lora-b-std", type=float, default=0.02)
    ap.add_argument("--strategies", default="round,gptq")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    setup_env()
    _, gptq_dir = resolve_models(args)

    import copy

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from qalora_hf import QALoraConfig, get_qalora_model
    from qalora_hf.export import export_gptq
    from qalora_hf.merge import collect_hessians, merge_qalora, qalora_layers
    from qalora_hf.gptq import load_gptq_model

    threads = set_threads(args.threads)
    strategies = [s for s in args.strategies.split(",") if s]
    meta = metadata(args, repeats=args.repeats, calibration_rows=args.calibration_rows, max_length=args.max_length,
                    gptq_model=gptq_dir, lora_b_std=args.lora_b_std, strategies=strategies)
    files = sorted(Path(gptq_dir).glob("*.safetensors"))
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    print(f"merge_export: {gptq_dir} ({size_mb:.1f} MiB in {len(files)} safetensors), {args.repeats} rounds, threads {threads}, "
          f"{args.calibration_rows} calibration rows", flush=True)

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(gptq_dir)
    peft_model = get_qalora_model(load_gptq_model(gptq_dir), QALoraConfig(r=16, lora_alpha=16))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, args.lora_b_std)
    peft_model.eval()
    texts = calibration_texts(args.calibration_rows)
    batches = []
    for i in range(0, len(texts), 8):
        enc = tok(texts[i : i + 8], return_tensors="pt", padding=True, truncation=True, max_length=args.max_length)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    names = [f"{n}.base_layer" for n in qalora_layers(peft_model)]
    t = time.perf_counter()
    with torch.no_grad():
        peft_model(**batches[0])  # warm-up: first-call compile is not part of a merge's cost
    warm = time.perf_counter() - t

    rounds = []
    with tempfile.TemporaryDirectory(prefix="qalora-bench-merge-", dir=Path(gptq_dir).parent) as tmp:
        tmp = Path(tmp)
        for f in files:  # page-cache warm-up of the reads, untimed
            load_file(str(f))
        for rnd in range(args.repeats):
            r = {}
            t = time.perf_counter()
            tensors = {f.name: load_file(str(f)) for f in files}
            r["read_s"] = time.perf_counter() - t
            t = time.perf_counter()
            (tmp / "rw").mkdir(exist_ok=True)
            for fname, sd in tensors.items():
                save_file(sd, str(tmp / "rw" / fname), metadata={"format": "pt"})
            r["write_s"] = time.perf_counter() - t
            r["read_write_s"] = r["read_s"] + r["write_s"]
            del tensors
            for strategy in strategies:
                model = copy.deepcopy(peft_model)
                r[f"{strategy}_first_forward_s"] = None
                if strategy != "round":  # a fresh module copy: first forward pays torch.compile again (reported, not counted)
                    t = time.perf_counter()
                    with torch.no_grad():
                        model(**batches[0])
                    r[f"{strategy}_first_forward_s"] = time.perf_counter() - t
                t = time.perf_counter()
                hessians = collect_hessians(model, names, batches) if strategy != "round" else None
                r[f"{strategy}_hessian_s"] = time.perf_counter() - t
                t = time.perf_counter()
                merged, report = merge_qalora(model, strategy=strategy, hessians=hessians, progress=False)
                r[f"{strategy}_merge_s"] = time.perf_counter() - t
                t = time.perf_counter()
                export_gptq(merged, tmp / f"export-{strategy}", tokenizer=tok, overwrite=True)
                r[f"{strategy}_export_s"] = time.perf_counter() - t
                r[f"{strategy}_total_s"] = r[f"{strategy}_hessian_s"] + r[f"{strategy}_merge_s"] + r[f"{strategy}_export_s"]
                r[f"{strategy}_codes_changed"] = report.totals["codes_changed"]
                r[f"{strategy}_zeros_changed"] = report.totals["zeros_changed"]
                del model, merged, hessians
            rounds.append(r)
            print(f"  round {rnd + 1}/{args.repeats}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items() if k.endswith("_s") and v is not None), flush=True)

    med = {k: median_of(rounds, k) for k in rounds[0]}
    rw = med["read_write_s"]
    rows = [["read + write (safetensors load_file + save_file)", None, None, None, None, rw, 1.0, ""]]
    tg = []
    for s in strategies:
        rows.append([f"merge '{s}' + export_gptq", med[f"{s}_first_forward_s"], med[f"{s}_hessian_s"] if s != "round" else None, med[f"{s}_merge_s"], med[f"{s}_export_s"],
                     med[f"{s}_total_s"], med[f"{s}_total_s"] / rw, f"{int(med[f'{s}_codes_changed'])} codes, {int(med[f'{s}_zeros_changed'])} zeros"])
        tg.append(target(f"merge '{s}' + export / read + write", med[f"{s}_total_s"] / rw, "<=", 2.0))
    md = (
        f"### Merge + export vs checkpoint read + write ({size_mb:.1f} MiB checkpoint, median of {args.repeats} interleaved rounds, "
        f"{threads} torch threads, seed {args.seed}, {meta['date']})\n\n"
        + markdown_table(["step", "first forward s (not counted)", "H collection s", "merge s", "export s", "total s", "x read+write", "changed"], rows)
        + f"\n\nread {med['read_s']:.3f}s + write {med['write_s']:.3f}s. H = X^T X on {args.calibration_rows} calibration rows "
        f"({len(batches)} batches, <= {args.max_length} tokens). Untimed warm-up forward on the original model: {warm:.1f}s; 'first forward' is an untimed forward on each fresh deep copy (torch.compile of TorchLinear's dequantise runs per module instance), excluded from the total -- a merge in a fresh process pays it once.\n\n" + targets_table(tg)
        + f"\n\nModel: {gptq_dir}. Peak RSS of the process {peak_rss_mb():.0f} MiB. Load average at start: {meta['loadavg_at_start']}.\n"
    )
    print("\n" + md)
    out = write_results("merge_export", args, {**meta, "checkpoint_mb": size_mb, "rounds": rounds, "median": med, "targets": tg,
                                               "rss_end_mb": current_rss_mb()}, md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
