"""The estimator's expected gradient equals the exact reverse-KL gradient, by enumeration of every sequence.

Tabular "models" over a vocabulary of 3 tokens + EOS and completions of at most 3 tokens: the next-token logits are a
table indexed by the prefix. The trainer's per-sequence surrogate loss is built from the library functions exactly as
the trainer builds it; its expectation over all sequences (each weighted by its probability under the student) must
have the gradient of `KL(q || p)` over whole sequences.
"""

import itertools
import math

import pytest
import torch

from rkd_trl.advantages import discounted_returns, importance_weights, token_rewards
from rkd_trl.losses import minillm_token_losses, per_position_reverse_kl

VOCAB, EOS, MAX_LEN = 4, 3, 3
PREFIXES = [p for n in range(MAX_LEN) for p in itertools.product(range(EOS), repeat=n)]
INDEX = {p: i for i, p in enumerate(PREFIXES)}


def all_sequences():
    """Every completion: ends with EOS, or reaches MAX_LEN tokens."""
    out = []
    for n in range(1, MAX_LEN + 1):
        for body in itertools.product(range(EOS), repeat=n - 1):
            out.append(body + (EOS,))
            if n == MAX_LEN:
                out.extend(body + (last,) for last in range(EOS))
    return out


def logits_along(table, sequence):
    return torch.stack([table[INDEX[tuple(sequence[:t])]] for t in range(len(sequence))])


def sequence_logprob(table, sequence):
    logprobs = torch.log_softmax(logits_along(table, sequence), -1)
    return logprobs[torch.arange(len(sequence)), torch.tensor(sequence)].sum()


@pytest.fixture
def tables():
    torch.manual_seed(0)
    student = torch.randn(len(PREFIXES), VOCAB, dtype=torch.float64, requires_grad=True)
    teacher = 2 * torch.randn(len(PREFIXES), VOCAB, dtype=torch.float64)
    return student, teacher


def exact_kl_gradient(student, teacher):
    sequences = all_sequences()
    log_q = torch.stack([sequence_logprob(student, s) for s in sequences])
    log_p = torch.stack([sequence_logprob(teacher, s) for s in sequences])
    assert math.isclose(log_q.exp().sum().item(), 1.0, rel_tol=1e-12)
    kl = (log_q.exp() * (log_q - log_p)).sum()
    return torch.autograd.grad(kl, student)[0]


def surrogate(student, teacher, sequence, single_step):
    """Per-sequence surrogate loss, computed like the trainer: rewards → returns → token losses, summed."""
    tokens = torch.tensor(sequence)
    student_logits = logits_along(student, sequence)
    teacher_logits = logits_along(teacher, sequence)
    with torch.no_grad():
        old = torch.log_softmax(student_logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        teacher_lp = torch.log_softmax(teacher_logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        mask = torch.ones(1, len(sequence))
        rewards = token_rewards(teacher_lp[None], old[None], mask)
        returns = discounted_returns(rewards, mask, 1.0, include_current=not single_step, length_normalized=False)
        weights = importance_weights(old[None], old[None], mask)  # α = 0: sampling distribution is q itself
    terms = minillm_token_losses(
        student_logits, teacher_logits, tokens, old, returns[0], weights[0], temperature=1.0, clip_epsilon=0.2
    )
    loss = terms.policy_gradient.sum()
    if single_step:
        loss = loss + terms.single_step.sum()
    return loss


@pytest.mark.parametrize("single_step", [True, False])
def test_expected_surrogate_gradient_is_exact_reverse_kl_gradient(tables, single_step):
    student, teacher = tables
    expected = exact_kl_gradient(student, teacher)
    total = torch.zeros_like(student)
    for sequence in all_sequences():
        probability = sequence_logprob(student, sequence).exp().detach()
        total += probability * torch.autograd.grad(surrogate(student, teacher, sequence, single_step), student)[0]
    assert torch.allclose(total, expected, atol=1e-5), (total - expected).abs().max()


def test_surrogate_without_single_step_but_future_returns_is_biased(tables):
    """Guard that the test can fail: dropping r_t from the return without the single-step term is wrong."""
    student, teacher = tables
    expected = exact_kl_gradient(student, teacher)
    total = torch.zeros_like(student)
    for sequence in all_sequences():
        tokens = torch.tensor(sequence)
        logits = logits_along(student, sequence)
        with torch.no_grad():
            old = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
            teacher_lp = torch.log_softmax(logits_along(teacher, sequence), -1).gather(-1, tokens[:, None]).squeeze(-1)
            mask = torch.ones(1, len(sequence))
            returns = discounted_returns(token_rewards(teacher_lp[None], old[None], mask), mask, 1.0, False, False)
        terms = minillm_token_losses(logits, logits_along(teacher, sequence), tokens, old, returns[0],
                                     torch.ones(len(sequence), dtype=torch.float64), temperature=1.0, clip_epsilon=0.2)
        probability = sequence_logprob(student, sequence).exp().detach()
        total += probability * torch.autograd.grad(terms.policy_gradient.sum(), student)[0]
    assert (total - expected).abs().max() > 1e-3


def test_single_step_term_is_exact_per_position_reverse_kl_gradient(tables):
    """Its expected gradient equals that of Σ_t KL(q(·|y<t) || p(·|y<t)) under the student's context distribution,
    each KL written out over the vocabulary in plain Python."""
    student, teacher = tables
    estimated = torch.zeros_like(student)
    for sequence in all_sequences():
        probability = sequence_logprob(student, sequence).exp().detach()
        q = torch.log_softmax(logits_along(student, sequence), -1)
        p = torch.log_softmax(logits_along(teacher, sequence), -1)
        estimated += probability * torch.autograd.grad(per_position_reverse_kl(q, p).sum(), student)[0]

    # Independent: per prefix, the probability of reaching it (as a constant) times the gradient of its KL.
    def reach_probability(prefix):
        value = 1.0
        for t in range(len(prefix)):
            value *= torch.softmax(student[INDEX[prefix[:t]]], -1)[prefix[t]].item()
        return value

    exact = torch.zeros_like(student)
    for prefix in PREFIXES:
        q = torch.softmax(student[INDEX[prefix]], -1)
        p = torch.softmax(teacher[INDEX[prefix]], -1)
        kl = sum(q[v] * (torch.log(q[v]) - torch.log(p[v])) for v in range(VOCAB))
        exact += reach_probability(prefix) * torch.autograd.grad(kl, student)[0]
    assert torch.allclose(estimated, exact, atol=1e-10)
