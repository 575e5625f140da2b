"""Evaluation metrics for distilled students (MiniLLM §3): validity, Rouge-L, sequence-level KL, distinct-n,
calibration and exposure bias.

The pure functions (`distinct_n`, `expected_calibration_error`, `excess_accumulated_error`, ...) take tensors or
strings and are tested against hand computations; the model-level helpers sample and score with them.
"""

from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..crosstokenizer import score_across_tokenizers, teacher_eos_token_ids
from ..guard import repeated_ngram_share  # noqa: F401  (one definition, used by the degeneration guard)
from ..probe import verify_scoring
from ..sampling import sample_teacher_mixed
from ..scoring import forward_arguments, left_pad, shared_vocab_size


def chat_prompt_batch(tokenizer, prompts, device="cpu"):
    """Left-padded `(ids, mask)` of user prompts rendered with the tokenizer's chat template, ending with the
    assistant turn's header (`add_generation_prompt`), as TRL's trainers render prompts."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    ids, mask = left_pad(tokenizer(texts, add_special_tokens=False)["input_ids"], tokenizer.pad_token_id)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_with_scores(student, teacher, tokenizer, prompts, max_new_tokens, alpha=0.0):
    """Sample one completion per prompt (chat-templated) from `α·p + (1-α)·q`; returns the `Rollout` and texts.

    `alpha=0` samples from the student, `alpha=1` from the teacher; both models' log-probs are recorded either way.
    """
    device = next(student.parameters()).device
    ids, mask = chat_prompt_batch(tokenizer, prompts, device)
    vocab_size = shared_vocab_size(student, teacher, tokenizer)
    checks = [verify_scoring(model, vocab_size, tokenizer.pad_token_id, name)
              for name, model in (("student", student), ("teacher", teacher))]  # fmt: skip
    rollout = sample_teacher_mixed(
        student,
        teacher,
        ids,
        mask,
        vocab_size=vocab_size,
        drop_ended_rows=(checks[0].drop_ended_rows, checks[1].drop_ended_rows),
        teacher_catch_up=checks[1].catch_up,
        student_catch_up=checks[0].catch_up,
        max_new_tokens=max_new_tokens,
        alpha=alpha,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    return rollout, texts


def _sequence_kl(student, teacher, tokenizer, prompts, max_new_tokens, samples_per_prompt, alpha):
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    rollout, _ = sample_with_scores(student, teacher, tokenizer, repeated, max_new_tokens, alpha=alpha)
    log_ratio = (rollout.student_logprobs - rollout.teacher_logprobs).sum(1)
    per_sequence = log_ratio if alpha == 0.0 else -log_ratio
    return {
        "kl": per_sequence.mean().item(),
        "kl_stderr": (per_sequence.std() / per_sequence.numel() ** 0.5).item(),
        "length": rollout.completion_mask.sum(1).float().mean().item(),
    }


@torch.no_grad()
def reverse_kl_estimate(student, teacher, tokenizer, prompts, max_new_tokens, samples_per_prompt=16):
    """Monte-Carlo `KL(q || p) = E_{y~q} Σ_t [log q(y_t|·) - log p(y_t|·)]` over whole sampled responses, averaged
    over prompts, with its standard error and the mean response length (of the student's samples)."""
    kl = _sequence_kl(student, teacher, tokenizer, prompts, max_new_tokens, samples_per_prompt, alpha=0.0)
    return {"reverse_kl": kl["kl"], "reverse_kl_stderr": kl["kl_stderr"], "length": kl["length"]}


@torch.no_grad()
def reverse_kl_by_position(student, teacher, tokenizer, prompts, max_new_tokens, samples_per_prompt=16, batch_size=16):
    """The reverse KL at each position of the student's own samples: `[N, max_new_tokens]` tensors (N = prompts ×
    `samples_per_prompt`, 0 after each sample ends) of

    - `kl`: the exact `KL(q_t || p_t)` over the shared vocabulary given the sampled prefix (its Rao–Blackwellised
      form: summed over positions its expectation is the sequence reverse KL, with the sampling noise of the token
      itself removed);
    - `log_ratio`: the sampled `log q(y_t|·) − log p(y_t|·)` (what `reverse_kl_estimate` sums);
    - `mask`: 1 where the sample has a token;
    - `completion_ids`: the sampled tokens (the pad token after the end).

    Compare methods at matched positions with it: the reverse KL is higher early in an answer than late, so a
    method whose answers are shorter scores a higher reverse KL per token without being worse anywhere.
    Student and teacher must share a tokenizer."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    parts = []
    for start in range(0, len(repeated), batch_size):
        rollout, student_logprobs, teacher_logprobs = _teacher_and_student_distributions(
            student, teacher, tokenizer, repeated[start : start + batch_size], max_new_tokens, alpha=0.0
        )
        mask = rollout.completion_mask.float()
        kl = (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1) * mask
        log_ratio = (rollout.student_logprobs - rollout.teacher_logprobs) * mask
        width = (0, max_new_tokens - mask.size(1))
        ids = F.pad(rollout.completion_ids, width, value=tokenizer.pad_token_id)
        parts.append([F.pad(x, width).cpu() for x in (kl, log_ratio, mask)] + [ids.cpu()])
    kl, log_ratio, mask, ids = (torch.cat(column) for column in zip(*parts, strict=True))
    return {"kl": kl, "log_ratio": log_ratio, "mask": mask, "completion_ids": ids}


@torch.no_grad()
def forward_kl_estimate(student, teacher, tokenizer, prompts, max_new_tokens, samples_per_prompt=16):
    """Monte-Carlo `KL(p || q) = E_{y~p} Σ_t [log p(y_t|·) - log q(y_t|·)]` over whole teacher-sampled responses,
    with its standard error and the mean response length (of the teacher's samples)."""
    kl = _sequence_kl(student, teacher, tokenizer, prompts, max_new_tokens, samples_per_prompt, alpha=1.0)
    return {"forward_kl": kl["kl"], "forward_kl_stderr": kl["kl_stderr"], "teacher_length": kl["length"]}


def validity(task, prompts, answers) -> float:
    """Share of answers that are exactly one of the task's valid answers for their prompt."""
    return sum(task.is_valid(p, a) for p, a in zip(prompts, answers, strict=True)) / len(prompts)


@cache
def _rouge_l_module():
    # Loaded by path from the package: `evaluate.load("rouge")` would download its script from the Hub.
    import evaluate

    return evaluate.load(str(Path(__file__).with_name("rouge_l.py")))


def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """Mean Rouge-L F-measure (`evaluate` + `rouge_score`) of each prediction against its best reference."""
    return _rouge_l_module().compute(predictions=predictions, references=references)["rougeL"]


def rouge_l_scores(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Rouge-L F-measure of each prediction against its best reference, one per prediction (`rouge_l` is their
    mean), for comparisons prompt by prompt."""
    return _rouge_l_module().compute(predictions=predictions, references=references, use_aggregator=False)["rougeL"]


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Share of predictions equal (up to surrounding white space) to one of their references."""
    hits = [
        prediction.strip() in {reference.strip() for reference in options}
        for prediction, options in zip(predictions, references, strict=True)
    ]
    return sum(hits) / max(len(hits), 1)


def bootstrap_interval(statistic, n: int, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `statistic(indices)` over `n` items (prompts, problems), resampled with
    replacement `resamples` times from a fixed seed."""
    import random

    rng = random.Random(seed)
    draws = sorted(statistic(rng.choices(range(n), k=n)) for _ in range(resamples))
    return draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]


def paired_difference(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """Mean of `a − b` over items scored by both (prompts, problems), its 95% bootstrap interval over the items
    (`bootstrap_interval`: each resample draws the same items for both) and how many items each side scores higher on.

    Pairing on items takes out what every method shares on an item (how hard a problem is, how far any short answer
    can be from the teacher's one answer), which separate intervals and seed means leave in."""
    import statistics

    differences = [x - y for x, y in zip(a, b, strict=True)]
    low, high = bootstrap_interval(
        lambda idx: statistics.fmean(differences[i] for i in idx), len(differences), resamples, seed
    )
    return {"difference": statistics.fmean(differences), "low": low, "high": high,
            "a_higher": sum(d > 0 for d in differences), "b_higher": sum(d < 0 for d in differences)}  # fmt: skip


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: unique white-space n-grams over all n-grams in `texts` (0 when there are none)."""
    ngrams = [tuple(words[i : i + n]) for words in map(str.split, texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor, num_bins: int = 10) -> float:
    """ECE = Σ_b |B_b|/N · |accuracy(B_b) - confidence(B_b)| over `num_bins` equal-width confidence bins.

    Args:
        confidences: `[N]` predicted probabilities of the predicted class, in [0, 1].
        correct: `[N]` whether each prediction was right.
    """
    confidences = confidences.flatten().double()
    correct = correct.flatten().double()
    # Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; confidence 0 goes to the first bin.
    bins = (torch.ceil(confidences * num_bins).long() - 1).clamp(0, num_bins - 1)
    gaps = torch.zeros(num_bins, dtype=torch.float64)
    gaps.index_add_(0, bins, correct - confidences)
    return (gaps.abs().sum() / confidences.numel()).item()


def excess_accumulated_error(student_prefix_errors: torch.Tensor, teacher_prefix_errors: torch.Tensor) -> torch.Tensor:
    """ExAccErr(l) of MiniLLM §3.3 (after Arora et al., 2022) for every length `l = 1..T`, in percent.

    `R(l) = Σ_{t≤l} E_{y<t~q} KL(p(·|y<t) || q(·|y<t))` is the error the student accumulates on its own prefixes,
    `ε(l) = 1/l Σ_{t≤l} E_{y<t~p} KL(p(·|y<t) || q(·|y<t))` its mean per-step error on the teacher's prefixes, and
    `ExAccErr(l) = (R(l) - l·ε(l)) / (l·ε(l)) · 100`: how much worse generating from its own prefixes is.

    Args:
        student_prefix_errors, teacher_prefix_errors: `[N, T]` per-position `KL(p || q)` on prefixes sampled from the
            student and from the teacher; positions after a response ended are 0 (an ended response adds no error).

    Returns:
        `[T]` ExAccErr(l) for l = 1..T.
    """
    student_accumulated = student_prefix_errors.mean(0).cumsum(0)
    teacher_accumulated = teacher_prefix_errors.mean(0).cumsum(0)
    return (student_accumulated - teacher_accumulated) / teacher_accumulated * 100


@torch.no_grad()
def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, vocab_size):
    """Full next-token log-probs `[B, T, vocab_size]` of `model` at every completion position (one forward).

    Args:
        prompt_ids, prompt_mask: `[B, P]` left-padded prompts.
        completion_ids, completion_mask: `[B, T]` completions (as in a `Rollout`).
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    arguments = forward_arguments(model, input_ids, attention_mask, use_cache=False)
    arguments.pop("logits_to_keep", None)  # every position
    logits = model(**arguments).logits
    prompt_length = prompt_ids.size(1)
    return F.log_softmax(logits[:, prompt_length - 1 : -1, :vocab_size].float(), dim=-1)


@torch.no_grad()
def _teacher_and_student_distributions(student, teacher, tokenizer, prompts, max_new_tokens, alpha):
    """Sample one response per prompt from `α·p + (1-α)·q`; return its rollout and both models' full log-probs."""
    vocab_size = shared_vocab_size(student, teacher, tokenizer)
    rollout, _ = sample_with_scores(student, teacher, tokenizer, prompts, max_new_tokens, alpha=alpha)
    ids, mask = chat_prompt_batch(tokenizer, prompts, rollout.completion_ids.device)
    completion = (rollout.completion_ids, rollout.completion_mask)
    student_logprobs = completion_logprobs(student, ids, mask, *completion, vocab_size)
    teacher_logprobs = completion_logprobs(teacher, ids, mask, *completion, vocab_size)
    return rollout, student_logprobs, teacher_logprobs


def _per_position_forward_kl(rollout, student_logprobs, teacher_logprobs, max_new_tokens):
    """`[N, max_new_tokens]` exact `KL(p || q)` at every valid position, 0 after the end of each response."""
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1) * rollout.completion_mask
    return F.pad(kl, (0, max_new_tokens - kl.size(1)))


@torch.no_grad()
def exposure_bias(student, teacher, tokenizer, prompts, max_new_tokens, samples_per_prompt=16) -> torch.Tensor:
    """ExAccErr(l), l = 1..max_new_tokens (`excess_accumulated_error`), from student- and teacher-sampled prefixes."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    errors = []
    for alpha in (0.0, 1.0):
        scored = _teacher_and_student_distributions(student, teacher, tokenizer, repeated, max_new_tokens, alpha)
        errors.append(_per_position_forward_kl(*scored, max_new_tokens))
    return excess_accumulated_error(*errors)


@torch.no_grad()
def next_token_calibration(student, teacher, tokenizer, prompts, max_new_tokens, samples_per_prompt=16, num_bins=10):
    """ECE of the student's most likely next token on teacher-sampled responses: at every position its top-1
    probability is the confidence, and it is correct when the teacher's sample is that token."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    rollout, student_logprobs, _ = _teacher_and_student_distributions(
        student, teacher, tokenizer, repeated, max_new_tokens, alpha=1.0
    )
    top_logprobs, top_tokens = student_logprobs.max(-1)
    valid = rollout.completion_mask.bool()
    correct = top_tokens[valid] == rollout.completion_ids[valid]
    return expected_calibration_error(top_logprobs[valid].exp(), correct, num_bins)


@torch.no_grad()
def answer_token_logprobs(model, tokenizer, prompts: list[str], token_lists: list[list[int]], batch_size: int = 16):
    """`log model(y_t | x, y_<t)` of every token of each given answer (one forward per batch), a list of lists."""
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompts), batch_size):
        answers = token_lists[start : start + batch_size]
        prompt_ids, prompt_mask = chat_prompt_batch(tokenizer, prompts[start : start + batch_size], device)
        completion_ids = pad_right(answers, tokenizer.pad_token_id).to(device)
        completion_mask = pad_right([[1] * len(a) for a in answers], 0).to(device)
        if completion_ids.size(1) == 0:
            results += [[] for _ in answers]
            continue
        logprobs = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, len(tokenizer))
        token_logprobs = logprobs.gather(-1, completion_ids[..., None]).squeeze(-1)
        results += [row[: len(answer)].tolist() for row, answer in zip(token_logprobs, answers)]
    return results


