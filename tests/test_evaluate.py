"""The held-out loss (qalora_hf.metrics) and the demo's MMLU scorer batch rows in order of length: the numbers must equal
an unbatched reference."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from demo.evaluation import MMLU_LETTERS, mmlu_accuracy, mmlu_prompt
from qalora_hf.metrics import completion_loss


@pytest.fixture(scope="module")
def float_model(tiny_float_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_float_dir, dtype=torch.float32).eval()


def _pairs():
    # lengths deliberately unsorted and uneven, so the length-sorted batches differ from the given order
    words = ["sun", "moon", "sea", "sky", "grass", "snow", "fire", "rock", "tree", "rain"]
    return [
        (f"Instruction: say something about the {w}{' please' * (i % 4)}. Response:", f" the {w} is{' very' * ((7 * i) % 5)} nice.")
        for i, w in enumerate(words)
    ]


def test_completion_loss_matches_unbatched_reference(float_model, tiny_tok):
    pairs = _pairs()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, completion in pairs:  # one row at a time, no padding, plain log-softmax
            # tokenised as TRL's SFTTrainer does: EOS appended to the completion, prompt and prompt + completion
            # tokenised separately, the completion starting where they diverge
            p = tiny_tok(prompt)["input_ids"]
            ids = tiny_tok(prompt + completion + tiny_tok.eos_token)["input_ids"]
            assert ids[-1] == tiny_tok.eos_token_id
            start = next((i for i, (a, b) in enumerate(zip(p, ids)) if a != b), min(len(p), len(ids)))
            logp = torch.log_softmax(float_model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
            targets = torch.tensor(ids)[1:]
            nll = -logp[torch.arange(len(targets)), targets]
            total += float(nll[start - 1 :].sum())  # positions predicting completion tokens
            count += len(ids) - start
    ref = total / count
    for batch_size in (1, 3, 8):
        got = completion_loss(float_model, tiny_tok, pairs, batch_size=batch_size)
        assert math.isclose(got, ref, rel_tol=1e-5), (batch_size, got, ref)


def test_mmlu_accuracy_matches_unbatched_reference(float_model, tiny_tok):
    rows = []
    for i in range(12):
        rows.append({
            "topic": "high_school_physics" if i % 2 else "anatomy",
            "question": "What is " + "very " * (i % 5) + f"true about item {i}?",
            "answer_a": f"alpha {i}", "answer_b": "beta" * (1 + i % 3), "answer_c": "gamma", "answer_d": f"delta {i * 7}",
        })
    letter_ids = [tiny_tok(" " + x, add_special_tokens=False)["input_ids"][-1] for x in MMLU_LETTERS]
    predicted = []
    with torch.no_grad():
        for r in rows:
            ids = tiny_tok(mmlu_prompt(r), add_special_tokens=False)["input_ids"]
            logits = float_model(input_ids=torch.tensor([ids])).logits[0, -1]
            predicted.append(MMLU_LETTERS[int(logits[letter_ids].argmax())])
    # label the rows so that the unbatched predictions are right on rows 0..5 and wrong on 6..11
    for i, r in enumerate(rows):
        r["correct_answer"] = predicted[i] if i < 6 else MMLU_LETTERS[(MMLU_LETTERS.index(predicted[i]) + 1) % 4]
    for batch_size in (1, 5, 8):
        assert mmlu_accuracy(float_model, tiny_tok, rows, batch_size=batch_size) == pytest.approx(0.5)
