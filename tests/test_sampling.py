import itertools
import math

import pytest
import torch

from rkd_trl import sampling
from rkd_trl.evaluation.metrics import chat_prompt_batch as prompt_batch
from rkd_trl.sampling import mix_logprobs, sample_from_logprobs, sample_teacher_mixed, teacher_steps
from rkd_trl.scoring import language_model_backbone, position_ids_from_mask


def assert_scores_match_full_forward(student, teacher, ids, mask, rollout, alpha, vocab_size):
    """The rollout's log q, log p and log p̃ of the sampled tokens equal those of a full forward, to 1e-5."""
    q = full_forward_logprobs(student, ids, mask, rollout.completion_ids, rollout.completion_mask, vocab_size)
    p = full_forward_logprobs(teacher, ids, mask, rollout.completion_ids, rollout.completion_mask, vocab_size)
    tokens = rollout.completion_ids[..., None]
    valid = rollout.completion_mask.bool()
    assert torch.allclose(q.gather(-1, tokens).squeeze(-1)[valid], rollout.student_logprobs[valid], atol=1e-5)
    assert torch.allclose(p.gather(-1, tokens).squeeze(-1)[valid], rollout.teacher_logprobs[valid], atol=1e-5)
    mixed = mix_logprobs(q, p, alpha).gather(-1, tokens).squeeze(-1)
    assert torch.allclose(mixed[valid], rollout.sampling_logprobs[valid], atol=1e-5)


def full_forward_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, vocab_size):
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, prompt_ids.size(1) - 1 : -1, :vocab_size]
    return torch.log_softmax(logits.float(), -1)


def test_mix_logprobs_endpoints_and_middle():
    q = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    p = torch.log(torch.tensor([0.1, 0.1, 0.8]))
    assert torch.equal(mix_logprobs(q, p, 0.0), q)
    assert torch.equal(mix_logprobs(q, p, 1.0), p)
    expected = torch.log(0.25 * p.exp() + 0.75 * q.exp())
    assert torch.allclose(mix_logprobs(q, p, 0.25), expected)


def sample(student, teacher, tokenizer, prompts, alpha, max_new_tokens=4, **kwargs):
    ids, mask = prompt_batch(tokenizer, prompts)
    kwargs.setdefault("eos_token_ids", [tokenizer.eos_token_id])
    rollout = sample_teacher_mixed(
        student, teacher, ids, mask, vocab_size=len(tokenizer), max_new_tokens=max_new_tokens, alpha=alpha,
        pad_token_id=tokenizer.pad_token_id, **kwargs,
    )  # fmt: skip
    return ids, mask, rollout


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_recorded_scores_match_full_forward(tokenizer, teacher, make_student, task, alpha):
    """KV-cached incremental scores equal a full forward over the sampled sequences, with left padding."""
    student = make_student().eval()
    torch.manual_seed(0)
    prompts = ["q0", "q1 q2 q3", "q4"]  # different lengths: left padding
    ids, mask, rollout = sample(student, teacher, tokenizer, prompts, alpha, max_new_tokens=5)
    assert_scores_match_full_forward(student, teacher, ids, mask, rollout, alpha, len(tokenizer))
    valid = rollout.completion_mask.bool()
    # After the first EOS: pad ids, mask 0, zero scores.
    for row in range(len(prompts)):
        ids_row = rollout.completion_ids[row].tolist()
        if tokenizer.eos_token_id in ids_row:
            end = ids_row.index(tokenizer.eos_token_id)
            assert rollout.completion_mask[row, : end + 1].all() and not rollout.completion_mask[row, end + 1 :].any()
            assert all(t == tokenizer.pad_token_id for t in ids_row[end + 1 :])
    assert torch.all(rollout.student_logprobs[~valid] == 0)


class FedPositions:
    """Counts the token positions fed to a module (forward pre-hook), all of them and those attended to (the fed
    columns of the attention mask), and its calls."""

    def __init__(self, module):
        self.count = self.attended = self.calls = 0
        module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        fed = kwargs["input_ids"].size(1)
        self.count += kwargs["input_ids"].numel()
        self.attended += int(kwargs["attention_mask"][:, -fed:].sum())
        self.calls += 1


