"""QA-LoRA SFT on Alpaca rows: quantise (GPTQ) -> train (QALoraTrainer) -> merge -> export -> push.

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/sft_alpaca.py --config recipes/configs/smollm2_135m_cpu.yaml [--max_steps 10 ...]

As alignment-handbook's scripts/sft.py: ``TrlParser((ScriptArguments, QALoraSFTConfig, ModelConfig))`` reads a
YAML file plus command-line overrides (``--help`` lists every option); ``main`` runs the stages in order: load
the data, the model (GPTQ-quantised first when it is a float model) and the trainer; train, resuming from the
last checkpoint automatically; merge, measure, export and push (``QALoraMergeCallback``, main process only);
write ``run_info.json``.  The adapter's options are ``ModelConfig``'s ``lora_r`` / ``lora_alpha`` /
``lora_dropout`` / ``lora_target_modules``; the merge's and the model card's are ``QALoraSFTConfig``'s.
"""

from __future__ import annotations

import json
import logging
import os
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
    bits: int = field(default=4, metadata={"help": "GPTQ bits (2, 3, 4, 8)."})
    group_size: int = field(default=32, metadata={"help": "GPTQ group size = QA-LoRA pooling group."})
    desc_act: bool = field(default=False, metadata={"help": "GPTQ act-order."})
    sym: bool = field(default=False, metadata={"help": "Symmetric GPTQ."})
    gptq_true_sequential: bool = field(
        default=True, metadata={"help": "GPTQ: one calibration pass per linear layer (True) or one per block (False, ~3x faster on CPU)."}
    )


def _resolve(path: str, sub: str) -> str:
    """An existing path as is; else the same name under the cache (``<cache>/<sub>/<name>``) if there."""
    if os.path.exists(path):
        return path
    from qalora_hf.cache import default_cache_dir

    cached = default_cache_dir() / sub / path
    return str(cached) if cached.exists() else path


def main(script_args: ScriptArguments, training_args: QALoraSFTConfig, model_args: ModelConfig):
    from datasets import Dataset

    from qalora_hf import QALoraConfig, QALoraTrainer
    from qalora_hf.data import alpaca_prompt_completion, read_rows
    from qalora_hf.gptq import is_gptq_checkpoint
    from qalora_hf.quantize import QuantizeConfig

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logger = logging.getLogger("sft_alpaca")

    # ---- data: Alpaca rows -> prompt/completion with the Alpaca template; the last rows held out
    data_path = _resolve(script_args.dataset_path, "data")
    if not os.path.exists(data_path):
        raise SystemExit(f"dataset {script_args.dataset_path} not found; run `python -m demo.fetch` or pass --dataset_path.")
    try:
        rows = read_rows(data_path)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if not all({"instruction", "output"} <= row.keys() for row in rows):
        raise SystemExit(f"{data_path} holds rows without 'instruction'/'output'; this recipe trains on Alpaca rows "
                         "(instruction, input, output).")
    ds = Dataset.from_list([dict(zip(("prompt", "completion"), alpaca_prompt_completion(r))) for r in rows])
    n_holdout = training_args.num_holdout_rows
    if n_holdout >= len(ds):
        raise SystemExit(f"num_holdout_rows={n_holdout} leaves no training rows ({len(ds)} in all).")
    n_train = len(ds) - n_holdout
    train_ds, eval_ds = ds.select(range(n_train)), (ds.select(range(n_train, len(ds))) if n_holdout else None)
    if script_args.max_train_rows:
        train_ds = train_ds.select(range(min(script_args.max_train_rows, len(train_ds))))
    logger.info("data: %d training rows, %d held-out rows from %s", len(train_ds), n_holdout, Path(data_path).name)

    # ---- model: a GPTQ checkpoint as is, a float model quantised first (cached); QA-LoRA from ModelConfig's lora_*
    if not model_args.model_name_or_path:
        raise SystemExit("pass --model_name_or_path (a GPTQ checkpoint, or a float model to quantise first).")
    model_path = _resolve(model_args.model_name_or_path, "models")
    quantize_config = None
    if not is_gptq_checkpoint(model_path):
        if not script_args.quantize:
            raise SystemExit(f"{model_path} is a float model and --quantize is false; pass a GPTQ checkpoint or --quantize true.")
        quantize_config = QuantizeConfig(
            bits=script_args.bits, group_size=script_args.group_size, desc_act=script_args.desc_act, sym=script_args.sym,
            num_calibration_rows=training_args.num_calibration_rows, true_sequential=script_args.gptq_true_sequential,
        )
    qalora_config = QALoraConfig.from_model_config(model_args)

    # ---- trainer
    trainer = QALoraTrainer(
        model=model_path, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
        qalora_config=qalora_config, quantize_config=quantize_config,
    )

    # ---- train (resume automatically from the last checkpoint); merge -> export -> push run in QALoraMergeCallback
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)

    # ---- run_info.json (main process): what the demo's fresh-process report reads
    if trainer.accelerator.is_main_process and trainer.merge_metrics:
        info = {
            "base_model": trainer.base_model_id,
            "float_model": trainer.float_model_id,
            "export_dir": str(trainer.export_dir),
            "hub_repo_id": (trainer.qalora_push or {}).get("repo_id"),
            "dataset_path": data_path,
            "datasets": training_args.model_card_datasets,
            "num_holdout_rows": n_holdout,
            "max_length": training_args.max_length,
            "merge_metrics": trainer.merge_metrics,
        }
        Path(training_args.output_dir, "run_info.json").write_text(json.dumps(info, indent=2, default=str))
        logger.info("export: %s", trainer.export_dir)
        logger.info("merge metrics: %s", {k: trainer.merge_metrics.get(k) for k in
                                          ("loss_base", "loss_trained", "loss_exported", "gain_kept", "max_logit_diff")})


if __name__ == "__main__":
    import torch

    # Several ranks (torchrun / accelerate's multi-process launcher) without a CUDA device: DDP over gloo on CPU.
    # Without this each rank would build its own single-process state and train and export on its own.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    parser = TrlParser((ScriptArguments, QALoraSFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
