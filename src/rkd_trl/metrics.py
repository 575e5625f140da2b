"""Evaluation metrics: Monte-Carlo sequence-level reverse KL, sampled answers and their validity."""

import torch

from .sampling import sample_teacher_mixed
from .scoring import left_pad, shared_vocab_size


def chat_prompt_batch(tokenizer, prompts, device="cpu"):
    """Left-padded `(ids, mask)` of user prompts rendered with the tokenizer's chat template."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False) for p in prompts]
    ids, mask = left_pad(tokenizer(texts, add_special_tokens=False)["input_ids"], tokenizer.pad_token_id)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_with_scores(student, teacher, tokenizer, prompts, max_new_tokens, alpha=0.0):
    """Sample one completion per prompt (chat-templated) from `α·p + (1-α)·q`; returns the `Rollout` and texts."""
    device = next(student.parameters()).device
    ids, mask = chat_prompt_batch(tokenizer, prompts, device)
    rollout = sample_teacher_mixed(
        student,
        teacher,
        ids,
        mask,
        vocab_size=shared_vocab_size(student, teacher, tokenizer),
        max_new_tokens=max_new_tokens,
        alpha=alpha,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    return rollout, texts


@torch.no_grad()
def reverse_kl_estimate(student, teacher, tokenizer, prompts, max_new_tokens, samples_per_prompt=16):
    """Monte-Carlo `KL(q || p) = E_{y~q} Σ_t [log q(y_t|·) - log p(y_t|·)]` over whole sampled responses, averaged
    over prompts, with its standard error and the mean response length."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    rollout, _ = sample_with_scores(student, teacher, tokenizer, repeated, max_new_tokens, alpha=0.0)
    per_sequence = (rollout.student_logprobs - rollout.teacher_logprobs).sum(1)
    return {
        "reverse_kl": per_sequence.mean().item(),
        "reverse_kl_stderr": (per_sequence.std() / per_sequence.numel() ** 0.5).item(),
        "length": rollout.completion_mask.sum(1).float().mean().item(),
    }


def validity(task, prompts, answers) -> float:
    """Share of answers that are exactly one of the task's valid answers for their prompt."""
    return sum(task.is_valid(p, a) for p, a in zip(prompts, answers, strict=True)) / len(prompts)
