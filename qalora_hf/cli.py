"""``qalora-hf``: merge a trained QA-LoRA adapter into its GPTQ base, export it, push it to the Hub.

::

    qalora-hf merge --base BASE --adapter ADAPTER_DIR --output-dir OUT [--strategy distill|scales|gptq|round]
                    [--calibration-file rows.json[l]] [--push-to-hub user/name] ...
    qalora-hf push OUT user/name [--private] [--revision R] [--commit-message M]

Every input is checked before a model is loaded; bad input ends with a one-line ``qalora-hf: error: ...``
and exit status 2.  The merge runs on the CPU in float32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

PROG = "qalora-hf"
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class UsageError(Exception):
    """Bad command-line input, reported as one line."""


def _log(msg: str) -> None:
    print(f"[{PROG}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Input checks (no torch / transformers imports)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {what} {path}: {err}") from None


def _check_base(base: str) -> Optional[dict]:
    """The base's ``config.json`` when it is a local directory (None for a Hub repo id, checked at load)."""
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"--base {base}: no config.json in that directory; pass a GPTQ model directory or a Hub repo id")
        config = _read_json(path / "config.json", "the base config")
        _check_gptq_config(config, base)
        return config
    if base.startswith((".", "/", "~")) or base.count("/") != 1:
        raise UsageError(f"--base {base}: no such directory (and not a Hub repo id 'namespace/name')")
    return None


def _check_gptq_config(config: dict, base: str) -> dict:
    from .gptq import check_gptq_config

    try:
        return check_gptq_config(config.get("quantization_config"))
    except (TypeError, ValueError) as err:
        raise UsageError(f"--base {base}: {err}") from None


