"""Training-step time and peak memory of QA-LoRA on a GPTQ base vs the alternatives (docs/benchmarks.md, #1).

    python bench/train_step.py [--quick] [--threads N] [--batch 4 --seq-len 256 --repeats 5] [--tiny]
    python bench/train_step.py --profile [--quick]      # torch.profiler on one step of ours, top 15 ops

One step = zero_grad + forward (labels = inputs) + backward + AdamW step, batch x seq-len tokens of
real text (Alpaca demo rows), all on CPU in float32.  Variants, each in its own spawned subprocess:

  ours                 get_qalora_model(load_gptq_model(gptq), QALoraConfig(r=16, lora_alpha=16)), gptqmodel
                       TorchLinear (the project's trainable kernel), TorchLinear's torch.compile'd dequantise
  ours, eager          the same with TORCHDYNAMO_DISABLE=1 (dequantise in eager mode; no per-layer compile)
  PEFT use_qalora      stock LoraConfig(use_qalora=True, qalora_group_size=32, r=16, lora_alpha=16, same
                       target modules) on the same base and kernel (compile on, as ours)
  GPTQ base, no adapter  forward + backward through the frozen GPTQ model (input embeddings require grad
                       so backward runs through every layer); no optimizer (nothing to update)
  LoRA on fp32         plain PEFT LoRA (same r, alpha, targets) on the float32 float model
  ours, auto kernel    the kernel a PEFT user gets by following PEFT's docs: plain
                       AutoModelForCausalLM.from_pretrained(gptq_dir); on AVX512 CPUs gptqmodel picks an
                       inference-only kernel whose train() raises -- reported as such

Timing: each worker loads its model and runs --warmup steps (the first one, which pays torch.compile,
is reported as "first step"); then --repeats rounds interleave one step per worker (A B C ... A B C ...),
one worker computing at a time, same batch/tokens/seed/threads; the median is reported.  Peak memory is
each worker process's ru_maxrss (includes the Python + torch runtime and model load, identical overhead
for every variant), so variants cannot pollute each other.  Under machine load the times are noisy.

Targets: ours <= 1.0x PEFT use_qalora step; ours <= 1.15x the adapter-free GPTQ step; ours peak RSS <=
0.6x LoRA on fp32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    Unavailable,
    add_model_args,
    markdown_table,
    median_of,
    metadata,
    prompt_ids,
    quant_kernels,
    runtime_rss_mb,
    resolve_models,
    run_interleaved,
    setup_env,
    target,
    targets_table,
    trainable_params,
    write_results,
)

DYNAMO_ON = {"TORCHDYNAMO_DISABLE": "0"}
DYNAMO_OFF = {"TORCHDYNAMO_DISABLE": "1"}


def target_names(model) -> list[str]:
    """The short names of the GPTQ linear layers (what 'all-linear' adapts), for the PEFT baselines."""
    from qalora_hf.gptq import gptq_layers

    return sorted({n.split(".")[-1] for n in gptq_layers(model) if not n.endswith("lm_head")})


def build_model(spec: dict):
    """(model, info) of a variant, ready to train; raises Unavailable when the variant cannot train."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qalora_hf import QALoraConfig, get_qalora_model
    from qalora_hf.gptq import load_gptq_model

    kind = spec["kind"]
    torch.manual_seed(spec["seed"])
    info = {}
    if kind in ("ours", "peft_qalora", "gptq_base"):
        base = load_gptq_model(spec["gptq"])
    elif kind == "ours_auto":
        base = AutoModelForCausalLM.from_pretrained(spec["gptq"])  # what PEFT's docs show: auto-picked kernel
    else:
        base = AutoModelForCausalLM.from_pretrained(spec["float"], dtype=torch.float32)
    info["dtype"] = str(next(base.parameters()).dtype).replace("torch.", "")
    info["kernel"] = quant_kernels(base) if kind != "lora_fp32" else "nn.Linear"
    if kind in ("ours", "ours_auto"):
        model = get_qalora_model(base, QALoraConfig(r=16, lora_alpha=16))
    elif kind == "peft_qalora":
        cfg = LoraConfig(r=16, lora_alpha=16, use_qalora=True, qalora_group_size=32, target_modules=target_names(base), task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
    elif kind == "lora_fp32":
        cfg = LoraConfig(r=16, lora_alpha=16, target_modules=spec["targets"], task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
    else:  # gptq_base
        model = base
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
    try:
        model.train()
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"raises on train(): {type(e).__name__}: {str(e).splitlines()[0][:160]}") from e
    info["trainable"], info["total_params"] = trainable_params(model)
    return model, info


class TrainVariant:
    def __init__(self, spec: dict):
        import torch

        from transformers import AutoTokenizer

        runtime_mb = runtime_rss_mb()
        self.model, self.info = build_model(spec)
        self.info["rss_runtime_mb"] = runtime_mb
        tok = AutoTokenizer.from_pretrained(spec["gptq"])
        self.ids = prompt_ids(tok, spec["seq_len"], spec["batch"], spec["seed"])
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        self.profile = spec.get("profile", False)
        times = [self._step() for _ in range(spec["warmup"])]
        self.info["first_step_s"] = times[0] if times else None
        self.info["warmup_s"] = times

    def _step(self) -> float:
        t = time.perf_counter()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        out = self.model(input_ids=self.ids, labels=self.ids)
        out.loss.backward()
        if self.opt is not None:
            self.opt.step()
        return time.perf_counter() - t

    def step(self) -> dict:
        if not self.profile:
            return {"step_s": self._step()}
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            dt = self._step()
        ka = prof.key_averages()
        return {
            "step_s": dt,
            "by_total": ka.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60),
            "by_self": ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60),
        }


