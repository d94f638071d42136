"""Held-out loss of a GGUF Q4_1 export in llama.cpp vs the GPTQ export in transformers (same rows, same ids).

    python bench/gguf_fidelity.py --gptq-dir <merged GPTQ export> [--gguf <file.gguf>] \\
        [--base <GPTQ base> --adapter <adapter dir>] [--dataset alpaca_en_demo.json --num-holdout 99] [--threads N]
    python bench/gguf_fidelity.py --base <GPTQ base> --adapter <adapter dir> [--out ...]     (no merge)

Without --gguf the GGUF is written first with qalora_hf.export_gguf (beside --out).  With --base and
--adapter it also measures the base GPTQ model and the trained (unmerged) adapter on the same rows, so
the table gives the fraction of the fine-tuning gain each export keeps.  Goal: |llama.cpp - transformers|
<= 0.002 nats/token.  Needs llama-cpp-python (make install-llama).

Without --gptq-dir (no merged export): the GGUF is written from the base and the unmerged adapter
(``export_gguf(base, path, adapter=...)``: the adapter in each Q4_1 block's float m).  It is measured twice:
decoded by transformers' own GGUF loader (``from_pretrained(gguf_file=...)``, gguf-py's dequantiser) in
the same engine as the trained model, and run by llama.cpp next to the base's own GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gptq-dir", help="the merged GPTQ export the GGUF is (or is to be) made from (default: none, "
                    "the GGUF is written from --base + --adapter without a merge)")
    ap.add_argument("--gguf", help="the GGUF file (default: written now to <out dir>/<name>-Q4_1.gguf)")
    ap.add_argument("--base", help="GPTQ base the adapter was trained on (for the gain kept)")
    ap.add_argument("--adapter", help="the trained QA-LoRA adapter (for the gain kept)")
    ap.add_argument("--dataset", default="alpaca_en_demo.json", help="Alpaca JSON; a bare name is looked up in <cache>/data")
    ap.add_argument("--num-holdout", type=int, default=99, help="last rows held out (default 99)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp and torch threads (default: all cores)")
    ap.add_argument("--out", default="bench/results/gguf_fidelity.json")
    args = ap.parse_args(argv)

    import torch

    from qalora_hf.cache import default_cache_dir
    from qalora_hf.data import read_rows, token_batches
    from qalora_hf.gguf_export import export_gguf, gguf_heldout_fidelity, llama_cpp_available
    from qalora_hf.metrics import measure

    if not args.gptq_dir and not (args.base and args.adapter):
        ap.error("pass --gptq-dir (a merged export), or --base and --adapter (base + adapter GGUF, no merge)")
    if args.gptq_dir and not llama_cpp_available():
        from qalora_hf.gguf_export import LLAMA_INSTALL_HINT

        sys.exit(f"llama-cpp-python is not installed; install it with: {LLAMA_INSTALL_HINT}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = Path(args.dataset) if Path(args.dataset).exists() else default_cache_dir() / "data" / args.dataset
    rows = read_rows(dataset)[-args.num_holdout:]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.gptq_dir:
        return _base_plus_adapter(args, rows, out)
    gguf_path = Path(args.gguf) if args.gguf else out.with_name(f"{Path(args.gptq_dir).resolve().name}-Q4_1.gguf")
    if not args.gguf:
        t = time.time()
        export_gguf(args.gptq_dir, gguf_path, overwrite=True)
        print(f"wrote {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB) in {time.time() - t:.0f}s", flush=True)

    loss_base = loss_trained = None
    if args.base and args.adapter:
        from transformers import AutoTokenizer

        from qalora_hf.gptq import load_gptq_model
        from qalora_hf.model import load_qalora_adapter

        tok = AutoTokenizer.from_pretrained(args.gptq_dir)
        batches = token_batches(rows, tok, args.max_length)
        loss_base = measure(load_gptq_model(args.base), batches).loss
        loss_trained = measure(load_qalora_adapter(load_gptq_model(args.base), args.adapter), batches).loss
    t = time.time()
    r = gguf_heldout_fidelity(gguf_path, args.gptq_dir, rows, loss_base=loss_base, loss_trained=loss_trained,
                              max_length=args.max_length, n_threads=args.threads)
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"| model | engine | held-out loss ({r['rows']} rows, {r['tokens']} tokens) | fine-tuning gain kept |", "|---|---|---|---|"]
    if loss_base is not None:
        lines += [f"| base GPTQ | transformers | {loss_base:.4f} | 0.0% |", f"| trained (adapter, unmerged) | transformers | {loss_trained:.4f} | 100.0% |"]
    lines += [f"| merged GPTQ export | transformers | {r['loss_gptq']:.4f} | {pct(r['gain_kept_gptq'])} |",
              f"| same export as GGUF Q4_1 | llama.cpp | {r['loss_gguf']:.4f} | {pct(r['gain_kept_gguf'])} |"]
    verdict = "PASS" if abs(r["diff"]) <= 0.002 else "FAIL"
    md = ("\n".join(lines) + f"\n\nllama.cpp - transformers: {r['diff']:+.5f} nats/token (goal |diff| <= 0.002: {verdict}); "
          f"llama.cpp's own tokenizer split {r['same_tokens']}/{r['rows']} rows into the same ids as the Hugging Face tokenizer. "
          f"({time.time() - t:.0f}s)\n")
    print("\n" + md)
    out.write_text(json.dumps({**r, "loss_base": loss_base, "loss_trained": loss_trained, "gguf": str(gguf_path),
                               "gptq_dir": str(args.gptq_dir)}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _base_plus_adapter(args, rows, out: Path) -> int:
    """GGUF from base + unmerged adapter: transformers (decoded) and llama.cpp (run) against the trained model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qalora_hf.data import token_batches
    from qalora_hf.gguf_export import export_gguf, llama_cpp_available, llama_cpp_completion_loss
    from qalora_hf.gptq import load_gptq_model
    from qalora_hf.metrics import gain_kept, measure
    from qalora_hf.model import load_qalora_adapter

    files = {"adapter": out.with_suffix(".base+adapter-Q4_1.gguf"), "base": out.with_suffix(".base-Q4_1.gguf")}
    if not llama_cpp_available():  # transformers' GGUF loader still decodes the file; llama.cpp's rows are left out
        print("llama-cpp-python is not installed (make install-llama): measuring the GGUF in transformers only", flush=True)
        del files["base"]
    for what, path in files.items():
        t = time.time()
        export_gguf(args.base, path, adapter=args.adapter if what == "adapter" else None, overwrite=True)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.time() - t:.0f}s", flush=True)
    tok = AutoTokenizer.from_pretrained(args.base)
    batches = token_batches(rows, tok, args.max_length)
    t = time.time()
    loss = {"base": measure(load_gptq_model(args.base), batches).loss,
            "trained": measure(load_qalora_adapter(load_gptq_model(args.base), args.adapter), batches).loss}
    decoded = AutoModelForCausalLM.from_pretrained(str(files["adapter"].parent), gguf_file=files["adapter"].name, dtype=torch.float32)
    loss["gguf_transformers"] = measure(decoded.eval(), batches).loss
    del decoded
    kept_tf = gain_kept(loss["base"], loss["trained"], loss["gguf_transformers"])
    lines = [f"| model | engine | held-out loss ({len(rows)} rows) | fine-tuning gain kept |", "|---|---|---|---|",
             f"| base GPTQ | transformers | {loss['base']:.4f} | 0.0% |",
             f"| trained (adapter, unmerged) | transformers | {loss['trained']:.4f} | 100.0% |",
             f"| base + adapter GGUF Q4_1, decoded by transformers' GGUF loader | transformers | {loss['gguf_transformers']:.4f} | {100 * kept_tf:.2f}% |"]
    kept_lc, note = None, "llama.cpp not measured"
    if "base" in files:
        lc = {what: llama_cpp_completion_loss(path, tok, rows, max_length=args.max_length, n_threads=args.threads) for what, path in files.items()}
        loss["gguf_llama_cpp"], loss["base_gguf_llama_cpp"] = lc["adapter"]["loss"], lc["base"]["loss"]
        kept_lc = (loss["base_gguf_llama_cpp"] - loss["gguf_llama_cpp"]) / (loss["base"] - loss["trained"])
        lines += [f"| base GGUF Q4_1 | llama.cpp | {loss['base_gguf_llama_cpp']:.4f} | |",
                  f"| base + adapter GGUF Q4_1 | llama.cpp | {loss['gguf_llama_cpp']:.4f} | {100 * kept_lc:.2f}% (llama.cpp's gain / transformers' gain) |"]
        note = f"llama.cpp's tokenizer split {lc['adapter']['same_tokens']}/{len(rows)} rows as Hugging Face does; the losses use the Hugging Face ids"
    print("\n" + "\n".join(lines) + f"\n\n({time.time() - t:.0f}s; {note})\n")
    out.write_text(json.dumps({"loss": loss, "gain_kept_transformers": kept_tf, "gain_kept_llama_cpp": kept_lc, "rows": len(rows),
                               "base": str(args.base), "adapter": str(args.adapter)}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
