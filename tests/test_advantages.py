import math

import torch

from rkd_trl.advantages import advantages_from_rollout, discounted_returns, importance_weights, token_rewards, whiten


def hand_returns(rewards, length, gamma, include_current, normalized):
    """Plain-Python reference for one row."""
    out = []
    for t in range(length):
        start = t if include_current else t + 1
        terms = [gamma ** (k - start) * rewards[k] for k in range(start, length)]
        value = sum(terms)
        if normalized:
            value = value / len(terms) if terms else 0.0
        out.append(value)
    return out


def test_returns_match_hand_computation_for_every_setting():
    torch.manual_seed(0)
    rewards = torch.randn(3, 6)
    lengths = [6, 4, 1]
    mask = torch.zeros(3, 6)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    rewards = rewards * mask
    for gamma in (1.0, 0.9):
        for include_current in (True, False):
            for normalized in (True, False):
                got = discounted_returns(rewards, mask, gamma, include_current, normalized)
                for row, length in enumerate(lengths):
                    expected = hand_returns(rewards[row].tolist(), length, gamma, include_current, normalized)
                    assert torch.allclose(got[row, :length], torch.tensor(expected, dtype=torch.float32), atol=1e-6)
                    assert torch.all(got[row, length:] == 0)


def test_paper_length_normalisation_divides_by_remaining_count():
    # T = 4 tokens, r = [1, 2, 3, 4]; R^Norm_{t+1} = mean of the rewards after t (0-based), 0 at the last token.
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    got = discounted_returns(rewards, torch.ones(1, 4), 1.0, include_current=False, length_normalized=True)
    assert torch.allclose(got, torch.tensor([[3.0, 3.5, 4.0, 0.0]]))


def test_length_normalisation_counts_the_tokens_each_position_holds():
    # Credits [a, 0, b, c] holding [1, 0, 2, 3] teacher tokens: R_t divides by the tokens held at positions ≥ t.
    rewards = torch.tensor([[1.0, 0.0, 4.0, 6.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    counts = torch.tensor([[1.0, 0.0, 2.0, 3.0, 5.0]])  # the last position is masked: its count is ignored
    got = discounted_returns(rewards, mask, 1.0, include_current=True, length_normalized=True, counts=counts)
    assert torch.allclose(got, torch.tensor([[11 / 6, 10 / 5, 10 / 5, 6 / 3, 0.0]]))
    after = discounted_returns(rewards, mask, 1.0, include_current=False, length_normalized=True, counts=counts)
    assert torch.allclose(after, torch.tensor([[10 / 5, 10 / 5, 6 / 3, 0.0, 0.0]]))


def test_each_model_normalised_by_its_own_tokens_across_tokenizers():
    """With teacher token counts, the return is the teacher's log-prob per teacher token of what follows minus the
    student's per student token; with every count 1 it is the usual return, normalised or not."""
    generator = torch.Generator().manual_seed(0)
    teacher = -torch.rand(2, 5, generator=generator) * 4
    student = -torch.rand(2, 5, generator=generator) * 4
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    settings = {"gamma": 0.9, "include_current": True, "whiten_advantages": False, "reward_scaling": 0.5}
    for normalized in (True, False):
        usual, _ = advantages_from_rollout(teacher, student, mask, length_normalized=normalized, **settings)
        ones, _ = advantages_from_rollout(
            teacher, student, mask, length_normalized=normalized, teacher_token_counts=torch.ones(2, 5), **settings
        )
        assert torch.allclose(ones, usual, atol=1e-6)
    counts = torch.tensor([[0.0, 2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 2.0, 0.0, 0.0]])
    got, _ = advantages_from_rollout(
        teacher * (counts > 0), student, mask, gamma=1.0, include_current=True, length_normalized=True,
        whiten_advantages=False, teacher_token_counts=counts,
    )  # fmt: skip
    for row in range(2):
        length = int(mask[row].sum())
        for t in range(length):
            teacher_mean = (teacher[row, t:length] * (counts[row, t:length] > 0)).sum() / counts[row, t:length].sum()
            student_mean = student[row, t:length].mean()
            assert torch.isclose(got[row, t], teacher_mean - student_mean, atol=1e-6), (row, t)


def test_rewards_scaled_clipped_and_masked():
    teacher = torch.tensor([[-1.0, -50.0, -2.0]])
    student = torch.tensor([[-2.0, -1.0, -2.0]])
    mask = torch.tensor([[1, 1, 0]])
    got = token_rewards(teacher, student, mask, scaling=0.5, clip=10.0)
    assert torch.allclose(got, torch.tensor([[2.0, -10.0, 0.0]]))


def test_whiten_uses_valid_positions_only():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    got = whiten(values, mask)
    assert torch.allclose(got[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)
    assert got[0, 3] == 0
    assert torch.all(whiten(values, torch.zeros_like(mask)) == 0)  # all-masked: no NaN


def test_importance_weights():
    student = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))
    sampling = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
    mask = torch.tensor([[1, 1, 0]])
    got = importance_weights(student, sampling, mask)
    assert torch.allclose(got, torch.tensor([[2.0, 0.5, 1.0]]))
    capped = importance_weights(student, sampling, mask, max_weight=1.5)
    assert math.isclose(capped[0, 0].item(), 1.5)


def adding_in_turn(contributions):
    """A stand-in for an all-reduce sum: each call adds the next of the other process's `contributions`."""
    return lambda tensor: tensor + next(contributions)


def test_whiten_over_processes_equals_whitening_the_whole_batch():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=generator)
    mask = (torch.rand(6, 5, generator=generator) > 0.3).long()
    whole = whiten(values, mask)
    global_mean = (values * mask).sum() / mask.sum()
    halves = [(values[:3], mask[:3]), (values[3:], mask[3:])]
    for mine, other in ((0, 1), (1, 0)):
        # An all-reduce sum between the two halves, by hand: each call adds what the other half contributes to it.
        other_values, other_mask = halves[other][0], halves[other][1].float()
        contributions = iter(
            [
                torch.stack([other_mask.sum(), (other_values * other_mask).sum()]),
                (((other_values - global_mean) * other_mask) ** 2).sum(),
            ]
        )
        got = whiten(*halves[mine], sum_over_processes=adding_in_turn(contributions))
        assert torch.allclose(got, whole[:3] if mine == 0 else whole[3:], atol=1e-6)
    # Without the reduction each half is whitened with its own statistics, which differ.
    assert not torch.allclose(whiten(*halves[0]), whole[:3], atol=1e-3)
