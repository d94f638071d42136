"""QA-LoRA SFT on Alpaca rows: quantise (GPTQ) -> train (QALoraTrainer) -> merge -> export -> push.

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/sft_alpaca.py --config recipes/configs/smollm2_135m_cpu.yaml [--max_steps 10 ...]

As alignment-handbook's scripts/sft.py: ``TrlParser((ScriptArguments, QALoraSFTConfig, ModelConfig))`` reads a
YAML file plus command-line overrides (``--help`` lists every option); ``main`` runs the stages in order: load
the data, the model (GPTQ-quantised first when it is a float model) and the trainer; train, resuming from the
newest *complete* checkpoint automatically (``qalora_hf.checkpoints``); merge, measure, export and push
(``QALoraMergeCallback``, main process only); write ``run_info.json`` (atomically, after the export: the marker of a
finished run).

Reruns (docs/reliability.md): a finished run with the same settings (model, data, quantisation, adapter, length
of training, merge) says so and exits without training or exporting, one with other settings is refused; one that
trained to the end but has no export (killed during the merge, push failed) exports from its final checkpoint
without training; ``--retrain`` starts over.  Every input is checked before any model is loaded; a bad one ends
with one line ``sft_alpaca: error: ...``.  The adapter's options are ``ModelConfig``'s ``lora_r`` /
``lora_alpha`` / ``lora_dropout`` / ``lora_target_modules``; the merge's and the model card's are
``QALoraSFTConfig``'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from trl import ModelConfig, TrlParser

from qalora_hf.sft_config import QALoraSFTConfig


@dataclass
class ScriptArguments:
    dataset_path: str = field(
        default="alpaca_en_demo.json",
        metadata={"help": "JSON/JSONL file of Alpaca rows (instruction, input, output). A bare name is looked up in "
                          "<cache>/data (python -m demo.fetch). The last num_holdout_rows rows are the eval set."},
    )
    max_train_rows: Optional[int] = field(default=None, metadata={"help": "Cap on training rows (for quick runs)."})
    quantize: bool = field(default=True, metadata={"help": "GPTQ-quantise a float model_name_or_path first."})
    bits: Optional[int] = field(
        default=None, metadata={"help": "GPTQ bits (2, 3, 4, 8); default 4. For a GPTQ checkpoint: must match it if given."})
    group_size: Optional[int] = field(
        default=None, metadata={"help": "GPTQ group size = QA-LoRA pooling group; default 32. For a GPTQ checkpoint: must "
                                        "match it if given."})
    desc_act: Optional[bool] = field(
        default=None, metadata={"help": "GPTQ act-order; default false. For a GPTQ checkpoint: must match it if given."})
    sym: Optional[bool] = field(
        default=None, metadata={"help": "Symmetric GPTQ; default false. For a GPTQ checkpoint: must match it if given."})
    gptq_calibration_rows: int = field(
        default=128, metadata={"help": "GPTQ: training rows the float model is quantised on (the merge's own rows are "
                                       "num_calibration_rows)."}
    )
    gptq_true_sequential: bool = field(
        default=True, metadata={"help": "GPTQ: one calibration pass per linear layer (True) or one per block (False, ~3x faster on CPU)."}
    )
    retrain: bool = field(
        default=False,
        metadata={"help": "Train again from scratch in an output_dir that holds a finished run or checkpoints: its "
                          "checkpoint-* directories and run_info.json are deleted (after every input check passed) and "
                          "its export is replaced. Without it a finished run is not trained again, and an unfinished "
                          "one resumes from its newest complete checkpoint."},
    )


QUANTIZE_DEFAULTS = {"bits": 4, "group_size": 32, "desc_act": False, "sym": False}
RUN_INFO = "run_info.json"


def _resolve(path: str, sub: str) -> str:
    """An existing path as is; else the same name under the cache (``<cache>/<sub>/<name>``) if there."""
    if os.path.exists(path):
        return path
    from qalora_hf.cache import default_cache_dir

    cached = default_cache_dir() / sub / path
    return str(cached) if cached.exists() else path


def _run_key(script_args: ScriptArguments, training_args: QALoraSFTConfig, model_args: ModelConfig) -> dict:
    """What a finished run in output_dir must match for a rerun to count as the same run (else: refused, see
    :func:`finished_run`): the model, the data, the quantisation, the adapter, the length of training and the merge."""
    lora_targets = model_args.lora_target_modules
    return {
        "model_name_or_path": model_args.model_name_or_path, "dataset_path": script_args.dataset_path,
        "max_train_rows": script_args.max_train_rows, "num_holdout_rows": training_args.num_holdout_rows,
        **{k: getattr(script_args, k) for k in QUANTIZE_DEFAULTS},
        "lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha,
        "lora_target_modules": list(lora_targets) if isinstance(lora_targets, (list, tuple)) else lora_targets,
        "max_steps": training_args.max_steps, "num_train_epochs": training_args.num_train_epochs,
        "learning_rate": training_args.learning_rate, "seed": training_args.seed,
        "merge_at_end": training_args.merge_at_end, "merge_strategy": training_args.merge_strategy,
    }


def finished_run(output_dir: str, key: dict, merge_at_end: bool) -> Optional[dict]:
    """The ``run_info.json`` of a finished run of the same ``key`` in ``output_dir`` (its export present), or None.

    Raises:
        SystemExit: ``output_dir`` holds a finished run with other settings (:func:`_run_key`).
    """
    path = Path(output_dir, RUN_INFO)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not info.get("finished"):
        return None
    differ = {k: (info.get("run", {}).get(k), v) for k, v in key.items() if info.get("run", {}).get(k) != v}
    if differ:
        raise SystemExit(
            f"sft_alpaca: error: --output_dir {output_dir} holds a finished run with other settings ("
            + ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
            + "); pass --retrain to train again from scratch there, or choose another --output_dir."
        )
    if merge_at_end and not (info.get("export_dir") and Path(info["export_dir"], "config.json").is_file()):
        return None  # trained, but the export is gone: export again (from the final checkpoint)
    return info


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


@contextlib.contextmanager
def one_line_errors(logger):
    """A ``ValueError`` / ``OSError`` inside (a bad input, a model or file that cannot be read) ends the run with one
    line ``sft_alpaca: error: ...`` (the traceback at DEBUG level)."""
    try:
        yield
    except (ValueError, OSError) as err:
        logger.debug("input error", exc_info=True)
        raise SystemExit(f"sft_alpaca: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def main(script_args: ScriptArguments, training_args: QALoraSFTConfig, model_args: ModelConfig):
    from datasets import Dataset

    from qalora_hf import QALoraConfig, QALoraTrainer
    from qalora_hf.checkpoints import checkpoint_global_step, checkpoint_mismatch, checkpoints, last_complete_checkpoint
    from qalora_hf.checks import check_alpaca_rows, check_model_source, check_quantize_options, check_revision
    from qalora_hf.data import alpaca_prompt_completion, read_rows
    from qalora_hf.gptq import quantization_config_dict
    from qalora_hf.quantize import QuantizeConfig

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logger = logging.getLogger("sft_alpaca")
    out = Path(training_args.output_dir)

    with one_line_errors(logger):  # every input is checked before any model is loaded
        # ---- data: Alpaca rows -> prompt/completion with the Alpaca template; the last rows held out
        data_path = _resolve(script_args.dataset_path, "data")
        if not os.path.exists(data_path):
            raise ValueError(f"dataset {script_args.dataset_path} not found; run `python -m demo.fetch` or pass --dataset_path.")
        rows = read_rows(data_path)  # no such file, invalid JSON, rows of no known format
        if not all({"instruction", "output"} <= row.keys() for row in rows):
            raise ValueError(f"{data_path} holds rows without 'instruction'/'output'; this recipe trains on Alpaca rows "
                             "(instruction, input, output).")
        check_alpaca_rows(rows, data_path)  # e.g. output: null, named by its row
        ds = Dataset.from_list([dict(zip(("prompt", "completion"), alpaca_prompt_completion(r))) for r in rows])
        n_holdout = training_args.num_holdout_rows
        if n_holdout >= len(ds):
            raise ValueError(f"num_holdout_rows={n_holdout} leaves no training rows ({len(ds)} in all).")
        n_train = len(ds) - n_holdout
        train_ds, eval_ds = ds.select(range(n_train)), (ds.select(range(n_train, len(ds))) if n_holdout else None)
        if script_args.max_train_rows:
            train_ds = train_ds.select(range(min(script_args.max_train_rows, len(train_ds))))
        logger.info("data: %d training rows, %d held-out rows from %s", len(train_ds), n_holdout, Path(data_path).name)

        # ---- model: a GPTQ checkpoint as is, a float model quantised first (cached); QA-LoRA from ModelConfig's lora_*
        if not model_args.model_name_or_path:
            raise ValueError("pass --model_name_or_path (a GPTQ checkpoint, or a float model to quantise first).")
        check_revision(model_args.model_revision, "--model_revision")
        if model_args.model_revision != "main":
            raise ValueError(f"--model_revision {model_args.model_revision}: this recipe loads a model's default revision; "
                             "download the revision you want (hf download ... --revision) and pass its directory.")
        model_path = _resolve(model_args.model_name_or_path, "models")
        if not os.path.exists(model_path) and "/" not in model_path:
            raise ValueError(f"--model_name_or_path {model_args.model_name_or_path}: no such directory, here or in the "
                             "cache (python -m demo.fetch); give a model directory or a Hub repo id 'namespace/name'.")
        check_model_source(model_path, "--model_name_or_path")
        qalora_config = QALoraConfig.from_model_config(model_args)  # r=4.5 and other bad adapter options fail here
        from transformers import AutoConfig

        qc = quantization_config_dict(getattr(AutoConfig.from_pretrained(model_path), "quantization_config", None))
        requested = {k: getattr(script_args, k) for k in QUANTIZE_DEFAULTS}
        quantize_config = None
        if str(qc.get("quant_method", "")).lower().endswith("gptq"):
            check_quantize_options(qc, requested, model_path, how="leave --bits/--group_size/--desc_act/--sym out")
        else:
            if not script_args.quantize:
                raise ValueError(f"{model_path} is a float model and --quantize is false; pass a GPTQ checkpoint or "
                                 "--quantize true.")
            options = {k: QUANTIZE_DEFAULTS[k] if v is None else v for k, v in requested.items()}
            quantize_config = QuantizeConfig(**options, num_calibration_rows=script_args.gptq_calibration_rows,
                                             true_sequential=script_args.gptq_true_sequential)

        # ---- a finished run with the same settings: nothing to do (unless --retrain)
        key = _run_key(script_args, training_args, model_args)
        if not script_args.retrain:
            info = finished_run(out, key, training_args.merge_at_end)
            if info is not None:
                logger.info("run already finished in %s (%s steps%s); nothing to do. Pass --retrain to train again from "
                            "scratch.", out, info.get("global_step"),
                            f", export {info['export_dir']}" if info.get("export_dir") else "")
                return

        # ---- trainer (its own checks run before it quantises or loads anything)
        trainer = QALoraTrainer(
            model=model_path, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
            qalora_config=qalora_config, quantize_config=quantize_config,
        )

    # ---- --retrain: only now that every check has passed, the old run's checkpoints and marker go
    is_main = trainer.accelerator.is_main_process
    if script_args.retrain:
        if is_main:
            for path in checkpoints(out):
                logger.info("--retrain: deleting %s", path)
                shutil.rmtree(path)
            (out / RUN_INFO).unlink(missing_ok=True)
        trainer.accelerator.wait_for_everyone()

    # ---- train, resuming from the newest COMPLETE checkpoint (a half-written newer one is skipped, with a warning);
    #      merge -> export -> push run in QALoraMergeCallback
    last = last_complete_checkpoint(out)
    if last is not None:
        problem = checkpoint_mismatch(last, trainer.accelerator.unwrap_model(trainer.model))
        if problem:
            raise SystemExit(f"sft_alpaca: error: --output_dir {out} holds {last.name} of another run ({problem}); "
                             "it would be resumed from. Choose another --output_dir, or pass --retrain to delete its "
                             "checkpoints and train from scratch there.")
    if last is not None and _training_finished(last, training_args):
        # Trained to the end, but no export (killed during the merge, or the push failed): export, don't train again.
        from transformers import TrainerState

        logger.info("training already finished in %s (step %d); exporting it without training again", last,
                    checkpoint_global_step(last))
        trainer.state = TrainerState.load_from_json(str(last / "trainer_state.json"))  # log history: the loss plot
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.load_adapter(str(last), adapter_name=model.active_adapter, is_trainable=True)
        if training_args.merge_at_end and trainer.is_world_process_zero():
            trainer.merge_and_export()
        trainer.accelerator.wait_for_everyone()
    else:
        if last is not None:
            logger.info("resuming from %s", last)
        trainer.train(resume_from_checkpoint=str(last) if last is not None else None)

    # ---- run_info.json (main process), written atomically after the export: the marker of a finished run, and what
    #      the demo's fresh-process report reads
    if is_main:
        info = {
            "finished": True,
            "run": key,
            "global_step": trainer.state.global_step,
            "base_model": trainer.base_model_id,
            "float_model": trainer.float_model_id,
            "export_dir": str(trainer.export_dir) if training_args.merge_at_end else None,
            "hub_repo_id": (trainer.qalora_push or {}).get("repo_id"),
            "dataset_path": data_path,
            "datasets": training_args.model_card_datasets,
            "num_holdout_rows": n_holdout,
            "max_length": training_args.max_length,
            "merge_metrics": trainer.merge_metrics,
        }
        _write_json_atomic(out / RUN_INFO, info)
        if trainer.merge_metrics:
            logger.info("export: %s", trainer.export_dir)
            logger.info("merge metrics: %s", {k: trainer.merge_metrics.get(k) for k in
                                              ("loss_base", "loss_trained", "loss_exported", "gain_kept", "max_logit_diff")})


def _training_finished(checkpoint: Path, training_args) -> bool:
    """The checkpoint is the run's last step: its global_step reached its max_steps, and max_steps was not changed."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step, planned = int(state.get("global_step", 0)), int(state.get("max_steps", 0) or 0)
    return planned > 0 and step >= planned and (training_args.max_steps <= 0 or training_args.max_steps == planned)


def cli(argv: Optional[list[str]] = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``: YAML ``--config`` plus overrides) and run :func:`main`."""
    import torch

    # Several ranks (torchrun / accelerate's multi-process launcher) without a CUDA device: DDP over gloo on CPU.
    # Without this each rank would build its own single-process state and train and export on its own.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    parser = TrlParser((ScriptArguments, QALoraSFTConfig, ModelConfig))
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except ValueError as err:  # a field's __post_init__ check (hub_model_id, merge_strategy, ...) or a bad YAML file
        raise SystemExit(f"sft_alpaca: error: {str(err).splitlines()[0]}") from None
    main(script_args, training_args, model_args)


if __name__ == "__main__":
    cli()
