"""Rows to text and to token batches, the same way for every caller (GPTQ calibration, the merge's calibration
in the CLI, held-out measurements, the demo).

Rows come in TRL's dataset formats or as Alpaca rows (docs/conventions.md, "Rows and text"):

* ``{"text": ...}`` and ``{"messages": [...]}`` (language modelling: every token counts);
* ``{"prompt": ..., "completion": ...}`` with strings or message lists (the loss counts completion tokens);
* Alpaca ``{"instruction", "input", "output"}``: the Alpaca template (Taori et al. 2023) as prompt, the
  output as completion, which is what ``recipes/sft_alpaca.py`` trains on.

Tokenisation follows TRL's ``SFTTrainer``: EOS appended to non-conversational text and completions,
prompt and prompt + completion tokenised separately, the completion starting where the two diverge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

IGNORE_INDEX = -100  # label of positions the loss does not count (PyTorch's cross_entropy default)
# The keys of a batch that are passed to the model (``labels`` and collator extras are not).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# The sequence boundaries TRL's padding-free collator (``packing=True`` with "bfd", or ``padding_free=True``) adds
# for varlen attention kernels (flash attention) and linear-attention layers; the Trainer passes them to the model.
PACKED_SEQUENCE_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def forward_inputs(batch: dict, device=None) -> dict:
    """The keyword arguments of the model forward on ``batch``, as the training step passes them.

    The keys of :data:`MODEL_INPUTS` and :data:`PACKED_SEQUENCE_INPUTS` that ``batch`` has (tensors moved to
    ``device`` when given), and ``use_cache=False`` as TRL's ``SFTTrainer.compute_loss`` sets.  Without a cache,
    transformers builds the attention mask of packed rows from ``position_ids`` (each packed sequence attends only
    to itself, ``masking_utils.find_packed_sequence_indices``); with one — a model whose ``config.use_cache`` is
    true — it skips that and packed sequences attend to each other, a forward training never ran.
    """
    out = {}
    for key in MODEL_INPUTS + PACKED_SEQUENCE_INPUTS:
        if key in batch:
            v = batch[key]
            out[key] = v.to(device) if device is not None and hasattr(v, "to") else v
    out["use_cache"] = False
    return out


def alpaca_prompt_completion(row: dict) -> tuple[str, str]:
    """The Alpaca template (Taori et al. 2023): ``(prompt, completion)`` of one instruction/input/output row."""
    template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
    return template.format(instruction=row["instruction"], input=row.get("input", "")), row["output"]


def row_format(keys: Iterable[str]) -> Optional[str]:
    """The format of a row (or of a dataset's columns): ``"text"``, ``"messages"``, ``"prompt_completion"``,
    ``"alpaca"``, ``"tokenized"`` (``input_ids``), or None when none fits."""
    keys = set(keys)
    if "text" in keys:
        return "text"
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "input_ids" in keys:
        return "tokenized"
    return None


FORMATS_HELP = ("a 'text' column, a 'messages' column, 'prompt' and 'completion' columns, or Alpaca "
                "'instruction'/'input'/'output' columns")


def _chat_text(tokenizer, messages: list, add_generation_prompt: bool = False) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return "\n\n".join(str(m.get("content", "")) for m in messages)  # no chat template: the contents, one per paragraph


def _is_conversational(row: dict) -> bool:
    return isinstance(row.get("messages"), list) or isinstance(row.get("prompt"), list)


def row_to_prompt_completion(row: dict, tokenizer=None) -> tuple[str, str]:
    """``(prompt, completion)`` text of one row (``prompt`` is ``""`` for language-modelling rows).

    Conversational rows go through ``tokenizer``'s chat template (the prompt with the generation prompt);
    without a chat template their message contents are joined by blank lines.  No EOS is added here.

    Raises:
        ValueError: a row in none of the formats of the module docstring.
    """
    fmt = row_format(row)
    if fmt == "text":
        return "", str(row["text"])
    if fmt == "messages":
        return "", _chat_text(tokenizer, row["messages"])
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            prompt_text = _chat_text(tokenizer, prompt, add_generation_prompt=True)
            full = _chat_text(tokenizer, prompt + list(completion or []))
            return (prompt_text, full[len(prompt_text):]) if full.startswith(prompt_text) else ("", full)
        return str(prompt or ""), str(completion or "")
    if fmt == "alpaca":
        return alpaca_prompt_completion(row)
    raise ValueError(f"row with keys {sorted(row)} has none of {FORMATS_HELP}.")


def row_to_text(row: dict, tokenizer=None) -> str:
    """Plain text of one row: prompt + completion (:func:`row_to_prompt_completion`), no EOS added."""
    prompt, completion = row_to_prompt_completion(row, tokenizer)
    return prompt + completion


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a ``.json`` file (a list, or ``{"data": [...]}`` / ``{"rows": [...]}``) or a ``.jsonl`` file.

    Raises:
        ValueError: no such file, invalid JSON, no rows, or a row in none of the supported formats
            (:data:`FORMATS_HELP`); the message names the file and the row.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if isinstance(rows, dict):
                rows = rows.get("data") or rows.get("rows") or [rows]
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON/JSONL: {err}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} holds no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or row_format(row) in (None, "tokenized"):
            raise ValueError(f"{path}: row {i} has neither 'text', 'messages', 'prompt'/'completion' nor Alpaca "
                             "'instruction'/'output' fields")
    return rows


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(row: dict, tokenizer) -> tuple[list[int], int]:
    """``(input_ids, start)``: the whole row's tokens, uncut, and the index of its first completion token."""
    prompt, completion = row_to_prompt_completion(row, tokenizer)
    conversational = _is_conversational(row)  # the chat template brings its own special tokens, and no EOS is added
    if not conversational and tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=not conversational)["input_ids"])

    ids = encode(prompt + completion)
    return ids, (_common_prefix(encode(prompt), ids) if prompt else 0)