def pad_right(token_lists: list[list[int]], value: int) -> torch.Tensor:
    """`[B, max length]` tensor of token lists padded on the right with `value`."""
    width = max((len(tokens) for tokens in token_lists), default=0)
    return torch.tensor([tokens + [value] * (width - len(tokens)) for tokens in token_lists], dtype=torch.long)


@torch.no_grad()
def greedy_answer_scores(greedy, teacher_answers: list[str]) -> dict:
    """Rouge-L (× 100) of greedy `Answers` against the teacher's answers, their repeated 4-grams and distinct-2, the
    share that ended with EOS and their mean length in tokens."""
    return {
        "rouge_l": 100.0 * rouge_l(greedy.texts, [[answer] for answer in teacher_answers]),
        "repeated_4grams": repeated_ngram_share(greedy.token_ids, 4),
        "distinct_2": distinct_n(greedy.texts, 2),
        "eos_rate": sum(greedy.ended) / len(greedy.ended),
        "length": sum(len(tokens) for tokens in greedy.token_ids) / len(greedy.token_ids),
    }


def answer_quality(student, teacher, tokenizer, prompts, teacher_answers, max_new_tokens, samples_per_prompt=2, seed=0):
    """What a person sees of a student's answers to real prompts, next to the KL it was trained on.

    Greedy answers: Rouge-L (× 100) against the teacher's greedy answers, repeated 4-grams, distinct-2, share ending
    with EOS, length, and the teacher's per-token NLL of them (how plausible the teacher finds what the student
    says). Samples at temperature 1 (`samples_per_prompt` per prompt): per-token and per-sequence reverse KL
    `KL(student || teacher)` (Monte-Carlo), share ending with EOS, length.
    """
    from ..demo.instructions import generate_answers

    greedy = generate_answers(student, tokenizer, prompts, max_new_tokens)
    teacher_logprobs = answer_token_logprobs(teacher, tokenizer, prompts, greedy.token_ids)
    answer_tokens = sum(len(tokens) for tokens in greedy.token_ids)
    torch.manual_seed(seed)
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    rollout, _ = sample_with_scores(student, teacher, tokenizer, repeated, max_new_tokens)
    log_ratio = (rollout.student_logprobs - rollout.teacher_logprobs).sum(1)
    sample_lengths = rollout.completion_mask.sum(1).float()
    eos = torch.tensor([tokenizer.eos_token_id], device=rollout.completion_ids.device)
    sample_ended = (torch.isin(rollout.completion_ids, eos) & rollout.completion_mask.bool()).any(1).float()
    return {
        **greedy_answer_scores(greedy, teacher_answers),
        "teacher_nll": -sum(sum(row) for row in teacher_logprobs) / max(answer_tokens, 1),
        "reverse_kl_per_token": (log_ratio.sum() / sample_lengths.sum()).item(),
        "reverse_kl_per_sequence": log_ratio.mean().item(),
        "sample_eos_rate": sample_ended.mean().item(),
        "sample_length": sample_lengths.mean().item(),
        "greedy_answers": greedy.texts,
    }


