"""MiniLLM loss terms, each a function of tensors (paper Eq. 5-7 and the reference code's PPO objective).

The per-token functions work on `[N, V]` logits of the `N` valid completion tokens. `minillm_loss_sums` is their
memory-bounded twin: it takes final hidden states, projects `chunk_size` tokens at a time to the vocabulary under
activation checkpointing, so at most `chunk_size × V` logits are alive at once, forward or backward.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def per_position_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Single-step term of Eq. 5: `KL(q(·|y<t) || p(·|y<t)) = Σ_v q_v (log q_v - log p_v)`, exact over the vocabulary.

    Args:
        student_logprobs, teacher_logprobs: `[N, V]` log-probs at `N` positions.

    Returns:
        `[N]`. Its gradient is `-(∇L)_Single` of paper Eq. 5: the part of the reverse-KL gradient that flows through
        the distribution of the current token, computed without sampling.
    """
    student_probs = student_logprobs.exp()
    return (student_probs * (student_logprobs - teacher_logprobs)).sum(-1)


def clipped_policy_gradient_loss(
    token_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip_epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clipped policy-gradient loss of the long-term term (`(∇L)_Long`, Eq. 5-7; reference `_pg_loss`).

    `ratio = w_t · exp(log q_θ(y_t) - log q_old(y_t))`; loss `max(-A·ratio, -A·clip(ratio, 1±ε))`. At the first
    pass over fresh rollouts `q_θ = q_old` and the gradient is `-w_t A_t ∇log q_θ(y_t)`.

    Args:
        token_logprobs: `[N]` `log q_θ(y_t)` with gradient.
        old_logprobs, advantages, weights: `[N]`, no gradient.

    Returns:
        `(loss [N], clipped [N] bool)` where `clipped` marks tokens whose clipped branch is active (no gradient).
    """
    ratio = weights * torch.exp(token_logprobs - old_logprobs)
    clipped_ratio = ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * clipped_ratio
    return torch.maximum(unclipped_loss, clipped_loss), (clipped_loss > unclipped_loss).detach()


@dataclass
class TokenTerms:
    """Per-token terms, each `[N]`."""

    policy_gradient: torch.Tensor
    single_step: torch.Tensor
    clipped: torch.Tensor
    entropy: torch.Tensor


def minillm_token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    temperature: float,
    clip_epsilon: float,
) -> TokenTerms:
    """All MiniLLM per-token terms from full logits (the plain path).

    Args:
        student_logits: `[N, V]` with gradient; teacher_logits: `[N, V]`.
        token_ids: `[N]` the sampled tokens `y_t`.
        old_logprobs, advantages, weights: `[N]` from the rollout (see `advantages.py`).

    The single-step term is not multiplied by `w_t` (reference code): `w_t` corrects the draw of `y_t`, while the
    single-step term is an exact expectation over `y_t` given the sampled context.
    """
    student_logprobs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    with torch.no_grad():
        teacher_logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    token_logprobs = student_logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
    policy_gradient, clipped = clipped_policy_gradient_loss(
        token_logprobs, old_logprobs, advantages, weights, clip_epsilon
    )
    single_step = per_position_reverse_kl(student_logprobs, teacher_logprobs)
    with torch.no_grad():
        entropy = -(student_logprobs.exp() * student_logprobs).sum(-1)
    return TokenTerms(policy_gradient, single_step, clipped, entropy)


def minillm_loss_sums(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    token_ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    temperature: float,
    clip_epsilon: float,
    chunk_size: int,
) -> dict[str, torch.Tensor]:
    """Sums over the `N` valid tokens of the MiniLLM terms, `chunk_size` tokens at a time (memory-bounded twin of
    `minillm_token_losses`).

    Args:
        student_hidden: `[N, H]` student final hidden states, with gradient.
        teacher_hidden: `[N, H']` teacher final hidden states recorded while sampling.
        student_head, teacher_head: map hidden states to `[n, V]` logits (see `scoring.output_logits`).

    Returns:
        `{"policy_gradient", "single_step"}` scalar sums with gradient and `{"clipped", "entropy"}` detached sums.
    """

    def chunk_sums(student_chunk, teacher_chunk, tokens, old, adv, w):
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_chunk)
        terms = minillm_token_losses(
            student_head(student_chunk), teacher_logits, tokens, old, adv, w,
            temperature=temperature, clip_epsilon=clip_epsilon,
        )  # fmt: skip
        return (
            terms.policy_gradient.sum(),
            terms.single_step.sum(),
            terms.clipped.float().sum(),
            terms.entropy.sum(),
        )

    # Anchored to the graph so an all-masked batch still back-propagates (zero) gradients.
    zero = student_hidden.sum() * 0.0
    sums = [zero, zero, zero.detach(), zero.detach()]
    for start in range(0, student_hidden.size(0), chunk_size):
        piece = slice(start, start + chunk_size)
        chunk = checkpoint(
            chunk_sums,
            student_hidden[piece], teacher_hidden[piece], token_ids[piece],
            old_logprobs[piece], advantages[piece], weights[piece],
            use_reentrant=False,
        )  # fmt: skip
        sums = [total + part for total, part in zip(sums, chunk, strict=True)]
    policy_gradient, single_step, clipped, entropy = sums
    return {
        "policy_gradient": policy_gradient,
        "single_step": single_step,
        "clipped": clipped.detach(),
        "entropy": entropy.detach(),
    }


def lm_loss_sum(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Summed next-token cross-entropy of `labels` `[N]` from hidden states `[N, H]` (the paper's `L_PT`),
    `chunk_size` tokens at a time under checkpointing."""

    def chunk_sum(hidden_chunk, label_chunk):
        return F.cross_entropy(head(hidden_chunk).float(), label_chunk, reduction="sum")

    total = hidden.sum() * 0.0
    for start in range(0, hidden.size(0), chunk_size):
        piece = slice(start, start + chunk_size)
        total = total + checkpoint(chunk_sum, hidden[piece], labels[piece], use_reentrant=False)
    return total
