"""`QALoraConfig`: the user-facing options of a QA-LoRA adapter, mapped onto `peft.LoraConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from peft import LoraConfig

# The key our adapter files carry so that their pooling can be told apart from stock PEFT's (stock PEFT
# ignores unknown adapter_config.json keys, with a warning).  Stock PEFT pools contiguous channels; we pool
# by g_idx; the two agree exactly when g_idx[i] == i // group_size (act-order off).
POOLING_KEY = "qalora_pooling"
POOLING_G_IDX = "g_idx"
# The key recording which GPTQ base an adapter was trained on (qalora_hf.model.base_fingerprint): a sha256 of the
# integer state (codes, zero-points, scales, g_idx) of the first and last adapted layers, compared on load.
BASE_KEY = "qalora_base"


@dataclass
class QALoraLoraConfig(LoraConfig):
    """``peft.LoraConfig`` plus ``qalora_pooling="g_idx"``, written into ``adapter_config.json`` by every
    PEFT ``save_pretrained`` (Trainer checkpoints included), so a loader knows these adapters pool by
    ``g_idx`` (docs/conventions.md), and ``qalora_base``, the fingerprint of the GPTQ base it was trained on
    (docs/reliability.md)."""

    qalora_pooling: str = field(default=POOLING_G_IDX, metadata={"help": "How the adapter input is pooled: 'g_idx'."})
    qalora_base: Optional[dict] = field(
        default=None,
        metadata={"help": "The GPTQ base the adapter was trained on: {'sha256': hex digest, 'layers': [names], 'bits', "
                          "'group_size'} (qalora_hf.model.base_fingerprint); compared when the adapter is loaded."},
    )


@dataclass
class QALoraConfig:
    """Options of a QA-LoRA adapter (Xu et al. 2023, arXiv 2309.14717, §3.3).

    The adapter is saved as a stock PEFT LoRA adapter with ``use_qalora=True`` and
    ``qalora_group_size=group_size`` (see :meth:`to_lora_config`), so PEFT's
    ``PeftModel.from_pretrained`` reads it, and stock PEFT computes the same forward on models
    without act-order.

    Raises:
        ValueError: from ``__post_init__`` on an ``r`` that is not a positive integer (``4.5``), a non-positive ``lora_alpha`` or ``group_size``,
            a ``lora_dropout`` outside [0, 1), an empty ``target_modules`` or an unknown
            ``init_lora_weights``.
    """

    r: int = field(default=16, metadata={"help": "LoRA rank r of lora_A [r, G] and lora_B [N, r]."})
    lora_alpha: float = field(default=16, metadata={"help": "scaling = lora_alpha / r (or / sqrt(r) with use_rslora)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the layer input before pooling."})
    target_modules: Union[list[str], str] = field(
        default="all-linear",
        metadata={"help": "Module names (suffixes) to adapt, or 'all-linear' for every GPTQ linear layer except lm_head."},
    )
    group_size: Optional[int] = field(
        default=None,
        metadata={"help": "Pooling group size; must equal the GPTQ group_size (default: read from the model)."},
    )
    init_lora_weights: Union[bool, str] = field(
        default=True,
        metadata={"help": "True: kaiming-uniform lora_A, zero lora_B (no-op start); 'gaussian': normal(0, 1/r) lora_A; False: random B too."},
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling lora_alpha / sqrt(r)."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules trained in full (rarely wanted)."})

    def __post_init__(self):
        if isinstance(self.r, float) and self.r.is_integer():
            self.r = int(self.r)  # 16.0 from a YAML file
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (lora_r, the rank of lora_A [r, G]), got {self.r!r}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(
                f"group_size must be positive (the GPTQ group_size), got {self.group_size}; leave it unset to read it from the model."
            )
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise ValueError("target_modules is empty; name modules such as ['q_proj', 'v_proj'] or use 'all-linear'.")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}.")

    @property
    def scaling(self) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_lora_config(self, group_size: int) -> LoraConfig:
        """The equivalent ``peft.LoraConfig(use_qalora=True, qalora_group_size=group_size)`` (as a
        :class:`QALoraLoraConfig`, which records ``qalora_pooling="g_idx"`` in saved adapters)."""
        return QALoraLoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            init_lora_weights=self.init_lora_weights,
            use_rslora=self.use_rslora,
            modules_to_save=self.modules_to_save,
            use_qalora=True,
            qalora_group_size=group_size,
            bias="none",
            task_type="CAUSAL_LM",
        )

    @classmethod
    def from_lora_config(cls, lora_config: LoraConfig) -> "QALoraConfig":
        """Read back a PEFT ``LoraConfig`` written by :meth:`to_lora_config` or by stock PEFT ``use_qalora``."""
        target = lora_config.target_modules
        if isinstance(target, set):
            target = sorted(target)
        return cls(
            r=lora_config.r,
            lora_alpha=lora_config.lora_alpha,
            lora_dropout=lora_config.lora_dropout,
            target_modules=target,
            group_size=lora_config.qalora_group_size,
            init_lora_weights=lora_config.init_lora_weights if lora_config.init_lora_weights in (True, False, "gaussian") else True,
            use_rslora=lora_config.use_rslora,
            modules_to_save=lora_config.modules_to_save,
        )

    @classmethod
    def from_model_config(cls, model_args, **overrides) -> "QALoraConfig":
        """The adapter options of a ``trl.ModelConfig`` (its ``lora_r``, ``lora_alpha``, ``lora_dropout``,
        ``lora_target_modules`` (default ``"all-linear"``), ``use_rslora`` and ``lora_modules_to_save``), as
        alignment-handbook recipes give them; ``overrides`` win.

        Raises:
            ValueError: options QA-LoRA on GPTQ cannot honour (``use_dora``, ``load_in_4bit`` / ``load_in_8bit``,
                ``lora_target_parameters``, a task type other than ``CAUSAL_LM``).
        """
        unsupported = {
            "use_dora": "DoRA's magnitude vector cannot be folded into GPTQ zero-points",
            "load_in_4bit": "QA-LoRA trains on a GPTQ base, not bitsandbytes",
            "load_in_8bit": "QA-LoRA trains on a GPTQ base, not bitsandbytes",
            "lora_target_parameters": "QA-LoRA adapts GPTQ linear layers, not parameters",
        }
        for name, why in unsupported.items():
            if getattr(model_args, name, None):
                raise ValueError(f"--{name} is not supported here: {why}. Remove it from the recipe's arguments.")
        task = getattr(model_args, "lora_task_type", "CAUSAL_LM")
        if task not in (None, "CAUSAL_LM"):
            raise ValueError(f"--lora_task_type {task}: QA-LoRA trains causal LMs; use CAUSAL_LM.")
        targets = getattr(model_args, "lora_target_modules", None) or "all-linear"
        if isinstance(targets, (list, tuple)) and list(targets) == ["all-linear"]:
            targets = "all-linear"
        values = dict(
            r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
            target_modules=targets if isinstance(targets, str) else list(targets),
            use_rslora=bool(getattr(model_args, "use_rslora", False)),
            modules_to_save=getattr(model_args, "lora_modules_to_save", None),
        )
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)
