import math

import pytest
import torch
import torch.nn.functional as F

from rkd_trl.losses import (
    clipped_policy_gradient_loss,
    lm_loss_sum,
    minillm_loss_sums,
    minillm_token_losses,
    per_position_reverse_kl,
)


def test_per_position_reverse_kl_by_hand():
    q = torch.tensor([[0.7, 0.2, 0.1]])
    p = torch.tensor([[0.2, 0.3, 0.5]])
    expected = sum(a * math.log(a / b) for a, b in zip(q[0].tolist(), p[0].tolist()))
    got = per_position_reverse_kl(q.log(), p.log())
    assert math.isclose(got.item(), expected, rel_tol=1e-6)
    assert per_position_reverse_kl(q.log(), q.log()).abs().item() < 1e-7


def test_clipped_policy_loss_cases():
    # ratio = w * exp(logq - old): 1.5, 0.5, 1.0 ; clip 0.2
    logq = torch.zeros(3, requires_grad=True)
    old = torch.zeros(3)
    weights = torch.tensor([1.5, 0.5, 1.0])
    advantages = torch.tensor([1.0, 1.0, -2.0])
    loss, clipped = clipped_policy_gradient_loss(logq, old, advantages, weights, 0.2)
    # A>0, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped, no grad); A>0, ratio 0.5: max(-0.5, -0.8) = -0.5; A<0: 2.0
    assert torch.allclose(loss, torch.tensor([-1.2, -0.5, 2.0]))
    assert clipped.tolist() == [True, False, False]
    loss.sum().backward()
    # d/dlogq of -A*ratio = -A*ratio where unclipped
    assert torch.allclose(logq.grad, torch.tensor([0.0, -0.5, 2.0]))


def random_case(n=37, v=11, h=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(h, v, bias=False)
    teacher_head = torch.nn.Linear(h, v, bias=False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(v, h, generator=g))
        teacher_head.weight.copy_(torch.randn(v, h, generator=g))
    return dict(
        student_hidden=torch.randn(n, h, generator=g, requires_grad=True),
        teacher_hidden=torch.randn(n, h, generator=g),
        student_head=student_head,
        teacher_head=teacher_head,
        token_ids=torch.randint(v, (n,), generator=g),
        old_logprobs=-torch.rand(n, generator=g) * 3,
        advantages=torch.randn(n, generator=g),
        weights=torch.rand(n, generator=g) * 1.25,
    )


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_sums_equal_plain_path_values_and_gradients(chunk_size, temperature):
    case = random_case()
    plain = minillm_token_losses(
        case["student_head"](case["student_hidden"]), case["teacher_head"](case["teacher_hidden"]),
        case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
        temperature=temperature, clip_epsilon=0.2,
    )  # fmt: skip
    plain_total = plain.policy_gradient.sum() + plain.single_step.sum()
    plain_grads = torch.autograd.grad(plain_total, [case["student_hidden"], case["student_head"].weight])

    sums = minillm_loss_sums(
        case["student_hidden"], case["teacher_hidden"], case["student_head"], case["teacher_head"],
        case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
        temperature=temperature, clip_epsilon=0.2, chunk_size=chunk_size,
    )  # fmt: skip
    chunked_total = sums["policy_gradient"] + sums["single_step"]
    chunked_grads = torch.autograd.grad(chunked_total, [case["student_hidden"], case["student_head"].weight])
    assert torch.allclose(chunked_total, plain_total, atol=1e-5)
    assert math.isclose(sums["clipped"].item(), plain.clipped.float().sum().item())
    assert torch.allclose(sums["entropy"], plain.entropy.sum(), atol=1e-5)
    for a, b in zip(chunked_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5)
    assert case["teacher_head"].weight.grad is None


def test_all_masked_batch_gives_zero_loss_and_zero_gradient():
    case = random_case(n=0)
    sums = minillm_loss_sums(
        case["student_hidden"], case["teacher_hidden"], case["student_head"], case["teacher_head"],
        case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
        temperature=1.0, clip_epsilon=0.2, chunk_size=4,
    )  # fmt: skip
    total = sums["policy_gradient"] + sums["single_step"]
    total.backward()
    assert total.item() == 0.0 and not torch.isnan(total)
    assert case["student_hidden"].grad is not None and torch.all(case["student_hidden"].grad == 0)


@pytest.mark.parametrize("chunk_size", [2, 100])
def test_lm_loss_sum_equals_cross_entropy(chunk_size):
    case = random_case(n=9)
    labels = case["token_ids"]
    expected = F.cross_entropy(case["student_head"](case["student_hidden"]), labels, reduction="sum")
    got = lm_loss_sum(case["student_hidden"], case["student_head"], labels, chunk_size)
    assert torch.allclose(got, expected, atol=1e-5)
