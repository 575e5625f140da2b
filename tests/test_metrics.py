"""Metrics against independent computations: hand-worked examples and exact enumeration on a tiny vocabulary."""

import itertools
import math

import pytest
import torch

from rkd_trl.demo.synthetic import build_tokenizer, tiny_causal_lm
from rkd_trl.evaluation.metrics import (
    chat_prompt_batch,
    completion_logprobs,
    distinct_n,
    exact_match,
    excess_accumulated_error,
    expected_calibration_error,
    exposure_bias,
    forward_kl_estimate,
    next_token_calibration,
    reverse_kl_by_position,
    reverse_kl_estimate,
    rouge_l,
    rouge_l_scores,
    sample_with_scores,
    validity,
)


def test_rouge_l_matches_hand_computed_lcs():
    # "a b c d" vs "a c d": LCS 3, precision 3/4, recall 3/3, F = 2·0.75·1/1.75 = 6/7; the other reference "b"
    # scores less, so the best reference counts. "x" vs "y" shares nothing: 0.
    assert rouge_l(["a b c d", "x"], [["a c d", "b"], ["y"]]) == pytest.approx((6 / 7 + 0) / 2)
    assert rouge_l(["a b"], [["a b"]]) == pytest.approx(1.0)
    # LCS("a b", "a b c d") = 2: precision 1, recall 1/2, F = 2/3; averaged with a perfect match.
    assert rouge_l(["a b", "z"], [["a b c d"], ["z"]]) == pytest.approx((2 / 3 + 1) / 2)
    assert rouge_l_scores(["a b c d", "x", "a b"], [["a c d", "b"], ["y"], ["a b c d"]]) == pytest.approx([6 / 7, 0, 2 / 3])


def test_exact_match_takes_any_reference_up_to_white_space():
    assert exact_match([" a b ", "a c"], [["x", "a b"], ["a b"]]) == 0.5


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b a b a b c: 3 distinct of 7
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc: 3 distinct of 5
    assert distinct_n(["a"], 2) == 0.0


def test_expected_calibration_error_by_hand():
    confidences = torch.tensor([0.85, 0.87, 0.55, 0.15])
    correct = torch.tensor([True, False, True, False])
    # bins (0.8, 0.9]: accuracy 1/2, confidence 0.86 -> 2/4 · 0.36; (0.5, 0.6]: 1 vs 0.55 -> 1/4 · 0.45;
    # (0.1, 0.2]: 0 vs 0.15 -> 1/4 · 0.15
    expected = 0.5 * 0.36 + 0.25 * 0.45 + 0.25 * 0.15
    assert expected_calibration_error(confidences, correct, num_bins=10) == pytest.approx(expected)
    # Perfectly calibrated: confidence 0.75, three of four right.
    assert expected_calibration_error(torch.full((4,), 0.75), torch.tensor([1, 1, 1, 0])) == pytest.approx(0.0)


def test_excess_accumulated_error_by_hand():
    student_prefix_errors = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])  # means 2, 1, 0 -> R(l) = 2, 3, 3
    teacher_prefix_errors = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # l·ε(l) = 1, 2, 3
    expected = torch.tensor([(2 - 1) / 1, (3 - 2) / 2, (3 - 3) / 3]) * 100
    torch.testing.assert_close(excess_accumulated_error(student_prefix_errors, teacher_prefix_errors), expected)


def test_validity_counts_exact_answers(task):
    prompt = task.prompts[0]
    valid_answer = task.answers[prompt][0]
    assert validity(task, [prompt, prompt], [f" {valid_answer} ", valid_answer + " a"]) == 0.5


# ---- sequence-level estimates against exact enumeration on a 7-token vocabulary, 2 new tokens


