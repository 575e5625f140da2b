"""Teacher-mixed sampling (MiniLLM §2.2): draw each token from `p̃ = α·p + (1-α)·q_θ`.

Sampling from the mixture keeps the student from drifting to strings the teacher finds unlikely (reward hacking)
early in training; the per-token importance weight `q_θ/p̃` corrects the gradient (see `advantages.py`).
With `α > 0` the decode loop runs both models one token at a time over their caches (`scoring.IncrementalDecoder`),
so each sampled token costs one incremental forward of each model, and it records everything the loss needs: the
teacher's log-prob and final hidden state at every position are the rewards' and the single-step term's teacher
scores. With `α = 0` the teacher is not needed inside the loop: the student samples alone and the teacher scores all
completion positions in one parallel forward afterwards, which is far cheaper for a large teacher. Rows that have
ended are dropped from the batch, so they cost nothing while the others finish.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from .scoring import IncrementalDecoder, OutputHead, final_hidden_states


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
    teacher_hidden: torch.Tensor | None  # teacher final hidden state that predicted y_t (None: no teacher scored)


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


def sample_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """One token per row of `[B, V]` log-probs, by inverting the cumulative distribution at a uniform draw.

    Exact like `torch.multinomial`, and several times faster on CPU for large vocabularies (one random number per
    row instead of one per vocabulary entry). The cumulative sum is taken in float64 so that rounding does not bias
    the tail of a 100k-token vocabulary.
    """
    cdf = logprobs.double().exp_().cumsum_(dim=-1)
    draw = torch.rand(cdf.size(0), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).squeeze(1).clamp_(max=cdf.size(1) - 1)


def draw_from_mixture(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor | None, alpha: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from `p̃ = α·p + (1-α)·q` (`[B, V]` log-probs in); return `(tokens, log p̃(tokens))`.

    Without top-k / top-p the mixture is never formed over the vocabulary: each row first picks the teacher with
    probability α (else the student), then a token from that model, which is a draw from `p̃` exactly; `log p̃` is
    then needed at the drawn token only. Top-k / top-p act on the mixture itself, so they build it in full. With
    `α = 0`, `teacher_logprobs` may be None: the draw is from the student alone.
    """
    if alpha == 0.0:
        teacher_logprobs = student_logprobs
    if (top_k and top_k > 0) or top_p < 1.0:
        sampling_logprobs = _filter_logprobs(mix_logprobs(student_logprobs, teacher_logprobs, alpha), top_k, top_p)
        tokens = sample_from_logprobs(sampling_logprobs)
        return tokens, sampling_logprobs.gather(1, tokens[:, None]).squeeze(1)
    if alpha == 0.0:
        tokens = sample_from_logprobs(student_logprobs)
        return tokens, student_logprobs.gather(1, tokens[:, None]).squeeze(1)
    from_teacher = torch.rand(student_logprobs.size(0), 1, device=student_logprobs.device) < alpha
    tokens = sample_from_logprobs(torch.where(from_teacher, teacher_logprobs, student_logprobs))
    student_token, teacher_token = (
        lp.gather(1, tokens[:, None]).squeeze(1) for lp in (student_logprobs, teacher_logprobs)
    )
    return tokens, mix_logprobs(student_token, teacher_token, alpha)


def _nan_in(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor | None) -> torch.Tensor:
    """`[2]` booleans: whether the student's / teacher's log-probs contain a NaN (the teacher's: False when None)."""
    teacher_nan = teacher_logprobs.isnan().any() if teacher_logprobs is not None else student_logprobs.new_zeros((), dtype=torch.bool)
    return torch.stack([student_logprobs.isnan().any(), teacher_nan])


