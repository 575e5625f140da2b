"""Cross-tokenizer scoring: the credit rule on hand-computed cases, the edge cases of text, and the teacher's scores
against an independent forward over the teacher's own rendering of the conversation."""

import pytest
import torch
from char_tokenizers import char_tokenizer, pair_tokenizer

from rkd_trl.crosstokenizer import (
    align_completion,
    credit_positions,
    credited_logprobs,
    score_across_tokenizers,
    student_text_ends,
    teacher_prompt_ids,
    teacher_turn_end_ids,
)
from rkd_trl.demo.synthetic import build_tokenizer, train_bpe_tokenizer

# Ids of the toy tokenizers (tests/char_tokenizers.py): characters a, b, space, then the pair tokenizer's merges.
A, B, SPACE = 0, 1, 2
AB, SPACE_A, BA = 3, 4, 5
CHAR_EOS, PAIR_EOS = 3, 7


# ----------------------------------------------------------------------------------------------- the rule, on numbers


def test_credit_positions_first_student_token_after_which_a_teacher_token_is_final():
    # Three student tokens; after them 0, 2 and 2 teacher tokens are final; 4 text tokens and 1 end-of-turn token.
    assert credit_positions([0, 2, 2], 4, 1) == [1, 1, 2, 2, 2]
    # Nothing final before the end: everything goes to the last student token.
    assert credit_positions([0, 0], 2, 0) == [1, 1]
    # A completion that is only the EOS.
    assert credit_positions([0], 0, 1) == [0]


