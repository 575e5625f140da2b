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
    return {
        "student_hidden": torch.randn(n, h, generator=g, requires_grad=True),
        "teacher_hidden": torch.randn(n, h, generator=g),
        "student_head": student_head,
        "teacher_head": teacher_head,
        "token_ids": torch.randint(v, (n,), generator=g),
        "old_logprobs": -torch.rand(n, generator=g) * 3,
        "advantages": torch.randn(n, generator=g),
        "weights": torch.rand(n, generator=g) * 1.25,
    }


def plain_objective(case, temperature, clip_epsilon, single_step_weight):
    """The plain path: full logits through `minillm_token_losses` (differentiated by autograd)."""
    plain = minillm_token_losses(
        case["student_head"](case["student_hidden"]), case["teacher_head"](case["teacher_hidden"]),
        case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
        temperature=temperature, clip_epsilon=clip_epsilon,
    )  # fmt: skip
    return plain, plain.policy_gradient.sum() + single_step_weight * plain.single_step.sum()


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("single_step_weight", [1.0, 0.0])
@pytest.mark.parametrize("sharded_head", [False, True], ids=["closed_form", "sharded_head"])
def test_chunked_sums_equal_plain_path_values_and_gradients(chunk_size, temperature, single_step_weight, sharded_head):
    """Closed-form chunked gradients equal autograd through the plain path, to 1e-5 (float32)."""
    case = random_case()
    # Advantages large enough that some ratios leave the clip range on either side.
    case["weights"] = torch.linspace(0.5, 1.5, case["token_ids"].numel())
    case["old_logprobs"] = (
        F.log_softmax(case["student_head"](case["student_hidden"]) / temperature, -1)
        .gather(-1, case["token_ids"][:, None])
        .squeeze(-1)
        .detach()
    )
    plain, plain_total = plain_objective(case, temperature, 0.2, single_step_weight)
    plain_grads = torch.autograd.grad(plain_total, [case["student_hidden"], case["student_head"].weight])
    assert plain.clipped.any() and not plain.clipped.all()

    sums = minillm_loss_sums(
        case["student_hidden"], case["teacher_hidden"], case["student_head"], case["teacher_head"],
        case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
        temperature=temperature, clip_epsilon=0.2, chunk_size=chunk_size, single_step_weight=single_step_weight,
        sharded_head=sharded_head, min_chunks=50 if sharded_head else 0,  # padded with empty chunks
    )  # fmt: skip
    chunked_grads = torch.autograd.grad(sums["objective"], [case["student_hidden"], case["student_head"].weight])
    assert torch.allclose(sums["objective"], plain_total, atol=1e-5)
    assert torch.allclose(sums["policy_gradient"], plain.policy_gradient.sum(), atol=1e-5)
    assert torch.allclose(sums["single_step"], plain.single_step.sum(), atol=1e-5)
    assert math.isclose(sums["clipped"].item(), plain.clipped.float().sum().item())
    assert torch.allclose(sums["entropy"], plain.entropy.sum(), atol=1e-5)
    for a, b in zip(chunked_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5)
    assert case["teacher_head"].weight.grad is None


@pytest.mark.parametrize("sharded_head", [False, True], ids=["closed_form", "sharded_head"])
def test_chunked_sums_without_a_teacher_are_the_policy_gradient_alone(sharded_head):
    """No teacher over the student's vocabulary (a teacher of another tokenizer): the objective and its gradients are
    those of the plain path's policy-gradient term, and the single-step sum is 0."""
    case = random_case()
    case["weights"] = torch.linspace(0.5, 1.5, case["token_ids"].numel())
    plain, _ = plain_objective(case, 0.7, 0.2, 0.0)
    plain_grads = torch.autograd.grad(
        plain.policy_gradient.sum(), [case["student_hidden"], case["student_head"].weight]
    )
    sums = minillm_loss_sums(
        case["student_hidden"], None, case["student_head"], None,
        case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
        temperature=0.7, clip_epsilon=0.2, chunk_size=5, single_step_weight=0.0, sharded_head=sharded_head,
    )  # fmt: skip
    grads = torch.autograd.grad(sums["objective"], [case["student_hidden"], case["student_head"].weight])
    assert torch.allclose(sums["objective"], plain.policy_gradient.sum(), atol=1e-5)
    assert sums["single_step"].item() == 0.0
    assert torch.allclose(sums["entropy"], plain.entropy.sum(), atol=1e-5)
    for a, b in zip(grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="single-step term needs the teacher"):
        minillm_loss_sums(
            case["student_hidden"], None, case["student_head"], None,
            case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
            temperature=0.7, clip_epsilon=0.2, chunk_size=5, single_step_weight=1.0,
        )  # fmt: skip


def test_chunked_gradient_scales_with_the_upstream_gradient_and_flows_through_head_post_processing():
    """A head with soft-capping and a bias (post-processing the closed form does not know about): the chunked
    gradient of `3 × objective` equals autograd's through the plain path."""
    case = random_case(n=13)
    linear = torch.nn.Linear(8, 11)

    class SoftCappedHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, hidden):
            return torch.tanh(self.linear(hidden) / 2.0) * 2.0

    case["student_head"] = SoftCappedHead()
    _, plain_total = plain_objective(case, 1.0, 0.2, 1.0)
    parameters = [case["student_hidden"], linear.weight, linear.bias]
    expected = torch.autograd.grad(3 * plain_total, parameters)
    sums = minillm_loss_sums(
        case["student_hidden"], case["teacher_hidden"], case["student_head"], case["teacher_head"],
        case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
        temperature=1.0, clip_epsilon=0.2, chunk_size=4,
    )  # fmt: skip
    got = torch.autograd.grad(3 * sums["objective"], parameters)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("sharded_head", [False, True], ids=["closed_form", "sharded_head"])
def test_all_masked_batch_gives_zero_loss_and_zero_gradient(sharded_head):
    case = random_case(n=0)
    sums = minillm_loss_sums(
        case["student_hidden"], case["teacher_hidden"], case["student_head"], case["teacher_head"],
        case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
        temperature=1.0, clip_epsilon=0.2, chunk_size=4, sharded_head=sharded_head,
    )  # fmt: skip
    total = sums["objective"]
    total.backward()
    assert total.item() == 0.0 and not torch.isnan(total)
    assert case["student_hidden"].grad is not None and torch.all(case["student_hidden"].grad == 0)


@pytest.mark.parametrize("chunk_size", [2, 100])
@pytest.mark.parametrize("sharded_head", [False, True], ids=["closed_form", "sharded_head"])
def test_lm_loss_sum_equals_cross_entropy_values_and_gradients(chunk_size, sharded_head):
    case = random_case(n=9)
    labels = case["token_ids"]
    parameters = [case["student_hidden"], case["student_head"].weight]
    expected = F.cross_entropy(case["student_head"](case["student_hidden"]), labels, reduction="sum")
    expected_grads = torch.autograd.grad(expected, parameters)
    got = lm_loss_sum(case["student_hidden"], case["student_head"], labels, chunk_size, sharded_head=sharded_head)
    got_grads = torch.autograd.grad(got, parameters)
    assert torch.allclose(got, expected, atol=1e-5)
    for a, b in zip(got_grads, expected_grads):
        assert torch.allclose(a, b, atol=1e-5)
