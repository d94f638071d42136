"""`QALoraTrainer`: TRL's `SFTTrainer` on a GPTQ base with QA-LoRA adapters, merged and exported at the end."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoTokenizer, PreTrainedModel
from transformers.trainer_utils import enable_full_determinism, set_seed
from trl import SFTConfig, SFTTrainer

from .card import source_license, training_args_summary
from .config import QALoraConfig
from .data import collated_batches, prompt_length, row_to_text
from .gptq import (check_mergeable_kernels, check_trainable_kernels, gptq_settings, is_gptq_checkpoint, kernel_summary,
                   load_gptq_model)
from .model import get_qalora_model
from .pipeline import CardInfo, merge_measure_export
from .quantize import QuantizeConfig, quantize_model
from .sft_config import QALoraSFTConfig

logger = logging.getLogger(__name__)


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
    # Counted as TRL tokenises the row (qalora_hf.data.encode_row): with the BOS a tokenizer adds to plain text.
    longest = max((prompt_length(row, tokenizer) for row in dataset.select(range(min(len(dataset), 2000)))), default=0)
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
            gptqmodel on training rows, cached on disk), or an already loaded GPTQ ``PreTrainedModel`` (not wrapped
            by PEFT; on a trainable gptqmodel kernel, and with ``merge_at_end`` one the merge can read:
            ``GPTQConfig(bits=..., backend="torch")``, docs/gptq_format.md "Kernels").
        args: a :class:`~qalora_hf.QALoraSFTConfig` (a plain ``SFTConfig`` is converted, with the QA-LoRA options at
            their defaults): the SFT options plus the merge's (``merge_at_end``, ``merge_strategy``,
            ``num_calibration_rows``, ``num_holdout_rows``, ``export_dir``, ``model_card_datasets``, ``float_model_id``).
        qalora_config: adapter options (default ``QALoraConfig()``; from a ``trl.ModelConfig``:
            ``QALoraConfig.from_model_config``).
        quantize_config: only with a float model.
        All other arguments are ``SFTTrainer``'s.

    With ``merge_at_end`` (default), :class:`~qalora_hf.callbacks.QALoraMergeCallback` calls :meth:`merge_and_export`
    when training ends.  With ``args.push_to_hub``, the Trainer's own checkpoint pushes are switched off: only the
    merged export (with its card and ``adapter/``) is pushed, to the main branch of ``args.hub_model_id``;
    :meth:`push_to_hub` pushes that same export.  ``args.seed`` (``full_determinism`` too) is applied before the
    adapters are made: the same seed gives the same adapters and losses.

    Raises:
        ValueError: ``peft_config`` given, an empty dataset, a dataset without SFT columns, a float model
            without ``quantize_config``, a ``max_length`` not longer than the prompts (counted as TRL tokenises
            them, BOS included), or a group size the adapter cannot match — all before any quantisation or
            training; a model already wrapped by PEFT, or GPTQ layers on an inference-only kernel (or, with
            ``merge_at_end``, on one the merge cannot read) — before training.
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
        peft_config=None,
        formatting_func=None,
        **kwargs,
    ):
        if peft_config is not None:
            raise ValueError(
                "QALoraTrainer builds its own QA-LoRA adapters; pass qalora_config=QALoraConfig(...) instead of peft_config."
            )
        if args is None:
            args = QALoraSFTConfig(output_dir="qalora-output")
        elif not isinstance(args, QALoraSFTConfig):
            args = QALoraSFTConfig.from_sft_config(args)
        # Seed before anything random happens here (the adapters' init), as transformers' Trainer and TRL do.
        if args.full_determinism:
            enable_full_determinism(args.seed)
        else:
            set_seed(args.seed)
        if args.push_to_hub and not args.hub_model_id:  # before any quantisation or training
            raise ValueError("push_to_hub=True needs hub_model_id='namespace/name'.")
        qalora_config = qalora_config or QALoraConfig()
        _check_dataset("train_dataset", train_dataset, formatting_func)
        _check_dataset("eval_dataset", eval_dataset, formatting_func)
        from .checks import check_trainer_inputs  # model source, layers vs target_modules and group size, rows, dirs

        check_trainer_inputs(model, args, qalora_config, quantize_config, train_dataset, eval_dataset, formatting_func)

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
        check_trainable_kernels(model)  # an inference-only kernel would only fail at train()
        if args.merge_at_end:
            check_mergeable_kernels(model)  # else the merge would fail after training
        kernels = kernel_summary(model)
        model = get_qalora_model(model, qalora_config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora_equiv = sum(
            m.lora_A["default"].out_features * (m.get_base_layer().in_features + m.get_base_layer().out_features)
            for m in model.modules() if hasattr(m, "qalora_group_size")
        )
        logger.info(
            "QA-LoRA: kernel %s; %s trainable parameters vs %s for plain LoRA of the same rank (%.1f%%)",
            kernels, f"{trainable:,}", f"{lora_equiv:,}", 100.0 * trainable / max(lora_equiv, 1),
        )

        # Intermediate checkpoints are never pushed: only the merged export lands on the Hub.
        self.qalora_push = None
        if args.push_to_hub:
            self.qalora_push = {"repo_id": args.hub_model_id, "private": bool(args.hub_private_repo), "token": args.hub_token}
            args.push_to_hub = False

        self.qalora_config = qalora_config
        self.quantize_config = quantize_config
        self.base_model_id = base_path
        self.license = source_license(float_model or base_path)
        self.float_model_id = args.float_model_id or float_model
        self.export_dir = args.export_dir or os.path.join(args.output_dir, "export")
        self.merged_model = None
        self.merge_report = None
        self.merge_metrics = None
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, formatting_func=formatting_func, **kwargs,
        )
        if args.merge_at_end:
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

    def push_to_hub(
        self,
        commit_message: Optional[str] = "End of training",
        blocking: bool = True,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        private: Optional[bool] = None,
        **kwargs,
    ):
        """Push the merged export (``self.export_dir``: the GPTQ v1 checkpoint, its model card, ``adapter/`` and
        ``merge_report.json``) to ``args.hub_model_id`` with :func:`qalora_hf.hub.push_gptq_to_hub`.

        Replaces transformers' ``Trainer.push_to_hub`` (same arguments), which would upload ``output_dir`` over that
        repo: the adapter files at its root, ``training_args.bin`` (a pickle), a second copy of the export under
        ``export/`` and the Trainer's generic card in place of ours.  After a ``train()`` that already pushed
        (``push_to_hub=True``) it uploads the same files again: the repo stays the export (at most one more commit of
        the same files).  Only world process zero pushes; the others return None.

        Args:
            commit_message: commit title (None: ``push_gptq_to_hub``'s default).
            blocking: False returns a ``concurrent.futures.Future`` of the commit id (huggingface_hub's
                ``HfApi.run_as_future``) instead of waiting for the upload.
            token: Hub token (default ``args.hub_token``, else ``HF_TOKEN`` or the stored login).
            revision: branch to commit to, created from ``main`` when missing (default ``main``).
            private: create the repo as private (default ``args.hub_private_repo``; no effect on an existing repo).
            kwargs: transformers' model-card options (``model_name``, ``tags``, ``finetuned_from``, ``dataset``, ...):
                not used, with a warning. The export's card was written by the merge from its measurements and is
                pushed as it is (``model_card_datasets`` sets its datasets).

        Returns:
            The id (40-hex sha) of the commit holding the upload, or its ``Future`` when ``blocking=False``.

        Raises:
            ValueError: nothing merged yet (``train()`` not run, or ``merge_at_end=False``: call
                :meth:`merge_and_export` first, or merge a saved adapter with ``qalora-hf merge``), or no
                ``hub_model_id`` — before any request.
            qalora_hf.hub.HubPushError: the push failed (token-free message).
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if not self.is_world_process_zero():
            return None
        push = self.qalora_push or {}
        repo_id = push.get("repo_id") or self.args.hub_model_id
        if self.merge_report is None:
            raise ValueError(
                "trainer.push_to_hub() publishes the merged GPTQ export, and nothing has been merged yet "
                f"({'merge_at_end=False' if not self.args.merge_at_end else 'train() has not finished'}). Call "
                "trainer.merge_and_export() first (train() does it with merge_at_end=True), or merge a saved adapter with "
                "`qalora-hf merge --base BASE --adapter DIR --output-dir OUT --push-to-hub REPO_ID`."
            )
        if not repo_id:
            raise ValueError("trainer.push_to_hub() needs hub_model_id='namespace/name' in the training arguments.")
        if kwargs:
            logger.warning("push_to_hub: %s not used: the export's model card, written by the merge, is pushed as it is.",
                           ", ".join(sorted(kwargs)))
        from .hub import push_gptq_to_hub

        push_kwargs = dict(
            private=bool(push.get("private", self.args.hub_private_repo) if private is None else private),
            revision=revision, token=token or push.get("token") or self.args.hub_token,
            **({"commit_message": commit_message} if commit_message else {}),
        )
        if not blocking:
            from huggingface_hub import HfApi

            return HfApi().run_as_future(push_gptq_to_hub, self.export_dir, repo_id, **push_kwargs)
        return push_gptq_to_hub(self.export_dir, repo_id, **push_kwargs)

    def merge_and_export(self) -> Path:
        """Merge the adapters into the GPTQ integers, measure, export (and push): :func:`qalora_hf.pipeline.merge_measure_export`
        on this trainer's model, its own collated batches and card metadata.  Called on the main process by
        :class:`~qalora_hf.callbacks.QALoraMergeCallback`.  Returns the export dir.

        Calibration: the first ``args.num_calibration_rows`` training rows.  Held out: the first ``args.num_holdout_rows``
        rows of ``eval_dataset``, else the last training rows.  The adapter is saved to ``<output_dir>/adapter`` first.
        """
        args = self.args
        model = self.accelerator.unwrap_model(self.model)
        adapter_dir = Path(args.output_dir) / "adapter"
        model.save_pretrained(adapter_dir)

        train = self.train_dataset
        holdout_ds = self.eval_dataset if self.eval_dataset is not None and not isinstance(self.eval_dataset, dict) else None
        if holdout_ds is not None:
            hold_idx, source = list(range(min(len(holdout_ds), args.num_holdout_rows))), "eval_dataset"
        else:
            holdout_ds, source = train, "last training rows"
            hold_idx = list(range(max(len(train) - args.num_holdout_rows, 0), len(train)))
        device = next(model.parameters()).device
        holdout = collated_batches(holdout_ds, hold_idx, self.data_collator, device=device)
        calibration = collated_batches(train, range(min(len(train), args.num_calibration_rows)), self.data_collator, device=device)

        push = self.qalora_push or {}
        card = CardInfo(
            repo_id=push.get("repo_id") or args.hub_model_id or Path(self.export_dir).name,
            base_model=self.base_model_id, float_model=self.float_model_id, license=self.license,
            datasets=args.model_card_datasets or (), qalora_config=self.qalora_config.to_dict(),
            training_args=training_args_summary(args),
        )
        hub_base = self.base_model_id if self.base_model_id and not Path(self.base_model_id).exists() else None
        result = merge_measure_export(
            model, self.processing_class, self.export_dir, card=card, strategy=args.merge_strategy, calibration=calibration,
            holdout=holdout, holdout_source=source, adapter_dir=adapter_dir, log_history=self.state.log_history,
            base_model_id=hub_base, push_to_hub=push.get("repo_id"), hub_private=bool(push.get("private")),
            hub_token=push.get("token"), overwrite=True,
        )
        self.merged_model, self.merge_report, self.merge_metrics = result.merged_model, result.report, result.metrics
        return result.export_dir