def prompt_length(row: dict, tokenizer) -> int:
    """Tokens before the completion of one row, counted as TRL's ``SFTTrainer`` tokenises it (:func:`encode_row`):
    special tokens the tokenizer adds to a non-conversational text (BOS) included, 0 for language-modelling rows.
    A ``max_length`` not above it truncates the whole completion away."""
    return _encode(row, tokenizer)[1]


def encode_row(row: dict, tokenizer, max_length: Optional[int] = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one row as TRL's ``SFTTrainer`` tokenises it.

    Non-conversational rows get EOS appended to the text or completion; the loss counts every token of
    language-modelling rows and the completion tokens of prompt/completion rows (``labels`` is
    :data:`IGNORE_INDEX` on the prompt).  Both are cut to ``max_length`` tokens.
    """
    ids, start = _encode(row, tokenizer)
    labels = [IGNORE_INDEX] * start + ids[start:]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def token_batches(rows: Sequence[dict], tokenizer, max_length: Optional[int] = 256, batch_size: int = 8) -> list[dict]:
    """Padded batches of ``rows`` (:func:`encode_row`), rows grouped by length (fewer padded positions; a mean over
    tokens does not depend on the grouping).

    Each batch: ``input_ids`` / ``attention_mask`` / ``labels``, int64 [B, T] CPU tensors, right-padded with the pad
    token (EOS when the tokenizer has none), ``attention_mask`` 0 and ``labels`` :data:`IGNORE_INDEX` on padding.
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = sorted((encode_row(r, tokenizer, max_length) for r in rows), key=lambda e: len(e[0]))
    batches = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        batches.append({
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
            "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in chunk]),
        })
    return batches


def collated_batches(dataset, indices: Sequence[int], data_collator, batch_size: int = 8, device=None) -> list[dict]:
    """Batches of an already tokenised dataset (``SFTTrainer.train_dataset`` / ``eval_dataset``) through the trainer's
    own ``data_collator``, rows grouped by length, tensors moved to ``device``; every key the collator returns is kept
    (``position_ids`` too).  Each row is read once."""
    rows = sorted((dataset[j] for j in indices), key=lambda r: len(r["input_ids"]))
    batches = [data_collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    if device is not None:
        batches = [{k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()} for b in batches]
    return batches
