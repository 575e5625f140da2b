"""`rkd-trl demo`: reverse-KL distillation of a tiny student on a synthetic multi-answer task, on CPU, offline.

Trains (or loads from its cache) a teacher on a task where every prompt has several valid answers, SFT-initialises a
smaller student, distils it with `ReverseKLDistillTrainer`, and reports validity, Rouge-L, reverse KL and length
before and after, with a plot and the trainer's model card in the output folder.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .metrics import reverse_kl_estimate, rouge_l, sample_with_scores, validity
from .synthetic import ChainTask, MultiAnswerTask, cached_teacher, tiny_causal_lm, train_causal_lm


@dataclass
class DemoSettings:
    output_dir: str = "rkd-trl-demo"
    task: str = "short"  # "short": MultiAnswerTask, "chain": ChainTask
    steps: int = 300
    sft_steps: int | None = None  # None: the task's default (TASKS)
    learning_rate: float = 3e-3
    teacher_mix_alpha: float = 0.2
    samples_per_prompt: int = 16
    seed: int = 0


# Teacher and student sizes per task. The teachers reach ~95% valid answers; the students are too small to learn
# every answer in the SFT budget (the short-task student tops out near 60% even after 1000 SFT steps).
TASKS = {
    "short": {
        "make": lambda seed: MultiAnswerTask(
            num_prompts=24, answers_per_prompt=4, answer_length=3, num_letters=8, seed=seed
        ),
        "teacher": {"hidden_size": 64, "num_layers": 2, "steps": 1500},
        "student": {"hidden_size": 8, "num_layers": 1, "num_heads": 2},
        "sft_steps": 600,
    },
    "varlen": {
        "make": lambda seed: MultiAnswerTask(
            num_prompts=24, answers_per_prompt=4, answer_length=6, min_answer_length=1, num_letters=8, seed=seed
        ),
        "teacher": {"hidden_size": 64, "num_layers": 2, "steps": 1500},
        "student": {"hidden_size": 8, "num_layers": 1, "num_heads": 2},
        "sft_steps": 600,
    },
    "chain": {
        "make": lambda seed: ChainTask(
            num_prompts=6, num_steps=4, branches=2, segment_length=2, num_letters=6, seed=seed
        ),
        "teacher": {"hidden_size": 64, "num_layers": 2, "steps": 1500},
        "student": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
        "sft_steps": 800,
    },
}


def evaluate_model(model, teacher, tokenizer, task, samples_per_prompt, seed):
    """Validity, Rouge-L to the valid answers, Monte-Carlo reverse KL to the teacher and length of sampled answers."""
    torch.manual_seed(seed)
    max_new_tokens = task.max_answer_tokens + 2
    prompts = [p for p in task.prompts for _ in range(samples_per_prompt)]
    _, answers = sample_with_scores(model, teacher, tokenizer, prompts, max_new_tokens)
    kl = reverse_kl_estimate(model, teacher, tokenizer, task.prompts, max_new_tokens, samples_per_prompt)
    return {
        "validity": validity(task, prompts, answers),
        "rouge_l": rouge_l(answers, [task.references(p) for p in prompts]),
        **kl,
    }


def print_table(rows: dict[str, dict]):
    print(f"\n{'model':<16}{'validity':>10}{'Rouge-L':>10}{'reverse KL':>16}{'length':>9}")
    for name, scores in rows.items():
        kl = f"{scores['reverse_kl']:.2f} ± {scores['reverse_kl_stderr']:.2f}"
        print(f"{name:<16}{scores['validity']:>10.1%}{scores['rouge_l']:>10.3f}{kl:>16}{scores['length']:>9.2f}")
    print("\nvalidity: share of sampled answers that are one of the prompt's valid answers (exact check)")
    print("Rouge-L: F-measure against the best valid answer; reverse KL: Monte-Carlo KL(student || teacher), nats;")
    print("length: tokens per answer, EOS included")


def plot(rows: dict[str, dict], log_history: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (scores_axis, curve_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(rows)
    positions = torch.arange(len(names)).tolist()
    scores_axis.bar([x - 0.2 for x in positions], [rows[n]["validity"] for n in names], 0.4, label="validity")
    scores_axis.bar([x + 0.2 for x in positions], [rows[n]["rouge_l"] for n in names], 0.4, label="Rouge-L")
    scores_axis.set_xticks(positions, names)
    scores_axis.set_ylim(0, 1)
    scores_axis.legend(loc="lower right")
    scores_axis.set_title("answers sampled from each model")
    steps = [entry["step"] for entry in log_history if "minillm/reverse_kl" in entry]
    values = [entry["minillm/reverse_kl"] for entry in log_history if "minillm/reverse_kl" in entry]
    curve_axis.plot(steps, values, marker="o")
    curve_axis.set_xlabel("optimizer step")
    curve_axis.set_ylabel("reverse KL on training rollouts (nats)")
    curve_axis.set_title("distillation")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_demo(settings: DemoSettings) -> dict[str, dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from . import ReverseKLDistillConfig, ReverseKLDistillTrainer

    hf_logging.set_verbosity_error()
    # Models this small gain nothing from intra-op threads, and extra threads thrash on a busy machine.
    torch.set_num_threads(1)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    spec = TASKS[settings.task]
    task = spec["make"](settings.seed)
    tokenizer = task.tokenizer()

    print(f"teacher: {spec['teacher']['num_layers']}-layer model trained from scratch on the task (cached) ...")
    teacher, teacher_dir = cached_teacher(task, tokenizer, output, **spec["teacher"], seed=settings.seed)
    print(f"teacher: {teacher_dir}")

    print("student: 1-layer model, SFT-initialised on the task (as in the paper) ...")
    student = tiny_causal_lm(tokenizer, **spec["student"], seed=settings.seed + 1)
    train_causal_lm(
        student,
        tokenizer,
        task.conversations(),
        steps=settings.sft_steps or spec["sft_steps"],
        seed=settings.seed,
        progress="SFT",
    )

    def measure(model):
        return evaluate_model(model, teacher, tokenizer, task, settings.samples_per_prompt, settings.seed)

    rows = {"teacher": measure(teacher), "student before": measure(student)}
    args = ReverseKLDistillConfig(
        output_dir=str(output / "student"),
        max_new_tokens=task.max_answer_tokens + 2,
        per_device_train_batch_size=16,
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        teacher_mix_alpha=settings.teacher_mix_alpha,
        logging_steps=max(1, settings.steps // 20),
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        seed=settings.seed,
    )
    trainer = ReverseKLDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=task.prompt_dataset(repeats=50),
        processing_class=tokenizer,
    )
    print(f"distilling for {settings.steps} steps (teacher_mix_alpha={settings.teacher_mix_alpha}) ...")
    trainer.train()
    rows["student after"] = measure(student.eval())
    trainer.save_model()
    trainer.create_model_card(model_name="rkd-trl-demo-student")

    print_table(rows)
    plot(rows, trainer.state.log_history, output / "demo.png")
    (output / "demo_metrics.json").write_text(json.dumps(rows, indent=2))
    print(f"\nstudent and model card (README.md): {args.output_dir}; plot: {output / 'demo.png'}")
    return rows
