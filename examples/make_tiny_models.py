"""Write a tiny teacher, a tiny student and a dataset to a directory, so every command of the docs runs on a CPU
in seconds with nothing downloaded:

    python examples/make_tiny_models.py tiny

    tiny/teacher/        2-layer Llama trained on a synthetic task where each prompt has several valid answers
    tiny/student/        1-layer Llama, briefly SFT-initialised on the same task (as the paper initialises students)
    tiny/data/train.jsonl, tiny/data/test.jsonl   conversational `prompt` / `completion` rows

`examples/recipes/tiny.yaml` trains on it. Real runs replace these paths with hub ids or your own checkpoints.
"""

import argparse
import json
from pathlib import Path

from rkd_trl.cli import quiet_library_notices
from rkd_trl.demo.synthetic import MultiAnswerTask, tiny_causal_lm, train_causal_lm


def write_jsonl(path: Path, dataset) -> None:
    """`messages` rows (user turn + assistant answer) as conversational `prompt` / `completion` rows."""
    with path.open("w") as file:
        for messages in dataset["messages"]:
            file.write(json.dumps({"prompt": messages[:-1], "completion": messages[-1:]}) + "\n")


def make_tiny_models(output_dir: str, teacher_steps: int = 300, student_sft_steps: int = 100, seed: int = 0) -> Path:
    output = Path(output_dir)
    task = MultiAnswerTask(num_prompts=12, answers_per_prompt=3, answer_length=3, num_letters=8, seed=seed)
    tokenizer = task.tokenizer()
    models = {
        "teacher": (tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, seed=seed), teacher_steps),
        "student": (tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=seed + 1),
                    student_sft_steps),
    }  # fmt: skip
    for name, (model, steps) in models.items():
        train_causal_lm(model, tokenizer, task.conversations(), steps=steps, lr=3e-3, seed=seed)
        model.save_pretrained(output / name)
        tokenizer.save_pretrained(output / name)
    (output / "data").mkdir(parents=True, exist_ok=True)
    write_jsonl(output / "data" / "train.jsonl", task.conversations(repeats=20))
    write_jsonl(output / "data" / "test.jsonl", task.conversations())
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", nargs="?", default="tiny")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-sft-steps", type=int, default=100)
    options = parser.parse_args()
    quiet_library_notices()
    print(f"written to {make_tiny_models(options.output_dir, options.teacher_steps, options.student_sft_steps)}/")