@torch.no_grad()
def cross_tokenizer_answer_quality(
    student, tokenizer, teacher, teacher_tokenizer, prompts, teacher_answers, max_new_tokens,
    samples_per_prompt=2, seed=0, batch_size=16,
):  # fmt: skip
    """`answer_quality` for a teacher with another tokenizer: the teacher's scores are those of the student's text
    (`crosstokenizer.score_across_tokenizers`: its own chat template and tokenization, its end of turn when the student
    ended), so per-token figures are per character (or per student token) instead.

    Greedy answers: Rouge-L (× 100) against the teacher's answers, repeated 4-grams (student tokens), distinct-2, EOS
    rate, length (student tokens and characters), teacher NLL per character. Samples at temperature 1: Monte-Carlo
    reverse KL `E_{y~q}[log q(y) − log p(text(y))]` per sequence, per student token and per character.

    The student is measured in eval mode (a model left in training mode by a trainer may run gradient checkpointing,
    which turns off the KV cache that decoding relies on) and put back in the mode it was in.
    """
    was_training = student.training
    student.eval()
    try:
        return _cross_tokenizer_answer_quality(
            student, tokenizer, teacher, teacher_tokenizer, prompts, teacher_answers, max_new_tokens,
            samples_per_prompt, seed, batch_size,
        )  # fmt: skip
    finally:
        student.train(was_training)