@pytest.fixture(scope="module")
def tiny_pair():
    tokenizer = build_tokenizer(["a", "b"])
    student = tiny_causal_lm(tokenizer, hidden_size=8, num_layers=1, num_heads=2, seed=3).eval()
    teacher = tiny_causal_lm(tokenizer, hidden_size=8, num_layers=1, num_heads=2, seed=4).eval()
    # Random initialisation gives near-uniform models; sharpen them so the KLs are far from 0.
    with torch.no_grad():
        student.lm_head.weight.mul_(40)
        teacher.lm_head.weight.mul_(40)
    return tokenizer, student, teacher


def exact_sequence_kls(tokenizer, student, teacher, prompt, max_new_tokens):
    """Enumerate every completion (ends at EOS or after max_new_tokens), score it with a plain forward each."""
    prompt_ids = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False))[
        "input_ids"
    ]
    vocab = range(len(tokenizer))

    def sequence_logprob(model, completion):
        ids = torch.tensor([prompt_ids + list(completion)])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        return sum(logprobs[len(prompt_ids) - 1 + t, token].item() for t, token in enumerate(completion))

    completions = []
    for length in range(1, max_new_tokens + 1):
        for completion in itertools.product(vocab, repeat=length):
            ends_early = any(token == tokenizer.eos_token_id for token in completion[:-1])
            if not ends_early and (length == max_new_tokens or completion[-1] == tokenizer.eos_token_id):
                completions.append(completion)
    reverse = forward = total_q = total_p = 0.0
    with torch.no_grad():
        for completion in completions:
            log_q, log_p = sequence_logprob(student, completion), sequence_logprob(teacher, completion)
            reverse += math.exp(log_q) * (log_q - log_p)
            forward += math.exp(log_p) * (log_p - log_q)
            total_q, total_p = total_q + math.exp(log_q), total_p + math.exp(log_p)
    assert total_q == pytest.approx(1.0) and total_p == pytest.approx(1.0)  # the enumeration is complete
    return reverse, forward


def test_sequence_kl_estimates_match_exact_enumeration(tiny_pair):
    tokenizer, student, teacher = tiny_pair
    exact_reverse, exact_forward = exact_sequence_kls(tokenizer, student, teacher, "a", max_new_tokens=2)
    torch.manual_seed(0)
    reverse = reverse_kl_estimate(student, teacher, tokenizer, ["a"], max_new_tokens=2, samples_per_prompt=4000)
    forward = forward_kl_estimate(student, teacher, tokenizer, ["a"], max_new_tokens=2, samples_per_prompt=4000)
    assert exact_reverse > 0.5 and exact_forward > 0.5
    assert abs(reverse["reverse_kl"] - exact_reverse) < 4 * reverse["reverse_kl_stderr"]
    assert abs(forward["forward_kl"] - exact_forward) < 4 * forward["forward_kl_stderr"]


