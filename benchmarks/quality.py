"""Quality benchmark: does our MiniLLM beat SFT, word-level KD, SeqKD and GKD on tasks where mode-seeking matters,
and do its ablations hurt the way the paper's ablations do?

Every method starts from the same SFT-initialised student and runs the same number of optimizer steps; its learning
rate is picked from a small sweep on a selection seed that is not reported. Everything runs on CPU, offline:

    PYTHONPATH=src python benchmarks/quality.py                 # full run (< 60 min on 2 cores), writes docs/
    PYTHONPATH=src python benchmarks/quality.py --smoke         # seconds-sized run of the same code, docs untouched

Baselines are TRL's own trainers: SFT and SeqKD = `trl.SFTTrainer` (on dataset answers / on teacher samples),
word-level KD = `GKDTrainer(lmbda=0, beta=0)` (forward KL on dataset answers), GKD = `GKDTrainer(lmbda=1)` with
`beta=0.5` (JSD) and `beta=1` (token-level reverse KL), on-policy.
"""

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
from datasets import Dataset
from transformers import PrinterCallback
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.demo.run import TASKS
from rkd_trl.demo.synthetic import cached_teacher, tiny_causal_lm, train_causal_lm
from rkd_trl.evaluation.metrics import (
    distinct_n,
    exposure_bias,
    forward_kl_estimate,
    next_token_calibration,
    reverse_kl_estimate,
    rouge_l,
    sample_with_scores,
    validity,
)

DEFAULT_RESULTS = "docs/benchmarks/quality_results.json"
METHODS = [
    "SFT",
    "KD (word-level)",
    "SeqKD",
    "GKD JSD β=0.5",
    "GKD token RKL β=1",
    "MiniLLM (ours)",
    "ours w/o length norm",
    "ours w/o teacher mix",
    "ours w/o single-step",
]
MINILLM_VARIANTS = {
    "MiniLLM (ours)": {},
    "ours w/o length norm": {"length_normalization": False},
    "ours w/o teacher mix": {"teacher_mix_alpha": 0.0},
    "ours w/o single-step": {"single_step_regularization": False},
}


@dataclass
class BenchmarkSettings:
    tasks: list[str] = field(default_factory=lambda: ["short", "chain"])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    selection_seed: int = 0
    learning_rates: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    steps: int = 200
    sft_steps: int | None = None  # None: the task's default (rkd_trl.demo.run.TASKS)
    batch_size: int = 16
    seqkd_samples_per_prompt: int = 32
    eval_samples_per_prompt: int = 32
    teacher_steps: dict[str, int] | None = None  # None: the demo's teacher


def trainer_arguments(settings, output_dir, learning_rate, seed):
    """Training arguments every method shares (same steps, batch, schedule and seed)."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": settings.batch_size,
        "max_steps": settings.steps,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "logging_steps": max(1, settings.steps // 4),
        "save_strategy": "no",
        "report_to": [],
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "disable_tqdm": True,
        "seed": seed,
        "dataloader_num_workers": 0,
    }


def prompt_completion(task, answers_by_prompt) -> Dataset:
    """SFTTrainer's conversational prompt/completion format: loss on the answer tokens only."""
    rows = [(p, a) for p, answers in answers_by_prompt.items() for a in answers]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _ in rows],
            "completion": [[{"role": "assistant", "content": a}] for _, a in rows],
        }
    )


def teacher_samples(teacher, tokenizer, task, samples_per_prompt, seed):
    torch.manual_seed(seed)
    prompts = [p for p in task.prompts for _ in range(samples_per_prompt)]
    _, answers = sample_with_scores(teacher, teacher, tokenizer, prompts, task.max_answer_tokens + 2)
    samples = {p: [] for p in task.prompts}
    for prompt, answer in zip(prompts, answers, strict=True):
        samples[prompt].append(answer.strip())
    return samples