def _cross_tokenizer_answer_quality(
    student, tokenizer, teacher, teacher_tokenizer, prompts, teacher_answers, max_new_tokens, samples_per_prompt, seed,
    batch_size,
):  # fmt: skip
    from ..demo.instructions import generate_answers, user_turns

    device = next(student.parameters()).device
    vocab_size = student.config.get_text_config().vocab_size
    eos_token_ids = [tokenizer.eos_token_id]
    teacher_eos = teacher_eos_token_ids(teacher, teacher_tokenizer)

    def teacher_scores(prompt_texts, completion_ids, completion_mask):
        return score_across_tokenizers(
            teacher, teacher_tokenizer, tokenizer, user_turns(prompt_texts), completion_ids, completion_mask,
            eos_token_ids=eos_token_ids, teacher_eos_token_ids=teacher_eos,
            vocab_size=teacher.config.get_text_config().vocab_size,
        )  # fmt: skip

    greedy = generate_answers(student, tokenizer, prompts, max_new_tokens)
    greedy_teacher_logprob, greedy_characters = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        answers = greedy.token_ids[start : start + batch_size]
        completion_ids = pad_right(answers, tokenizer.pad_token_id).to(device)
        completion_mask = pad_right([[1] * len(a) for a in answers], 0).to(device)
        scores = teacher_scores(prompts[start : start + batch_size], completion_ids, completion_mask)
        greedy_teacher_logprob += scores.teacher_logprobs.sum().item()
        greedy_characters += scores.characters.sum().item()

    torch.manual_seed(seed)
    drop_ended_rows = verify_scoring(student, vocab_size, tokenizer.pad_token_id, "student").drop_ended_rows
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    log_ratios, lengths, characters, ended, unscored = [], [], [], [], 0
    for start in range(0, len(repeated), batch_size):
        batch = repeated[start : start + batch_size]
        ids, mask = chat_prompt_batch(tokenizer, batch, device)
        rollout = sample_teacher_mixed(
            student, None, ids, mask, vocab_size=vocab_size, max_new_tokens=max_new_tokens, alpha=0.0,
            eos_token_ids=eos_token_ids, pad_token_id=tokenizer.pad_token_id, drop_ended_rows=(drop_ended_rows, True),
        )  # fmt: skip
        scores = teacher_scores(batch, rollout.completion_ids, rollout.completion_mask)
        unscored += int((~scores.scored).sum())
        log_ratios.append(rollout.student_logprobs.sum(1) - scores.teacher_logprobs.sum(1))
        lengths.append(rollout.completion_mask.sum(1).float())
        characters.append(scores.characters.float())
        eos = torch.tensor(eos_token_ids, device=device)
        ended.append((torch.isin(rollout.completion_ids, eos) & rollout.completion_mask.bool()).any(1).float())
    log_ratio, length, character = torch.cat(log_ratios), torch.cat(lengths), torch.cat(characters)
    return {
        **greedy_answer_scores(greedy, teacher_answers),
        "length_characters": greedy_characters / len(prompts),
        "teacher_nll_per_character": -greedy_teacher_logprob / max(greedy_characters, 1),
        "reverse_kl_per_sequence": log_ratio.mean().item(),
        "reverse_kl_per_sequence_stderr": (log_ratio.std() / log_ratio.numel() ** 0.5).item(),
        "reverse_kl_per_token": (log_ratio.sum() / length.sum()).item(),
        "reverse_kl_per_character": (log_ratio.sum() / character.sum().clamp(min=1)).item(),
        "sample_eos_rate": torch.cat(ended).mean().item(),
        "sample_length": length.mean().item(),
        "sample_length_characters": character.mean().item(),
        "unscored_samples": unscored,
        "greedy_answers": greedy.texts,
    }
