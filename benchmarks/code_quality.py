"""Code benchmark: a Qwen2.5-Coder student distilled by each method, judged by pass@1 (greedy) on HumanEval.

Every method starts from the same student, trains the same optimizer steps on the same prompts (the project's coding
instructions, `rkd_trl.evaluation.code_eval.load_code_instructions`) with the same batch and learning rate, and is judged by the
evaluation of `rkd_trl.evaluation.code_eval` (docs/benchmarks-code.md) on HumanEval (`--eval humaneval`, the held-out test) or on
the project's dev problems (`--eval dev`, for tuning); the teacher and the student before are judged once.

Methods: ours (ReverseKLDistillTrainer, its defaults: the LM loss on the teacher's greedy answers), ours without the LM
loss (`lm_loss_weight=0`: the same work as trl.DistillationTrainer plus teacher mixing), trl.DistillationTrainer
(β = 1, its default), GKD JSD (trl.experimental.gkd, β = 0.5, λ = 0.5) and SeqKD (SFT on the teacher's greedy answers).

Precision (`--precision`, default `auto`): bf16 where the machine computes it natively (a GPU, or a CPU with
`avx512_bf16` / AMX: `rkd_trl.config.cpu_computes_bf16_natively`), else float32, as a user of the machine would train.
Under bf16 the teacher is loaded in bf16, the student keeps float32 weights and trains under bf16 autocast
(`bf16=True`), and every model is judged in bf16 (a bf16 copy of the trained student).

Pairs (`--pair`):
- `headline`: Qwen2.5-Coder-1.5B-Instruct teaching Qwen2.5-Coder-0.5B-Instruct;
- `cpu`: a pair that fits a 2-core CPU and keeps the ground truth: the 0.5B as teacher, and as student the 0.5B
  with some of its layers (`rkd_trl.demo.models.keep_layers`), SFT-initialised on the teacher's answers.

Runs are appended to the results JSON as they finish, so an interrupted grid resumes where it stopped:

    PYTHONPATH=src python benchmarks/code_quality.py --pair headline            # the grid (results: `results_name`)
    PYTHONPATH=src python benchmarks/code_quality.py --pair cpu --eval dev      # the CPU pair, on the dev problems
    PYTHONPATH=src python benchmarks/code_quality.py --methods                  # the teacher and the student before
    PYTHONPATH=src python benchmarks/code_quality.py --smoke                    # the same code on tiny settings
"""

import argparse
import copy
import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "docs" / "benchmarks"
# trl.DistillationTrainer's default β is 1 (reverse KL) in trl 1.16: its default and β = 1 are one run.
METHODS = ["ours", "ours w/o LM loss", "DistillationTrainer β=1", "GKD JSD", "SeqKD"]
PAIRS = {
    "headline": ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"),
    "cpu": ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct"),
}


@dataclass
class Settings:
    pair: str = "headline"
    student_layers: list[int] | None = None  # `cpu`: the layers the student keeps (None: the whole student model)
    sft_steps: int = 0  # `cpu`: SFT steps of the pruned student on the teacher's answers
    sft_learning_rate: float = 1e-4
    # First n instructions (None: all 290). 120: the 30 steps of 4 see each once, and the 1.5B writes 120 answers
    # (SeqKD's data, the LM loss's, GKD's) before the first run instead of 290.
    train_prompts: int | None = 120
    answer_max_new_tokens: int = 512  # the teacher's greedy answers (SeqKD data, the LM loss, GKD's dataset); at 256 only
    # 20% of the 0.5B's answers ended (it explains its code at length), and only answers that end are trained on
    steps: int = 30
    batch_size: int = 4
    max_new_tokens: int = 128
    learning_rate: float = 5e-6
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    eval: str = "humaneval"
    eval_problems: int | None = None  # first n problems (None: all)
    eval_max_new_tokens: int = 512
    eval_batch_size: int = 8  # prompts of similar length batched (`code_eval.generate_code`)
    precision: str = "auto"  # "bf16", "fp32", or "auto": bf16 where the machine computes it natively


