"""Teacher-mixed sampling (MiniLLM §2.2): draw each token from `p̃ = α·p + (1-α)·q_θ`.

Sampling from the mixture keeps the student from drifting to strings the teacher finds unlikely (reward hacking)
early in training; the per-token importance weight `q_θ/p̃` corrects the gradient (see `advantages.py`).
With `α > 0` one coin per decode step picks the model that draws it, and each model runs over its KV cache
(`decoding.IncrementalDecoder`) at its own steps only, catching up on the tokens drawn by the other in one cached
forward: about `α·T` teacher forwards and `(1-α)·T` student forwards per rollout of `T` tokens (`T + 2` in all,
with the prompts and one catch-up after the loop). The rollout records
everything the loss needs: the teacher's log-prob and final hidden state at every position are the rewards' and the
single-step term's teacher scores. With `α = 0` the teacher is not needed inside the loop: the student samples alone
and the teacher scores all completion positions in one parallel forward afterwards. Rows that have ended are dropped
from the batch, so they cost nothing while the others finish.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from .decoding import IncrementalDecoder, catch_up
from .probe import compute_precision
from .scoring import OutputHead, final_hidden_states


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
    teacher_calls: int = 0  # teacher forwards in the rollout (prompt, catch-ups, final scoring)
    student_calls: int = 0  # student forwards in the rollout (prompt, one at each of its steps, final catch-up)


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


@torch.no_grad()
def token_logprobs_from_hidden(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> torch.Tensor:
    """`[B, T]` log-probs of `completion_ids` from the final hidden states `[B, T, H]` that predict them, through the
    model's output head (`OutputHead`), `chunk_size` positions at a time; zero at masked positions."""
    valid = completion_mask.bool()
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
    return logprobs


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
    hidden = hidden * completion_mask[..., None].bool()
    logprobs = token_logprobs_from_hidden(
        model, hidden, completion_ids, completion_mask,
        vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size,
    )  # fmt: skip
    return hidden, logprobs


class _LazyModel:
    """One model of a teacher-mixed rollout, fed lazily (`decoding.catch_up`): when a step needs its distribution it
    reads the tokens sampled since its last call in one cached forward, and once more after the loop for the columns
    it has not read, so that it reads every position once and, when its decoder has `record_hidden`, records the
    final hidden state that predicts each completion token.

    `rows` are the batch rows in its cache, `fed` the completion columns it has read, `logprobs` its next-token
    log-probs after them (one row per entry of `rows`), `calls` its forwards so far.
    """

    def __init__(self, decoder: IncrementalDecoder, prompt_ids, prompt_mask, max_new_tokens: int):
        hidden, self.logprobs = decoder.start(prompt_ids, prompt_mask)
        self.decoder = decoder
        self.rows = torch.arange(prompt_ids.size(0), device=prompt_ids.device)
        self.fed = 0
        self.calls = 1
        self.hidden = None
        if hidden is not None:
            self.hidden = hidden.new_zeros(prompt_ids.size(0), max_new_tokens, hidden.size(-1))
            self.hidden[:, 0] = hidden

    def catch_up(self, upto: int, completion_ids, completion_mask, active_rows, pad_token_id: int) -> None:
        """Read completion columns `fed .. upto-1`: `logprobs` then predicts column `upto` for `active_rows`."""
        if upto == self.fed:  # nothing new: keep the active rows' distributions
            keep = torch.isin(self.rows, active_rows)
            if not bool(keep.all()):
                self.decoder.keep_rows(keep.nonzero().squeeze(1))
                self.rows, self.logprobs = self.rows[keep], self.logprobs[keep]
            return
        fed_rows, hidden, self.logprobs = catch_up(
            self.decoder, self.rows, self.fed, upto, completion_ids, completion_mask, active_rows, pad_token_id
        )
        if self.hidden is not None:
            self.hidden[fed_rows, self.fed + 1 : upto + 1] = hidden
        self.rows, self.fed = active_rows, upto
        self.calls += 1