def make_variant(spec: dict) -> TrainVariant:
    return TrainVariant(spec)


VARIANTS = [
    # name, kind, env
    ("ours (TorchLinear, compile)", "ours", DYNAMO_ON),
    ("ours (TorchLinear, eager)", "ours", DYNAMO_OFF),
    ("PEFT use_qalora (TorchLinear, compile)", "peft_qalora", DYNAMO_ON),
    ("GPTQ base, no adapter (TorchLinear, compile)", "gptq_base", DYNAMO_ON),
    ("LoRA on fp32 float model", "lora_fp32", DYNAMO_ON),
    ("ours (auto kernel, PEFT docs)", "ours_auto", DYNAMO_ON),
]
EAGER_BASELINES = [
    ("PEFT use_qalora (TorchLinear, eager)", "peft_qalora", DYNAMO_OFF),
    ("GPTQ base, no adapter (TorchLinear, eager)", "gptq_base", DYNAMO_OFF),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=None, help="default 4 (2 with --quick)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 256 (128 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (default 5, 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per worker before the rounds (>= 1)")
    ap.add_argument("--quick", action="store_true", help="batch 2 x 128 tokens, 3 repeats")
    ap.add_argument("--eager-baselines", action="store_true", help="also time PEFT use_qalora and the adapter-free base with TORCHDYNAMO_DISABLE=1")
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only matching variants (debugging)")
    ap.add_argument("--profile", action="store_true", help="only profile one step of ours (compile and eager) and print the top 15 ops")
    args = ap.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq_len = args.seq_len or (128 if args.quick else 256)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.warmup = max(1, args.warmup)
    setup_env()
    float_dir, gptq_dir = resolve_models(args)

    from transformers import AutoConfig

    targets = _targets_of(gptq_dir)
    common = {"float": float_dir, "gptq": gptq_dir, "batch": args.batch, "seq_len": args.seq_len, "seed": args.seed,
              "threads": args.threads, "warmup": args.warmup, "targets": targets}
    meta = metadata(args, batch=args.batch, seq_len=args.seq_len, repeats=args.repeats, warmup=args.warmup,
                    float_model=float_dir, gptq_model=gptq_dir, model_type=AutoConfig.from_pretrained(gptq_dir).model_type)
    print(f"train_step: batch {args.batch} x {args.seq_len} tokens, {args.repeats} rounds, threads {meta['torch_threads']}, seed {args.seed}\n  float {float_dir}\n  gptq  {gptq_dir}", flush=True)

    if args.profile:
        return _profile(args, common, meta)

    variants = VARIANTS + (EAGER_BASELINES if args.eager_baselines else [])
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        variants = [v for v in variants if any(k in v[0] for k in keys)]
    specs = {name: {**common, "kind": kind, "env": env} for name, kind, env in variants}
    res = run_interleaved(specs, make_variant, args.repeats)

    rows, summary = [], {}
    for name, r in res.items():
        if "info" not in r or "error" in r and not r.get("steps"):
            summary[name] = {"error": r.get("error"), "where": r.get("where"), "peak_rss_mb": r.get("peak_rss_mb")}
            rows.append([name, "-", "-", "-", "-", "-", "-", f"n/a: {r.get('error')}"])
            continue
        info, steps = r["info"], r["steps"]
        s = {"step_s_median": median_of(steps, "step_s"), "step_s_all": [x["step_s"] for x in steps], **info,
             "peak_rss_mb": r.get("final", {}).get("peak_rss_mb")}
        s["peak_above_runtime_mb"] = s["peak_rss_mb"] - info["rss_runtime_mb"] if s["peak_rss_mb"] else None
        s["tokens_per_s"] = args.batch * args.seq_len / s["step_s_median"] if s["step_s_median"] else None
        summary[name] = s
        rows.append([name, info["kernel"], f"{info['trainable']:,}", s["first_step_s"], s["step_s_median"], s["tokens_per_s"], s["peak_rss_mb"], s["peak_above_runtime_mb"]])
        if "error" in r:
            rows[-1].append(f"failed after {len(steps)} rounds: {r['error']}")

    def get(name, key):
        return summary.get(name, {}).get(key)

    ours, ours_e = "ours (TorchLinear, compile)", "ours (TorchLinear, eager)"
    peft_c, base_c, lora = "PEFT use_qalora (TorchLinear, compile)", "GPTQ base, no adapter (TorchLinear, compile)", "LoRA on fp32 float model"
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    tg = [
        target("ours / PEFT use_qalora step time (compile)", ratio(get(ours, "step_s_median"), get(peft_c, "step_s_median")), "<=", 1.0),
        target("ours / adapter-free GPTQ step time (compile)", ratio(get(ours, "step_s_median"), get(base_c, "step_s_median")), "<=", 1.15),
        target("ours / LoRA-fp32 peak RSS", ratio(get(ours, "peak_rss_mb"), get(lora, "peak_rss_mb")), "<=", 0.6),
    ]
    if args.eager_baselines:
        tg += [
            target("ours / PEFT use_qalora step time (eager)", ratio(get(ours_e, "step_s_median"), get("PEFT use_qalora (TorchLinear, eager)", "step_s_median")), "<=", 1.0),
            target("ours / adapter-free GPTQ step time (eager)", ratio(get(ours_e, "step_s_median"), get("GPTQ base, no adapter (TorchLinear, eager)", "step_s_median")), "<=", 1.15),
        ]
    extra = [
        ("ours eager / ours compile, first step", ratio(get(ours_e, "first_step_s"), get(ours, "first_step_s"))),
        ("ours eager / ours compile, steady step", ratio(get(ours_e, "step_s_median"), get(ours, "step_s_median"))),
        ("ours / LoRA-fp32 peak RSS above the runtime", ratio(get(ours, "peak_above_runtime_mb"), get(lora, "peak_above_runtime_mb"))),
        ("ours / LoRA-fp32 step time", ratio(get(ours, "step_s_median"), get(lora, "step_s_median"))),
    ]
    md = (
        f"### Training step (batch {args.batch} x {args.seq_len} tokens, fwd+bwd+AdamW, median of {args.repeats} interleaved rounds, "
        f"{meta['torch_threads']} torch threads, seed {args.seed}, {meta['date']})\n\n"
        + markdown_table(["variant", "kernel", "trainable params", "first step s", "step s (median)", "tokens/s", "peak RSS MiB", "peak above runtime MiB"], rows)
        + "\n\n" + targets_table(tg) + "\n\n"
        + "\n".join(f"- {k}: {v:.2f}x" for k, v in extra if v is not None)
        + f"\n\nModel: {meta['gptq_model']} (GPTQ) / {meta['float_model']} (float). Peak RSS = ru_maxrss of the variant's own process "
        f"(includes model load and torch.compile); 'above runtime' subtracts the RSS of the same process after importing torch/transformers/peft/gptqmodel, before loading the model. Load average at start: {meta['loadavg_at_start']}.\n"
    )
    print("\n" + md)
    out = write_results("train_step", args, {**meta, "results": summary, "targets": tg, "extra_ratios": dict(extra)}, md)
    print(f"wrote {out}")
    return 0