def calls_at_own_steps(own_columns: torch.Tensor, length: int) -> int:
    """Forwards of a model fed lazily over a rollout of `length` columns: the prompt, one catch-up at each of its own
    steps after the first column, and one at the end for the columns since its last step."""
    columns = own_columns[1:length].nonzero().squeeze(1) + 1
    last = int(columns.max()) if columns.numel() else 0
    return 1 + columns.numel() + (last < length - 1)


@pytest.mark.parametrize("catch_up", [True, False])
def test_rows_that_end_leave_the_batch_and_every_position_is_fed_once(
    tokenizer, teacher, make_student, task, catch_up, monkeypatch
):
    """With half the vocabulary as EOS, rows end at different steps: they are dropped from both KV caches, the
    remaining rows' scores and the teacher's hidden states still equal a full forward, and each model reads every
    prompt position and every sampled position but the last of each row exactly once. Each model catches up at its
    own steps only (one forward per step it draws, plus the prompt and the end), or, without catch-up, is fed every
    token as it is drawn."""
    student = make_student().eval()
    V = len(tokenizer)
    eos_token_ids = [tokenizer.convert_tokens_to_ids(letter) for letter in task.letters[:3]] + [tokenizer.eos_token_id]
    fed = {
        name: FedPositions(language_model_backbone(model))
        for name, model in (("student", student), ("teacher", teacher))
    }
    # The teacher draws the first column, runs of several steps each, and the last (the student then catches up).
    coins = torch.tensor([True, False, True, True, False, False, True, True])
    monkeypatch.setattr(sampling, "teacher_steps", lambda *args: coins)
    torch.manual_seed(10)  # rows end at columns the teacher drew and at columns the student drew
    prompts = ["q0", "q1 q2 q3", "q4", "q5", "q6 q7", "q2"]
    ids, mask, rollout = sample(
        student, teacher, tokenizer, prompts, 0.5, max_new_tokens=8, eos_token_ids=eos_token_ids,
        teacher_catch_up=catch_up, student_catch_up=catch_up,
    )  # fmt: skip
    lengths = rollout.completion_mask.sum(1)
    length = int(lengths.max())
    assert lengths.unique().numel() > 2 and length > 4, lengths  # rows ended at several different steps
    # ... at columns each model drew, and the teacher drew the last column (the student catches up after the loop).
    ended_at = {bool(coins[int(n) - 1]) for n in lengths[lengths < 8]}
    assert ended_at == {True, False} and bool(coins[length - 1]), (lengths, coins)
    for name, model_fed in fed.items():
        assert model_fed.attended == int(mask.sum() + (lengths - 1).sum()), name
    assert fed["teacher"].calls == rollout.teacher_calls and fed["student"].calls == rollout.student_calls
    if catch_up:
        assert rollout.teacher_calls == calls_at_own_steps(coins, length)
        assert rollout.student_calls == calls_at_own_steps(~coins, length)
    else:
        expected_fed = ids.numel() + int((lengths - 1).sum())
        assert fed["teacher"].count == fed["student"].count == expected_fed
        assert rollout.teacher_calls == rollout.student_calls == length

    assert_scores_match_full_forward(student, teacher, ids, mask, rollout, 0.5, V)
    valid = rollout.completion_mask.bool()
    # The recorded teacher hidden states are those of a full forward at the valid positions, zero after the end.
    full = torch.cat([ids, rollout.completion_ids], 1)
    full_mask = torch.cat([mask, rollout.completion_mask], 1)
    hidden = language_model_backbone(teacher)(
        input_ids=full, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask)
    ).last_hidden_state[:, ids.size(1) - 1 : -1]
    assert torch.allclose(hidden[valid], rollout.teacher_hidden[valid], atol=1e-5)
    assert torch.all(rollout.teacher_hidden[~valid] == 0)
    for row, length in enumerate(lengths.tolist()):
        ended_by_eos = int(rollout.completion_ids[row, length - 1]) in eos_token_ids
        assert ended_by_eos or length == 8
        assert not any(t in eos_token_ids for t in rollout.completion_ids[row, : length - 1].tolist())


