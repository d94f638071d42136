"""Generation speed of a merged QA-LoRA GPTQ export vs the unmerged adapter and a float+LoRA model (docs/benchmarks.md, #2).

    python bench/inference.py [--quick] [--threads N] [--new-tokens 64 --prompt-tokens 64 --repeats 5] [--tiny]

Batch 1, greedy, a ~64-token prompt of real text, exactly --new-tokens new tokens (min_new_tokens set so
EOS cannot stop early), KV cache on, CPU float32.  Prepared once in the parent: a QA-LoRA adapter on the
GPTQ base with a random small lora_B (std --lora-b-std, seeded), saved as a PEFT adapter; merged with
merge_qalora(strategy='round') and written with export_gptq.  Variants, each in its own spawned subprocess:

  merged export (stock from_pretrained)  AutoModelForCausalLM.from_pretrained(export) -- the kernel gptqmodel
                                       auto-picks (named in the table), what a user of the export gets
  merged export (TorchLinear)          the same export loaded with load_gptq_model (backend='torch')
  merged AWQ export (stock from_pretrained)  the same merged integers repacked by export_awq (AWQ GEMM layout),
                                       AutoModelForCausalLM.from_pretrained(awq export) -- gptqmodel's auto-picked
                                       AWQ kernel; what a transformers user of the -AWQ repo gets on this CPU
  GPTQ base + adapter, ours (TorchLinear)   load_qalora_adapter(load_gptq_model(base), adapter), unmerged
  GPTQ base + adapter, stock PEFT (auto kernel)  PeftModel.from_pretrained(from_pretrained(base), adapter)
  float fp32 + LoRA merged             the float model with a plain PEFT LoRA (same r/targets, random small
                                       lora_B) folded in by merge_and_unload()
  merged export as GGUF Q4_1 (llama.cpp)  the same merged export written by export_gguf (lossless Q4_1) and run
                                       by llama.cpp through llama-cpp-python (n_threads = --threads); only
                                       when llama-cpp-python is installed (make install-llama), else n/a

decode tokens/s = (new tokens - 1) / (generate time - prefill time) (for llama.cpp: timed from its first
new token to its last); file size = the checkpoint's weight files (safetensors / .gguf).  For the GGUF
variant "prefill" is llama.cpp's eval() of the prompt and "generate" its greedy generate() of exactly
--new-tokens tokens, prompt evaluated again (KV cache reset, no prefix reuse).

Each worker loads and runs one warm-up generation (first-call compile cost is reported separately);
then --repeats interleaved rounds each time a prefill (one forward over the prompt) and a full
generate() per worker; medians are reported.  tokens/s = new tokens / generate() wall time (prefill
included).  Timings are noisy under machine load.

Targets: merged >= 2x float+LoRA tokens/s; merged >= 1.1x GPTQ base + unmerged adapter tokens/s;
GGUF Q4_1 in llama.cpp >= 3x float+LoRA decode tokens/s.
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
    markdown_table,
    median_of,
    metadata,
    prompt_ids,
    quant_kernels,
    resolve_models,
    run_interleaved,
    runtime_rss_mb,
    setup_env,
    target,
    targets_table,
    write_results,
)


def prepare(gptq_dir: str, workdir: Path, seed: int, std: float, gguf: bool = False, gguf_tokenizer_pre=None) -> dict:
    """Adapter with random small lora_B on the GPTQ base, saved; merged (round) and exported. Returns paths + merge stats."""
    import torch
    from transformers import AutoTokenizer

    from qalora_hf import QALoraConfig, get_qalora_model
    from qalora_hf.awq_export import AwqExportError, export_awq
    from qalora_hf.export import export_gptq
    from qalora_hf.merge import merge_qalora
    from qalora_hf.quantize import load_gptq_model

    torch.manual_seed(seed)
    peft_model = get_qalora_model(load_gptq_model(gptq_dir), QALoraConfig(r=16, lora_alpha=16))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    adapter = workdir / "adapter"
    peft_model.save_pretrained(adapter)
    t = time.perf_counter()
    merged, report = merge_qalora(peft_model, strategy="round", progress=False)
    export = export_gptq(merged, workdir / "merged", tokenizer=AutoTokenizer.from_pretrained(gptq_dir))
    elapsed = time.perf_counter() - t
    try:  # the same integers in AWQ's layout (4-bit, no act-order, group size 32/64/128 only)
        awq = str(export_awq(merged, workdir / "merged-awq", tokenizer=AutoTokenizer.from_pretrained(gptq_dir)))
    except AwqExportError as err:
        awq = None
        print(f"  no AWQ variant: {err}", flush=True)
    tot = report.totals
    out = {"adapter": str(adapter), "merged": str(export), "merged_awq": awq, "merge_export_s": elapsed,
           "zeros_changed": tot["zeros_changed"], "shift_abs_median": tot["shift_abs_median"]}
    if gguf:
        from qalora_hf.gguf_export import export_gguf

        t = time.perf_counter()
        out["gguf"] = str(export_gguf(export, workdir / "merged-Q4_1.gguf", tokenizer_pre=gguf_tokenizer_pre))
        out["gguf_export_s"] = time.perf_counter() - t
    return out


def file_size_mb(path: str) -> float:
    p = Path(path)
    files = [p] if p.is_file() else list(p.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**20


class LlamaCppVariant:
    """The GGUF export run by llama.cpp (llama-cpp-python), same prompt ids as the transformers variants."""

    def __init__(self, spec: dict):
        from transformers import AutoTokenizer

        from qalora_hf.gguf_export import _llama

        runtime_mb = runtime_rss_mb()
        self.llm = _llama(spec["gguf"], n_ctx=spec["prompt_tokens"] + spec["new_tokens"] + 8, n_threads=spec["threads"], logits_all=False)
        self.info = {"kernel": "llama.cpp Q4_1", "dtype": "q4_1", "rss_runtime_mb": runtime_mb}
        tok = AutoTokenizer.from_pretrained(spec["gptq"])
        self.ids = prompt_ids(tok, spec["prompt_tokens"], 1, spec["seed"])[0].tolist()
        self.new = spec["new_tokens"]
        t = time.perf_counter()
        first = self._generate()
        self.info["first_generate_s"] = time.perf_counter() - t
        self.info["first_tokens"] = first[:8]

    def _generate(self) -> list[int]:
        self.llm.reset()  # n_tokens = 0: generate() evaluates the whole prompt (no KV-cache prefix reuse), as HF generate() does
        out, first = [], None
        for token in self.llm.generate(self.ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))  # EOS does not stop it: exactly new_tokens tokens, like min_new_tokens
            if first is None:
                first = time.perf_counter()  # the prompt is evaluated and the first token sampled
            if len(out) == self.new:
                break
        self.decode_s = time.perf_counter() - first  # the other new_tokens - 1 tokens, one forward each
        return out

    def step(self) -> dict:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(self.ids)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        n = len(self._generate())
        gen = time.perf_counter() - t
        return {"prefill_s": prefill, "generate_s": gen, "new_tokens": n, "tokens_per_s": n / gen, "decode_s": self.decode_s}


def build_model(spec: dict):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from qalora_hf.model import load_qalora_adapter
    from qalora_hf.quantize import load_gptq_model

    kind = spec["kind"]
    torch.manual_seed(spec["seed"])
    if kind == "merged_auto":
        model = AutoModelForCausalLM.from_pretrained(spec["merged"])
    elif kind == "merged_awq_auto":
        model = AutoModelForCausalLM.from_pretrained(spec["merged_awq"])
    elif kind == "merged_torch":
        model = load_gptq_model(spec["merged"])
    elif kind == "unmerged_ours":
        model = load_qalora_adapter(load_gptq_model(spec["gptq"]), spec["adapter"])
    elif kind == "unmerged_auto_peft":
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec["gptq"]), spec["adapter"])
    elif kind == "float_lora_merged":
        base = AutoModelForCausalLM.from_pretrained(spec["float"], dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=spec["targets"], task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, spec["lora_b_std"])
        model = model.merge_and_unload()
    else:
        raise ValueError(kind)
    model.eval()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kernel = "nn.Linear" if kind == "float_lora_merged" else quant_kernels(inner)
    return model, {"kernel": kernel, "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}


class GenVariant:
    def __init__(self, spec: dict):
        import torch
        from transformers import AutoTokenizer

        runtime_mb = runtime_rss_mb()
        self.model, self.info = build_model(spec)
        self.info["rss_runtime_mb"] = runtime_mb
        self.tok = AutoTokenizer.from_pretrained(spec["gptq"])
        self.ids = prompt_ids(self.tok, spec["prompt_tokens"], 1, spec["seed"])
        self.mask = torch.ones_like(self.ids)
        self.new = spec["new_tokens"]
        t = time.perf_counter()
        first = self._generate()
        self.info["first_generate_s"] = time.perf_counter() - t
        self.info["first_tokens"] = first[0, self.ids.shape[1] : self.ids.shape[1] + 8].tolist()

    def _generate(self):
        import torch

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        with torch.no_grad():
            return self.model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=self.new, min_new_tokens=self.new,
                                       do_sample=False, pad_token_id=pad)

    def step(self) -> dict:
        import torch

        with torch.no_grad():
            t = time.perf_counter()
            self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=True)
            prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = self._generate()
        gen = time.perf_counter() - t
        n = out.shape[1] - self.ids.shape[1]
        return {"prefill_s": prefill, "generate_s": gen, "new_tokens": n, "tokens_per_s": n / gen}


def make_variant(spec: dict):
    return LlamaCppVariant(spec) if spec["kind"] == "gguf_llama_cpp" else GenVariant(spec)


MERGED = "merged export (stock from_pretrained)"
MERGED_T = "merged export (TorchLinear)"
MERGED_AWQ = "merged AWQ export (stock from_pretrained)"
UNMERGED = "GPTQ base + adapter, ours (TorchLinear)"
UNMERGED_P = "GPTQ base + adapter, stock PEFT (auto kernel)"
FLOAT = "float fp32 + LoRA merged"
GGUF = "merged export as GGUF Q4_1 (llama.cpp)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (default 5, 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    ap.add_argument("--lora-b-std", type=float, default=0.02, help="std of the random lora_B of both adapters")
    ap.add_argument("--no-gguf", action="store_true", help="skip the GGUF Q4_1 / llama.cpp variant")
    ap.add_argument("--variants", help="comma-separated subset of the variant keys to run: merged_auto, merged_torch, "
                    "merged_awq_auto, unmerged_ours, unmerged_auto_peft, float_lora_merged, gguf_llama_cpp (default: all)")
    ap.add_argument("--gguf-tokenizer-pre", help="tokenizer.ggml.pre for the GGUF (only for a tokenizer llama.cpp's converter "
                    "does not know, e.g. 'gpt-2' for --tiny)")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    setup_env()
    float_dir, gptq_dir = resolve_models(args)

    from bench.train_step import _targets_of

    meta = metadata(args, batch=1, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                    float_model=float_dir, gptq_model=gptq_dir, lora_b_std=args.lora_b_std)
    print(f"inference: prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, batch 1, greedy, {args.repeats} rounds, "
          f"threads {meta['torch_threads']}\n  float {float_dir}\n  gptq  {gptq_dir}", flush=True)
    with tempfile.TemporaryDirectory(prefix="qalora-bench-inf-") as tmp:
        from qalora_hf.gguf_export import llama_cpp_available

        with_gguf = not args.no_gguf and llama_cpp_available()
        if not args.no_gguf and not with_gguf:
            print("  GGUF variant: n/a, llama-cpp-python is not installed (make install-llama)", flush=True)
        prep = prepare(gptq_dir, Path(tmp), args.seed, args.lora_b_std, gguf=with_gguf,
                       gguf_tokenizer_pre=args.gguf_tokenizer_pre or ("gpt-2" if getattr(args, "tiny", False) else None))
        print(f"  prepared adapter + round-merged export in {prep['merge_export_s']:.1f}s ({prep['zeros_changed']} zero-points changed)", flush=True)
        common = {"float": float_dir, "gptq": gptq_dir, "adapter": prep["adapter"], "merged": prep["merged"],
                  "merged_awq": prep["merged_awq"], "seed": args.seed,
                  "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                  "targets": _targets_of(gptq_dir), "lora_b_std": args.lora_b_std, "gguf": prep.get("gguf")}
        kinds = {MERGED: "merged_auto", MERGED_T: "merged_torch", UNMERGED: "unmerged_ours", UNMERGED_P: "unmerged_auto_peft", FLOAT: "float_lora_merged"}
        if prep["merged_awq"]:
            kinds = {MERGED: "merged_auto", MERGED_AWQ: "merged_awq_auto", **{n: k for n, k in kinds.items() if n != MERGED}}
        if prep.get("gguf"):
            kinds[GGUF] = "gguf_llama_cpp"
        sizes = {MERGED: file_size_mb(prep["merged"]), MERGED_T: file_size_mb(prep["merged"]), UNMERGED: file_size_mb(gptq_dir),
                 UNMERGED_P: file_size_mb(gptq_dir), FLOAT: file_size_mb(float_dir)}
        if prep["merged_awq"]:
            sizes[MERGED_AWQ] = file_size_mb(prep["merged_awq"])
        if prep.get("gguf"):
            sizes[GGUF] = file_size_mb(prep["gguf"])
        if args.variants:
            wanted = set(args.variants.split(","))
            unknown = wanted - set(kinds.values())
            if unknown:
                raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {sorted(kinds.values())}")
            kinds = {n: k for n, k in kinds.items() if k in wanted}
        res = run_interleaved({n: {**common, "kind": k} for n, k in kinds.items()}, make_variant, args.repeats)

    rows, summary = [], {}
    for name, r in res.items():
        if not r.get("steps"):
            summary[name] = {"error": r.get("error"), "where": r.get("where")}
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", f"n/a: {r.get('error')}"])
            continue
        info, steps = r["info"], r["steps"]
        s = {**info, "tokens_per_s_median": median_of(steps, "tokens_per_s"), "prefill_s_median": median_of(steps, "prefill_s"),
             "generate_s_median": median_of(steps, "generate_s"), "steps": steps, "peak_rss_mb": r.get("final", {}).get("peak_rss_mb")}
        s["decode_tokens_per_s_median"] = median_of(  # llama.cpp: timed from the first to the last new token
            [{"d": (x["new_tokens"] - 1) / max(x.get("decode_s") or x["generate_s"] - x["prefill_s"], 1e-9)} for x in steps], "d")
        s["file_size_mb"] = sizes.get(name)
        summary[name] = s
        rows.append([name, info["kernel"], info["first_generate_s"], 1000 * s["prefill_s_median"], s["generate_s_median"], s["tokens_per_s_median"],
                     s["decode_tokens_per_s_median"], s["file_size_mb"], s["peak_rss_mb"]])
    if not with_gguf and not args.no_gguf:
        rows.append([GGUF, "-", "-", "-", "-", "-", "-", "-", "n/a: llama-cpp-python not installed (make install-llama)"])

    def tps(name):
        return summary.get(name, {}).get("tokens_per_s_median")

    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    tg = [
        target(f"merged (stock load, {summary.get(MERGED, {}).get('kernel', '?')}) / float+LoRA tokens/s", ratio(tps(MERGED), tps(FLOAT)), ">=", 2.0),
        target(f"merged (stock load) / GPTQ base + unmerged adapter (ours, TorchLinear) tokens/s", ratio(tps(MERGED), tps(UNMERGED)), ">=", 1.1),
        target("merged (TorchLinear) / float+LoRA tokens/s", ratio(tps(MERGED_T), tps(FLOAT)), ">=", 2.0),
        target("merged (TorchLinear) / GPTQ base + unmerged adapter (TorchLinear) tokens/s", ratio(tps(MERGED_T), tps(UNMERGED)), ">=", 1.1),
    ]
    dec = lambda name: summary.get(name, {}).get("decode_tokens_per_s_median")  # noqa: E731
    tg.append(target("GGUF Q4_1 in llama.cpp / float+LoRA decode tokens/s", ratio(dec(GGUF), dec(FLOAT)), ">=", 3.0))
    if tps(UNMERGED_P):
        tg.append(target("merged (stock load) / GPTQ base + adapter, stock PEFT (same auto kernel) tokens/s", ratio(tps(MERGED), tps(UNMERGED_P)), ">=", 1.1))
    awq_vs_gptq = ratio(tps(MERGED_AWQ), tps(MERGED))
    same = {n: s.get("first_tokens") for n, s in summary.items() if s.get("first_tokens")}
    md = (
        f"### Inference (batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens greedy, median of {args.repeats} interleaved rounds, "
        f"{meta['torch_threads']} torch threads, seed {args.seed}, {meta['date']})\n\n"
        + markdown_table(["variant", "kernel", "first generate s", "prefill ms", "generate s", "tokens/s", "decode tokens/s", "file MiB", "peak RSS MiB"], rows)
        + "\n\n" + targets_table(tg)
        + (f"\n\nAWQ export / GPTQ export, both stock from_pretrained on this CPU ({summary.get(MERGED_AWQ, {}).get('kernel', '?')} vs "
           f"{summary.get(MERGED, {}).get('kernel', '?')}): {awq_vs_gptq:.2f}x tokens/s (same integers, no target: the AWQ layout is for "
           "vLLM/SGLang Marlin and mlx-lm, whose speed is not measured here)." if awq_vs_gptq is not None else "")
        + f"\n\nAdapter: r=16, random lora_B (std {args.lora_b_std}); merged with strategy 'round' ({prep['zeros_changed']} zero-points changed). "
        + "First 8 generated ids per variant: " + "; ".join(f"{n}: {v}" for n, v in same.items())
        + f"\n\nModel: {gptq_dir} / {float_dir}. Load average at start: {meta['loadavg_at_start']}.\n"
    )
    print("\n" + md)
    out = write_results("inference", args, {**meta, "prepare": prep, "results": summary, "targets": tg}, md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
