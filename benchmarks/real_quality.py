"""Real-model benchmark: SmolLM2-135M-Instruct distilled into a depth-pruned student on real instructions.

Every method starts from the same SFT-initialised student (the teacher with some of its 30 layers, SFT on the
teacher's answers to the 240 `train` instructions), runs the same number of optimizer steps on the `train` prompts,
and is judged on the 60 held-out `test` instructions, which nothing was tuned on (defaults were studied on `dev`):

- what the student says: Rouge-L (× 100) of its greedy answer against the teacher's greedy answer, repeated 4-grams
  and distinct-2 of its greedy answers, share of answers ending with EOS and their length, the teacher's per-token
  NLL of them;
- the KL it was trained on: per-token and per-sequence reverse KL `KL(student || teacher)`, Monte-Carlo over samples
  at temperature 1.

Methods: ours (ReverseKLDistillTrainer, defaults), GKD (trl.experimental.gkd.GKDTrainer) with token-level reverse KL
(β = 1, on-policy) and with its default JSD (β = 0.5, λ = 0.5), trl.DistillationTrainer (β = 1, its default), SeqKD
(SFT continued on the teacher's greedy answers); each over a learning-rate grid and several seeds; and ours with the
defaults before whitening was turned off (`whiten_advantages=True`). Ablations of the defaults (teacher mixing
α ∈ {0, 0.5}, no length normalisation, γ = 1, no single-step term, without the LM loss, without the policy
gradient) run at one learning rate; the same changes to the whitened defaults, run earlier, stay in the results.
Runs are appended to the results JSON as they finish, so an interrupted run resumes where it stopped:

    PYTHONPATH=src python benchmarks/real_quality.py              # the full run (hours on 2 CPU cores)
    PYTHONPATH=src python benchmarks/real_quality.py --smoke      # minutes: the same code on tiny settings
    PYTHONPATH=src python benchmarks/real_quality.py --sft450     # ours and GKD JSD from a memorised SFT start
    PYTHONPATH=src python benchmarks/real_quality.py --defaults-rerun  # the defaults before / after the LM loss share
    PYTHONPATH=src python docs/generated.py                       # re-render docs/benchmarks.md from the JSON
"""

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from rkd_trl.evaluation.metrics import paired_difference  # noqa: E402  (after the settings above: it imports transformers)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks" / "real_quality.json"
STUDY_RESULTS = REPO / "docs" / "benchmarks" / "real_study.json"
SFT450_RESULTS = REPO / "docs" / "benchmarks" / "real_quality_sft450.json"
LM_SHARE_RESULTS = REPO / "docs" / "benchmarks" / "real_lm_share.json"
LM_WEIGHT_RESULTS = REPO / "docs" / "benchmarks" / "real_lm_weight.json"
# The LM loss on every row against a quarter and half of the rows, on the test prompts (`--defaults-rerun`).
DEFAULTS_RERUN_RESULTS = REPO / "docs" / "benchmarks" / "real_defaults_rerun.json"

