"""``qalora-hf``: merge a trained QA-LoRA adapter into its GPTQ base, export it, push it to the Hub.

::

    qalora-hf merge --base BASE --adapter ADAPTER_DIR --output-dir OUT [--strategy distill|scales|gptq|round]
                    [--calibration-file rows.json[l]] [--push-to-hub user/name] [--allow-other-base] ...
    qalora-hf push OUT user/name [--private] [--revision R] [--commit-message M]
    qalora-hf awq GPTQ_DIR_OR_REPO --output-dir OUT_AWQ [--push-to-hub user/name-AWQ] [--gptq-repo-id user/name] ...
    qalora-hf gguf OUT -o model-Q4_1.gguf [--float-type auto|f32|f16|bf16] [--push-to-hub user/name-GGUF] ...
    qalora-hf gguf BASE_DIR --adapter ADAPTER_DIR -o model-Q4_1.gguf ...     (no merge: the adapter goes into Q4_1's m)

Every input is checked before a model is loaded; bad input ends with a one-line ``qalora-hf: error: ...``
and exit status 2.  The merge runs on the CPU in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
        from .checkpoints import last_complete_checkpoint

        inside = last_complete_checkpoint(path)
        hint = f" (a training run: its newest complete checkpoint is {inside})" if inside is not None else ""
        raise UsageError(f"--adapter {adapter}: no adapter_config.json{hint}; pass the directory written by save_pretrained "
                         "of the adapter, or a checkpoint-* directory")
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
    from .checks import check_writable_dir

    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {output_dir} exists and is a file")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"--output-dir {output_dir} exists and is not empty; pass --overwrite or choose another directory")
    try:  # the export is written beside --output-dir and renamed into place: its parent must take a new directory
        check_writable_dir(path, "--output-dir", for_rename=True)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _check_repo_id(repo_id: str, flag: str) -> None:
    from .checks import check_repo_id

    try:
        check_repo_id(repo_id, flag, namespace_required=True)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _check_revision(revision: Optional[str], flag: str) -> None:
    from .checks import check_revision

    if revision is not None:
        try:
            check_revision(revision, flag)
        except ValueError as err:
            raise UsageError(str(err)) from None


def _read_calibration_rows(path: str) -> list[dict]:
    from .checks import check_rows
    from .data import read_rows

    try:
        rows = read_rows(path)
        check_rows(rows, path)  # a null text / output, named by row, before the base is loaded
        return rows
    except ValueError as err:
        raise UsageError(f"--calibration-file {err}") from None


# --------------------------------------------------------------------------------------------------
# Commands


def cmd_merge(args) -> int:
    from .strategies import STRATEGIES

    # 1. Check every input before loading anything heavy.
    base_config = _check_base(args.base)
    adapter_config = _check_adapter(args.adapter)
    _check_output_dir(args.output_dir, args.overwrite)
    if STRATEGIES[args.strategy].needs_calibration and not args.calibration_file:
        raise UsageError(f"--strategy {args.strategy} needs --calibration-file (rows of the training data, JSON or JSONL); "
                         "or pass --strategy round (zero-points only, no calibration)")
    rows = _read_calibration_rows(args.calibration_file) if args.calibration_file else []
    if args.num_calibration < 1 or args.max_length < 8 or args.num_eval < 0:
        raise UsageError("--num-calibration must be >= 1, --num-eval >= 0 and --max-length >= 8")
    for flag in ("push_to_hub", "base_model_id", "float_model"):
        value = getattr(args, flag)
        if value:
            _check_repo_id(value, "--" + flag.replace("_", "-"))
    extra = Path(args.adapter)
    trainer_state = _read_json(extra / "trainer_state.json", "trainer_state.json") if (extra / "trainer_state.json").is_file() else None
    training_args = _read_json(extra / "training_args.json", "training_args.json") if (extra / "training_args.json").is_file() else {}
    from .pipeline import CardInfo

    card = CardInfo(
        repo_id=args.push_to_hub or f"{args.namespace}/{Path(args.output_dir).resolve().name}",
        base_model=args.base_model_id or (args.base if not Path(args.base).exists() else Path(args.base).resolve().name),
        float_model=args.float_model, license=args.license, datasets=args.dataset or (), qalora_config=adapter_config,
        training_args=training_args,
    )
    try:  # a card that would leak a path or a token fails now, not after the merge
        card.check()
    except ValueError as err:
        raise UsageError(str(err)) from None

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    t0 = time.time()
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from .data import token_batches
    from .gptq import load_gptq_model
    from .model import load_qalora_adapter
    from .pipeline import merge_measure_export

    # 2. Load the base, its tokenizer and the adapter.
    if base_config is None:
        _log(f"reading the config of {args.base}")
        base_config = AutoConfig.from_pretrained(args.base).to_dict()
        _check_gptq_config(base_config, args.base)
    qc = base_config["quantization_config"]
    _log(f"loading GPTQ base {args.base} ({qc['bits']}-bit, group {qc.get('group_size')}) on the CPU in float32")
    model = load_gptq_model(args.base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _log(f"loading QA-LoRA adapter {args.adapter}")
    model = load_qalora_adapter(model, args.adapter, allow_other_base=args.allow_other_base)  # refuses another base

    # 3. Calibration rows, and held-out rows (the ones after them) for the before/after measurements, as the recipe
    #    trained on them (qalora_hf.data: Alpaca rows through the Alpaca template).
    calib_rows = rows[:args.num_calibration]
    eval_rows, source = rows[args.num_calibration:args.num_calibration + args.num_eval], "rows after the calibration rows"
    if not eval_rows and args.num_eval and calib_rows:  # too few rows to hold any out: measure on calibration rows, and say so
        eval_rows, source = calib_rows[:args.num_eval], "calibration rows (not held out)"
    calibration = token_batches(calib_rows, tokenizer, args.max_length) if calib_rows else None
    holdout = token_batches(eval_rows, tokenizer, args.max_length) if eval_rows else []

    # 4. Measure, merge, measure, card, export, push: one pipeline (qalora_hf.pipeline).
    _log(f"merging ({args.strategy}{f', {len(calib_rows)} calibration rows' if calib_rows else ''}"
         f"{f', {len(eval_rows)} rows measured' if eval_rows else ''}) and exporting to {args.output_dir}")
    result = merge_measure_export(
        model, tokenizer, args.output_dir, card=card, strategy=args.strategy, calibration=calibration, holdout=holdout,
        holdout_source=source if eval_rows else None, adapter_dir=args.adapter,
        log_history=(trainer_state or {}).get("log_history"), base_model_id=args.base_model_id,
        push_to_hub=args.push_to_hub, hub_private=args.private, overwrite=args.overwrite, progress=False,
    )
    if result.commit:
        _log(f"pushed to {args.push_to_hub}")
    _print_summary(result.metrics, result.export_dir, result.commit, args.push_to_hub, time.time() - t0)
    return 0


def _print_summary(metrics: dict, out: Path, commit: Optional[str], repo_id: Optional[str], seconds: float) -> None:
    from .metrics import format_metric

    rows = [(k, format_metric(k, v)) for k, v in metrics.items() if format_metric(k, v) is not None]
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
    _check_revision(args.revision, "--revision")
    kwargs = {"private": args.private, "revision": args.revision}
    if args.commit_message:
        kwargs["commit_message"] = args.commit_message
    commit = push_gptq_to_hub(path, args.repo_id, **kwargs)
    print(f"pushed {path.name} to {args.repo_id} at commit {commit}", flush=True)
    return 0


def cmd_gguf(args) -> int:
    """Write a GPTQ 2/3/4-bit export, or a GPTQ base + QA-LoRA adapter, as a lossless GGUF Q4_1 file (docs/gguf.md);
    optionally push it."""
    from .gguf_export import GGUFExportError, check_gptq_dir

    path = Path(args.source).expanduser()
    if not path.is_dir():
        raise UsageError(f"{args.source}: no such directory; pass a GPTQ export directory ('qalora-hf merge' / export_gptq output)")
    output = Path(args.output).expanduser()
    if output.suffix.lower() != ".gguf":
        raise UsageError(f"--output {args.output}: the file name must end in .gguf")
    if output.exists() and not args.overwrite:
        raise UsageError(f"--output {args.output} exists; pass --overwrite or choose another file")
    if args.push_to_hub:
        _check_repo_id(args.push_to_hub, "--push-to-hub")
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise UsageError("--push-to-hub with HF_HUB_OFFLINE set: unset it to push, or drop --push-to-hub and push the "
                             "file later (push_gguf_to_hub)")
    if args.gptq_repo_id:
        _check_repo_id(args.gptq_repo_id, "--gptq-repo-id")
    if args.adapter:
        _check_adapter(args.adapter)
    try:
        check_gptq_dir(path)  # every refusal (bits, act-order, group size, adapters, float model) before any work
    except GGUFExportError as err:
        raise UsageError(str(err)) from None

    from .gguf_export import export_gguf, gguf_summary

    t0 = time.time()
    what = "the GPTQ integers + the adapter's per-group offsets in m" if args.adapter else "the GPTQ integers"
    _log(f"writing {output} (Q4_1 from {what}; everything else by llama.cpp's converter)")
    import warnings

    from .gguf_export import M_ROUNDING_WARN

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            out = export_gguf(path, output, adapter=args.adapter, float_type=args.float_type, tokenizer_pre=args.tokenizer_pre,
                              model_name=args.model_name, overwrite=args.overwrite, converter_dir=args.llama_cpp_dir)
    except GGUFExportError as err:
        raise UsageError(str(err)) from None
    ours = [str(w.message) for w in caught if "resolution of m" in str(w.message)]
    for w in caught:
        if str(w.message) not in ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for msg in ours:
        _log(f"WARNING: {msg}")
    summary = gguf_summary(out, None if args.adapter else path)
    if args.adapter:
        summary["checked"] = "every Q4_1 tensor decoded by gguf-py = s*(q-z) + adapter offset, to the fp16 rounding of m"
        summary["adapter shifts"] = (f"WARNING: the rounding of m changes them by more than {100 * M_ROUNDING_WARN:.0f} % (rms); "
                                     "see the warning above" if ours else
                                     f"the rounding of m changes them by under {100 * M_ROUNDING_WARN:.0f} % (rms)")
    commit = None
    if args.push_to_hub:
        from .gguf_export import push_gguf_to_hub

        _log(f"pushing to {args.push_to_hub}")
        from .card import ALPACA_OLLAMA_TEMPLATE

        commit = push_gguf_to_hub(out, args.push_to_hub, gptq_dir=path, gptq_repo_id=args.gptq_repo_id, private=args.private,
                                  prompt_template=ALPACA_OLLAMA_TEMPLATE if args.alpaca_template else None,
                                  from_adapter=bool(args.adapter))
    rows = [("gguf", str(out)), ("size", f"{out.stat().st_size / 2**20:.1f} MiB")] + [(k, str(v)) for k, v in summary.items()]
    if commit:
        rows.append(("pushed", f"{args.push_to_hub}@{commit[:12]}"))
    rows.append(("time", f"{time.time() - t0:.1f}s"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)
    return 0


def cmd_awq(args) -> int:
    """Repack a merged 4-bit GPTQ export losslessly into AWQ's GEMM layout (docs/awq.md); optionally push it."""
    from .awq_export import AwqExportError, _check_gptq_dir

    _check_output_dir(args.output_dir, args.overwrite)
    for flag in ("push_to_hub", "gptq_repo_id"):
        if getattr(args, flag):
            _check_repo_id(getattr(args, flag), "--" + flag.replace("_", "-"))
    source = Path(args.source).expanduser()
    gptq_repo_id = args.gptq_repo_id
    if not source.exists():
        if args.source.startswith((".", "/", "~")) or args.source.count("/") != 1:
            raise UsageError(f"{args.source}: no such directory (and not a Hub repo id 'namespace/name')")
        from huggingface_hub import snapshot_download

        _log(f"downloading {args.source} from the Hub")
        source = Path(snapshot_download(args.source, allow_patterns=["*.json", "*.safetensors", "*.md", "*.jinja", "*.txt",
                                                                     "*.model", "*.png"]))
        gptq_repo_id = gptq_repo_id or args.source
    try:
        _check_gptq_dir(source)  # refusals (act-order, bits, group size, float, adapter dir) before loading
    except AwqExportError as err:
        raise UsageError(str(err)) from None
    t0 = time.time()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    from .awq_export import export_awq

    card = None
    adapter = source / "adapter" if (source / "adapter" / "adapter_config.json").is_file() else None
    repo_id = args.push_to_hub or f"{args.namespace}/{Path(args.output_dir).resolve().name}"
    if (source / "README.md").is_file() and not args.no_card:
        from huggingface_hub import ModelCard

        from .card import build_awq_model_card

        group_size = int(_read_json(source / "config.json", "the GPTQ config")["quantization_config"]["group_size"])
        card = build_awq_model_card(ModelCard.load(source / "README.md"), repo_id=repo_id, gptq_repo_id=gptq_repo_id,
                                    group_size=group_size, has_adapter=adapter is not None)
    extra = {name: source / name for name in ("merge_report.json", "loss.png") if (source / name).is_file()}
    _log(f"repacking {source.name} into AWQ's GEMM layout -> {args.output_dir}")
    try:
        out = export_awq(source, args.output_dir, card=card, extra_files=extra, overwrite=args.overwrite, adapter_dir=adapter)
    except AwqExportError as err:
        raise UsageError(str(err)) from None
    commit = None
    if args.push_to_hub:
        from .hub import push_gptq_to_hub

        _log(f"pushing to {args.push_to_hub}")
        commit = push_gptq_to_hub(out, args.push_to_hub, private=args.private,
                                  commit_message="Upload QA-LoRA merged model (AWQ GEMM layout)")
    qc = _read_json(out / "config.json", "the AWQ config")["quantization_config"]
    _print_summary({"format": f"awq gemm, {qc['bits']}-bit, group size {qc['group_size']}, zero_point"}, out, commit,
                   args.push_to_hub, time.time() - t0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .strategies import STRATEGIES

    parser = argparse.ArgumentParser(prog=PROG, description="Merge, export and push QA-LoRA GPTQ models.")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge a QA-LoRA adapter into its GPTQ base and export a stock GPTQ checkpoint")
    m.add_argument("--base", required=True, help="GPTQ model directory or Hub repo id the adapter was trained on")
    m.add_argument("--adapter", required=True, help="QA-LoRA adapter directory (adapter_config.json with use_qalora); "
                   "trainer_state.json / training_args.json there feed the loss plot and the card")
    m.add_argument("--output-dir", required=True, help="where to write the merged checkpoint (written atomically)")
    m.add_argument("--strategy", choices=tuple(STRATEGIES), default="distill",
                   help="; ".join(f"{s.name}: {s.summary}" for s in STRATEGIES.values()))
    m.add_argument("--calibration-file", help="JSON/JSONL rows of the training data, in the form it was trained on: {'text'}, "
                   "{'messages'}, {'prompt', 'completion'} or Alpaca rows (rendered with the Alpaca template, as the recipe trains)")
    m.add_argument("--num-calibration", type=int, default=256, help="calibration rows used for the merge (default 256: the distillation's 32 steps x 8 rows, each row once)")
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
    m.add_argument("--allow-other-base", action="store_true",
                   help="merge even when the adapter records another GPTQ base than --base (its qalora_base "
                        "fingerprint, or base_model_name_or_path); without it such an adapter is refused")
    m.set_defaults(func=cmd_merge)

    p = sub.add_parser("push", help="push an exported model directory to the Hub")
    p.add_argument("folder", help="directory written by 'qalora-hf merge' or export_gptq")
    p.add_argument("repo_id", help="target repo, 'namespace/name'")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to (created from main when missing)")
    p.add_argument("--commit-message")
    p.set_defaults(func=cmd_push)

    g = sub.add_parser("gguf", help="write a GPTQ 2/3/4-bit export (or a GPTQ base + QA-LoRA adapter) as a lossless GGUF Q4_1 "
                       "file for llama.cpp / ollama")
    g.add_argument("source", help="GPTQ export directory ('qalora-hf merge' / export_gptq output), or with --adapter the GPTQ "
                   "base directory: 2/3/4-bit, act-order off, "
                   "group size -1 or a multiple of 32")
    g.add_argument("-o", "--output", required=True, help="the .gguf file to write (atomically)")
    g.add_argument("--adapter", help="a saved QA-LoRA adapter (unmerged) trained on SOURCE, which is then the GPTQ base: "
                   "the adapter goes into each Q4_1 block's float m, so the file is the trained model, with no merge loss")
    g.add_argument("--float-type", choices=("auto", "f32", "f16", "bf16"), default="auto",
                   help="type of the unquantised tensors (embeddings, an unquantised lm_head): auto (default) = f16/bf16 when "
                        "that is exact, else f32; norms and biases are always f32")
    g.add_argument("--tokenizer-pre", help="tokenizer.ggml.pre, when llama.cpp's converter does not recognise the BPE pre-tokenizer")
    g.add_argument("--model-name", help="general.name in the GGUF (default: the converter's choice)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    g.add_argument("--llama-cpp-dir", help="llama.cpp source tree to take convert_hf_to_gguf.py from (default: the pinned "
                   "converter from the llama-cpp-python sdist, fetched once into the cache)")
    g.add_argument("--push-to-hub", metavar="REPO_ID", help="push the .gguf, a model card and an ollama Modelfile to this "
                   "repo (Hub convention: the GPTQ repo's name + '-GGUF')")
    g.add_argument("--gptq-repo-id", help="Hub id of the GPTQ repo this GGUF was made from, with --adapter the base's "
                   "(card metadata and links)")
    g.add_argument("--private", action="store_true", help="create the Hub repo as private")
    g.add_argument("--alpaca-template", action="store_true", help="the pushed ollama Modelfile uses the Alpaca prompt "
                   "(for models fine-tuned on it); default: ollama uses the chat template stored in the GGUF")
    g.set_defaults(func=cmd_gguf)

    a = sub.add_parser("awq", help="repack a merged 4-bit GPTQ export losslessly as AWQ (GEMM) for vLLM/SGLang Marlin, "
                                   "mlx-lm and transformers")
    a.add_argument("source", help="GPTQ export directory (qalora-hf merge / export_gptq) or its Hub repo id")
    a.add_argument("--output-dir", required=True, help="where to write the AWQ checkpoint (written atomically)")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    a.add_argument("--push-to-hub", metavar="REPO_ID", help="push the AWQ export to this Hub repo (convention: "
                   "the GPTQ repo's name with -AWQ)")
    a.add_argument("--private", action="store_true", help="create the Hub repo as private")
    a.add_argument("--gptq-repo-id", help="Hub id of the GPTQ export, linked from the AWQ card (default: SOURCE when it "
                   "is a repo id)")
    a.add_argument("--no-card", action="store_true", help="do not derive an AWQ card from the GPTQ export's README.md")
    a.add_argument("--namespace", default="your-user", help="namespace shown in the card when not pushing")
    a.set_defaults(func=cmd_awq)
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
