"""Teacher scores across tokenizers: the teacher's log-probability of the text the student wrote, credited to the
student's tokens.

MiniLLM's rewards need the teacher's log-probability of the student's response, which is defined whatever the
tokenizer: `log p(text)`. A completion sampled by the student is decoded to text; the teacher reads its own rendering of
the prompt (its chat template, generation prompt included), then the text tokenised by its own tokenizer, then — when
the student ended with EOS — its own end of turn up to its EOS token. One teacher forward gives the log-prob of every
teacher token, and each is credited to one student token, so that the per-token rewards
`r_t = credit_t − log q(y_t)` sum to `log p(text) − log q(y)` (docs/cross-tokenizer.md).

**Credit rule.** A teacher token is credited to the first student token after which it is *final*: the teacher's
tokenization of the text written so far holds it before the last word (pre-token) of that text, so no continuation can
change it. When a student token completes a word, that is the student token that starts the next word; at the student's
last token (EOS, or the length limit) every remaining teacher token is final, and at EOS the teacher's end of turn is
credited too. Crediting a teacher token to the student token that merely completes its characters would be biased:
whether a teacher token ends at a given character depends on the characters that follow (BPE merges them), so the
credit given to earlier student tokens would depend on later ones, which the causal returns `R_t` assume it does not
(`tests/test_crosstokenizer_exact.py` measures the bias). The rule assumes what byte-level and SentencePiece
tokenizers do: BPE never merges across words, and a word ends once the next one has started; every completion is
checked against it (`final_token_counts`).

The teacher's text distribution is therefore `p(text) = p(tokens_T(text) [+ end of turn] | teacher prompt)` with
`tokens_T` the teacher tokenizer's own (canonical) tokenization of the text; other tokenizations of the same text are
not summed over. The student's side is its distribution over its token sequences, as in the same-tokenizer trainer.
"""

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers.utils import logging
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

from .sampling import score_completions
from .scoring import left_pad

logger = logging.get_logger(__name__)

# Stands for the assistant's content when the teacher's chat template is rendered to find what follows it.
CONTENT_SENTINEL = "\u2063rkd-trl-completion\u2063"
# Decoding a student token that stops inside a multi-byte character gives this replacement character.
INCOMPLETE_CHARACTER = "\ufffd"


class UnscorableCompletion(ValueError):
    """The teacher cannot score this completion's text faithfully (the reason is the message)."""


# ----------------------------------------------------------------------------------------------- the credit rule


def credit_positions(final_counts: list[int], num_text_tokens: int, num_end_tokens: int) -> list[int]:
    """The student position credited with each teacher token.

    Args:
        final_counts: `[T]` for each student token `t`, how many leading teacher tokens of the text are final after it.
        num_text_tokens: teacher tokens of the completion text.
        num_end_tokens: teacher end-of-turn tokens scored after the text (0 when the student did not end).

    Returns:
        `num_text_tokens + num_end_tokens` indices into `0..T-1`: teacher token `j` goes to the first `t` with
        `final_counts[t] > j`, and to the last student token when none is (then it is final only because the
        completion ends there); end-of-turn tokens go to the last student token (EOS).
    """
    last = len(final_counts) - 1
    positions, t = [], 0
    for j in range(num_text_tokens):
        while t < last and final_counts[t] <= j:
            t += 1
        positions.append(t)
    return positions + [last] * num_end_tokens


def credited_logprobs(
    teacher_logprobs: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, num_positions: int
) -> torch.Tensor:
    """Sum each teacher token's log-prob into the student position credited with it.

    Args:
        teacher_logprobs: `[B, M]` teacher log-probs of its tokens.
        positions: `[B, M]` credited student position of each (see `credit_positions`).
        mask: `[B, M]` 1 on teacher tokens that are scored.
        num_positions: `T`, the student completion length.

    Returns:
        `[B, T]` credited teacher log-probs; row `b` sums to `Σ_j mask·teacher_logprobs`, the teacher's log-prob of
        the text (and end of turn).
    """
    credited = teacher_logprobs.new_zeros(teacher_logprobs.size(0), num_positions)
    return credited.scatter_add_(1, positions.long(), teacher_logprobs * mask)


# ----------------------------------------------------------------------------------------------- text and tokens