BASELINES = ["SeqKD", "GKD β=1", "GKD JSD", "DistillationTrainer β=1"]
# The defaults before whitening was turned off (the study below), and the ablations that ran with them.
WHITENED = "ours, whitened (defaults before)"
NO_POLICY_GRADIENT = "ours w/o policy gradient"  # also run at 5e-6 (extra runs), for the per-token target there
# Each ablation changes one setting of the defaults.
ABLATIONS = {
    "ours α=0": {"teacher_mix_alpha": 0.0},
    "ours α=0.5": {"teacher_mix_alpha": 0.5},
    "ours w/o length norm": {"length_normalization": False},
    "ours γ=1": {"gamma": 1.0},
    "ours w/o single-step": {"single_step_regularization": False},
    "ours w/o LM loss": {"lm_loss_weight": 0.0},
    NO_POLICY_GRADIENT: {"policy_gradient": False},
}
# The same ablations of the whitened defaults before (they ran then; not in the grid any more, kept in the results).
WHITENED_ABLATIONS = {
    f"{name}, whitened": {**change, "whiten_advantages": True} for name, change in ABLATIONS.items()
    if name != NO_POLICY_GRADIENT
}
# The study behind the defaults (`--study`): on the `dev` prompts, at the learning rate where the student degenerated.
# Every variant spells out what it changes, so the rows keep their meaning whatever the defaults are.
STUDY = {
    "α=0.2, no LM loss (defaults before)": {"teacher_mix_alpha": 0.2, "lm_loss_weight": 0.0, "whiten_advantages": True},
    "α=0.2, LM loss 1": {"teacher_mix_alpha": 0.2, "lm_loss_weight": 1.0, "whiten_advantages": True},
    "α=0.5, no LM loss": {"teacher_mix_alpha": 0.5, "lm_loss_weight": 0.0, "whiten_advantages": True},
    "α=0.5, LM loss 1": {"teacher_mix_alpha": 0.5, "lm_loss_weight": 1.0, "whiten_advantages": True},
    "α=0.2, no LM loss, no whitening": {"teacher_mix_alpha": 0.2, "lm_loss_weight": 0.0, "whiten_advantages": False},
    "α=0.2, LM loss 1, no whitening": {"teacher_mix_alpha": 0.2, "lm_loss_weight": 1.0, "whiten_advantages": False},
    "α=0.2, LM loss 1, γ=1": {"teacher_mix_alpha": 0.2, "lm_loss_weight": 1.0, "gamma": 1.0, "whiten_advantages": True},
    "α=0.2, LM loss 1, no whitening, γ=1": {"teacher_mix_alpha": 0.2, "lm_loss_weight": 1.0, "gamma": 1.0,
                                            "whiten_advantages": False},
    "α=0, LM loss 1, no whitening": {"teacher_mix_alpha": 0.0, "lm_loss_weight": 1.0, "whiten_advantages": False},
    "α=0.2, LM loss 1, no policy gradient": {"teacher_mix_alpha": 0.2, "lm_loss_weight": 1.0, "policy_gradient": False},
}
# The LM loss on a random quarter of each batch's rows (`--lm-share`): the defaults otherwise.
LM_SHARE = "ours, LM loss on 1/4 of the rows"
LM_EIGHTH = "ours, LM loss on 1/8 of the rows"
LM_HALF = "ours, LM loss on 1/2 of the rows"
LM_EVERY_ROW = "ours, LM loss on every row"  # the defaults before `lm_loss_row_share` (now 0.5)
VARIANTS = {**ABLATIONS, **WHITENED_ABLATIONS, **STUDY, WHITENED: {"whiten_advantages": True},
            LM_SHARE: {"lm_loss_row_share": 0.25}, LM_EIGHTH: {"lm_loss_row_share": 0.125},
            LM_HALF: {"lm_loss_row_share": 0.5}, LM_EVERY_ROW: {"lm_loss_row_share": 1.0}}  # fmt: skip


@dataclass
class Settings:
    student_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 27, 28, 29])
    train_prompts: int | None = None  # first n `train` instructions (None: all 240)
    sft_steps: int = 150
    sft_learning_rate: float = 3e-4
    sft_samples: list[float] = field(default_factory=lambda: [0.7, 0.7])  # sampled answers per prompt (temperature)
    steps: int = 30
    batch_size: int = 8
    max_new_tokens: int = 32
    learning_rates: list[float] = field(default_factory=lambda: [5e-5, 5e-6])
    ablation_learning_rate: float = 5e-5
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    later_seed_learning_rates: list[float] | None = field(default_factory=lambda: [5e-5])  # seeds after the first
    ablation_seeds: list[int] = field(default_factory=lambda: [1])
    eval_split: str = "test"
    eval_prompts: int = 60
    eval_max_new_tokens: int = 64
    eval_samples_per_prompt: int = 2
    reference_max_new_tokens: int = 64
    ablations: bool = True
    methods: list[str] = field(default_factory=lambda: ["ours", WHITENED, *BASELINES])


SMOKE = Settings(
    student_layers=[0, 29], train_prompts=8, sft_steps=2, sft_samples=[], steps=2, batch_size=2, max_new_tokens=8,
    learning_rates=[5e-5], seeds=[1], eval_prompts=4, eval_max_new_tokens=8, eval_samples_per_prompt=1,
    reference_max_new_tokens=8, ablations=False, methods=["ours", "SeqKD", "GKD JSD", "DistillationTrainer β=1",
                                                          "ours w/o LM loss"],
)  # fmt: skip
# Another start (`--sft450`): three times the SFT steps, eight epochs over the training answers, which the student
# memorises; ours against GKD JSD, every seed at both learning rates.
SFT450_SETTINGS = Settings(sft_steps=450, learning_rates=[5e-6, 5e-5], seeds=[1, 2, 3], later_seed_learning_rates=None,
                           ablations=False, methods=["ours", "GKD JSD"])  # fmt: skip