# The 0.5B without 8 of its middle layers (12-19): pass@1 0 on the dev problems before SFT (so do the students that
# keep 12 or 18 layers), against 31.6 for the 0.5B itself (bf16, measured before choosing).
# 60 SFT steps of 4: about one epoch over the teacher's answers that end (a step of 4 answers of ~330 tokens takes
# about half a minute on the 2-core CPU).
CPU = Settings(pair="cpu", student_layers=[*range(12), 20, 21, 22, 23], sft_steps=60, learning_rate=5e-5,
               train_prompts=None)  # fmt: skip
SMOKE = Settings(pair="cpu", student_layers=[0, 23], sft_steps=1, train_prompts=4, answer_max_new_tokens=16, steps=1,
                 batch_size=2, max_new_tokens=8, seeds=[1], methods=["ours", "SeqKD"], eval="dev", eval_problems=2,
                 eval_max_new_tokens=16)  # fmt: skip


def resolve_precision(precision: str) -> str:
    """`bf16` or `fp32`: `auto` is bf16 where the machine computes it natively (a GPU, or a CPU with bf16
    instructions), as `ReverseKLDistillConfig` resolves an unset `bf16`."""
    import torch

    from rkd_trl.config import cpu_computes_bf16_natively

    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() or cpu_computes_bf16_natively() else "fp32"


