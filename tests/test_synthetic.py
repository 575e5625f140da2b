"""Synthetic tasks (exact validity, answer structure) and the teacher cache."""

from collections import defaultdict

import torch

from rkd_trl.demo.synthetic import ChainTask, MultiAnswerTask, cached_teacher


def test_multi_answer_task_answers_and_checker():
    task = MultiAnswerTask(num_prompts=5, answers_per_prompt=3, answer_length=4, num_letters=5, seed=1)
    assert task.prompts == [f"q{i}" for i in range(5)]
    for prompt in task.prompts:
        answers = task.references(prompt)
        assert len(set(answers)) == 3
        assert all(len(a.split()) == 4 and set(a.split()) <= set(task.letters) for a in answers)
        assert task.is_valid(prompt, f" {answers[0]} ")
    assert task.max_answer_tokens == 4
    assert not task.is_valid("q0", "zz")


def test_multi_answer_task_with_variable_lengths():
    task = MultiAnswerTask(num_prompts=30, answers_per_prompt=4, answer_length=6, min_answer_length=1, seed=0)
    lengths = [len(answer.split()) for answers in task.answers.values() for answer in answers]
    assert min(lengths) >= 1 and max(lengths) <= 6
    assert len(set(lengths)) >= 4  # lengths really vary
    assert all(len(answers) == 4 for answers in task.answers.values())
    fixed = MultiAnswerTask(num_prompts=30, answers_per_prompt=4, answer_length=6, seed=0)
    assert {len(answer.split()) for answers in fixed.answers.values() for answer in answers} == {6}


def test_chain_task_is_a_tree_of_segments():
    task = ChainTask(num_prompts=3, num_steps=3, branches=2, segment_length=2, num_letters=5, seed=2)
    for prompt in task.prompts:
        answers = task.references(prompt)
        assert len(set(answers)) == 2**3
        assert all(len(a.split()) == 6 for a in answers)
        # After any prefix of whole segments exactly `branches` next segments are valid.
        for step in range(3):
            next_segments = defaultdict(set)
            for answer in answers:
                words = answer.split()
                next_segments[tuple(words[: 2 * step])].add(tuple(words[2 * step : 2 * step + 2]))
            assert all(len(options) == 2 for options in next_segments.values())
    assert task.is_valid("c0", task.references("c0")[0])
    assert not task.is_valid("c0", task.references("c0")[0] + " a")


def test_conversations_and_prompt_dataset_formats():
    task = ChainTask(num_prompts=2, num_steps=2, branches=2, seed=0)
    conversations = task.conversations(repeats=2)
    assert len(conversations) == 2 * 2 * 4
    first = conversations[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert task.is_valid(first[0]["content"], first[1]["content"])
    assert task.prompt_dataset(repeats=3)["prompt"][0] == [{"role": "user", "content": "c0"}]


def test_cached_teacher_trains_once_per_settings(tmp_path):
    task = MultiAnswerTask(num_prompts=2, answers_per_prompt=2, answer_length=2, num_letters=3)
    tokenizer = task.tokenizer()
    teacher, directory = cached_teacher(task, tokenizer, tmp_path, hidden_size=8, num_layers=1, steps=2)
    again, same_directory = cached_teacher(task, tokenizer, tmp_path, hidden_size=8, num_layers=1, steps=2)
    assert same_directory == directory
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor)
    _, other_directory = cached_teacher(task, tokenizer, tmp_path, hidden_size=8, num_layers=1, steps=3)
    assert other_directory != directory
    other_task = MultiAnswerTask(num_prompts=2, answers_per_prompt=2, answer_length=2, num_letters=3, seed=5)
    _, other_task_directory = cached_teacher(other_task, tokenizer, tmp_path, hidden_size=8, num_layers=1, steps=2)
    assert other_task_directory != directory