LM_SHARE_SETTINGS = Settings(eval_split="dev", learning_rates=[5e-5], seeds=[1, 2], later_seed_learning_rates=None,
                             ablations=False, methods=["ours", LM_SHARE])  # fmt: skip
# The LM loss on every row, on a share of them, or off (`--lm-weight`), the rest the defaults, on `dev`, three seeds.
LM_WEIGHT_SETTINGS = replace(LM_SHARE_SETTINGS, methods=["ours", "ours w/o LM loss", LM_SHARE, LM_EIGHTH, LM_HALF],
                             seeds=[1, 2, 3])  # fmt: skip
# The LM loss on a quarter and on half of the rows against every row, the defaults before (`--defaults-rerun`), on
# the test prompts, at the learning rate and seeds of the defaults' rows in RESULTS.
DEFAULTS_RERUN_SETTINGS = Settings(learning_rates=[5e-5], seeds=[1, 2, 3], later_seed_learning_rates=None,
                                   ablations=False, methods=[LM_EVERY_ROW, LM_SHARE, LM_HALF])  # fmt: skip
STUDY_SETTINGS = Settings(eval_split="dev", steps=40, learning_rates=[5e-5], ablation_learning_rate=1.5e-5, seeds=[1],
                          later_seed_learning_rates=None, ablations=False, methods=list(STUDY))  # fmt: skip


def runs(settings: Settings) -> list[tuple[str, float, int]]:
    """Every (method, learning rate, seed) of the benchmark, in the order they run."""
    grid = []
    for index, seed in enumerate(settings.seeds):
        rates = settings.learning_rates if index == 0 else settings.later_seed_learning_rates or settings.learning_rates
        grid += [(m, lr, seed) for lr in rates for m in settings.methods]
    if settings.ablations:
        grid += [(m, settings.ablation_learning_rate, seed) for seed in settings.ablation_seeds for m in ABLATIONS]
    return grid


def sft_student_path(settings: Settings, work_dir: Path) -> Path:
    """Where the SFT-initialised student of `settings` is cached (keyed by the settings that make it)."""
    s = settings
    key = f"sft-{'-'.join(map(str, s.student_layers))}-{s.sft_steps}-{s.sft_learning_rate}-{len(s.sft_samples)}"
    return work_dir / "cache" / key