def test_reverse_kl_by_position_against_plain_forwards_and_exact_enumeration(tiny_pair):
    tokenizer, student, teacher = tiny_pair
    prompts = ["a", "b a b"]  # two prompt lengths: left padding in the batch
    torch.manual_seed(0)
    by_position = reverse_kl_by_position(student, teacher, tokenizer, prompts, 3, samples_per_prompt=3, batch_size=4)
    kl, log_ratio, mask = by_position["kl"], by_position["log_ratio"], by_position["mask"]
    assert kl.shape == log_ratio.shape == mask.shape == (6, 3)
    # Each sample, position by position, against one unpadded forward of prompt + sample per model.
    lengths = set()
    for row, prompt in enumerate(p for p in prompts for _ in range(3)):
        length = int(mask[row].sum())
        lengths.add(length)
        assert mask[row, :length].all() and not mask[row, length:].any()
        assert (kl[row, length:] == 0).all() and (log_ratio[row, length:] == 0).all()
        prompt_ids = chat_prompt_batch(tokenizer, [prompt])[0]
        sample = by_position["completion_ids"][row, :length]
        ids = torch.cat([prompt_ids[0], sample])[None]
        q, p = (torch.log_softmax(m(input_ids=ids).logits[0].double(), -1)[prompt_ids.size(1) - 1 : -1]
                for m in (student, teacher))  # fmt: skip
        expected_kl = (q.exp() * (q - p)).sum(-1)
        expected_ratio = (q - p).gather(-1, sample[:, None]).squeeze(-1)
        torch.testing.assert_close(kl[row, :length].double(), expected_kl, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(log_ratio[row, :length].double(), expected_ratio, atol=1e-4, rtol=1e-4)
    assert len(lengths) > 1  # some samples end early, some run to the limit
    # Summed over positions, its mean is the sequence reverse KL: against exact enumeration.
    exact_reverse, _ = exact_sequence_kls(tokenizer, student, teacher, "a", max_new_tokens=2)
    torch.manual_seed(1)
    many = reverse_kl_by_position(student, teacher, tokenizer, ["a"], 2, samples_per_prompt=3000, batch_size=1000)
    per_sequence = many["kl"].sum(1)
    assert abs(per_sequence.mean().item() - exact_reverse) < 4 * (per_sequence.std() / 3000**0.5).item()
    # Rao–Blackwellised: less spread than the sampled log-ratio over the same samples, the same mean.
    assert per_sequence.std() < many["log_ratio"].sum(1).std()


def test_completion_logprobs_match_the_cached_sampler(tiny_pair):
    tokenizer, student, teacher = tiny_pair
    torch.manual_seed(0)
    prompts = ["a", "b a", "a"]
    rollout, _ = sample_with_scores(student, teacher, tokenizer, prompts, max_new_tokens=3)
    ids, mask = chat_prompt_batch(tokenizer, prompts)
    logprobs = completion_logprobs(
        student, ids, mask, rollout.completion_ids, rollout.completion_mask, vocab_size=len(tokenizer)
    )
    picked = logprobs.gather(-1, rollout.completion_ids[..., None]).squeeze(-1) * rollout.completion_mask
    torch.testing.assert_close(picked, rollout.student_logprobs, atol=1e-4, rtol=1e-4)


def test_exposure_bias_starts_at_zero_and_has_one_value_per_length(tiny_pair):
    tokenizer, student, teacher = tiny_pair
    torch.manual_seed(0)
    curve = exposure_bias(student, teacher, tokenizer, ["a"], max_new_tokens=3, samples_per_prompt=64)
    assert curve.shape == (3,)
    # At l = 1 both prefixes are the prompt alone: no excess error.
    assert curve[0].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(curve).all()


def test_a_model_is_calibrated_against_its_own_samples(tiny_pair):
    tokenizer, student, teacher = tiny_pair
    torch.manual_seed(0)
    self_ece = next_token_calibration(teacher, teacher, tokenizer, ["a"], max_new_tokens=2, samples_per_prompt=3000)
    other_ece = next_token_calibration(student, teacher, tokenizer, ["a"], max_new_tokens=2, samples_per_prompt=3000)
    assert self_ece < 0.03
    assert other_ece > 3 * self_ece


def test_paired_difference_against_normal_theory_and_by_hand():
    """The bootstrap interval of a mean difference over many prompts matches the normal-theory interval
    (mean ± 1.96 sd / √n); a constant difference has no spread; wins are counted prompt by prompt."""
    import random
    import statistics

    from rkd_trl.evaluation.metrics import paired_difference

    rng = random.Random(1)
    a = [rng.gauss(1.0, 4.0) for _ in range(400)]
    b = [0.0] * 400
    d = paired_difference(a, b, resamples=4000)
    half = 1.96 * statistics.stdev(a) / 400**0.5
    assert d["difference"] == pytest.approx(statistics.fmean(a))
    assert d["low"] == pytest.approx(statistics.fmean(a) - half, abs=0.1 * half)
    assert d["high"] == pytest.approx(statistics.fmean(a) + half, abs=0.1 * half)
    same = paired_difference([3.0, 5.0, 7.0], [1.0, 3.0, 5.0])
    assert same["difference"] == same["low"] == same["high"] == pytest.approx(2.0)
    counts = paired_difference([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 0.0])
    assert (counts["a_higher"], counts["b_higher"]) == (2, 1)