@torch.no_grad()
def score_completions(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A model's final hidden states `[B, T, H]` and log-probs `[B, T]` of given completions, from one parallel
    forward over prompt + completion (zero at masked positions). Vocabulary logits exist for `chunk_size` positions
    at a time."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    hidden = final_hidden_states(model, input_ids, attention_mask)[:, prompt_ids.size(1) - 1 : -1]
    valid = completion_mask.bool()
    hidden = hidden * valid[..., None]
    head = OutputHead(model, vocab_size)
    valid_hidden, valid_tokens = hidden[valid], completion_ids[valid]
    token_logprobs = torch.cat(
        [
            F.log_softmax(head(valid_hidden[start : start + chunk_size]) / temperature, dim=-1)
            .gather(1, valid_tokens[start : start + chunk_size, None])
            .squeeze(1)
            for start in range(0, valid_tokens.numel(), chunk_size)
        ]
        or [hidden.new_zeros(0, dtype=torch.float32)]
    )
    logprobs = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    logprobs[valid] = token_logprobs
    return hidden, logprobs


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
    drop_ended_rows: tuple[bool, bool] = (True, True),
) -> Rollout:
    """Sample completions token by token from `α·p + (1-α)·q` (then top-k / top-p if set).

    The batch shrinks as rows end: a row that has produced EOS is not fed again (and is dropped from a model's cache
    where `drop_ended_rows` allows it, see `scoring.verify_scoring`).

    Args:
        student, teacher: causal LMs sharing the first `vocab_size` vocabulary rows. With `alpha = 0` the teacher
            may be None (a teacher of another tokenizer, scored by `crosstokenizer`): the rollout's teacher scores
            are then 0 and `teacher_hidden` is None.
        prompt_ids, prompt_mask: `[B, P]` left-padded prompts.
        alpha: teacher share of the mixture; `0` is plain sampling from the student, with the teacher scoring the
            completions in one parallel forward afterwards.
        eos_token_ids: any of these ends a completion.
        drop_ended_rows: for (student, teacher), whether finished rows can be dropped from the model's cache.

    Returns:
        A `Rollout` with `T ≤ max_new_tokens` columns (the loop stops once every row has ended).
    """
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("sample_teacher_mixed needs left-padded prompts (the last column must be real tokens).")
    if teacher is None and alpha > 0.0:
        raise ValueError("Teacher-mixed sampling (alpha > 0) needs the teacher in the decode loop; got teacher=None.")
    teacher_in_loop = alpha > 0.0
    student_decoder = IncrementalDecoder(student, vocab_size, temperature, drop_ended_rows=drop_ended_rows[0])
    teacher_decoder = (
        IncrementalDecoder(teacher, vocab_size, temperature, record_hidden=True, drop_ended_rows=drop_ended_rows[1])
        if teacher_in_loop
        else None
    )
    device = prompt_ids.device
    eos = torch.tensor(eos_token_ids, device=device)

    _, student_logprobs = student_decoder.start(prompt_ids, prompt_mask)
    teacher_hidden, teacher_logprobs = teacher_decoder.start(prompt_ids, prompt_mask) if teacher_in_loop else (None, None)
    nan_seen = _nan_in(student_logprobs, teacher_logprobs)

    batch_size = prompt_ids.size(0)
    completion_ids = torch.full((batch_size, max_new_tokens), pad_token_id, dtype=prompt_ids.dtype, device=device)
    completion_mask = torch.zeros(batch_size, max_new_tokens, dtype=torch.long, device=device)
    scores = torch.zeros(3, batch_size, max_new_tokens, device=device)  # log q, log p, log p̃ of the sampled tokens
    hidden = teacher_hidden.new_zeros(batch_size, max_new_tokens, teacher_hidden.size(-1)) if teacher_in_loop else None
    rows = torch.arange(batch_size, device=device)  # batch rows still generating, in the decoders' order
    for step in range(max_new_tokens):
        tokens, sampled_logprobs = draw_from_mixture(student_logprobs, teacher_logprobs, alpha, top_k, top_p)
        completion_ids[rows, step] = tokens
        completion_mask[rows, step] = 1
        scores[0, rows, step] = student_logprobs.gather(1, tokens[:, None]).squeeze(1)
        scores[2, rows, step] = sampled_logprobs
        if teacher_in_loop:
            scores[1, rows, step] = teacher_logprobs.gather(1, tokens[:, None]).squeeze(1)
            hidden[rows, step] = teacher_hidden
        ended = torch.isin(tokens, eos)
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            rows, tokens = rows[keep], tokens[keep]
            for decoder in (student_decoder, teacher_decoder):
                if decoder is not None:
                    decoder.keep_rows(keep)
        # Feed the sampled token to the models in the loop: one incremental forward each.
        _, student_logprobs = student_decoder.step(tokens, pad_token_id)
        if teacher_in_loop:
            teacher_hidden, teacher_logprobs = teacher_decoder.step(tokens, pad_token_id)
        nan_seen |= _nan_in(student_logprobs, teacher_logprobs)

    length = step + 1
    completion_ids, completion_mask = completion_ids[:, :length], completion_mask[:, :length]
    student_scores, teacher_scores, sampling_scores = scores[:, :, :length]
    if teacher_in_loop:
        hidden = hidden[:, :length]
    elif teacher is None:
        hidden = None
    else:
        hidden, teacher_scores = score_completions(
            teacher, prompt_ids, prompt_mask, completion_ids, completion_mask,
            vocab_size=vocab_size, temperature=temperature,
        )  # fmt: skip
        nan_seen[1] = teacher_scores.isnan().any()

    # Checked once at the end (no extra synchronisation per token): tokens drawn after a NaN are never used.
    if bool(nan_seen.any()):
        models = " and the ".join(name for name, seen in zip(("student", "teacher"), nan_seen.tolist()) if seen)
        raise FloatingPointError(
            f"The {models}'s next-token distribution contains NaN while sampling: its logits overflowed or its "
            "weights are corrupt. Run it in bfloat16 or float32 rather than float16, and check its output with a "
            "plain forward on the same prompts."
        )
    return Rollout(
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        student_logprobs=student_scores,
        teacher_logprobs=teacher_scores,
        sampling_logprobs=sampling_scores,
        teacher_hidden=hidden,
    )