class Benchmark:
    """The teacher, the data, the SFT student every run starts from, and one run of a method."""

    def __init__(self, settings: Settings, work_dir: Path):
        import torch

        from rkd_trl.demo.instructions import cached_teacher_answers, load_instructions
        from rkd_trl.demo.models import load_smollm2

        self.settings = settings
        self.work_dir = work_dir
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        self.teacher, self.tokenizer = load_smollm2()
        self.train_prompts = load_instructions("train")[: settings.train_prompts]
        self.eval_prompts = load_instructions(settings.eval_split)[: settings.eval_prompts]
        cache = work_dir / "cache"
        answer = lambda prompts, tokens, **kw: cached_teacher_answers(  # noqa: E731
            self.teacher, self.tokenizer, prompts, tokens, cache, batch_size=32, **kw
        )
        self.train_answers = answer(self.train_prompts, 128)
        self.sft_answers = [self.train_answers] + [
            answer(self.train_prompts, 128, temperature=t, seed=i + 1) for i, t in enumerate(settings.sft_samples)
        ]
        self.references = answer(self.eval_prompts, settings.reference_max_new_tokens)
        self.teacher_quality = None

    def sft_student(self):
        """The SFT-initialised student (cached under the work dir, keyed by the settings that make it)."""
        from transformers import AutoModelForCausalLM

        from rkd_trl.demo.instructions import sft_student
        from rkd_trl.demo.models import keep_layers

        s = self.settings
        path = sft_student_path(s, self.work_dir)
        if (path / "config.json").exists():
            return AutoModelForCausalLM.from_pretrained(path).eval()
        student = keep_layers(self.teacher, s.student_layers)
        sft_student(
            student, self.tokenizer, self.train_prompts, self.sft_answers, self.work_dir / "sft-run",
            max_steps=s.sft_steps, learning_rate=s.sft_learning_rate, per_device_train_batch_size=8,
            lr_scheduler_type="cosine", warmup_steps=10, max_length=192, use_cpu=True, bf16=False, seed=0,
        )  # fmt: skip
        student.save_pretrained(path)
        return student.eval()

    def evaluate(self, student, seed=0):
        from rkd_trl.evaluation.metrics import answer_quality

        s = self.settings
        return answer_quality(
            student, self.teacher, self.tokenizer, self.eval_prompts, self.references.texts, s.eval_max_new_tokens,
            samples_per_prompt=s.eval_samples_per_prompt, seed=seed,
        )  # fmt: skip

    def trainer(self, method: str, student, learning_rate: float, seed: int):
        from datasets import Dataset

        from rkd_trl.demo.instructions import conversations, user_turns

        s = self.settings
        common = dict(
            output_dir=str(self.work_dir / "run"), per_device_train_batch_size=s.batch_size, max_steps=s.steps,
            learning_rate=learning_rate, lr_scheduler_type="linear", warmup_steps=0, logging_steps=5,
            save_strategy="no", report_to=[], bf16=False, use_cpu=True, activation_checkpointing=False,
            disable_tqdm=True, seed=seed, dataloader_num_workers=0,
        )  # fmt: skip
        with_answers = conversations(self.train_prompts, self.train_answers)  # `messages`: the ended teacher answers
        prompts_only = Dataset.from_dict({"prompt": user_turns(self.train_prompts)})
        if method == "SeqKD":
            from trl import SFTConfig, SFTTrainer

            data = with_answers.map(lambda row: {"prompt": row["messages"][:1], "completion": row["messages"][1:]},
                                    remove_columns=["messages"])  # fmt: skip
            return SFTTrainer(model=student, args=SFTConfig(**common, max_length=192), train_dataset=data,
                              processing_class=self.tokenizer)  # fmt: skip
        if method.startswith("GKD"):
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            lmbda, beta = (1.0, 1.0) if method == "GKD β=1" else (0.5, 0.5)
            args = GKDConfig(**common, lmbda=lmbda, beta=beta, temperature=1.0, max_new_tokens=s.max_new_tokens,
                             max_length=192)  # fmt: skip
            return GKDTrainer(model=student, teacher_model=self.teacher, args=args, train_dataset=with_answers,
                              processing_class=self.tokenizer)  # fmt: skip
        if method == "DistillationTrainer β=1":
            from trl import DistillationConfig, DistillationTrainer

            args = DistillationConfig(**common, beta=1.0, max_completion_length=s.max_new_tokens)
            return DistillationTrainer(model=student, teacher_model=self.teacher, args=args,
                                       train_dataset=prompts_only, processing_class=self.tokenizer)  # fmt: skip
        from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer

        # `ours` here is the trainer's defaults as this benchmark ran them: with the LM loss on the teacher's answers
        # (lm_loss_weight=1), whatever the default is now; every variant changes that.
        variant = {"lm_loss_weight": 1.0, **VARIANTS.get(method, {})}
        data = with_answers  # GKD's dataset: prompts and the teacher's answers (the LM loss trains on them)
        args = ReverseKLDistillConfig(**common, max_new_tokens=s.max_new_tokens, **variant)
        return ReverseKLDistillTrainer(model=student, teacher_model=self.teacher, args=args, train_dataset=data,
                                       processing_class=self.tokenizer)  # fmt: skip

    def run(self, method: str, learning_rate: float, seed: int) -> dict:
        import torch
        from transformers import PrinterCallback

        student = self.sft_student()
        torch.manual_seed(seed)
        started = time.perf_counter()
        trainer = self.trainer(method, student, learning_rate, seed)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        seconds = time.perf_counter() - started
        scores = self.evaluate(trainer.model.eval(), seed=1000 + seed)
        curve = [{key: entry[key] for key in ("step", "minillm/reverse_kl", "completions/repeated_4grams",
                                               "completions/clipped_ratio", "completions/greedy_repeated_4grams",
                                               "completions/greedy_clipped_ratio", "loss/lm") if key in entry}
                 for entry in trainer.state.log_history if "minillm/reverse_kl" in entry]  # fmt: skip
        # The thread count changes the order of floating-point sums, enough to move a run as much as a seed does.
        return {"method": method, "learning_rate": learning_rate, "seed": seed, "train_seconds": seconds,
                "threads": torch.get_num_threads(), **scores, "curve": curve}  # fmt: skip


