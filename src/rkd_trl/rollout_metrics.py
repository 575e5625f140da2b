"""What the trainer logs about each rollout (docs/logging.md): the rewards and the Monte-Carlo reverse KL, the
importance weights, the models' forwards, the completions' lengths, truncation and repetition. Each value is over
every process: `gather` is the accelerator's."""

import torch

from .guard import repetition_and_truncation


def degeneration_metrics(completion_ids, completion_mask, eos_token_ids, gather) -> tuple[float, float]:
    """(mean share of repeated 4-grams, share of completions cut off without EOS) over every process."""
    repetition, truncated = repetition_and_truncation(completion_ids, completion_mask, eos_token_ids)
    return gather(repetition).mean().item(), gather(truncated).mean().item()


def rollout_metrics(rollout, weights: torch.Tensor, eos_token_ids: list[int], gather) -> dict[str, float]:
    """The logged values of one rollout (`sampling.Rollout`) and its importance weights `[B, T]`."""
    mask = rollout.completion_mask.bool()
    lengths = gather(rollout.completion_mask.sum(1)).float()
    log_ratio = (rollout.teacher_logprobs - rollout.student_logprobs) * mask
    masked_weights = weights * mask
    tokens = lengths.sum().clamp(min=1)
    completions = rollout.completion_ids, rollout.completion_mask
    repetition, truncated = degeneration_metrics(*completions, eos_token_ids, gather)
    return {
        "minillm/reward_mean": (gather(log_ratio.sum()).sum() / tokens).item(),
        "minillm/reverse_kl": gather(-log_ratio.sum(1)).mean().item(),
        "minillm/importance_weight_mean": (gather(masked_weights.sum()).sum() / tokens).item(),
        "minillm/importance_weight_max": gather(masked_weights.max()).max().item(),
        "rollout/teacher_calls": gather(torch.tensor(float(rollout.teacher_calls), device=mask.device)).mean().item(),
        "rollout/student_calls": gather(torch.tensor(float(rollout.student_calls), device=mask.device)).mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": truncated,
        "completions/repeated_4grams": repetition,
    }