def build_trainer(method, student, teacher, tokenizer, task, settings, learning_rate, seed, output_dir):
    common = trainer_arguments(settings, output_dir, learning_rate, seed)
    max_new_tokens = task.max_answer_tokens + 2
    if method in ("SFT", "SeqKD"):
        answers = (
            task.answers
            if method == "SFT"
            else teacher_samples(teacher, tokenizer, task, settings.seqkd_samples_per_prompt, seed)
        )
        args = SFTConfig(**common, completion_only_loss=True, max_length=64)
        return SFTTrainer(
            model=student, args=args, train_dataset=prompt_completion(task, answers), processing_class=tokenizer
        )
    if method.startswith(("KD", "GKD")):
        lmbda, beta = {"KD (word-level)": (0.0, 0.0), "GKD JSD β=0.5": (1.0, 0.5), "GKD token RKL β=1": (1.0, 1.0)}[
            method
        ]
        args = GKDConfig(
            **common, lmbda=lmbda, beta=beta, temperature=1.0, max_new_tokens=max_new_tokens, max_length=64
        )
        return GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=task.conversations(),
            processing_class=tokenizer,
        )
    # Prompts only: the reverse KL alone; whitened advantages, the default when these tasks were measured.
    variant = {"lm_loss_weight": 0.0, "whiten_advantages": True, **MINILLM_VARIANTS[method]}
    args = ReverseKLDistillConfig(**common, max_new_tokens=max_new_tokens, **variant)
    return ReverseKLDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=task.prompt_dataset(repeats=8),
        processing_class=tokenizer,
    )


def evaluate_student(student, teacher, tokenizer, task, samples_per_prompt, seed, full=True):
    """Every metric of a trained student; `full=False` only validity (for the learning-rate sweep)."""
    torch.manual_seed(seed)
    max_new_tokens = task.max_answer_tokens + 2
    prompts = [p for p in task.prompts for _ in range(samples_per_prompt)]
    _, answers = sample_with_scores(student, teacher, tokenizer, prompts, max_new_tokens)
    scores = {"validity": validity(task, prompts, answers)}
    if not full:
        return scores
    scores["rouge_l"] = rouge_l(answers, [task.references(p) for p in prompts])
    scores["distinct_2"] = distinct_n(answers, 2)
    scores["unique_valid_answers"] = len({(p, a.strip()) for p, a in zip(prompts, answers) if task.is_valid(p, a)})
    scores.update(reverse_kl_estimate(student, teacher, tokenizer, task.prompts, max_new_tokens, samples_per_prompt))
    scores.update(forward_kl_estimate(student, teacher, tokenizer, task.prompts, max_new_tokens, samples_per_prompt))
    scores["ece"] = next_token_calibration(
        student, teacher, tokenizer, task.prompts, max_new_tokens, samples_per_prompt
    )
    scores["exaccerr"] = exposure_bias(
        student, teacher, tokenizer, task.prompts, max_new_tokens, samples_per_prompt
    ).tolist()
    return scores


