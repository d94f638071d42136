"""QA-LoRA SFT on Alpaca rows: quantise (GPTQ) -> train (QALoraTrainer) -> merge -> export -> push.

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/sft_alpaca.py --config recipes/configs/smollm2_135m_cpu.yaml [--max_steps 10 ...]

Stages follow alignment-handbook's scripts/sft.py: parse, load data, load tokenizer/model, build the
trainer, train (resuming from the last checkpoint automatically), merge/export/push (by the merge
callback, main process only).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from trl import SFTConfig, TrlParser

@dataclass
class ScriptArguments:
    model_name_or_path: str = field(
        default="SmolLM2-135M-Instruct",
        metadata={"help": "GPTQ checkpoint, or float model (then quantised first). A bare name is looked up in the fetch cache (python -m qalora_hf.fetch)."},
    )
    dataset_path: str = field(
        default="alpaca_en_demo.json",
        metadata={"help": "JSON/JSONL file of Alpaca rows (instruction, input, output). A bare name is looked up in <cache>/data."},
    )
    num_holdout_rows: int = field(default=99, metadata={"help": "Last rows held out as eval set (merge fidelity, eval_loss)."})
    max_train_rows: Optional[int] = field(default=None, metadata={"help": "Cap on training rows (for quick runs)."})
    quantize: bool = field(default=True, metadata={"help": "GPTQ-quantise a float model_name_or_path first."})
    bits: int = field(default=4, metadata={"help": "GPTQ bits (2, 3, 4, 8)."})
    group_size: int = field(default=32, metadata={"help": "GPTQ group size = QA-LoRA pooling group."})
    desc_act: bool = field(default=False, metadata={"help": "GPTQ act-order."})
    sym: bool = field(default=False, metadata={"help": "Symmetric GPTQ."})
    num_calibration_rows: int = field(default=128, metadata={"help": "Training rows for GPTQ calibration and for the merge."})
    gptq_true_sequential: bool = field(
        default=True, metadata={"help": "GPTQ: one calibration pass per linear layer (True) or one per block (False, ~3x faster on CPU)."}
    )
    lora_r: int = field(default=16, metadata={"help": "QA-LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "QA-LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "QA-LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "Modules to adapt."})
    merge_strategy: str = field(default="distill", metadata={"help": "Merge strategy: distill (default), scales, gptq or round; see qalora_hf.merge."})
    float_model_hub_id: Optional[str] = field(
        default=None, metadata={"help": "Hub id of the float model (model card metadata) when model_name_or_path is a local copy."}
    )
    export_dir: Optional[str] = field(default=None, metadata={"help": "Merged checkpoint dir (default <output_dir>/export)."})


def _resolve(path: str, sub: str) -> str:
    """An existing path as is; else the same name under the fetch cache (``<cache>/<sub>/<name>``) if there."""
    if os.path.exists(path):
        return path
    from qalora_hf.fetch import default_cache_dir

    cached = default_cache_dir() / sub / path
    return str(cached) if cached.exists() else path


def alpaca_to_prompt_completion(row: dict) -> dict:
    """Alpaca row -> {prompt, completion} with the Alpaca template (Taori et al. 2023)."""
    from qalora_hf.evaluate import alpaca_prompt_completion

    prompt, completion = alpaca_prompt_completion(row)
    return {"prompt": prompt, "completion": completion}


def main(script_args: ScriptArguments, training_args: SFTConfig):
    from datasets import load_dataset

    from qalora_hf import QALoraConfig, QALoraTrainer
    from qalora_hf.quantize import QuantizeConfig, is_gptq_checkpoint

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logger = logging.getLogger("sft_alpaca")

    # ---- data
    data_path = _resolve(script_args.dataset_path, "data")
    if not os.path.exists(data_path):
        raise SystemExit(f"dataset {script_args.dataset_path} not found; run `python -m qalora_hf.fetch` or pass --dataset_path.")
    raw = load_dataset("json", data_files=data_path, split="train")
    missing = {"instruction", "output"} - set(raw.column_names)
    if missing:
        raise SystemExit(f"{data_path} lacks columns {sorted(missing)}; Alpaca rows need instruction, input, output.")
    ds = raw.map(alpaca_to_prompt_completion, remove_columns=raw.column_names)
    if script_args.num_holdout_rows >= len(ds):
        raise SystemExit(f"num_holdout_rows={script_args.num_holdout_rows} leaves no training rows ({len(ds)} in all).")
    n_train = len(ds) - script_args.num_holdout_rows
    train_ds, eval_ds = ds.select(range(n_train)), ds.select(range(n_train, len(ds)))
    if script_args.max_train_rows:
        train_ds = train_ds.select(range(min(script_args.max_train_rows, len(train_ds))))
    logger.info("data: %d training rows, %d held-out rows from %s", len(train_ds), len(eval_ds), Path(data_path).name)

    # ---- model
    model_path = _resolve(script_args.model_name_or_path, "models")
    quantize_config = None
    if not is_gptq_checkpoint(model_path):
        if not script_args.quantize:
            raise SystemExit(f"{model_path} is a float model and --quantize is false; pass a GPTQ checkpoint or --quantize true.")
        quantize_config = QuantizeConfig(
            bits=script_args.bits, group_size=script_args.group_size, desc_act=script_args.desc_act, sym=script_args.sym,
            num_calibration_rows=script_args.num_calibration_rows, true_sequential=script_args.gptq_true_sequential,
        )
    targets = script_args.lora_target_modules
    qalora_config = QALoraConfig(
        r=script_args.lora_r, lora_alpha=script_args.lora_alpha, lora_dropout=script_args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
    )

    # ---- trainer
    trainer = QALoraTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        qalora_config=qalora_config,
        quantize_config=quantize_config,
        merge_strategy=script_args.merge_strategy,
        num_calibration_rows=script_args.num_calibration_rows,
        num_holdout_rows=script_args.num_holdout_rows,
        export_dir=script_args.export_dir,
    )
    trainer.qalora_datasets = ["tatsu-lab/alpaca"]
    if script_args.float_model_hub_id:
        trainer.float_model_id = script_args.float_model_hub_id

    # ---- train (resume automatically from the last checkpoint)
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)
    # merge -> export -> push ran in QALoraMergeCallback on the main process
    if trainer.accelerator.is_main_process and trainer.merge_metrics:
        info = {
            "base_model": trainer.base_model_id,
            "float_model": trainer.float_model_id,
            "export_dir": str(trainer.export_dir),
            "hub_repo_id": (trainer.qalora_push or {}).get("repo_id"),
            "dataset_path": data_path,
            "num_holdout_rows": script_args.num_holdout_rows,
            "max_length": training_args.max_length,
            "merge_metrics": trainer.merge_metrics,
        }
        Path(training_args.output_dir, "run_info.json").write_text(json.dumps(info, indent=2, default=str))
        logger.info("export: %s", trainer.export_dir)
        logger.info("merge metrics: %s", {k: trainer.merge_metrics[k] for k in ("loss_base", "loss_trained", "loss_export", "gain_kept", "max_logit_diff")})


if __name__ == "__main__":
    import torch

    # Several ranks (torchrun / accelerate's multi-process launcher) without a CUDA device: DDP over gloo on CPU.
    # Without this each rank would build its own single-process state and train and export on its own.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    parser = TrlParser((ScriptArguments, SFTConfig))
    script_args, training_args = parser.parse_args_and_config()
    main(script_args, training_args)
