"""Rewards, length-normalised returns and importance weights (MiniLLM §2.2, Eq. 4-7).

All functions take `[B, T]` tensors over completion positions with a `mask` (1 on valid tokens) and return zeros
on masked positions. Everything here is computed once per batch of rollouts and carries no gradient.
"""

from collections.abc import Callable

import torch


def token_rewards(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    mask: torch.Tensor,
    scaling: float = 1.0,
    clip: float | None = None,
) -> torch.Tensor:
    """Per-token reward `r_t = log p(y_t|y_<t,x) - log q_θ(y_t|y_<t,x)` (the teacher-logit scorer), `/ scaling`,
    clipped to `±clip` (reference code's `--reward-scaling`, `--cliprange-reward`)."""
    rewards = (teacher_logprobs - student_logprobs) / scaling
    if clip is not None:
        rewards = rewards.clamp(-clip, clip)
    return rewards * mask


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    include_current: bool,
    length_normalized: bool,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return `R_t = Σ_{t' ≥ s} γ^(t'-s) r_t'` with `s = t` (`include_current`) or `s = t + 1`.

    With `include_current=False` this is the long-term return `R_{t+1}` of paper Eq. 5 (the single-step term covers
    `r_t`). With `length_normalized`, `R_t` is divided by the number of rewards it sums, which for `s = t + 1` is the
    paper's `R^Norm_{t+1} = 1/(T-t-1) Σ_{t'>t} r_t'` (Eq. 7, 0-based `t`); a return over no rewards is 0. `counts`
    (`[B, T]`) makes position `t'` count as `counts[t']` rewards instead of one: the number of tokens its reward
    holds, e.g. teacher tokens credited to one student token (`crosstokenizer`).
    """
    mask = mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        if include_current:
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
        else:
            returns[:, t] = running
            running = rewards[:, t] + gamma * running
    if length_normalized:
        units = mask if counts is None else counts.to(rewards.dtype) * mask
        remaining = units.flip(1).cumsum(1).flip(1)  # rewards summed at positions ≥ t
        summed = remaining if include_current else remaining - units
        returns = torch.where(summed > 0, returns / summed.clamp(min=1), torch.zeros_like(returns))
    return returns * mask


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Shift and scale `values` to zero mean, unit variance over the valid positions (reference `whiten`).

    `sum_over_processes` (e.g. an all-reduce sum) makes the mean and variance those of the valid positions of every
    process, so that the result does not depend on how the batch is split over processes. Fewer than two valid
    positions leave nothing to normalise against: the result is 0 there.
    """
    total = sum_over_processes or (lambda tensor: tensor)
    mask = mask.to(values.dtype)
    count, value_sum = total(torch.stack([mask.sum(), (values * mask).sum()]))
    if count < 2:
        return torch.zeros_like(values)
    mean = value_sum / count
    variance = total((((values - mean) * mask) ** 2).sum()) / (count - 1)
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def importance_weights(
    student_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    max_weight: float | None = None,
) -> torch.Tensor:
    """Per-token importance weight `w_t = q_θ(y_t|·) / p̃(y_t|·)` (paper §2.2), optionally capped at `max_weight`.

    The paper uses the per-token weight rather than the product over the sequence, whose variance is too high. With
    `α = 0` the two distributions coincide and every weight is exactly 1. Masked positions get weight 1.
    """
    weights = torch.exp(student_logprobs - sampling_logprobs)
    if max_weight is not None:
        weights = weights.clamp(max=max_weight)
    return torch.where(mask.bool(), weights, torch.ones_like(weights))


def advantages_from_rollout(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    include_current: bool,
    length_normalized: bool,
    whiten_advantages: bool,
    reward_scaling: float = 1.0,
    reward_clip: float | None = None,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    teacher_token_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards → (length-normalised, discounted) returns → optional whitening (over the valid tokens of every
    process when `sum_over_processes` is given, see `whiten`). Returns `(advantages, rewards)`.

    `teacher_token_counts` (`[B, T]`, a teacher of another tokenizer): how many teacher tokens' log-probs each student
    token was credited with (`crosstokenizer.credited_logprobs`). The return is then `R_t(log p) − R_t(log q)` with
    each model's part length-normalised by its own tokens — the teacher's log-prob per teacher token of the text not
    yet final, minus the student's per student token — and each part scaled and clipped on its own. With one shared
    tokenizer every count is 1 and that is `R_t(log p − log q)`.
    """
    rewards = token_rewards(teacher_logprobs, student_logprobs, mask, reward_scaling, reward_clip)
    if teacher_token_counts is None:
        advantages = discounted_returns(rewards, mask, gamma, include_current, length_normalized)
    else:
        zeros = torch.zeros_like(student_logprobs)
        teacher_part, student_part = (
            discounted_returns(
                token_rewards(logprobs, zeros, mask, reward_scaling, reward_clip), mask, gamma, include_current,
                length_normalized, counts,
            )
            for logprobs, counts in ((teacher_logprobs, teacher_token_counts), (student_logprobs, None))
        )  # fmt: skip
        advantages = teacher_part - student_part
    if whiten_advantages:
        advantages = whiten(advantages, mask, sum_over_processes=sum_over_processes)
    return advantages, rewards