def _check_adapter(adapter: str) -> dict:
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise UsageError(f"--adapter {adapter}: no such directory")
    if not (path / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {adapter}: no adapter_config.json; pass the directory written by save_pretrained of the adapter")
    config = _read_json(path / "adapter_config.json", "the adapter config")
    if not config.get("use_qalora", False):
        raise UsageError(f"--adapter {adapter} is a plain LoRA adapter (use_qalora is not true); only QA-LoRA adapters "
                         "merge into GPTQ zero-points")
    from .safety import check_adapter_dir

    try:
        check_adapter_dir(path)
    except FileNotFoundError as err:
        raise UsageError(f"--adapter {adapter}: {err}") from None
    return config


def _check_output_dir(output_dir: str, overwrite: bool) -> None:
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {output_dir} exists and is a file")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"--output-dir {output_dir} exists and is not empty; pass --overwrite or choose another directory")


def _check_repo_id(repo_id: str, flag: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UsageError(f"{flag} {repo_id!r} is not a valid repo id: {str(err).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise UsageError(f"{flag} {repo_id!r} must be 'namespace/name'")


def read_rows(path: str) -> list[dict]:
    """Rows of a ``.json`` (a list) or ``.jsonl`` file: ``{"text"}``, ``{"messages"}`` or Alpaca ``{"instruction", "input", "output"}``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--calibration-file {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if isinstance(rows, dict):
                rows = rows.get("data") or rows.get("rows") or [rows]
    except ValueError as err:
        raise UsageError(f"--calibration-file {path} is not valid JSON/JSONL: {err}") from None
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"--calibration-file {path} holds no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not ({"text", "messages"} & row.keys() or {"instruction", "output"} <= row.keys()):
            raise UsageError(f"--calibration-file {path}: row {i} has neither 'text', 'messages' nor Alpaca "
                             "'instruction'/'output' fields")
    return rows


# --------------------------------------------------------------------------------------------------
# Calibration data and measurements


def row_text(row: dict, tokenizer) -> str:
    """A calibration row as training text: ``text`` as is, ``messages`` / Alpaca rows through the chat template."""
    if "text" in row:
        return str(row["text"])
    messages = row.get("messages")
    if messages is None:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


def make_batches(texts: list[str], tokenizer, max_length: int, batch_size: int = 8) -> list[dict]:
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def measure(model, batches: list[dict]) -> tuple[float, list]:
    """Mean next-token loss over non-padding tokens, and the logits of each batch."""
    import torch
    import torch.nn.functional as F

    total, count, logits_all = 0.0, 0, []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch).logits.float()
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels[:, 1:] != -100).sum())
            logits_all.append(logits.masked_fill(batch["attention_mask"][..., None] == 0, 0.0))
    return total / max(count, 1), logits_all


# --------------------------------------------------------------------------------------------------
# Commands


def cmd_merge(args) -> int:
    # 1. Check every input before loading anything heavy.
    base_config = _check_base(args.base)
    adapter_config = _check_adapter(args.adapter)
    _check_output_dir(args.output_dir, args.overwrite)
    if args.strategy != "round" and not args.calibration_file:
        raise UsageError(f"--strategy {args.strategy} needs --calibration-file (rows of the training data, JSON or JSONL); "
                         "or pass --strategy round (zero-points only, no calibration)")
    rows = read_rows(args.calibration_file) if args.calibration_file else []
    if args.num_calibration < 1 or args.max_length < 8 or args.num_eval < 0:
        raise UsageError("--num-calibration must be >= 1, --num-eval >= 0 and --max-length >= 8")
    for flag in ("push_to_hub", "base_model_id", "float_model"):
        value = getattr(args, flag)
        if value:
            _check_repo_id(value, "--" + flag.replace("_", "-"))
    extra = Path(args.adapter)
    trainer_state = _read_json(extra / "trainer_state.json", "trainer_state.json") if (extra / "trainer_state.json").is_file() else None
    training_args = _read_json(extra / "training_args.json", "training_args.json") if (extra / "training_args.json").is_file() else {}

    from .card import build_model_card, gain_kept, plot_training_loss

    repo_id = args.push_to_hub or f"{args.namespace}/{Path(args.output_dir).resolve().name}"
    base_name = args.base_model_id or (args.base if not Path(args.base).exists() else Path(args.base).resolve().name)

    def card(bits, group_size, desc_act, merge_metrics, loss_plot):
        return build_model_card(
            repo_id=repo_id, base_model=base_name, float_model=args.float_model, license=args.license,
            datasets=args.dataset or (), qalora_config=adapter_config, training_args=training_args,
            merge_metrics=merge_metrics, eval_results=None, loss_plot=loss_plot,
            bits=bits, group_size=group_size, desc_act=desc_act,
        )

    try:  # a card that would leak a path or a token fails now, not after the merge
        card(4, 32, False, None, None)
    except ValueError as err:
        raise UsageError(str(err)) from None

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    t0 = time.time()
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from .export import export_gptq
    from .gptq import load_gptq_model
    from .merge import merge_qalora
    from .model import load_qalora_adapter

    # 2. Load the base, its tokenizer and the adapter.
    if base_config is None:
        _log(f"reading the config of {args.base}")
        base_config = AutoConfig.from_pretrained(args.base).to_dict()
        _check_gptq_config(base_config, args.base)
    qc = base_config["quantization_config"]
    bits = int(qc["bits"])
    _log(f"loading GPTQ base {args.base} ({bits}-bit, group {qc.get('group_size')}) on the CPU in float32")
    model = load_gptq_model(args.base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _log(f"loading QA-LoRA adapter {args.adapter}")
    model = load_qalora_adapter(model, args.adapter)

    # 3. Calibration rows and held-out rows (the ones after them) for the before/after measurements.
    texts = [row_text(r, tokenizer) for r in rows]
    calib_texts = texts[:args.num_calibration]
    eval_texts = texts[args.num_calibration:args.num_calibration + args.num_eval]
    if not eval_texts and args.num_eval:  # too few rows to hold any out: measure on calibration rows, and say so
        eval_texts = calib_texts[:args.num_eval]
    calibration = make_batches(calib_texts, tokenizer, args.max_length) if calib_texts else None
    eval_batches = make_batches(eval_texts, tokenizer, args.max_length) if eval_texts else []
    metrics: dict = {"strategy": args.strategy}
    if eval_batches:
        _log(f"measuring base and trained model on {len(eval_texts)} rows")
        with model.disable_adapter():
            loss_base, _ = measure(model, eval_batches)
        loss_trained, logits_trained = measure(model, eval_batches)
        metrics.update(eval_rows=len(eval_texts), loss_base=loss_base, loss_trained=loss_trained)
        if len(texts) <= args.num_calibration:
            metrics["eval_on_calibration_rows"] = True

    # 4. Merge.
    _log(f"merging ({args.strategy}{f', {len(calib_texts)} calibration rows' if calib_texts else ''})")
    merged, report = merge_qalora(model, strategy=args.strategy, calibration=calibration, progress=False)
    totals = report.totals
    metrics.update({k: totals[k] for k in ("layers", "exact_layers", "codes_changed", "zeros_changed", "zeros_clamped",
                                           "rel_output_error_mean") if totals.get(k) is not None})
    if eval_batches:
        loss_exported, logits_exported = measure(merged, eval_batches)
        diffs = [(a - b).abs() for a, b in zip(logits_trained, logits_exported)]
        metrics.update(loss_exported=loss_exported, max_logit_diff=max(float(d.max()) for d in diffs))
        metrics["gain_kept"] = gain_kept(loss_base, loss_trained, loss_exported)

    # 5. Card, loss plot, export.
    extra_files, loss_plot = {}, None
    with tempfile.TemporaryDirectory() as scratch:
        if trainer_state and trainer_state.get("log_history"):
            try:
                extra_files["loss.png"] = plot_training_loss(trainer_state["log_history"], Path(scratch) / "loss.png")
                loss_plot = "loss.png"
            except ValueError:
                pass
        model_card = card(bits, int(qc.get("group_size", -1)), bool(qc.get("desc_act", False)), metrics, loss_plot)
        extra_files["merge_report.json"] = Path(scratch) / "merge_report.json"
        extra_files["merge_report.json"].write_text(json.dumps({"metrics": metrics, **report.to_dict()}, indent=2) + "\n")
        _log(f"exporting to {args.output_dir}")
        out = export_gptq(merged, args.output_dir, tokenizer=tokenizer, card=model_card, adapter_dir=args.adapter,
                          extra_files=extra_files, overwrite=args.overwrite, base_model_id=args.base_model_id)

    commit = None
    if args.push_to_hub:
        from .hub import push_gptq_to_hub

        _log(f"pushing to {args.push_to_hub}")
        commit = push_gptq_to_hub(out, args.push_to_hub, private=args.private)

    _print_summary(metrics, out, commit, args.push_to_hub, time.time() - t0)
    return 0


def _print_summary(metrics: dict, out: Path, commit: Optional[str], repo_id: Optional[str], seconds: float) -> None:
    def fmt(key, v):
        if key == "gain_kept":
            return f"{100 * v:.1f}%"
        return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)

    rows = [(k, fmt(k, v)) for k, v in metrics.items() if v is not None]
    rows.append(("output_dir", str(out)))
    if commit:
        rows.append(("pushed", f"{repo_id}@{commit[:12]}"))
    rows.append(("time", f"{seconds:.1f}s"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)


def cmd_push(args) -> int:
    from .hub import push_gptq_to_hub

    path = Path(args.folder).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(f"{args.folder}: not an exported model directory (needs config.json)")
    _check_repo_id(args.repo_id, "repo_id")
    kwargs = {"private": args.private, "revision": args.revision}
    if args.commit_message:
        kwargs["commit_message"] = args.commit_message
    commit = push_gptq_to_hub(path, args.repo_id, **kwargs)
    print(f"pushed {path.name} to {args.repo_id} at commit {commit}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Merge, export and push QA-LoRA GPTQ models.")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge a QA-LoRA adapter into its GPTQ base and export a stock GPTQ checkpoint")
    m.add_argument("--base", required=True, help="GPTQ model directory or Hub repo id the adapter was trained on")
    m.add_argument("--adapter", required=True, help="QA-LoRA adapter directory (adapter_config.json with use_qalora); "
                   "trainer_state.json / training_args.json there feed the loss plot and the card")
    m.add_argument("--output-dir", required=True, help="where to write the merged checkpoint (written atomically)")
    m.add_argument("--strategy", choices=("distill", "scales", "gptq", "round"), default="distill",
                   help="distill (default): scales, then scale-only distillation towards the trained model; scales: scale refit + "
                        "re-chosen codes on calibration data; gptq: codes only; round: zero-points only")
    m.add_argument("--calibration-file", help="JSON/JSONL rows of the training data: {'text'}, {'messages'} or Alpaca rows")
    m.add_argument("--num-calibration", type=int, default=128, help="calibration rows used for the merge (default 128)")
    m.add_argument("--num-eval", type=int, default=8,
                   help="held-out rows (after the calibration rows) used to measure the merge (default 8; 0 = skip); "
                        "with no rows left, calibration rows are measured and the card says so")
    m.add_argument("--max-length", type=int, default=256, help="tokens per row (default 256)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    m.add_argument("--push-to-hub", metavar="REPO_ID", help="push the export to this Hub repo")
    m.add_argument("--private", action="store_true", help="create the Hub repo as private")
    m.add_argument("--base-model-id", help="Hub id of the GPTQ base for the card, when --base is a local directory")
    m.add_argument("--float-model", help="Hub id of the float model the base was quantised from (card metadata)")
    m.add_argument("--license", help="licence id for the card (e.g. apache-2.0)")
    m.add_argument("--dataset", action="append", help="training dataset id for the card (repeatable)")
    m.add_argument("--namespace", default="your-user", help="namespace shown in the card when not pushing")
    m.set_defaults(func=cmd_merge)

    p = sub.add_parser("push", help="push an exported model directory to the Hub")
    p.add_argument("folder", help="directory written by 'qalora-hf merge' or export_gptq")
    p.add_argument("repo_id", help="target repo, 'namespace/name'")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to (created from main when missing)")
    p.add_argument("--commit-message")
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``qalora-hf`` command. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OSError) as err:  # bad values/files found while loading (wrong adapter, missing repo, ...)
        print(f"{PROG}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        from .hub import HubPushError

        if isinstance(err, HubPushError):
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