def teacher_steps(max_new_tokens: int, alpha: float) -> torch.Tensor:
    """`[max_new_tokens]` booleans, one coin per decode step for the whole batch: True, with probability α, where the
    teacher draws the step's tokens. On the CPU, so that reading one costs no device synchronisation."""
    if alpha in (0.0, 1.0):
        return torch.full((max_new_tokens,), alpha == 1.0)
    return torch.rand(max_new_tokens) < alpha


def _filtered(top_k: int, top_p: float) -> bool:
    return bool(top_k and top_k > 0) or top_p < 1.0


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
    teacher_catch_up: bool = True,
    student_catch_up: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> Rollout:
    """Sample completions token by token from `α·p + (1-α)·q` (then top-k / top-p if set).

    One coin per decode step, shared by the batch, picks the model that draws the step's tokens (the teacher with
    probability α): the coins are independent of everything before them, so each row's completion is drawn from
    `Π_t (α·p_t + (1-α)·q_t)` exactly (docs/algorithm.md). Each model runs at its own steps only: when a step needs
    its distribution it catches up on the tokens since its last call in one cached forward (`teacher_catch_up`,
    `student_catch_up`, which `verify_scoring` checks per model; a model that cannot is fed every token as it is
    drawn). After the loop each scores the positions it has not read the same way, so it sees every position once:
    `log p` of every token comes from the teacher's recorded hidden states, `log q` of a token the teacher drew from
    the student's. With `α = 0` the student runs at every step and the teacher scores the completions in one forward
    afterwards. Top-k / top-p act on the mixture itself, which needs `p` and `q` at every step: both models are then
    fed every token and the filtered mixture is drawn from directly.

    The batch shrinks as rows end: a row that has produced EOS is not fed again (and is dropped from a model's cache
    where `drop_ended_rows` allows it, see `probe.verify_scoring`).

    Args:
        student, teacher: causal LMs sharing the first `vocab_size` vocabulary rows. With `alpha = 0` the teacher
            may be None (a teacher of another tokenizer, scored by `crosstokenizer`): the rollout's teacher scores
            are then 0 and `teacher_hidden` is None.
        prompt_ids, prompt_mask: `[B, P]` left-padded prompts.
        alpha: teacher share of the mixture; `0` is plain sampling from the student, with the teacher scoring the
            completions in one parallel forward afterwards.
        eos_token_ids: any of these ends a completion.
        drop_ended_rows: for (student, teacher), whether finished rows can be dropped from the model's cache.
        teacher_catch_up, student_catch_up: whether the model may be fed several tokens in one cached forward
            (`probe.verify_scoring`'s `catch_up` for it).
        autocast_dtype: the dtype the models' forwards compute in under mixed precision (accelerate's autocast;
            None: none). The student's output head scores the tokens the teacher drew under the same autocast, as
            its forward scores the tokens it drew itself.

    Returns:
        A `Rollout` with `T ≤ max_new_tokens` columns (the loop stops once every row has ended).
    """
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("sample_teacher_mixed needs left-padded prompts (the last column must be real tokens).")
    if teacher is None and alpha > 0.0:
        raise ValueError("Teacher-mixed sampling (alpha > 0) needs the teacher in the decode loop; got teacher=None.")
    filtered = _filtered(top_k, top_p)
    teacher_every_step = filtered or not teacher_catch_up or alpha == 1.0
    student_every_step = filtered or not student_catch_up or alpha == 0.0
    device = prompt_ids.device
    eos = torch.tensor(eos_token_ids, device=device)
    batch_size = prompt_ids.size(0)
    completion_ids = torch.full((batch_size, max_new_tokens), pad_token_id, dtype=prompt_ids.dtype, device=device)
    completion_mask = torch.zeros(batch_size, max_new_tokens, dtype=torch.long, device=device)
    student_scores = torch.zeros(batch_size, max_new_tokens, device=device)
    filtered_scores = torch.zeros(batch_size, max_new_tokens, device=device)  # log p̃ of a filtered draw

    # The student records the hidden states that predict the tokens the teacher drew, where it skips those steps.
    student_decoder = IncrementalDecoder(
        student, vocab_size, temperature, record_hidden=not student_every_step, drop_ended_rows=drop_ended_rows[0]
    )
    student_state = _LazyModel(student_decoder, prompt_ids, prompt_mask, max_new_tokens)
    student_nan = student_state.logprobs.isnan().any()
    teacher_nan = torch.zeros_like(student_nan)
    teacher_state = None
    if alpha > 0.0:
        teacher_decoder = IncrementalDecoder(
            teacher, vocab_size, temperature, record_hidden=True, drop_ended_rows=drop_ended_rows[1]
        )
        teacher_state = _LazyModel(teacher_decoder, prompt_ids, prompt_mask, max_new_tokens)
    rows = torch.arange(batch_size, device=device)  # batch rows still generating, in order
    coins = teacher_steps(max_new_tokens, 0.0 if filtered else alpha)  # filtered: every step draws the mixture
    for step in range(max_new_tokens):
        if alpha > 0.0 and (teacher_every_step or bool(coins[step])):
            teacher_state.catch_up(step, completion_ids, completion_mask, rows, pad_token_id)
            teacher_nan |= teacher_state.logprobs.isnan().any()
        student_runs = student_every_step or not bool(coins[step])
        if student_runs:
            student_state.catch_up(step, completion_ids, completion_mask, rows, pad_token_id)
            student_nan |= student_state.logprobs.isnan().any()
        if filtered:
            teacher_logprobs = teacher_state.logprobs if alpha > 0.0 else student_state.logprobs
            mixed = mix_logprobs(student_state.logprobs, teacher_logprobs, alpha)
            sampling_logprobs = _filter_logprobs(mixed, top_k, top_p)
            tokens = sample_from_logprobs(sampling_logprobs)
            filtered_scores[rows, step] = sampling_logprobs.gather(1, tokens[:, None]).squeeze(1)
        else:
            tokens = sample_from_logprobs(teacher_state.logprobs if bool(coins[step]) else student_state.logprobs)
        completion_ids[rows, step] = tokens
        completion_mask[rows, step] = 1
        if student_runs:
            student_scores[rows, step] = student_state.logprobs.gather(1, tokens[:, None]).squeeze(1)
        ended = torch.isin(tokens, eos)
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        rows = rows[~ended]

    length = step + 1
    completion_ids, completion_mask = completion_ids[:, :length], completion_mask[:, :length]
    student_scores = student_scores[:, :length]
    last_column_rows = completion_mask[:, -1].nonzero().squeeze(1)  # rows that reached the last column
    if not student_every_step:  # log q of the tokens the teacher drew, from the student's recorded hidden states
        student_state.catch_up(length - 1, completion_ids, completion_mask, last_column_rows, pad_token_id)
        skipped = completion_mask * coins[None, :length].to(device)
        with compute_precision(student, autocast_dtype):
            student_scores = student_scores + token_logprobs_from_hidden(
                student, student_state.hidden[:, :length], completion_ids, skipped,
                vocab_size=vocab_size, temperature=temperature,
            )  # fmt: skip
    teacher_calls = 0
    if teacher is None:
        hidden, teacher_scores = None, torch.zeros_like(student_scores)
    elif teacher_state is None:  # α = 0: the teacher scores every completion position in one parallel forward
        hidden, teacher_scores = score_completions(
            teacher, prompt_ids, prompt_mask, completion_ids, completion_mask,
            vocab_size=vocab_size, temperature=temperature,
        )  # fmt: skip
        teacher_calls = 1
    else:
        teacher_state.catch_up(length - 1, completion_ids, completion_mask, last_column_rows, pad_token_id)
        hidden = teacher_state.hidden[:, :length] * completion_mask[..., None]
        teacher_scores = token_logprobs_from_hidden(
            teacher, hidden, completion_ids, completion_mask, vocab_size=vocab_size, temperature=temperature
        )
        teacher_calls = teacher_state.calls
    nan_seen = torch.stack([student_nan | student_scores.isnan().any(), teacher_nan | teacher_scores.isnan().any()])
    sampling_scores = (
        filtered_scores[:, :length] if filtered else mix_logprobs(student_scores, teacher_scores, alpha)
    ) * completion_mask

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
        teacher_calls=teacher_calls,
        student_calls=student_state.calls,
    )