def test_inverse_cdf_sampling_matches_the_distribution():
    """Seeded chi-square of `sample_from_logprobs` against a peaked 1000-token distribution."""
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(1000) * 3, -1)
    n = 40000
    draws = sample_from_logprobs(logprobs.expand(n, -1))
    expected = logprobs.exp() * n
    observed = torch.bincount(draws, minlength=1000).float()
    keep = expected >= 5
    chi2 = ((observed - expected) ** 2 / expected)[keep].sum().item()
    df = int(keep.sum()) - 1
    assert chi2 < df + 3.09 * math.sqrt(2 * df) + 2, (chi2, df)
    assert observed[~keep].sum() < 5 * (~keep).sum() + 20  # the far tail stays rare


def binomial_z(hits: int, n: int, probability: float) -> float:
    return (hits - n * probability) / math.sqrt(n * probability * (1 - probability))


def test_one_coin_per_step_picks_the_teacher_with_probability_alpha():
    """Seeded two-sided binomial test of the coins at z = 4.4 (p ≈ 1e-5), with its power shown: the same test
    rejects coins whose probability is off by 0.05."""
    torch.manual_seed(0)
    n = 20_000
    hits = sum(int(teacher_steps(100, 0.2).sum()) for _ in range(n // 100))
    assert abs(binomial_z(hits, n, 0.2)) < 4.4
    assert abs(binomial_z(hits, n, 0.25)) > 4.4 and abs(binomial_z(hits, n, 0.15)) > 4.4
    assert teacher_steps(7, 0.0).tolist() == [False] * 7 and teacher_steps(7, 1.0).tolist() == [True] * 7


def test_each_row_is_drawn_from_the_product_of_mixtures_by_exact_enumeration(tokenizer, teacher, make_student, monkeypatch):
    """Exact enumeration over every completion of 2 tokens (one row each, EOS excluded) and every pattern of the
    step coins: `Σ_coins P(coins) Π_t P_coin_t(y_t | y_<t)`, with the distributions the sampler hands to its draw, equals
    `Π_t (α·p_t + (1-α)·q_t)` of a full forward of both models, for every row; and a per-step teacher gives the same."""
    student = make_student().eval()
    alpha, V, length = 0.3, len(tokenizer), 2
    vocabulary = [t for t in range(V) if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
    sequences = torch.tensor([[a, b] for a in vocabulary for b in vocabulary])
    ids, mask = prompt_batch(tokenizer, ["q1 q2"] * len(sequences))
    drawn_from = []

    def forced(logprobs):  # every row stays active: row r draws sequences[r, step]
        step = len(drawn_from)
        drawn_from.append(logprobs.gather(1, sequences[:, step, None]).squeeze(1))
        return sequences[:, step].clone()

    monkeypatch.setattr(sampling, "sample_from_logprobs", forced)
    q = full_forward_logprobs(student, ids, mask, sequences, torch.ones_like(sequences), V)
    p = full_forward_logprobs(teacher, ids, mask, sequences, torch.ones_like(sequences), V)
    expected = mix_logprobs(q, p, alpha).gather(-1, sequences[..., None]).squeeze(-1).sum(1).exp()
    assert abs(expected.sum().item() - 1) > 0.01  # EOS and padding excluded: these rows do not cover everything
    for catch_up in (True, False):
        total = torch.zeros(len(sequences))
        for pattern in itertools.product([False, True], repeat=length):
            monkeypatch.setattr(sampling, "teacher_steps", lambda n, a, pattern=pattern: torch.tensor(pattern[:n]))
            drawn_from.clear()
            rollout = sample_teacher_mixed(
                student, teacher, ids, mask, vocab_size=V, max_new_tokens=length, alpha=alpha,
                eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, teacher_catch_up=catch_up,
                student_catch_up=catch_up,
            )  # fmt: skip
            assert torch.equal(rollout.completion_ids, sequences)
            coins_probability = math.prod(alpha if coin else 1 - alpha for coin in pattern)
            total += coins_probability * torch.stack(drawn_from).sum(0).exp()
        torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-7)


def test_alpha_zero_gives_unit_importance_weights(tokenizer, teacher, make_student):
    student = make_student().eval()
    torch.manual_seed(1)
    _, _, rollout = sample(student, teacher, tokenizer, ["q0", "q5"], 0.0)
    assert torch.equal(rollout.sampling_logprobs, rollout.student_logprobs)


def test_top_k_restricts_the_sampling_distribution(tokenizer, teacher, make_student):
    student = make_student().eval()
    torch.manual_seed(0)
    _, _, rollout = sample(student, teacher, tokenizer, ["q1"] * 500, 0.5, max_new_tokens=1, top_k=2)
    assert len(set(rollout.completion_ids[:, 0].tolist())) <= 2
    # log p̃ of the sampled tokens is that of the renormalised top-2 mixture: the two probabilities sum to 1
    distinct = {
        t: lp for t, lp in zip(rollout.completion_ids[:, 0].tolist(), rollout.sampling_logprobs[:, 0].tolist())
    }
    if len(distinct) == 2:
        assert math.isclose(sum(math.exp(v) for v in distinct.values()), 1.0, rel_tol=1e-5)


def test_filtered_sampling_records_the_scores_of_a_full_forward(tokenizer, teacher, make_student):
    """Top-k / top-p feed both models every token; over several steps, with rows of different prompt lengths, the
    recorded log q and log p equal a full forward's, and log p̃ is that of the filtered mixture (at most log 1)."""
    student = make_student().eval()
    torch.manual_seed(0)
    ids, mask, rollout = sample(student, teacher, tokenizer, ["q0", "q1 q2 q3", "q4"], 0.3, max_new_tokens=5, top_k=3)
    assert rollout.completion_ids.size(1) > 2 and rollout.student_calls == rollout.teacher_calls
    V, valid = len(tokenizer), rollout.completion_mask.bool()
    tokens = rollout.completion_ids[..., None]
    for model, recorded in ((student, rollout.student_logprobs), (teacher, rollout.teacher_logprobs)):
        expected = full_forward_logprobs(model, ids, mask, rollout.completion_ids, rollout.completion_mask, V)
        torch.testing.assert_close(expected.gather(-1, tokens).squeeze(-1)[valid], recorded[valid], atol=1e-5, rtol=0)
    q = full_forward_logprobs(student, ids, mask, rollout.completion_ids, rollout.completion_mask, V)
    p = full_forward_logprobs(teacher, ids, mask, rollout.completion_ids, rollout.completion_mask, V)
    top3 = sampling._filter_logprobs(mix_logprobs(q, p, 0.3), 3, 1.0).gather(-1, tokens).squeeze(-1)
    torch.testing.assert_close(top3[valid], rollout.sampling_logprobs[valid], atol=1e-5, rtol=0)


def test_right_padded_prompts_are_rejected(tokenizer, teacher, make_student):
    ids = torch.tensor([[5, 6, 0]])
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        sample_teacher_mixed(
            make_student(),
            teacher,
            ids,
            mask,
            vocab_size=len(tokenizer),
            max_new_tokens=2,
            alpha=0.2,
            eos_token_ids=[2],
            pad_token_id=0,
        )


@pytest.mark.parametrize("broken", ["student", "teacher"])
def test_nan_logits_while_sampling_name_the_model(tokenizer, teacher, make_student, broken):
    student = make_student().eval()
    models = {"student": student, "teacher": teacher}
    calls = {"count": 0}

    def nan_on_third_step(module, args, output):
        # The prompt step and the first fed token are fine; the second fed token overflows.
        calls["count"] += 1
        return output * float("nan") if calls["count"] == 3 else output

    models[broken].get_output_embeddings().register_forward_hook(nan_on_third_step)
    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match=f"The {broken}'s next-token distribution contains NaN"):
        sample(student, teacher, tokenizer, ["q0", "q1"], 0.2, max_new_tokens=6)


def test_without_teacher_mixing_the_teacher_scores_completions_in_one_parallel_forward(tokenizer, teacher, make_student, task):
    """α = 0: the teacher is not in the decode loop. It runs one forward over prompt + completion after sampling, and
    the recorded teacher log-probs and hidden states equal a full forward's; the student is fed as before."""
    student = make_student().eval()
    eos_token_ids = [tokenizer.convert_tokens_to_ids(letter) for letter in task.letters[:3]] + [tokenizer.eos_token_id]
    fed = {
        name: FedPositions(language_model_backbone(model))
        for name, model in (("student", student), ("teacher", teacher))
    }
    calls = []
    language_model_backbone(teacher).register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(3)
    prompts = ["q0", "q1 q2 q3", "q4", "q5", "q6 q7", "q2"]
    ids, mask, rollout = sample(student, teacher, tokenizer, prompts, 0.0, max_new_tokens=8, eos_token_ids=eos_token_ids)
    lengths = rollout.completion_mask.sum(1)
    assert lengths.unique().numel() > 2, lengths
    assert fed["student"].count == ids.numel() + int((lengths - 1).sum())
    assert len(calls) == 1 and fed["teacher"].count == ids.numel() + rollout.completion_ids.numel()
    assert_scores_match_full_forward(student, teacher, ids, mask, rollout, 0.0, len(tokenizer))
    valid = rollout.completion_mask.bool()
    full = torch.cat([ids, rollout.completion_ids], 1)
    full_mask = torch.cat([mask, rollout.completion_mask], 1)
    hidden = language_model_backbone(teacher)(
        input_ids=full, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask)
    ).last_hidden_state[:, ids.size(1) - 1 : -1]
    assert torch.allclose(hidden[valid], rollout.teacher_hidden[valid], atol=1e-5)
    assert torch.all(rollout.teacher_hidden[~valid] == 0) and torch.all(rollout.teacher_logprobs[~valid] == 0)


