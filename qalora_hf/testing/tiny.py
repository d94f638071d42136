"""Tiny random Llama models and tokenizers for tests and examples (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

TINY_TEXTS = [
    f"Below is an instruction. Write a response. Instruction: give fact number {i} about the {w}. Response: the {w} is {a}."
    for i, (w, a) in enumerate(
        [("sun", "hot"), ("moon", "grey"), ("sea", "salty"), ("sky", "blue"), ("grass", "green"), ("snow", "cold"), ("fire", "bright"), ("rock", "hard")]
        * 8
    )
]


def tiny_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` (vocab ~320) trained on :data:`TINY_TEXTS`, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(TINY_TEXTS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tok


def save_tiny_float_model(output_dir: str | os.PathLike, seed: int = 0, bias: bool = False, hidden_size: int = 64,
                          intermediate_size: int = 128, num_attention_heads: int = 4, num_key_value_heads: int = 2) -> Path:
    """Write a random 2-layer Llama (by default hidden 64, intermediate 128, 4 heads / 2 KV heads) and its tokenizer.

    gptqmodel packs only layers whose ``in_features`` and ``out_features`` are multiples of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, max_position_embeddings=256,
        tie_word_embeddings=True, attention_bias=bias, mlp_bias=bias,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out = Path(output_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def quantize_tiny(float_dir, output_dir, bits=4, group_size=32, desc_act=False, sym=False) -> Path:
    """GPTQ-quantise a (tiny) float model with transformers + optimum + gptqmodel on :data:`TINY_TEXTS`."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    tok = AutoTokenizer.from_pretrained(float_dir)
    from qalora_hf.gptq import TRAINABLE_BACKEND

    qconf = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, dataset=TINY_TEXTS[:16], tokenizer=tok,
                       backend=TRAINABLE_BACKEND)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=qconf, dtype=torch.float32)
    from qalora_hf.export import export_gptq

    export_gptq(model, output_dir, tokenizer=tok, overwrite=True, card=None, split_ragged_groups=False)
    return Path(output_dir)


def load_gptq(path, bits: Optional[int] = None, **kwargs):
    """Load a GPTQ checkpoint with the trainable torch kernel, in float32 (CPU): :func:`qalora_hf.gptq.load_gptq_model`,
    checking ``bits`` against the checkpoint when given."""
    from qalora_hf.gptq import load_gptq_model

    model = load_gptq_model(str(path), dtype=torch.float32, **kwargs)
    if bits is not None and int(model.config.quantization_config.bits) != int(bits):
        raise ValueError(f"{path} holds a {model.config.quantization_config.bits}-bit model, not {bits}-bit.")
    return model