def run_benchmark(settings: Settings, work_dir: Path, results_path: Path, only=None, seeds=None, learning_rates=None,
                  log=print) -> dict:
    """Run every missing (method, lr, seed) of `settings` (those whose method is in `only`, seed in `seeds` and
    learning rate in `learning_rates`, if given), appending each to `results_path` as it finishes."""
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not same_grid(results.get("settings"), asdict(settings)):
        raise ValueError(f"{results_path} holds a run with other settings: move it away or use --results.")
    results.update(settings=joined_settings(results.get("settings"), asdict(settings)), machine=machine())
    bench = Benchmark(settings, work_dir)
    for name, model in (("teacher", bench.teacher), ("SFT init", None)):
        if name not in results:
            model = model if model is not None else bench.sft_student()
            results[name] = bench.evaluate(model)
            results_path.write_text(json.dumps(results, indent=1))
            log(f"{name}: {summary_line(results[name])}")
    done = {(r["method"], r["learning_rate"], r["seed"]) for r in results.setdefault("runs", [])}
    for method, learning_rate, seed in runs_to_do(settings, done, only, seeds, learning_rates):
        result = bench.run(method, learning_rate, seed)
        results["runs"].append(result)
        results_path.write_text(json.dumps(results, indent=1))
        log(f"{method} lr={learning_rate:g} seed={seed}: {summary_line(result)} ({result['train_seconds']:.0f} s)")
    return results


def runs_to_do(settings: Settings, done, only=None, seeds=None, learning_rates=None) -> list[tuple[str, float, int]]:
    """The runs of `settings` not in `done`, restricted to the methods `only`, the `seeds` and the `learning_rates`
    given (None: all). A method, seed or learning rate that the grid does not hold is an error, not an empty
    selection."""
    grid = runs(settings)
    for asked, position, name in ((only, 0, "methods"), (learning_rates, 1, "learning rates"), (seeds, 2, "seeds")):
        available = sorted({run[position] for run in grid}, key=str)
        missing = [value for value in asked or () if value not in available]
        if missing:
            raise ValueError(f"The grid of these settings has no {name} {missing}: it has {available} (choose a "
                             "preset such as --lm-share or --defaults-rerun that holds them).")
    return [
        (method, rate, seed)
        for method, rate, seed in grid
        if (method, rate, seed) not in done
        and (not only or method in only)
        and (not seeds or seed in seeds)
        and (not learning_rates or rate in learning_rates)
    ]


# Settings that only say which runs make up the grid; every other setting shapes each run.
GRID_KEYS = ("methods", "learning_rates", "seeds", "later_seed_learning_rates")


def same_grid(old: dict | None, new: dict) -> bool:
    """Whether results run with settings `old` can be extended by a run with `new`: the same settings, except those
    that say which runs make up the grid (methods, learning rates and seeds added later run on the same student,
    data and steps)."""
    strip = lambda settings: {key: value for key, value in settings.items() if key not in GRID_KEYS}  # noqa: E731
    return old is None or strip(old) == strip(new)


def joined_settings(old: dict | None, new: dict) -> dict:
    """`new`, with each grid list holding the entries of `old` first and those only `new` has after them (a seed's
    learning rates: None, every rate, wins)."""
    joined = dict(new)
    for key in GRID_KEYS:
        before, after = (old or {}).get(key, []), new[key]
        if before is None or after is None:
            joined[key] = None
        else:
            joined[key] = before + [value for value in after if value not in before]
    return joined


def machine() -> dict:
    import torch
    import transformers
    import trl

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}  # fmt: skip