def student_text_ends(tokenizer, text_token_ids: list[int]) -> tuple[str, list[int]]:
    """The text the student wrote and, for each of its tokens, how many characters of it exist after that token.

    Every token is decoded as text (a special token other than EOS is written out, e.g. `<pad>`: the teacher sees what
    the student's output says, and an invisible token would escape the teacher's judgement). A token that stops inside
    a multi-byte character contributes its character when a later token completes it; bytes never completed at the end
    are dropped. Raises `UnscorableCompletion` when decoding is not prefix-consistent (a later token rewrites text
    that an earlier one wrote), since then no character belongs to one token.
    """
    if not text_token_ids:
        return "", []
    prefixes = tokenizer.batch_decode(
        [text_token_ids[: t + 1] for t in range(len(text_token_ids))],
        skip_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    prefixes = [prefix.rstrip(INCOMPLETE_CHARACTER) for prefix in prefixes]
    text = prefixes[-1] if prefixes else ""
    ends, previous = [], 0
    for prefix in prefixes:
        if not text.startswith(prefix) or len(prefix) < previous:
            raise UnscorableCompletion(
                f"the student tokenizer decodes a prefix of the completion to {prefix!r}, which is not a prefix of "
                f"the whole completion's text {text!r}"
            )
        ends.append(len(prefix))
        previous = len(prefix)
    return text, ends


def teacher_text_encodings(teacher_tokenizer, texts: list[str]):
    """The teacher tokenizer's encodings of `texts` as generated text: no BOS/EOS added, and strings that look like its
    special tokens (e.g. `<|im_end|>` written out by the student) tokenised as the plain text they are."""
    return teacher_tokenizer(texts, add_special_tokens=False, split_special_tokens=True)


def final_token_counts(teacher_tokenizer, text: str, ends: list[int]) -> tuple[list[int], list[int], bool]:
    """The teacher's tokens of `text` and, after each student token, how many of them are final.

    After student token `t` the text is `text[:ends[t]]`; its teacher tokenization is split into words (pre-tokens,
    the encoding's `word_ids`) and every token before the last word is final. The counts are made non-decreasing.

    Returns:
        `(teacher_ids, final_counts, stable)`: `stable` is False when some prefix's final tokens are not the leading
        tokens of the whole text's tokenization — the assumption of the credit rule failed for this text (the counts
        are still used, and every token is still credited exactly once).
    """
    distinct_ends = sorted(set(ends))
    encodings = teacher_text_encodings(teacher_tokenizer, [text[:end] for end in distinct_ends] + [text])
    teacher_ids = encodings["input_ids"][-1]
    count_at, stable = {}, True
    for index, end in enumerate(distinct_ends):
        ids, words = encodings["input_ids"][index], encodings.word_ids(index)
        count = words.index(words[-1]) if ids else 0
        stable &= ids[:count] == teacher_ids[:count]
        count_at[end] = count
    counts, running = [], 0
    for end in ends:
        running = max(running, count_at[end])
        counts.append(running)
    return teacher_ids, counts, stable


@dataclass
class CompletionAlignment:
    """One completion as the teacher scores it.

    `teacher_ids` are the teacher tokens scored after the teacher's prompt (the text, then the end of turn when the
    student ended) and `positions` the student position credited with each. When the completion cannot be scored,
    `problem` says why and both lists are empty.
    """

    text: str = ""
    teacher_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    stable: bool = True
    problem: str | None = None


def align_completion(
    student_tokenizer, teacher_tokenizer, completion_ids: list[int], ended: bool, turn_end_ids: list[int]
) -> CompletionAlignment:
    """Teacher tokens of one sampled completion and the student token credited with each.

    Args:
        completion_ids: the student's valid completion tokens, the EOS included when `ended`.
        ended: whether the last token is the student's EOS; its teacher counterpart, `turn_end_ids` (the teacher's end
            of turn up to its EOS, `teacher_turn_end_ids`), is then scored and credited to it. A completion cut by
            the length limit is scored as text only: the teacher's probability that its answer starts that way.
    """
    text_ids = completion_ids[:-1] if ended else completion_ids
    try:
        text, ends = student_text_ends(student_tokenizer, text_ids)
    except UnscorableCompletion as error:
        return CompletionAlignment(problem=str(error))
    if ended:
        ends.append(len(text))  # EOS writes no character
    teacher_ids, final_counts, stable = final_token_counts(teacher_tokenizer, text, ends)
    round_trip = teacher_tokenizer.decode(teacher_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if round_trip != text:
        return CompletionAlignment(
            text=text,
            problem=f"the teacher tokenizer does not reproduce the text (it reads {text!r} as {round_trip!r}: "
            "normalisation or characters outside its vocabulary)",
        )
    end_ids = list(turn_end_ids) if ended else []
    positions = credit_positions(final_counts, len(teacher_ids), len(end_ids))
    return CompletionAlignment(text=text, teacher_ids=teacher_ids + end_ids, positions=positions, stable=stable)


# ----------------------------------------------------------------------------------------------- the teacher's side


def teacher_eos_token_ids(teacher, teacher_tokenizer) -> list[int]:
    """The token ids that end the teacher's answers: its tokenizer's EOS and its `generation_config.eos_token_id`.
    Raises a `ValueError` when there are none (the teacher's probability of ending could not be scored)."""
    eos_token_ids = teacher.generation_config.eos_token_id
    eos_token_ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or [])
    if teacher_tokenizer.eos_token_id is not None and teacher_tokenizer.eos_token_id not in eos_token_ids:
        eos_token_ids.insert(0, teacher_tokenizer.eos_token_id)
    if not eos_token_ids:
        raise ValueError(
            "The teacher's tokenizer has no EOS token (and its generation_config none): the teacher's probability "
            "of ending an answer cannot be scored. Set the teacher tokenizer's eos_token."
        )
    return eos_token_ids


def teacher_prompt_ids(teacher_tokenizer, prompts: list) -> list[list[int]]:
    """The teacher's token ids of each prompt, rendered as TRL renders prompts for generation: conversational prompts
    with the teacher's chat template and its generation prompt, plain text with the tokenizer's own special tokens."""
    if is_conversational({"prompt": prompts[0]}):
        return [
            teacher_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
            for prompt in prompts
        ]
    return teacher_tokenizer(prompts)["input_ids"]


def teacher_turn_end_ids(teacher_tokenizer, prompt, eos_token_ids: list[int]) -> list[int]:
    """What the teacher writes after an answer, up to and including its first EOS token: for conversational prompts
    what its chat template puts after the assistant's content (e.g. `<|im_end|>`), for plain text its EOS token.

    Raises a `ValueError` when the template closes the assistant turn without any of `eos_token_ids`: the teacher's
    probability of ending there is then undefined.
    """
    if not is_conversational({"prompt": prompt}):
        return [eos_token_ids[0]]
    rendered = teacher_tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": CONTENT_SENTINEL}], tokenize=False
    )
    _, found, after = rendered.rpartition(CONTENT_SENTINEL)
    if not found:
        raise ValueError(
            "The teacher's chat template does not write the assistant's content verbatim (it dropped a probe "
            "content), so the end of the teacher's turn cannot be found. Give the teacher tokenizer a template that "
            "renders assistant turns."
        )
    ids = teacher_tokenizer(after, add_special_tokens=False)["input_ids"]
    for index, token in enumerate(ids):
        if token in eos_token_ids:
            return ids[: index + 1]
    raise ValueError(
        f"The teacher's chat template closes the assistant turn with {after!r}, which holds none of the teacher's EOS "
        f"tokens (ids {eos_token_ids}): the teacher's probability of ending its answer cannot be scored. Set the "
        "teacher tokenizer's eos_token (or the teacher's generation_config.eos_token_id) to its end-of-turn token."
    )