def test_credited_logprobs_sum_into_their_positions_and_skip_masked_tokens():
    teacher_logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, 0.0, 0.0]])
    positions = torch.tensor([[0, 0, 2, 2], [1, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    credited = credited_logprobs(teacher_logprobs, positions, mask, 3)
    assert torch.equal(credited, torch.tensor([[-3.0, 0.0, -7.0], [0.0, -0.75, 0.0]]))


# ----------------------------------------------------------------------------------------------- the rule, on text


def test_teacher_token_spanning_two_student_tokens_is_credited_once_final():
    """Student writes a, b, space, a, EOS; the teacher reads `ab`, ` a`, EOS. `ab` spans the student's a and b, and is
    final once the next word has started (the space); ` a` and the teacher's EOS go to the student's EOS."""
    alignment = align_completion(char_tokenizer(), pair_tokenizer(), [A, B, SPACE, A, CHAR_EOS], True, [PAIR_EOS])
    assert alignment.text == "ab a"
    assert alignment.teacher_ids == [AB, SPACE_A, PAIR_EOS]
    assert alignment.positions == [2, 4, 4]
    assert alignment.stable and alignment.problem is None


def test_truncated_completion_scores_the_text_only():
    """Without EOS the teacher's end of turn is not scored, and what is not final is credited to the last token."""
    alignment = align_completion(char_tokenizer(), pair_tokenizer(), [A, B, SPACE, A], False, [PAIR_EOS])
    assert alignment.teacher_ids == [AB, SPACE_A]
    assert alignment.positions == [2, 3]


def test_student_token_spanning_several_teacher_tokens():
    """Student writes `ab`, ` a`, EOS; the teacher reads a, b, space, a, EOS. The word `ab` is final after ` a`."""
    alignment = align_completion(pair_tokenizer(), char_tokenizer(), [AB, SPACE_A, PAIR_EOS], True, [CHAR_EOS])
    assert alignment.teacher_ids == [A, B, SPACE, A, CHAR_EOS]
    assert alignment.positions == [1, 1, 2, 2, 2]


def test_runs_of_spaces_follow_the_teachers_pre_tokenization():
    """`a  ba`: byte-level pre-tokenization gives the words `a`, ` `, ` ba` — the first space stays a word of its own
    only once the `b` after the second one is written, so it is final at the `b`, not at the second space."""
    alignment = align_completion(
        char_tokenizer(), pair_tokenizer(), [A, SPACE, SPACE, B, A, CHAR_EOS], True, [PAIR_EOS]
    )
    assert alignment.teacher_ids == [A, SPACE, SPACE, BA, PAIR_EOS]
    assert alignment.positions == [1, 3, 5, 5, 5]


def test_eos_only_completion_is_the_teachers_end_of_turn():
    alignment = align_completion(char_tokenizer(), pair_tokenizer(), [CHAR_EOS], True, [PAIR_EOS])
    assert (alignment.text, alignment.teacher_ids, alignment.positions) == ("", [PAIR_EOS], [0])


def test_incomplete_multibyte_character_belongs_to_the_token_that_completes_it():
    student = train_bpe_tokenizer(["plain ascii text"], vocab_size=300)
    ids = student("é a", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4  # é is two byte tokens
    assert student_text_ends(student, ids) == ("é a", [0, 1, 2, 3])


def test_text_that_looks_like_a_teacher_special_token_is_scored_as_text():
    """The student writes the characters `<|end|>` (a plain word for it); the teacher reads them as characters, not
    as its end-of-turn token, which only the student's EOS brings."""
    student = build_tokenizer(["<|end|>", "x"])
    teacher = train_bpe_tokenizer(["hello world"], vocab_size=300)
    ids = student("x <|end|> x", add_special_tokens=False)["input_ids"]
    alignment = align_completion(student, teacher, ids, False, [teacher.eos_token_id])
    assert alignment.problem is None and alignment.text == "x <|end|> x"
    assert teacher.eos_token_id not in alignment.teacher_ids


def test_text_the_teacher_cannot_reproduce_is_not_scored():
    student = build_tokenizer(["abc"])  # the toy teacher has no `c`
    alignment = align_completion(student, pair_tokenizer(), student("abc", add_special_tokens=False)["input_ids"],
                                 False, [PAIR_EOS])  # fmt: skip
    assert alignment.problem is not None and "does not reproduce the text" in alignment.problem
    assert alignment.teacher_ids == [] and alignment.positions == []


def test_decoding_that_rewrites_earlier_text_is_not_scored():
    class CleaningDecoder:
        """Decodes like `clean_up_tokenization_spaces`: `a`, `a `, then `a.`, which rewrites the space."""

        def batch_decode(self, sequences, **kwargs):
            return ["".join(["a", " ", "."][token] for token in ids).replace(" .", ".") for ids in sequences]

    alignment = align_completion(CleaningDecoder(), pair_tokenizer(), [0, 1, 2], False, [PAIR_EOS])
    assert alignment.problem is not None and "not a prefix" in alignment.problem


# ----------------------------------------------------------------------------------------------- the teacher's turn


def test_turn_end_is_what_the_template_writes_after_the_answer_up_to_eos(teacher_bpe_tokenizer):
    prompt = [{"role": "user", "content": "q1"}]
    # TURN_TEMPLATE closes the answer with `<|end|>` then a newline; the newline comes after the EOS.
    eos = teacher_bpe_tokenizer.eos_token_id
    assert teacher_turn_end_ids(teacher_bpe_tokenizer, prompt, [eos]) == [eos]
    assert teacher_turn_end_ids(teacher_bpe_tokenizer, "plain prompt", [eos]) == [eos]


def test_template_without_eos_after_the_answer_is_rejected(teacher_bpe_tokenizer):
    tokenizer = train_bpe_tokenizer(["hello world"], vocab_size=300)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="none of the teacher's EOS"):
        teacher_turn_end_ids(tokenizer, [{"role": "user", "content": "q1"}], [tokenizer.eos_token_id])


# ----------------------------------------------------------------------------------------------- one teacher forward


def test_scores_equal_an_independent_forward_over_the_teachers_rendering(
    tokenizer, teacher_bpe_tokenizer, bpe_teacher
):
    """Credited log-probs sum, per completion, to the teacher's log-prob of the answer computed from its own chat
    template: the whole conversation rendered and tokenised at once, one forward, the answer's tokens (and its EOS when
    the student ended) summed."""
    prompts = [
        [{"role": "user", "content": "q1"}],
        [{"role": "user", "content": "q3"}],
        [{"role": "user", "content": "q0"}],
    ]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    words = [["a", "b", "c"], ["d"], ["f", "a"]]
    ended = [True, False, True]
    rows = [tokenizer.convert_tokens_to_ids(w) + ([eos] if e else []) for w, e in zip(words, ended)]
    width = max(map(len, rows))
    completion_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    completion_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    teacher_eos = teacher_bpe_tokenizer.eos_token_id
    scores = score_across_tokenizers(
        bpe_teacher, teacher_bpe_tokenizer, tokenizer, prompts, completion_ids, completion_mask,
        eos_token_ids=[eos], teacher_eos_token_ids=[teacher_eos], vocab_size=len(teacher_bpe_tokenizer),
    )  # fmt: skip
    assert scores.scored.all() and scores.stable.all()
    assert (scores.teacher_logprobs[completion_mask == 0] == 0).all()

    for row, (prompt, answer, done) in enumerate(zip(prompts, words, ended)):
        text = " ".join(answer)
        conversation = teacher_bpe_tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": text}], tokenize=False
        )
        prompt_text = teacher_bpe_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        answer_end = len(prompt_text) + len(text)
        scored_text = (
            conversation[: conversation.index("<|end|>", answer_end) + len("<|end|>")]
            if done
            else (conversation[:answer_end])
        )
        ids = teacher_bpe_tokenizer(scored_text, add_special_tokens=False)["input_ids"]
        num_prompt = len(teacher_bpe_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        assert ids[:num_prompt] == teacher_prompt_ids(teacher_bpe_tokenizer, [prompt])[0]
        with torch.no_grad():
            logprobs = torch.log_softmax(bpe_teacher(torch.tensor([ids])).logits[0, :-1].float(), -1)
        expected = logprobs[torch.arange(num_prompt - 1, len(ids) - 1), torch.tensor(ids[num_prompt:])].sum()
        assert torch.allclose(scores.teacher_logprobs[row].sum(), expected, atol=1e-4), row
        assert scores.teacher_tokens[row] == len(ids) - num_prompt
        assert scores.characters[row] == len(text)
