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


def test_measure_row_losses_match_unbatched_rows(float_model, tiny_tok):
    """The per-row loss sums and token counts (for gain_kept_se) are each row's own, whatever the batching."""
    from qalora_hf.data import token_batches
    from qalora_hf.metrics import measure

    rows = [{"prompt": p, "completion": c} for p, c in _pairs()]
    one = [measure(float_model, token_batches([r], tiny_tok, 256, 1)) for r in rows]
    expected = sorted((round(m.row_loss_sums[0], 3), m.row_tokens[0]) for m in one)
    m = measure(float_model, token_batches(rows, tiny_tok, 256, 4))
    assert len(m.row_loss_sums) == len(m.row_tokens) == m.rows == len(rows)
    assert sum(m.row_tokens) == m.tokens and math.isclose(sum(m.row_loss_sums) / m.tokens, m.loss, rel_tol=1e-9)
    got = sorted((round(s, 3), n) for s, n in zip(m.row_loss_sums, m.row_tokens))
    assert [n for _, n in got] == [n for _, n in expected]
    for (a, _), (b, _) in zip(got, expected):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-3)


def test_gain_kept_se_matches_the_delta_method():
    """The paired bootstrap's standard error of the gain kept agrees with the delta method's for a ratio of sums, is 0
    when the export is the trained (or the base) model, and refuses rows that differ."""
    from qalora_hf.metrics import Measurement, gain_kept_se

    g = torch.Generator().manual_seed(0)
    n = 400
    tokens = torch.randint(20, 60, (n,), generator=g).double()
    base = tokens * (2.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64))
    trained = base - tokens * (0.2 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
    other = trained + tokens * (0.01 + 0.02 * torch.randn(n, generator=g, dtype=torch.float64))

    def m(sums):
        return Measurement(loss=float(sums.sum() / tokens.sum()), tokens=int(tokens.sum()), rows=n,
                           row_loss_sums=sums.tolist(), row_tokens=[int(t) for t in tokens])

    a, c = base - other, base - trained
    r = a.sum() / c.sum()
    delta = float(((a - r * c).var() / n).sqrt() / c.mean())
    se = gain_kept_se(m(base), m(trained), m(other))
    assert 0.85 * delta < se < 1.15 * delta, (se, delta)
    assert gain_kept_se(m(base), m(trained), m(trained)) < 1e-12
    assert gain_kept_se(m(base), m(trained), m(base)) < 1e-12
    assert gain_kept_se(m(base), m(base), m(other)) is None  # no gain: the fraction is not defined
    short = Measurement(loss=1.0, tokens=1, rows=1)
    assert gain_kept_se(m(base), m(trained), short) is None  # no per-row losses
    shifted = Measurement(loss=1.0, tokens=int(tokens.sum()) + 1, rows=n, row_loss_sums=other.tolist(),
                          row_tokens=[int(t) + (i == 0) for i, t in enumerate(tokens)])
    with pytest.raises(ValueError, match="same batches"):
        gain_kept_se(m(base), m(trained), shifted)