class Benchmark:
    def __init__(self, settings: BenchmarkSettings, work_dir: Path):
        self.settings = settings
        self.work_dir = work_dir
        self.setups = {}

    def setup(self, task_name):
        """Task, tokenizer, cached teacher and its scores (the reference row)."""
        if task_name not in self.setups:
            spec = TASKS[task_name]
            task = spec["make"](0)
            tokenizer = task.tokenizer()
            teacher_spec = dict(spec["teacher"])
            if self.settings.teacher_steps:
                teacher_spec["steps"] = self.settings.teacher_steps[task_name]
            teacher, _ = cached_teacher(task, tokenizer, self.work_dir / "teachers", **teacher_spec)
            self.setups[task_name] = (task, tokenizer, teacher, spec)
        return self.setups[task_name]

    def sft_student(self, task_name, seed):
        """The SFT-initialised student every method of this seed starts from (cached per task and seed)."""
        task, tokenizer, _, spec = self.setup(task_name)
        sft_steps = self.settings.sft_steps or spec["sft_steps"]
        size = f"{spec['student']['hidden_size']}x{spec['student']['num_layers']}"
        path = self.work_dir / f"student-{task_name}-{size}-{seed}-{sft_steps}.pt"
        student = tiny_causal_lm(tokenizer, **spec["student"], seed=seed)
        if path.exists():
            student.load_state_dict(torch.load(path))
        else:
            train_causal_lm(student, tokenizer, task.conversations(), steps=sft_steps, seed=seed)
            torch.save(student.state_dict(), path)
        return student.eval()

    def run(self, task_name, method, learning_rate, seed, full=True):
        task, tokenizer, teacher, _ = self.setup(task_name)
        student = self.sft_student(task_name, seed)
        started = time.perf_counter()
        torch.manual_seed(seed)
        trainer = build_trainer(
            method, student, teacher, tokenizer, task, self.settings, learning_rate, seed, str(self.work_dir / "run")
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        seconds = time.perf_counter() - started
        student = trainer.model.eval()
        scores = evaluate_student(
            student, teacher, tokenizer, task, self.settings.eval_samples_per_prompt, seed + 1000, full
        )
        return {"seconds": seconds, **scores}


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_benchmark(settings: BenchmarkSettings, work_dir: Path, log=print, checkpoint=None) -> dict:
    """Every task × method × seed; `checkpoint(results)` is called after each method (partial results)."""
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and the machine is shared
    hf_logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    benchmark = Benchmark(settings, work_dir)
    results = {"settings": asdict(settings), "tasks": {}}
    for task_name in settings.tasks:
        task, tokenizer, teacher, _ = benchmark.setup(task_name)
        teacher_scores = evaluate_student(
            teacher, teacher, tokenizer, task, settings.eval_samples_per_prompt, 1000, full=True
        )
        student_before = [
            evaluate_student(
                benchmark.sft_student(task_name, seed),
                teacher,
                tokenizer,
                task,
                settings.eval_samples_per_prompt,
                seed + 1000,
            )
            for seed in settings.seeds
        ]
        task_results = {"teacher": teacher_scores, "sft_init": student_before, "methods": {}}
        for method in METHODS:
            sweep = {}
            for learning_rate in settings.learning_rates:
                if len(settings.learning_rates) == 1:
                    break
                scores = benchmark.run(task_name, method, learning_rate, settings.selection_seed, full=False)
                sweep[learning_rate] = scores["validity"]
                log(f"[{task_name}] {method} sweep lr={learning_rate:g}: validity {scores['validity']:.3f}")
            best_lr = max(sweep, key=sweep.get) if sweep else settings.learning_rates[0]
            runs = []
            for seed in settings.seeds:
                scores = benchmark.run(task_name, method, best_lr, seed)
                log(
                    f"[{task_name}] {method} lr={best_lr:g} seed={seed}: validity {scores['validity']:.3f} "
                    f"rouge-L {scores['rouge_l']:.3f} rkl {scores['reverse_kl']:.2f} ({scores['seconds']:.0f}s)"
                )
                runs.append(scores)
            task_results["methods"][method] = {"learning_rate": best_lr, "sweep": sweep, "runs": runs}
            results["tasks"][task_name] = task_results
            if checkpoint:
                checkpoint(results)
        results["tasks"][task_name] = task_results
    return results


# ------------------------------------------------------------------------------------------------ report

COLUMNS = [
    ("validity", "validity ↑", "{:.3f}"),
    ("rouge_l", "Rouge-L ↑", "{:.3f}"),
    ("reverse_kl", "reverse KL ↓", "{:.2f}"),
    ("forward_kl", "forward KL ↓", "{:.2f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("unique_valid_answers", "distinct valid answers", "{:.1f}"),
    ("ece", "ECE ↓", "{:.3f}"),
    ("exaccerr_last", "ExAccErr(T) % ↓", "{:.0f}"),
    ("length", "length", "{:.2f}"),
]


def summary(runs, key):
    if key == "exaccerr_last":
        values = [run["exaccerr"][-1] for run in runs]
    else:
        values = [run[key] for run in runs]
    mean, std = mean_std(values)
    return mean, std


def table(task_results) -> str:
    header = "| model | lr | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]

    def row(name, lr, runs):
        cells = []
        for key, _, fmt in COLUMNS:
            mean, std = summary(runs, key)
            cells.append(f"{fmt.format(mean)} ± {fmt.format(std)}" if len(runs) > 1 else fmt.format(mean))
        lines.append(f"| {name} | {lr} | " + " | ".join(cells) + " |")

    row("teacher", "–", [task_results["teacher"]])
    lines[-1] = lines[-1].replace("nan", "–")  # the teacher's ExAccErr is 0/0
    row("student after SFT init", "–", task_results["sft_init"])
    for method, result in task_results["methods"].items():
        row(method, f"{result['learning_rate']:g}", result["runs"])
    return "\n".join(lines)


def paired_table(task_results, reference="MiniLLM (ours)") -> str:
    """Per-seed differences to `reference` (every method of a seed starts from the same student): mean ± std."""
    reference_runs = task_results["methods"][reference]["runs"]
    keys = [("validity", "{:+.3f}"), ("rouge_l", "{:+.3f}"), ("reverse_kl", "{:+.2f}")]
    lines = [
        f"| method | Δ validity vs {reference} | Δ Rouge-L | Δ reverse KL | seeds where {reference} has higher validity |",
        "|---|---|---|---|---|",
    ]
    for method, result in task_results["methods"].items():
        if method == reference:
            continue
        cells = []
        for key, fmt in keys:
            diffs = [run[key] - ref[key] for run, ref in zip(result["runs"], reference_runs, strict=True)]
            mean, std = mean_std(diffs)
            cells.append(f"{fmt.format(mean)} ± {std:.3f}")
        wins = sum(ref["validity"] > run["validity"] for run, ref in zip(result["runs"], reference_runs))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {wins}/{len(reference_runs)} |")
    return "\n".join(lines)


def sweep_table(task_results, learning_rates) -> str:
    """Validity of each method at each learning rate of the sweep; "–" for a rate it was not run at. A `sweep` maps
    learning rates to validity: numbers in a run, strings once read back from the results JSON, so both are compared
    as numbers."""
    lines = [
        "| method | " + " | ".join(f"lr {lr:g}" for lr in learning_rates) + " |",
        "|---|" + "---|" * len(learning_rates),
    ]
    for method, result in task_results["methods"].items():
        validity = {float(lr): value for lr, value in result["sweep"].items()}
        cells = [f"{validity[float(lr)]:.3f}" if float(lr) in validity else "–" for lr in learning_rates]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(results, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    tasks = list(results["tasks"])
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for axis, task_name in zip(axes[0], tasks):
        methods = results["tasks"][task_name]["methods"]
        means = [summary(m["runs"], "validity") for m in methods.values()]
        axis.barh(list(methods), [m for m, _ in means], xerr=[s for _, s in means])
        axis.axvline(results["tasks"][task_name]["teacher"]["validity"], color="k", linestyle="--", label="teacher")
        axis.axvline(
            summary(results["tasks"][task_name]["sft_init"], "validity")[0],
            color="gray",
            linestyle=":",
            label="SFT init",
        )
        axis.invert_yaxis()
        axis.set_xlabel("exact validity of sampled answers")
        axis.set_title(f"task: {task_name}")
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out_dir / "validity.png", dpi=80)
    plt.close(figure)
    names.append("validity.png")

    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for axis, task_name in zip(axes[0], tasks):
        for method, result in results["tasks"][task_name]["methods"].items():
            curves = torch.tensor([run["exaccerr"] for run in result["runs"]])
            axis.plot(range(1, curves.size(1) + 1), curves.mean(0), marker=".", label=method)
        axis.set_xlabel("generation length l")
        axis.set_ylabel("ExAccErr(l) %")
        axis.set_title(f"exposure bias, task: {task_name}")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / "exposure_bias.png", dpi=80)
    plt.close(figure)
    names.append("exposure_bias.png")
    return names


def task_descriptions(task_names) -> str:
    lines = []
    for name in task_names:
        spec, task = TASKS[name], TASKS[name]["make"](0)
        teacher, student = spec["teacher"], spec["student"]
        lines.append(
            f"`{name}`: {len(task.prompts)} prompts × {len(task.references(task.prompts[0]))} valid answers of "
            f"{task.max_answer_tokens} letters; teacher {teacher['hidden_size']}-dim × {teacher['num_layers']} layers "
            f"({teacher['steps']} steps); student {student['hidden_size']}-dim × {student['num_layers']} layer "
            f"({spec['sft_steps']} SFT steps)"
        )
    return "Tasks (`rkd_trl.demo.run.TASKS`): " + "; ".join(lines) + "."


def write_report(results, command, minutes, docs_path: Path, reading: str):
    settings = results["settings"]
    plot_dir = docs_path.parent / "benchmarks"
    plot_dir.mkdir(parents=True, exist_ok=True)
    images = plots(results, plot_dir)
    parts = [
        "# Quality benchmark on synthetic tasks",
        "",
        (
            "Generated by `benchmarks/quality.py` (do not edit by hand). The reading at the end is written from this run "
            "in `benchmarks/quality_reading.md`; `--report-only --reading benchmarks/quality_reading.md` rewrites this "
            "page from the saved results (`docs/benchmarks/quality_results.json`)."
        ),
        "",
        f"Command: `{command}` — wall time {minutes:.1f} min on a shared 2-core CPU.",
        "",
        (
            f"Seeds {settings['seeds']} (mean ± std over them); learning rate per method picked by validity on seed "
            f"{settings['selection_seed']} (not reported) from {settings['learning_rates']}. Every method: "
            f"{settings['steps']} optimizer steps, batch {settings['batch_size']}, from the same student after "
            f"{settings['sft_steps'] or 'the task’s'} SFT steps. Evaluation: {settings['eval_samples_per_prompt']} "
            "samples per prompt."
        ),
        "",
        task_descriptions(settings["tasks"]),
        "",
        (
            "Metrics: validity = share of sampled answers that are exactly one of the prompt's valid answers; Rouge-L "
            "(`evaluate` + `rouge_score`) against the best valid answer; reverse KL = Monte-Carlo KL(q‖p) over whole "
            "student samples, forward KL = KL(p‖q) over whole teacher samples (nats); distinct-2 over sampled answers; "
            "distinct valid answers = number of different valid (prompt, answer) pairs among the samples (mode coverage); "
            "ECE = calibration of the student's top-1 next token on teacher samples (10 bins); ExAccErr(T) = excess "
            "accumulated error at the longest generation length (MiniLLM §3.3), length = tokens per answer incl. EOS."
        ),
        "",
    ]
    for task_name, task_results in results["tasks"].items():
        parts += [
            f"## Task `{task_name}`",
            "",
            table(task_results),
            "",
            "Paired by seed (method − ours, same SFT-initialised student):",
            "",
            paired_table(task_results),
            "",
            "Learning-rate sweep (validity on the selection seed):",
            "",
        ]
        parts += [sweep_table(task_results, settings["learning_rates"]), ""]
    parts += (
        ["## Plots", ""] + [f"![{name}](benchmarks/{name})" for name in images] + ["", "## Reading", "", reading, ""]
    )
    docs_path.write_text("\n".join(parts))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run of the same code (a test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--tasks", nargs="+", default=["short", "chain"], choices=list(TASKS))
    parser.add_argument("--work-dir", default="benchmarks/.cache", help="teacher and SFT-student cache, run scratch")
    parser.add_argument(
        "--results",
        default=None,
        help="results JSON (default: docs/benchmarks/quality_results.json; --smoke: work dir)",
    )
    parser.add_argument(
        "--docs", default=None, help="report to write (default: docs/benchmarks-synthetic.md; --smoke: none)"
    )
    parser.add_argument("--reading", default="", help="file with the written reading of the results, for the report")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from --results, no training")
    options = parser.parse_args(argv)
    # A smoke run never overwrites the committed results and report unless asked to.
    if options.results is None:
        options.results = str(Path(options.work_dir) / "smoke_results.json") if options.smoke else DEFAULT_RESULTS
    if options.docs is None:
        options.docs = "" if options.smoke else "docs/benchmarks-synthetic.md"
    Path(options.work_dir).mkdir(parents=True, exist_ok=True)
    settings = BenchmarkSettings(
        tasks=options.tasks, seeds=options.seeds, steps=options.steps, learning_rates=options.learning_rates
    )
    if options.smoke:
        settings = BenchmarkSettings(
            tasks=["short"],
            seeds=[1],
            learning_rates=[3e-3],
            steps=2,
            sft_steps=2,
            batch_size=4,
            seqkd_samples_per_prompt=2,
            eval_samples_per_prompt=2,
            teacher_steps={"short": 2},
        )
    if options.report_only:
        results = json.loads(Path(options.results).read_text())
    else:
        started = time.perf_counter()

        def checkpoint(partial):
            Path(options.results).write_text(json.dumps(partial, indent=1))

        results = run_benchmark(settings, Path(options.work_dir), checkpoint=checkpoint)
        results["minutes"] = (time.perf_counter() - started) / 60
        results["command"] = "PYTHONPATH=src python benchmarks/quality.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        Path(options.results).write_text(json.dumps(results, indent=1))
        print(f"results: {options.results} ({results['minutes']:.1f} min)")
    if options.docs:
        reading = Path(options.reading).read_text() if options.reading else "(no reading written yet)"
        write_report(results, results["command"].strip(), results["minutes"], Path(options.docs), reading)
        print(f"report: {options.docs}")
    return results


if __name__ == "__main__":
    main()