class Benchmark:
    def __init__(self, settings: Settings, work_dir: Path):
        import torch

        from rkd_trl.demo.models import load_chunked_model
        from rkd_trl.evaluation.code_eval import load_code_instructions

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        self.settings, self.work_dir = settings, work_dir
        self.bf16 = settings.precision == "bf16"
        self.on_cpu = not torch.cuda.is_available()
        self.device = "cpu" if self.on_cpu else "cuda"
        teacher_name, self.student_name = PAIRS[settings.pair]
        self.teacher, self.tokenizer = load_chunked_model(teacher_name, dtype=self.dtype)
        self.teacher.to(self.device)
        self.prompts = load_code_instructions()[: settings.train_prompts]

    @functools.cached_property
    def answers(self) -> list[str]:
        """The teacher's greedy answers to the training instructions, generated at first use (the pruned student's
        SFT, the methods' data) and cached under the work dir: judging the teacher and the student before needs none."""
        from rkd_trl.demo.instructions import cached_teacher_answers

        return cached_teacher_answers(self.teacher, self.tokenizer, self.prompts, self.settings.answer_max_new_tokens,
                                      self.work_dir / "cache", batch_size=8)  # fmt: skip

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    def student(self):
        """The student every method starts from (float32 weights, trained under autocast when bf16): the 0.5B
        itself, or (`student_layers`) its pruned, SFT-initialised copy, cached under the work dir."""
        from transformers import AutoModelForCausalLM

        from rkd_trl.demo.instructions import sft_student
        from rkd_trl.demo.models import keep_layers, load_chunked_model

        s = self.settings
        if s.student_layers is None:
            return load_chunked_model(self.student_name)[0]
        name = f"sft-{'-'.join(map(str, s.student_layers))}-{s.sft_steps}-{len(self.prompts)}-{s.precision}"
        path = self.work_dir / "cache" / name
        if (path / "config.json").exists():
            return AutoModelForCausalLM.from_pretrained(path).eval()
        student = keep_layers(load_chunked_model(self.student_name)[0], s.student_layers)
        sft_student(student, self.tokenizer, self.prompts, [self.answers], self.work_dir / "sft-run",
                    max_steps=s.sft_steps, learning_rate=s.sft_learning_rate, per_device_train_batch_size=4,
                    lr_scheduler_type="cosine", warmup_steps=0, max_length=512, use_cpu=self.on_cpu, bf16=self.bf16,
                    seed=0)  # fmt: skip
        student.save_pretrained(path)
        return student.eval()

    def evaluate(self, model) -> dict:
        import statistics

        from rkd_trl.evaluation import code_eval
        from rkd_trl.evaluation.metrics import bootstrap_interval

        s = self.settings
        problems = code_eval.humaneval_problems() if s.eval == "humaneval" else code_eval.dev_problems()
        problems = dict(list(problems.items())[: s.eval_problems])
        problem_file = code_eval.humaneval_file() if s.eval == "humaneval" else code_eval.DEV_PROBLEMS
        started = time.perf_counter()
        # Judged as it would be served: in the precision of the run (a bf16 copy of a float32 student under bf16).
        judged = model if next(model.parameters()).dtype == self.dtype else copy.deepcopy(model).to(self.dtype)
        answers = code_eval.generate_code(judged.to(self.device).eval(), self.tokenizer, problems,
                                          s.eval_max_new_tokens, s.eval_batch_size)  # fmt: skip
        results = code_eval.execute(answers.task_ids, answers.completions, problem_file)
        passed = [float(r["passed"]) for r in results]
        low, high = bootstrap_interval(lambda idx: statistics.fmean(passed[i] for i in idx), len(passed))
        return {"pass@1": code_eval.pass_at_1([r["passed"] for r in results]), "interval": [low, high],
                "ended": statistics.fmean(answers.ended), "eval_seconds": time.perf_counter() - started,
                "problems": [{**r, "reply": reply, "tokens": len(ids)} for r, reply, ids in
                             zip(results, answers.replies, answers.token_ids, strict=True)]}  # fmt: skip

    def trainer(self, method: str, student, seed: int):
        from datasets import Dataset

        from rkd_trl.demo.instructions import conversations, user_turns

        s = self.settings
        common = dict(
            output_dir=str(self.work_dir / "run"), per_device_train_batch_size=s.batch_size, max_steps=s.steps,
            learning_rate=s.learning_rate, lr_scheduler_type="linear", warmup_steps=0, logging_steps=5,
            save_strategy="no", report_to=[], bf16=self.bf16, use_cpu=self.on_cpu, activation_checkpointing=False,
            disable_tqdm=True, seed=seed, dataloader_num_workers=0,
        )  # fmt: skip
        with_answers = conversations(self.prompts, self.answers)
        if method == "SeqKD":
            from trl import SFTConfig, SFTTrainer

            data = with_answers.map(lambda row: {"prompt": row["messages"][:1], "completion": row["messages"][1:]},
                                    remove_columns=["messages"])  # fmt: skip
            return SFTTrainer(model=student, args=SFTConfig(**common, max_length=512), train_dataset=data,
                              processing_class=self.tokenizer)  # fmt: skip
        if method == "GKD JSD":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(**common, lmbda=0.5, beta=0.5, temperature=1.0, max_new_tokens=s.max_new_tokens,
                             max_length=512)  # fmt: skip
            return GKDTrainer(model=student, teacher_model=self.teacher, args=args, train_dataset=with_answers,
                              processing_class=self.tokenizer)  # fmt: skip
        if method == "DistillationTrainer β=1":
            from trl import DistillationConfig, DistillationTrainer

            args = DistillationConfig(**common, beta=1.0, max_completion_length=s.max_new_tokens)
            prompts_only = Dataset.from_dict({"prompt": user_turns(self.prompts)})
            return DistillationTrainer(model=student, teacher_model=self.teacher, args=args, train_dataset=prompts_only,
                                       processing_class=self.tokenizer)  # fmt: skip
        from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer

        lm_loss = {"lm_loss_weight": 0.0} if method == "ours w/o LM loss" else {}  # the default: on, with answers
        args = ReverseKLDistillConfig(**common, max_new_tokens=s.max_new_tokens, **lm_loss)
        return ReverseKLDistillTrainer(model=student, teacher_model=self.teacher, args=args,
                                       train_dataset=with_answers, processing_class=self.tokenizer)  # fmt: skip

    def run(self, method: str, seed: int) -> dict:
        import torch
        from transformers import PrinterCallback

        torch.manual_seed(seed)
        trainer = self.trainer(method, self.student(), seed)
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        return {"method": method, "seed": seed, "train_seconds": seconds, "seconds_per_step": seconds / self.settings.steps,
                "threads": torch.get_num_threads(), **self.evaluate(trainer.model.eval())}  # fmt: skip


def results_name(settings: Settings) -> str:
    """The results file of a grid: one per pair, evaluation set, learning rate and precision."""
    return f"code_quality-{settings.pair}-{settings.eval}-lr{settings.learning_rate:g}-{settings.precision}.json"


EVALUATION_KEYS = ("eval", "eval_problems", "eval_max_new_tokens", "eval_batch_size", "precision")