def test_without_teacher_mixing_the_sampler_draws_from_the_student(tokenizer, teacher, make_student):
    """Seeded goodness of fit of the first token at α = 0 against q."""
    student = make_student().eval()
    n = 20000
    torch.manual_seed(0)
    ids, _, rollout = sample(student, teacher, tokenizer, ["q1"] * n, 0.0, max_new_tokens=1)
    V = len(tokenizer)
    q = torch.softmax(student(input_ids=ids[:1]).logits[0, -1, :V], -1)
    empirical = torch.bincount(rollout.completion_ids[:, 0], minlength=V).float() / n
    keep = q * n >= 5
    chi2 = (((empirical - q) * n) ** 2 / (q * n))[keep].sum().item()
    df = int(keep.sum()) - 1
    assert chi2 < df + 3.09 * math.sqrt(2 * df) + 2, (chi2, df)


def test_without_a_teacher_the_student_samples_alone(tokenizer, teacher, make_student):
    """A teacher of another tokenizer scores text afterwards (`crosstokenizer`): the sampler takes none at α = 0, draws
    the same completions as with one (same seed), and leaves the teacher scores empty; with α > 0 it refuses."""
    student = make_student().eval()
    ids, mask = prompt_batch(tokenizer, ["q0", "q1 q2", "q3"])
    settings = dict(vocab_size=len(tokenizer), max_new_tokens=6, alpha=0.0, eos_token_ids=[tokenizer.eos_token_id],
                    pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    alone = sample_teacher_mixed(student, None, ids, mask, **settings)
    torch.manual_seed(0)
    scored = sample_teacher_mixed(student, teacher, ids, mask, **settings)
    assert torch.equal(alone.completion_ids, scored.completion_ids)
    assert torch.equal(alone.student_logprobs, scored.student_logprobs)
    assert alone.teacher_hidden is None and (alone.teacher_logprobs == 0).all()
    with pytest.raises(ValueError, match="needs the teacher in the decode loop"):
        sample_teacher_mixed(student, None, ids, mask, **{**settings, "alpha": 0.2})