def _targets_of(gptq_dir: str) -> list[str]:
    """Short names of the quantised linear layers, read from the checkpoint's tensor names (no model load)."""
    from safetensors import safe_open

    names = set()
    for f in Path(gptq_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= {k.rsplit(".", 2)[-2] for k in h.keys() if k.endswith(".qweight")}
    return sorted(n for n in names if n != "lm_head")


def _profile(args, common, meta) -> int:
    specs = {
        "ours (TorchLinear, compile)": {**common, "kind": "ours", "env": DYNAMO_ON, "profile": True},
        "ours (TorchLinear, eager)": {**common, "kind": "ours", "env": DYNAMO_OFF, "profile": True},
    }
    res = run_interleaved(specs, make_variant, 1)
    md = [f"### Profile of one training step of ours (batch {args.batch} x {args.seq_len}, {meta['torch_threads']} threads, {meta['date']})\n"]
    for name, r in res.items():
        if not r.get("steps"):
            md.append(f"#### {name}: n/a ({r.get('error')})\n")
            continue
        s = r["steps"][0]
        md.append(f"#### {name}: step {s['step_s']:.3f}s under the profiler; top 15 ops by self CPU time\n\n```\n{s['by_self']}```\n")
        md.append(f"top 15 by total CPU time (includes children)\n\n```\n{s['by_total']}```\n")
    text = "\n".join(md)
    print(text)
    args.out = args.out or str(Path(__file__).resolve().parent / "results" / "train_step_profile.json")
    out = write_results("train_step_profile", args, {**meta, "profile": {n: r.get("steps", [{}])[0] if r.get("steps") else r for n, r in res.items()}}, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