def judged_elsewhere(settings: Settings, folder: Path) -> dict | None:
    """The evaluation of the student before, when it is a whole model (no pruning) that another grid's results in
    `folder` judged as its teacher with the same evaluation settings and precision: greedy decoding makes it the same
    figure, so it is taken from there (marked with `judged_in`) rather than paid twice (18 min for the 0.5B on
    HumanEval on 2 cores)."""
    if settings.student_layers is not None:
        return None
    student = PAIRS[settings.pair][1]
    for path in sorted(folder.glob("code_quality-*.json")):
        other = json.loads(path.read_text())
        same = all(other.get("settings", {}).get(key) == getattr(settings, key) for key in EVALUATION_KEYS)
        if same and PAIRS.get(other["settings"].get("pair"), ("",))[0] == student and "teacher" in other:
            return {**other["teacher"], "judged_in": f"{path.name}: teacher"}
    return None


def run_grid(settings: Settings, work_dir: Path, results_path: Path, log=print) -> dict:
    """Every missing (method, seed) of `settings`, appended to `results_path` as it finishes."""
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    shared = {k: v for k, v in asdict(settings).items() if k not in ("methods", "seeds")}  # a selection of runs
    if results.get("settings", shared) != shared:
        raise ValueError(f"{results_path} holds runs with other settings: move it away or use --results.")
    results["settings"] = shared
    # The machines that ran this file's runs (CPUs differ between sessions: bf16 native or emulated).
    from code_costs import machine

    if machine() not in results.setdefault("machines", []):
        results["machines"].append(machine())
    if "student before" not in results and (reused := judged_elsewhere(settings, results_path.parent)):
        results["student before"] = reused  # the same model, precision and evaluation: not judged twice
    bench = Benchmark(settings, work_dir)
    for name in ("teacher", "student before"):
        if name not in results:
            results[name] = bench.evaluate(bench.teacher if name == "teacher" else bench.student())
            results_path.write_text(json.dumps(results, indent=1))
            log(f"{name}: pass@1 {100 * results[name]['pass@1']:.1f}")
    done = {(r["method"], r["seed"]) for r in results.setdefault("runs", [])}
    for seed in settings.seeds:
        for method in settings.methods:
            if (method, seed) in done:
                continue
            results["runs"].append(bench.run(method, seed))
            results_path.write_text(json.dumps(results, indent=1))
            run = results["runs"][-1]
            log(f"{method} seed={seed}: pass@1 {100 * run['pass@1']:.1f} ({run['seconds_per_step']:.0f} s/step)")
    return results


# ----------------------------------------------------------------------------------------------- rendering

PAIR_NAMES = {"headline": "Qwen2.5-Coder-1.5B-Instruct → 0.5B-Instruct",
              "cpu": "Qwen2.5-Coder-0.5B-Instruct → its 16-layer pruned, SFT-initialised copy"}  # fmt: skip


def passed(record: dict) -> list[float]:
    """Per-problem pass (1.0 / 0.0) of an evaluation, in problem order."""
    return [float(problem["passed"]) for problem in record["problems"]]


def paired_with(after: dict, before: dict) -> dict:
    """`metrics.paired_difference` of two evaluations over the same problems: pass@1 of `after` minus `before`, in
    points, with its paired 95% interval."""
    from rkd_trl.evaluation.metrics import paired_difference

    if [p["task_id"] for p in after["problems"]] != [p["task_id"] for p in before["problems"]]:
        raise ValueError("The two evaluations are not over the same problems.")
    points = lambda record: [100.0 * problem["passed"] for problem in record["problems"]]  # noqa: E731
    return paired_difference(points(after), points(before))


def repetition(record: dict) -> float:
    """Mean share of repeated 4-grams of white-space words in an evaluation's replies (`repeated_ngram_share`): near
    1 for a reply that loops until the token budget."""
    from rkd_trl.guard import repeated_ngram_share

    return repeated_ngram_share([problem["reply"].split() for problem in record["problems"]], 4)


