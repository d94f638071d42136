"""`QALoraTrainer`: TRL's `SFTTrainer` on a GPTQ base with QA-LoRA adapters, merged and exported at the end."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoTokenizer, PreTrainedModel
from trl import SFTConfig, SFTTrainer

from .config import QALoraConfig
from .gptq import TRAINABLE_BACKEND, gptq_layers, gptq_settings, is_gptq_checkpoint, load_gptq_model
from .model import get_qalora_model
from .quantize import QuantizeConfig, quantize_model

logger = logging.getLogger(__name__)


def row_to_text(row: dict, tokenizer=None) -> str:
    """Plain text of one SFT row in any TRL format (``text``, ``messages``, ``prompt``/``completion``)."""
    if "text" in row:
        return row["text"]
    if "messages" in row:
        return tokenizer.apply_chat_template(row["messages"], tokenize=False) if tokenizer is not None else str(row["messages"])
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list):  # conversational prompt/completion
        msgs = prompt + (completion or [])
        return tokenizer.apply_chat_template(msgs, tokenize=False) if tokenizer is not None else str(msgs)
    return f"{prompt or ''}{completion or ''}"


def _check_dataset(name: str, dataset, formatting_func) -> None:
    if dataset is None:
        if name == "train_dataset":
            raise ValueError("train_dataset is required.")
        return
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        if hasattr(ds, "__len__") and len(ds) == 0:
            raise ValueError(f"{name} is empty; give it at least one row.")
        if formatting_func is not None:
            continue
        cols = set(ds.column_names or [])
        if not ({"text"} <= cols or {"messages"} <= cols or {"prompt", "completion"} <= cols or "input_ids" in cols):
            raise ValueError(
                f"{name} has columns {sorted(cols)}; SFT needs a 'text' column, a 'messages' column, or 'prompt' and "
                "'completion' columns (or pass formatting_func). Rename or map your columns."
            )


def _check_prompt_lengths(dataset, tokenizer, max_length: Optional[int]) -> None:
    if max_length is None or dataset is None or "prompt" not in (dataset.column_names or []):
        return
    longest = 0
    for row in dataset.select(range(min(len(dataset), 2000))):
        p = row["prompt"]
        text = tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
        longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    if longest >= max_length:
        raise ValueError(
            f"max_length={max_length} is not longer than the longest prompt ({longest} tokens): the completion would be "
            f"truncated away and there is nothing to learn. Raise max_length above {longest} or shorten the prompts."
        )


class QALoraTrainer(SFTTrainer):
    """TRL ``SFTTrainer`` that trains QA-LoRA adapters (Xu et al. 2023) on a GPTQ INT-N base.

    Args:
        model: a GPTQ checkpoint path / Hub id (loaded with gptqmodel's trainable ``torch`` kernel), a
            float model path / id together with ``quantize_config`` (GPTQ-quantised first with
            gptqmodel on training rows, cached on disk), or an already loaded GPTQ ``PreTrainedModel``.
        qalora_config: adapter options (default ``QALoraConfig()``).
        quantize_config: only with a float model.
        merge_at_end: add :class:`~qalora_hf.callbacks.QALoraMergeCallback` (merge, measure, export,
            push when ``args.push_to_hub``) when training ends.
        merge_strategy: see :func:`qalora_hf.merge.merge_qalora`.
        num_calibration_rows: training rows used for the merge's calibration statistics.
        num_holdout_rows: rows of ``eval_dataset`` (else the last training rows) for the merge-fidelity check.
        export_dir: where the merged checkpoint goes (default ``<output_dir>/export``).
        All other arguments are ``SFTTrainer``'s.

    With ``args.push_to_hub``, the Trainer's own checkpoint pushes are switched off: only the merged
    export (with its card and ``adapter/``) is pushed, to the main branch of ``args.hub_model_id``.

    Raises:
        ValueError: ``peft_config`` given, an empty dataset, a dataset without SFT columns, a float model
            without ``quantize_config``, a ``max_length`` not longer than the prompts, or a group size
            the adapter cannot match — all before any quantisation or training.
    """

    def __init__(
        self,
        model: Union[str, PreTrainedModel],
        args: Optional[SFTConfig] = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        qalora_config: Optional[QALoraConfig] = None,
        quantize_config: Optional[QuantizeConfig] = None,
        merge_at_end: bool = True,
        merge_strategy: str = "distill",
        num_calibration_rows: int = 128,
        num_holdout_rows: int = 32,
        export_dir: Optional[str] = None,
        peft_config=None,
        formatting_func=None,
        **kwargs,
    ):
        if peft_config is not None:
            raise ValueError(
                "QALoraTrainer builds its own QA-LoRA adapters; pass qalora_config=QALoraConfig(...) instead of peft_config."
            )
        from .merge import STRATEGIES

        if merge_strategy not in STRATEGIES:
            raise ValueError(f"merge_strategy='{merge_strategy}' is unknown; choose one of {STRATEGIES}.")
        args = args or SFTConfig(output_dir="qalora-output")
        if args.push_to_hub and not args.hub_model_id:  # before any quantisation or training
            raise ValueError("push_to_hub=True needs hub_model_id='namespace/name'.")
        qalora_config = qalora_config or QALoraConfig()
        _check_dataset("train_dataset", train_dataset, formatting_func)
        _check_dataset("eval_dataset", eval_dataset, formatting_func)

        if isinstance(model, str):
            model_id = model
            processing_class = processing_class or AutoTokenizer.from_pretrained(model_id)
            _check_prompt_lengths(train_dataset, processing_class, args.max_length)
            if is_gptq_checkpoint(model_id):
                if quantize_config is not None:
                    logger.warning("%s is already a GPTQ checkpoint; quantize_config is ignored.", model_id)
                base_path, float_model = model_id, None
            else:
                if quantize_config is None:
                    raise ValueError(
                        f"{model_id} is a float model: pass quantize_config=QuantizeConfig(bits=4, group_size=32, ...) so it is "
                        "GPTQ-quantised first, or pass a GPTQ checkpoint."
                    )
                if qalora_config.group_size not in (None, quantize_config.group_size):
                    raise ValueError(
                        f"QALoraConfig.group_size={qalora_config.group_size} differs from QuantizeConfig.group_size="
                        f"{quantize_config.group_size}; the adapter pools whole GPTQ groups. Make them equal or leave group_size unset."
                    )
                texts = [row_to_text(r, processing_class) for r in train_dataset.select(range(min(len(train_dataset), quantize_config.num_calibration_rows)))]
                # Under DDP every rank gets here with the same inputs: the main process quantises into the
                # cache first, the other ranks then find it there (else they all quantise into one cache dir,
                # and transformers' save_pretrained writes nothing on ranks other than 0).
                from accelerate import PartialState

                with PartialState().main_process_first():
                    base_path, float_model = str(quantize_model(model_id, quantize_config, texts, processing_class)), model_id
            model = load_gptq_model(base_path, dtype=self._load_dtype(args), device_map=self._device_map(args))
        else:
            if processing_class is None:
                raise ValueError("pass processing_class (the tokenizer) together with an already loaded model.")
            _check_prompt_lengths(train_dataset, processing_class, args.max_length)
            base_path = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
            float_model = None
        gptq_settings(model)  # TypeError for a non-GPTQ model, before any work

        kernels = sorted({type(m).__name__ for m in gptq_layers(model).values()})
        model = get_qalora_model(model, qalora_config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora_equiv = sum(
            m.lora_A["default"].out_features * (m.get_base_layer().in_features + m.get_base_layer().out_features)
            for m in model.modules() if hasattr(m, "qalora_group_size")
        )
        logger.info(
            "QA-LoRA: kernel %s (backend=%r: trainable); %s trainable parameters vs %s for plain LoRA of the same rank (%.1f%%)",
            ",".join(kernels), TRAINABLE_BACKEND, f"{trainable:,}", f"{lora_equiv:,}", 100.0 * trainable / max(lora_equiv, 1),
        )

        # Intermediate checkpoints are never pushed: only the merged export lands on the Hub.
        self.qalora_push = None
        if args.push_to_hub:
            self.qalora_push = {"repo_id": args.hub_model_id, "private": bool(args.hub_private_repo), "token": args.hub_token}
            args.push_to_hub = False

        self.qalora_config = qalora_config
        self.quantize_config = quantize_config
        self.base_model_id = base_path
        self.float_model_id = float_model
        self.license = _source_license(float_model or base_path)
        self.merge_strategy = merge_strategy
        self.num_calibration_rows = num_calibration_rows
        self.num_holdout_rows = num_holdout_rows
        self.export_dir = export_dir or os.path.join(args.output_dir, "export")
        self.merged_model = None
        self.merge_report = None
        self.merge_metrics = None
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, formatting_func=formatting_func, **kwargs,
        )
        if merge_at_end:
            from .callbacks import QALoraMergeCallback

            self.add_callback(QALoraMergeCallback(self))

    @staticmethod
    def _load_dtype(args) -> torch.dtype:
        if torch.cuda.is_available() and not args.use_cpu:
            return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        return torch.float32  # CPU: fp32 weights; bf16=True still autocasts the compute

    @staticmethod
    def _device_map(args):
        if torch.cuda.is_available() and not args.use_cpu:  # use_cpu: stay on the CPU the Trainer trains on
            from accelerate import PartialState

            return {"": PartialState().local_process_index}
        return None

    # ------------------------------------------------------------------------------------------
    # merge, measure, export (called on the main process by QALoraMergeCallback)

    def _batches(self, dataset, indices, batch_size: int = 8):
        """Collated batches of ``dataset[indices]``, rows grouped by length (about a third fewer padded
        positions on Alpaca than in the given order; ``H`` and the held-out mean loss do not depend on the
        grouping; the distillation visits the batches in shuffled order)."""
        keep = ("input_ids", "attention_mask", "labels", "position_ids")
        device = next(self.model.parameters()).device
        rows = sorted((dataset[j] for j in indices), key=lambda r: len(r["input_ids"]))
        for i in range(0, len(rows), batch_size):
            batch = self.data_collator(rows[i : i + batch_size])
            yield {k: v.to(device) for k, v in batch.items() if k in keep}

    @torch.no_grad()
    def _eval_holdout(self, model, batches) -> tuple[float, list[torch.Tensor]]:
        total, count, logits = 0.0, 0, []
        for b in batches:
            out = model(**b)
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
            logits.append(out.logits.float().cpu())
        return total / max(count, 1), logits

    def merge_and_export(self) -> Path:
        """Merge the adapters into the GPTQ integers, measure, export (and push). Returns the export dir."""
        from .card import build_model_card, plot_training_loss
        from .evaluate import gain_kept
        from .export import export_gptq
        from .hub import push_gptq_to_hub
        from .merge import merge_qalora

        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        adapter_dir = Path(self.args.output_dir) / "adapter"
        model.save_pretrained(adapter_dir)

        train = self.train_dataset
        holdout_ds = self.eval_dataset if self.eval_dataset is not None and not isinstance(self.eval_dataset, dict) else None
        if holdout_ds is not None:
            hold_idx = list(range(min(len(holdout_ds), self.num_holdout_rows)))
        else:
            holdout_ds = train
            hold_idx = list(range(max(len(train) - self.num_holdout_rows, 0), len(train)))
        cal_idx = list(range(min(len(train), self.num_calibration_rows)))
        holdout = list(self._batches(holdout_ds, hold_idx))
        calibration = list(self._batches(train, cal_idx))

        logger.info("merge: held-out loss of the base and the trained model (%d rows) before merging", len(hold_idx))
        with model.disable_adapter():
            loss_base, _ = self._eval_holdout(model, holdout)
        loss_trained, logits_trained = self._eval_holdout(model, holdout)
        merged, report = merge_qalora(model, strategy=self.merge_strategy, calibration=calibration)
        loss_export, logits_export = self._eval_holdout(merged, holdout)
        max_diff = max(float((a - b).abs().max()) for a, b in zip(logits_trained, logits_export)) if holdout else float("nan")
        gain = loss_base - loss_trained
        kept = gain_kept(loss_base, loss_trained, loss_export)
        metrics = {
            "strategy": self.merge_strategy,
            "holdout_rows": len(hold_idx),
            "holdout_source": "eval_dataset" if holdout_ds is not train else "last training rows",
            "loss_base": loss_base,
            "loss_trained": loss_trained,
            "loss_export": loss_export,
            "gain_kept": kept if kept is not None else float("nan"),
            "max_logit_diff": max_diff,
            **{k: v for k, v in report.totals.items() if k != "strategy"},
        }
        self.merged_model, self.merge_report, self.merge_metrics = merged, report, metrics
        logger.info(
            "merge (%s): held-out loss base %.4f, trained %.4f, export %.4f -> %.1f%% of the fine-tuning gain kept; max logit diff %.4f",
            self.merge_strategy, loss_base, loss_trained, loss_export, 100 * metrics["gain_kept"] if gain > 0 else float("nan"), max_diff,
        )

        with tempfile.TemporaryDirectory() as tmp:
            try:
                plot = plot_training_loss(self.state.log_history, os.path.join(tmp, "loss.png"))
            except ValueError:  # no logged loss yet (very short runs)
                plot = None
            report_path = os.path.join(tmp, "merge_report.json")
            Path(report_path).write_text(json.dumps({"metrics": metrics, **report.to_dict()}, indent=2, default=str))
            qc = gptq_settings(merged)
            repo_id = (self.qalora_push or {}).get("repo_id") or self.args.hub_model_id or Path(self.export_dir).name
            card = build_model_card(
                repo_id=repo_id,
                base_model=self.base_model_id,
                float_model=self.float_model_id,
                license=self.license,
                datasets=getattr(self, "qalora_datasets", ()),
                qalora_config=self.qalora_config.to_dict(),
                training_args=_training_args_summary(self.args),
                merge_metrics=metrics,
                eval_results=getattr(self, "qalora_eval_results", None),
                loss_plot="loss.png" if plot else None,
                bits=int(qc["bits"]),
                group_size=int(qc["group_size"]),
                desc_act=bool(qc.get("desc_act", False)),
            )
            extra = {"merge_report.json": report_path}
            if plot:
                extra["loss.png"] = plot
            hub_base = self.base_model_id if self.base_model_id and not Path(self.base_model_id).exists() else None
            out = export_gptq(
                merged, self.export_dir, tokenizer=self.processing_class, card=card, adapter_dir=adapter_dir,
                extra_files=extra, overwrite=True, base_model_id=hub_base, tokens=[(self.qalora_push or {}).get("token")],
            )
        if self.qalora_push:
            commit = push_gptq_to_hub(out, self.qalora_push["repo_id"], private=self.qalora_push["private"], token=self.qalora_push["token"])
            logger.info("pushed %s to %s (commit %s)", out, self.qalora_push["repo_id"], commit)
        return out


def _source_license(model_path) -> Optional[str]:
    """Licence recorded by ``qalora_hf.fetch`` (``qalora_source.json``) or in a local model's README front matter."""
    if not model_path or not Path(model_path).is_dir():
        return None
    src = Path(model_path) / "qalora_source.json"
    if src.is_file():
        return json.loads(src.read_text()).get("license")
    readme = Path(model_path) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.license
    return None


def _training_args_summary(args) -> dict:
    keys = (
        "learning_rate", "lr_scheduler_type", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "gradient_accumulation_steps", "max_grad_norm", "warmup_steps", "weight_decay", "optim", "seed", "max_length",
        "packing", "completion_only_loss", "bf16", "fp16", "gradient_checkpointing",
    )
    out = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    out = {k: (v.value if hasattr(v, "value") else v) for k, v in out.items()}
    out["world_size"] = args.world_size
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
