"""Teacher-mixed sampling (MiniLLM §2.2): draw each token from `p̃ = α·p + (1-α)·q_θ`.

Sampling from the mixture keeps the student from drifting to strings the teacher finds unlikely (reward hacking)
early in training; the per-token importance weight `q_θ/p̃` corrects the gradient (see `advantages.py`).
The decode loop keeps a KV cache for both models, so each sampled token costs one incremental forward of each
model, and it records everything the loss needs: the teacher's log-prob and final hidden state at every position
are the rewards' and the single-step term's teacher scores (no second teacher pass over the same tokens).
"""

import math
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from .scoring import IncrementalScorer, position_ids_from_mask


@dataclass
class Rollout:
    """Sampled completions and their per-token scores; every tensor is `[B, T]` (`teacher_hidden`: `[B, T, H]`).

    Positions at or before the first EOS are valid (`completion_mask == 1`, the EOS itself included); after it the
    ids are the pad id and every score is 0.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    student_logprobs: torch.Tensor  # log q_θ(y_t | y_<t, x) at sampling time
    teacher_logprobs: torch.Tensor  # log p(y_t | y_<t, x)
    sampling_logprobs: torch.Tensor  # log p̃(y_t | y_<t, x): the distribution y_t was actually drawn from
    teacher_hidden: torch.Tensor  # teacher final hidden state that predicted y_t


def mix_logprobs(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """`log(α·p + (1-α)·q)` from `log q` and `log p` (`[..., V]`), computed in log space.

    `α = 0` returns `log q` itself and `α = 1` `log p`, so those ends are exact (no `log 0`).
    """
    if alpha == 0.0:
        return student_logprobs
    if alpha == 1.0:
        return teacher_logprobs
    return torch.logaddexp(student_logprobs + math.log1p(-alpha), teacher_logprobs + math.log(alpha))


def _filter_logprobs(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Apply transformers' top-k / top-p warpers to a sampling distribution and renormalise."""
    if top_k and top_k > 0:
        logprobs = TopKLogitsWarper(top_k=top_k)(None, logprobs)
    if top_p < 1.0:
        logprobs = TopPLogitsWarper(top_p=top_p)(None, logprobs)
    return torch.log_softmax(logprobs, dim=-1)


@torch.no_grad()
def sample_teacher_mixed(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    vocab_size: int,
    max_new_tokens: int,
    alpha: float,
    eos_token_ids: list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Rollout:
    """Sample completions token by token from `α·p + (1-α)·q` (then top-k / top-p if set).

    Args:
        student, teacher: causal LMs sharing the first `vocab_size` vocabulary rows.
        prompt_ids, prompt_mask: `[B, P]` left-padded prompts.
        alpha: teacher share of the mixture; `0` is plain sampling from the student.
        eos_token_ids: any of these ends a completion.

    Returns:
        A `Rollout` with `T ≤ max_new_tokens` columns (the loop stops once every row has ended).
    """
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("sample_teacher_mixed needs left-padded prompts (the last column must be real tokens).")
    student_scorer = IncrementalScorer(student, vocab_size, temperature)
    teacher_scorer = IncrementalScorer(teacher, vocab_size, temperature)
    eos = torch.tensor(eos_token_ids, device=prompt_ids.device)

    attention_mask = prompt_mask
    position_ids = position_ids_from_mask(prompt_mask)
    _, student_logprobs = student_scorer(prompt_ids, attention_mask, position_ids)
    teacher_hidden, teacher_logprobs = teacher_scorer(prompt_ids, attention_mask, position_ids)
    next_position = position_ids[:, -1:] + 1

    batch_size = prompt_ids.size(0)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
    columns = {name: [] for name in ("ids", "mask", "student", "teacher", "sampling", "hidden")}
    for step in range(max_new_tokens):
        sampling_logprobs = _filter_logprobs(mix_logprobs(student_logprobs, teacher_logprobs, alpha), top_k, top_p)
        tokens = torch.multinomial(sampling_logprobs.exp(), num_samples=1).squeeze(1)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        valid = ~finished

        def picked(logprobs):
            return torch.where(valid, logprobs.gather(1, tokens[:, None]).squeeze(1), 0.0)

        columns["ids"].append(tokens)
        columns["mask"].append(valid.long())
        columns["student"].append(picked(student_logprobs))
        columns["teacher"].append(picked(teacher_logprobs))
        columns["sampling"].append(picked(sampling_logprobs))
        columns["hidden"].append(teacher_hidden * valid[:, None].to(teacher_hidden.dtype))
        finished = finished | torch.isin(tokens, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        # Feed the sampled token to both models: one incremental forward each.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
        _, student_logprobs = student_scorer(tokens[:, None], attention_mask, next_position)
        teacher_hidden, teacher_logprobs = teacher_scorer(tokens[:, None], attention_mask, next_position)
        next_position = next_position + 1

    return Rollout(
        completion_ids=torch.stack(columns["ids"], dim=1),
        completion_mask=torch.stack(columns["mask"], dim=1),
        student_logprobs=torch.stack(columns["student"], dim=1),
        teacher_logprobs=torch.stack(columns["teacher"], dim=1),
        sampling_logprobs=torch.stack(columns["sampling"], dim=1),
        teacher_hidden=torch.stack(columns["hidden"], dim=1),
    )