def grid_table(results: dict) -> str:
    """One results file as markdown: its settings, then a row per model (teacher, student before, each method's run)
    with pass@1, its interval, the paired difference to the student before, replies that ended, their repeated
    4-grams, seconds per step and minutes of the evaluation."""
    import statistics

    s = results["settings"]
    before = results.get("student before")  # a grid under way may have judged only the teacher yet
    lines = [
        f"{PAIR_NAMES[s['pair']]}; judged on {'HumanEval (164 problems)' if s['eval'] == 'humaneval' else 'the dev problems'}"
        f" in {s['precision']}; {s['steps']} steps of batch {s['batch_size']}, {s['max_new_tokens']} new tokens, "
        f"learning rate {s['learning_rate']:g}"
        + (f"; student layers {s['student_layers']}, {s['sft_steps']} SFT steps" if s["student_layers"] else "")
        + ".",
        "",
        "| model | seed | pass@1 | 95% interval | − student before (paired 95% interval) | ended | rep-4 | s / step "
        "| eval min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    row = lambda name, seed, r, diff, step: (  # noqa: E731
        f"| {name} | {seed} | {100 * r['pass@1']:.1f} | {100 * r['interval'][0]:.1f}–{100 * r['interval'][1]:.1f} "
        f"| {diff} | {100 * r['ended']:.0f}% | {repetition(r):.2f} | {step} | {r['eval_seconds'] / 60:.0f} |"
    )
    lines.append(row("teacher", "–", results["teacher"], "–", "–"))
    if before is not None:
        lines.append(row("student before", "–", before, "–", "–"))
    by_method = {}
    for run in results.get("runs", []):
        by_method.setdefault(run["method"], []).append(run)
    for method in [m for m in METHODS if m in by_method]:
        for run in sorted(by_method[method], key=lambda r: r["seed"]):
            d = paired_with(run, before)
            lines.append(row(method, run["seed"], run, f"{d['difference']:+.1f} ({d['low']:+.1f} to {d['high']:+.1f})",
                             f"{run['seconds_per_step']:.0f}"))  # fmt: skip
        if len(by_method[method]) > 1:
            scores = [100 * r["pass@1"] for r in by_method[method]]
            lines.append(f"| {method}, mean ± sd | {len(scores)} seeds | {statistics.fmean(scores):.1f} ± "
                         f"{statistics.stdev(scores):.1f} | | | | | | |")  # fmt: skip
    lines.append("")
    if before is not None and "judged_in" in before:
        lines.append(f"The student before is the evaluation of {before['judged_in']} (the same model, precision and "
                     "evaluation settings). ")  # fmt: skip
    for m in results.get("machines", []):
        lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, bf16 {' '.join(m['bf16_flags']) or 'emulated (no flags)'}; "
                     f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}. ")  # fmt: skip
    threads = sorted({run["threads"] for run in results.get("runs", []) if "threads" in run})
    if threads:
        lines.append(f"Torch threads of the training runs: {', '.join(map(str, threads))}.")
    return "\n".join(lines).rstrip() + "\n"


def doc_blocks() -> dict[str, str]:
    """Generated blocks of docs/benchmarks-code.md (see docs/generated.py), from the committed results files."""
    files = sorted(RESULTS.glob("code_quality-*.json"))
    tables = [f"`{path.name}`:\n\n{grid_table(json.loads(path.read_text()))}" for path in files]
    return {"code-quality": "\n".join(tables) if tables else "No run yet.\n"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=PAIRS, default="headline")
    parser.add_argument("--eval", choices=["humaneval", "dev"], default=None, help="default: humaneval")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (the cpu pair), results to the work dir")
    parser.add_argument("--work-dir", default=str(REPO / "benchmarks" / ".cache" / "code"))
    parser.add_argument("--results", default=None)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 where the machine computes it natively, else fp32")  # fmt: skip
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the pair's")
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=None,
                        help="default: all; none (`--methods` alone): judge the teacher and the student before only")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 1 2")
    options = parser.parse_args(argv)
    settings = SMOKE if options.smoke else CPU if options.pair == "cpu" else Settings()
    settings = replace(settings, precision=resolve_precision(options.precision))
    for name in ("eval", "learning_rate", "methods", "seeds"):
        if getattr(options, name) is not None:
            settings = replace(settings, **{name: getattr(options, name)})
    work_dir = Path(options.work_dir) / ("smoke" if options.smoke else settings.pair)
    work_dir.mkdir(parents=True, exist_ok=True)
    default = work_dir / "smoke.json" if options.smoke else RESULTS / results_name(settings)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    run_grid(settings, work_dir, Path(options.results) if options.results else default)


if __name__ == "__main__":
    main()