@dataclass
class CrossTokenizerScores:
    """Teacher scores of a batch of student completions (`[B]` tensors unless said otherwise)."""

    teacher_logprobs: torch.Tensor  # [B, T] teacher log-probs credited to each student token (0 where unscored)
    credited_tokens: torch.Tensor  # [B, T] how many teacher tokens each student token was credited with
    scored: torch.Tensor  # bool: the text could be scored faithfully (else the row's credits are 0)
    stable: torch.Tensor  # bool: the credit rule's assumption held for the row (see `final_token_counts`)
    teacher_tokens: torch.Tensor  # teacher tokens scored (text and end of turn)
    characters: torch.Tensor  # characters of the text
    problems: list[str | None]  # why a row could not be scored


@torch.no_grad()
def score_across_tokenizers(
    teacher: torch.nn.Module,
    teacher_tokenizer,
    student_tokenizer,
    prompts: list,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    eos_token_ids: list[int],
    teacher_eos_token_ids: list[int],
    vocab_size: int,
    temperature: float = 1.0,
) -> CrossTokenizerScores:
    """The teacher's log-probs of the student's completions, credited to the student's tokens (one teacher forward).

    Args:
        teacher: causal LM of `teacher_tokenizer`; `vocab_size` of its rows are scored.
        prompts: the prompts (conversational or plain text) the completions answer.
        completion_ids, completion_mask: `[B, T]` the student's completions (as in a `Rollout`).
        eos_token_ids: the student's EOS ids (a completion that ends with one is closed by the teacher's end of turn).
        teacher_eos_token_ids: the teacher's EOS ids, which end its turn.
    """
    device = completion_ids.device
    alignments = []
    for prompt, ids, mask in zip(prompts, completion_ids.tolist(), completion_mask.tolist(), strict=True):
        valid = [token for token, keep in zip(ids, mask) if keep]
        ended = bool(valid) and valid[-1] in eos_token_ids
        turn_end = teacher_turn_end_ids(teacher_tokenizer, prompt, teacher_eos_token_ids) if ended else []
        alignments.append(align_completion(student_tokenizer, teacher_tokenizer, valid, ended, turn_end))

    pad_token_id = teacher_tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = teacher_eos_token_ids[0]
    prompt_ids, prompt_mask = left_pad(teacher_prompt_ids(teacher_tokenizer, prompts), pad_token_id)
    teacher_ids, teacher_mask, positions = (
        pad([torch.tensor(row, dtype=torch.long) for row in rows], padding_value=value, padding_side="right")
        for rows, value in (
            ([a.teacher_ids for a in alignments], pad_token_id),
            ([[1] * len(a.teacher_ids) for a in alignments], 0),
            ([a.positions for a in alignments], 0),
        )
    )
    limit = getattr(teacher.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and prompt_ids.size(1) + teacher_ids.size(1) > limit:
        raise ValueError(
            f"The teacher reads {prompt_ids.size(1)} prompt tokens and up to {teacher_ids.size(1)} completion tokens, "
            f"more than its max_position_embeddings ({limit}). Lower max_new_tokens or shorten the prompts."
        )
    if teacher_ids.size(1) > 0:
        _, teacher_logprobs = score_completions(
            teacher, prompt_ids.to(device), prompt_mask.to(device), teacher_ids.to(device), teacher_mask.to(device),
            vocab_size=vocab_size, temperature=temperature,
        )  # fmt: skip
    else:  # nothing to score
        teacher_logprobs = torch.zeros(teacher_ids.shape, device=device)
    positions, teacher_mask = positions.to(device), teacher_mask.to(device).float()
    num_positions = completion_ids.size(1)
    return CrossTokenizerScores(
        teacher_logprobs=credited_logprobs(teacher_logprobs, positions, teacher_mask, num_positions),
        credited_tokens=credited_logprobs(teacher_mask, positions, teacher_mask, num_positions),  # 1 per token
        scored=torch.tensor([a.problem is None for a in alignments], device=device),
        stable=torch.tensor([a.stable for a in alignments], device=device),
        teacher_tokens=teacher_mask.sum(1).to(device),
        characters=torch.tensor([len(a.text) for a in alignments], device=device),
        problems=[a.problem for a in alignments],
    )


def score_rollout_across_tokenizers(teacher, cross, student_tokenizer, prompts: list, rollout, *, eos_token_ids,
                                    temperature: float, warn: bool):  # fmt: skip
    """A rollout's completions scored by a teacher of another tokenizer (`score_across_tokenizers`; `cross`: the
    trainer's `teacher.CrossTokenizerTeacher` record), the scores put into the rollout.

    Returns the rollout with the teacher's log-probs, the mask of the tokens whose rewards count (a completion whose
    text the teacher cannot score faithfully, `align_completion`, gets no reward and no advantage: its teacher
    log-probs are the student's, zero divergence in the logged rewards) and the scores (`credited_tokens`: the teacher's
    length normalisation). With `warn`, a completion that cannot be scored logs a warning."""
    scores = score_across_tokenizers(
        teacher, cross.tokenizer, student_tokenizer, prompts, rollout.completion_ids, rollout.completion_mask,
        eos_token_ids=eos_token_ids, teacher_eos_token_ids=cross.eos_token_ids, vocab_size=cross.vocab_size,
        temperature=temperature,
    )  # fmt: skip
    scored = scores.scored[:, None]
    teacher_logprobs = torch.where(scored, scores.teacher_logprobs, rollout.student_logprobs)
    rollout = dataclasses.replace(rollout, teacher_logprobs=teacher_logprobs)
    problems = [problem for problem in scores.problems if problem is not None]
    if problems and warn:
        logger.warning(
            f"A sampled completion cannot be scored by the teacher and gets no reward ({problems[0]}). The share "
            "of such completions is logged as crosstok/unscored_fraction (docs/cross-tokenizer.md)."
        )
    return rollout, rollout.completion_mask * scored, scores


def cross_tokenizer_metrics(scores: CrossTokenizerScores, completion_mask: torch.Tensor, gather) -> dict[str, float]:
    """The logged `crosstok/*` values of a batch's scores, over every process (`gather`: the accelerator's)."""
    student_tokens = gather(completion_mask.sum()).sum().clamp(min=1)
    return {
        "crosstok/unscored_fraction": gather((~scores.scored).float()).mean().item(),
        "crosstok/unstable_fraction": gather((~scores.stable).float()).mean().item(),
        "crosstok/teacher_tokens_per_student_token": (
            gather(scores.teacher_tokens.sum()).sum() / student_tokens
        ).item(),
    }