METRICS = [  # key, column title, format
    ("rouge_l", "Rouge-L ↑", "{:.1f}"),
    ("repeated_4grams", "rep-4", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.2f}"),
    ("eos_rate", "ends (greedy)", "{:.0%}"),
    ("length", "length", "{:.1f}"),
    ("teacher_nll", "teacher NLL", "{:.2f}"),
    ("reverse_kl_per_token", "RKL/token ↓", "{:.2f}"),
    ("reverse_kl_per_sequence", "RKL/seq ↓", "{:.1f}"),
    ("sample_eos_rate", "ends (sampled)", "{:.0%}"),
]


def summary_line(scores: dict) -> str:
    return ", ".join(f"{title} {fmt.format(scores[key])}" for key, title, fmt in METRICS)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def method_table(results: dict, methods: list[str], learning_rates: list[float] | None = None) -> str:
    """One row per (method, learning rate): mean ± std over seeds of every metric; the teacher and the SFT init first."""
    header = "| method | lr | " + " | ".join(title for _, title, _ in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for name in ("teacher", "SFT init"):
        lines.append(f"| {name} | – | " + " | ".join(fmt.format(results[name][key]) for key, _, fmt in METRICS) + " |")
    for method in methods:
        rates = sorted({r["learning_rate"] for r in results["runs"] if r["method"] == method})
        for rate in learning_rates or rates:
            group = [r for r in results["runs"] if r["method"] == method and r["learning_rate"] == rate]
            if not group:
                continue
            cells = []
            for key, _, fmt in METRICS:
                mean, std = mean_std([r[key] for r in group])
                cells.append(fmt.format(mean) + (f" ± {fmt.format(std)}" if len(group) > 1 else ""))
            lines.append(f"| {method} | {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def speed_table(results: dict) -> str:
    """Seconds per optimizer step of each method (mean over its runs) and the ratio to trl.DistillationTrainer."""
    steps = results["settings"]["steps"]
    per_step = {}
    for run in results["runs"]:
        per_step.setdefault(run["method"], []).append(run["train_seconds"] / steps)
    reference = statistics.fmean(per_step["DistillationTrainer β=1"])
    lines = ["| method | runs | s / step | × DistillationTrainer β=1 |", "|---|---|---|---|"]
    for method, values in per_step.items():
        mean = statistics.fmean(values)
        lines.append(f"| {method} | {len(values)} | {mean:.1f} | {mean / reference:.2f} |")
    return "\n".join(lines) + "\n"


def prompt_scores(results: dict, method: str, learning_rate: float | None = None) -> tuple[list[float], int]:
    """Rouge-L (× 100) of `method`'s greedy answers against the teacher's, prompt by prompt, averaged over its seeds at
    `learning_rate` (the teacher and the SFT init: their one set of answers), and the number of seeds."""
    from rkd_trl.evaluation.metrics import rouge_l_scores

    if method in ("teacher", "SFT init"):
        groups = [results[method]]
    else:
        groups = [r for r in results["runs"] if r["method"] == method and r["learning_rate"] == learning_rate]
    if not groups:
        raise ValueError(f"no runs of {method!r} at {learning_rate} in the results.")
    references = [[answer] for answer in results["teacher"]["greedy_answers"]]
    per_seed = [rouge_l_scores(run["greedy_answers"], references) for run in groups]
    return [100.0 * statistics.fmean(scores) for scores in zip(*per_seed, strict=True)], len(groups)


# Rouge-L compared prompt by prompt: (results file, its start, [(a, b)]) at each learning rate of the pair.
PAIRED = [
    (RESULTS, "150 SFT steps", [("ours", "GKD JSD"), ("ours", "SeqKD"), ("ours", NO_POLICY_GRADIENT),
                                ("ours", "SFT init"), ("GKD JSD", "SFT init")]),
    (SFT450_RESULTS, "450 SFT steps", [("ours", "GKD JSD"), ("ours", "SFT init"), ("GKD JSD", "SFT init")]),
]  # fmt: skip


def paired_table(paired=PAIRED) -> str:
    """For each pair of `paired` at each learning rate both ran at (the SFT init at every rate): Rouge-L of each, the
    difference prompt by prompt with its 95% bootstrap interval, and the prompts on which each is higher."""
    lines = ["| start | lr | a − b | seeds | Rouge-L a | Rouge-L b | a − b | 95% interval | prompts a > b / b > a |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for path, start, pairs in paired:
        results = json.loads(path.read_text())
        rates = {}
        for r in results["runs"]:
            rates.setdefault(r["method"], set()).add(r["learning_rate"])
        for rate in sorted(rates["ours"]):
            for a, b in pairs:
                if rate not in rates.get(a, ()) or (b != "SFT init" and rate not in rates.get(b, ())):
                    continue
                scores_a, seeds_a = prompt_scores(results, a, rate)
                scores_b, seeds_b = prompt_scores(results, b, rate)
                d = paired_difference(scores_a, scores_b)
                seeds = f"{seeds_a}, {seeds_b}" if b != "SFT init" else f"{seeds_a}"
                lines.append(
                    f"| {start} | {rate:g} | {a} − {b} | {seeds} | {statistics.fmean(scores_a):.1f} | "
                    f"{statistics.fmean(scores_b):.1f} | {d['difference']:+.2f} | [{d['low']:+.2f}, {d['high']:+.2f}] | "
                    f"{d['a_higher']} / {d['b_higher']} |"
                )
    return "\n".join(lines) + "\n"


def lm_loss_table(results: dict) -> str:
    """`method_table` of the `--lm-share` or `--lm-weight` runs, then each method's training seconds per step (mean
    over its runs)."""
    steps = results["settings"]["steps"]
    lines = [method_table(results, results["settings"]["methods"]), "| method | runs | training s / step |",
             "|---|---|---|"]  # fmt: skip
    for method in results["settings"]["methods"]:
        seconds = [r["train_seconds"] / steps for r in results["runs"] if r["method"] == method]
        if seconds:
            lines.append(f"| {method} | {len(seconds)} | {statistics.fmean(seconds):.1f} |")
    return "\n".join(lines) + "\n"


def defaults_rerun_table(rerun: dict, learning_rate: float = 5e-5) -> str:
    """The defaults before (`LM_EVERY_ROW`) and the LM loss on a share of the rows, from the same SFT student, on the
    same prompts, seeds and learning rate: `method_table` of each, then per metric and share the difference of the
    means to the defaults before, against the larger seed standard deviation of the two (the seed spread)."""
    runs = [r for r in rerun["runs"] if r["learning_rate"] == learning_rate]
    methods = [m for m in rerun["settings"]["methods"] if any(r["method"] == m for r in runs)]
    shares = [m for m in methods if m != LM_EVERY_ROW]
    stats = {(m, key): mean_std([r[key] for r in runs if r["method"] == m]) for m in methods for key, _, _ in METRICS}
    lines = [method_table(rerun, methods, [learning_rate]),
             "| metric | " + " | ".join(f"{m.removeprefix('ours, ')}: − every row (larger seed sd)" for m in shares)
             + " |", "|---|" + "---|" * len(shares)]  # fmt: skip
    for key, title, fmt in METRICS:
        cells = []
        for share in shares:
            difference = stats[share, key][0] - stats[LM_EVERY_ROW, key][0]
            spread = max(stats[share, key][1], stats[LM_EVERY_ROW, key][1])
            beyond = " **beyond**" if abs(difference) > spread else ""
            cells.append(f"{fmt.format(difference)} ({fmt.format(spread)}){beyond}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def doc_blocks() -> dict[str, str]:
    """Generated blocks of docs/benchmarks.md (see docs/generated.py), rendered from the committed results."""
    study = json.loads(STUDY_RESULTS.read_text())
    blocks = {"real-study": method_table(study, study["settings"]["methods"])}
    for name, path in (("real-lm-share", LM_SHARE_RESULTS), ("real-lm-weight", LM_WEIGHT_RESULTS)):
        lm_runs = json.loads(path.read_text()) if path.exists() else {}
        if lm_runs.get("runs"):
            blocks[name] = lm_loss_table(lm_runs)
    if not RESULTS.exists():
        return blocks
    results = json.loads(RESULTS.read_text())
    settings = results["settings"]
    ablations = list(ABLATIONS) if settings["ablations"] else []
    if DEFAULTS_RERUN_RESULTS.exists():
        blocks["real-defaults-rerun"] = defaults_rerun_table(json.loads(DEFAULTS_RERUN_RESULTS.read_text()))
    return blocks | {
        "real-speed": speed_table(results),
        "real-paired": paired_table(),
        "real-methods": method_table(results, ["ours", WHITENED, NO_POLICY_GRADIENT, *BASELINES]),
        "real-ablations": method_table(results, ["ours", *ablations, WHITENED, *WHITENED_ABLATIONS],
                                       [settings["ablation_learning_rate"]]),
        "real-settings": "```json\n" + json.dumps({"settings": settings, "machine": results["machine"]}, indent=1)
        + "\n```\n",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings, results to a scratch file")
    parser.add_argument("--study", action="store_true", help=f"the study behind the defaults ({STUDY_RESULTS.name})")
    parser.add_argument("--sft450", action="store_true", help=f"from a memorised SFT start ({SFT450_RESULTS.name})")
    parser.add_argument("--lm-share", action="store_true",
                        help=f"the LM loss on a quarter of the rows against the defaults, on dev ({LM_SHARE_RESULTS.name})")
    parser.add_argument("--lm-weight", action="store_true",
                        help=f"the LM loss on every row, on a share of them, or off, on dev ({LM_WEIGHT_RESULTS.name})")
    parser.add_argument("--defaults-rerun", action="store_true",
                        help="the LM loss on every row, a quarter and half of the rows, on test "
                        f"({DEFAULTS_RERUN_RESULTS.name})")  # fmt: skip
    parser.add_argument("--only", nargs="+", help="run only these methods (e.g. one share of the grid per process)")
    parser.add_argument("--seeds", nargs="+", type=int, help="run only these seeds (another way to share the grid)")
    parser.add_argument("--learning-rates", nargs="+", type=float, help="run only these learning rates")
    parser.add_argument("--all-rates-for-later-seeds", action="store_true",
                        help="run the seeds after the first at every learning rate (default: 5e-5 only)")
    parser.add_argument("--merge", nargs="+", type=Path, help="merge these results files into --results and stop")
    parser.add_argument("--work-dir", default=str(REPO / "benchmarks" / ".cache" / "real"))
    parser.add_argument("--results", default=None, help=f"results JSON (default: {RESULTS.relative_to(REPO)})")
    options = parser.parse_args(argv)
    presets = ((options.smoke, SMOKE, None), (options.study, STUDY_SETTINGS, STUDY_RESULTS),
               (options.sft450, SFT450_SETTINGS, SFT450_RESULTS),
               (options.lm_share, LM_SHARE_SETTINGS, LM_SHARE_RESULTS),
               (options.lm_weight, LM_WEIGHT_SETTINGS, LM_WEIGHT_RESULTS),
               (options.defaults_rerun, DEFAULTS_RERUN_SETTINGS, DEFAULTS_RERUN_RESULTS))  # fmt: skip
    settings, default = next(((s, path) for chosen, s, path in presets if chosen), (Settings(), RESULTS))
    if options.all_rates_for_later_seeds:
        settings = replace(settings, later_seed_learning_rates=None)
    work_dir = Path(options.work_dir) / ("smoke" if options.smoke else "full")
    default = default or work_dir / "smoke.json"
    results_path = Path(options.results) if options.results else default
    if options.merge:
        return merge(options.merge, results_path)
    work_dir.mkdir(parents=True, exist_ok=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    run_benchmark(settings, work_dir, results_path, only=options.only, seeds=options.seeds,
                  learning_rates=options.learning_rates)
    return results_path


def merge(sources: list[Path], target: Path) -> Path:
    """Merge results files of the same settings (shares of one grid run in parallel) into `target`."""
    merged = json.loads(target.read_text()) if target.exists() else {}
    for source in sources:
        part = json.loads(source.read_text())
        if not same_grid(merged.get("settings"), part["settings"]):
            raise ValueError(f"{source} was run with other settings than {target}.")
        runs = merged.setdefault("runs", [])
        done = {(r["method"], r["learning_rate"], r["seed"]) for r in runs}
        settings = joined_settings(merged.get("settings"), part["settings"])
        merged.update({key: value for key, value in part.items() if key != "runs"}, settings=settings)
        runs += [r for r in part["runs"] if (r["method"], r["learning_rate"], r["seed"]) not in done]
    target.write_text(json.dumps(merged, indent=1))
    return target


if __name__ == "__main__":
    main()
