"""Time per optimizer step: `ReverseKLDistillTrainer` vs TRL's `GKDTrainer` and `DistillationTrainer`.

All trainers get the same randomly initialised models (built from config: a 4-layer teacher and a 2-layer student,
hidden 256), the same prompts, batch size and `max_new_tokens`. After warm-up steps the trainers are run one step
each in turn (A, B, C, ... A, B, C, ...) so that load from other processes on a shared machine hits all of them
alike; the table reports medians, the spread (inter-quartile range) and ratios of medians.

Also measured: teacher forward work (forward hooks count the positions fed to the teacher backbone), the scaling of
the step time from `max_new_tokens` 64 to 128, and where the time of one step goes (torch.profiler ranges).

    PYTHONPATH=src python benchmarks/speed.py          # tiny models; prints the tables, writes docs/performance.md
    PYTHONPATH=src python benchmarks/speed.py --real   # the real SmolLM2 teacher and its pruned student (one length)
"""

import argparse
import contextlib
import copy
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
from datasets import Dataset
from transformers.utils import logging as hf_logging
from trl import DistillationConfig, DistillationTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl import trainer as rkd_trainer_module
from rkd_trl.config import cpu_computes_bf16_natively
from rkd_trl.demo.synthetic import build_tokenizer, tiny_causal_lm
from rkd_trl.scoring import language_model_backbone

sys.path.insert(0, str(Path(__file__).parent))
from memory import DOCS, write_section

# ---------------------------------------------------------------------------------------------------------- set-up


def build_models(tokenizer, hidden_size: int, teacher_layers: int, student_layers: int):
    """A random teacher and student over the tokenizer's vocabulary (Llama, 4 heads, long enough positions)."""

    def model(layers, seed):
        lm = tiny_causal_lm(tokenizer, hidden_size, layers, seed=seed, max_position_embeddings=512)
        return lm.eval()

    return model(teacher_layers, 1), model(student_layers, 2)


def conversations(tokenizer, num_rows: int, seed: int = 0) -> Dataset:
    """User prompts of 8-24 random words (so prompts are left-padded) and a 16-word reference answer each."""
    rng = random.Random(seed)
    words = [word for word in tokenizer.get_vocab() if word.startswith("w")]
    rows = []
    for _ in range(num_rows):
        prompt = " ".join(rng.choices(words, k=rng.randint(8, 24)))
        answer = " ".join(rng.choices(words, k=16))
        rows.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    return Dataset.from_dict({"messages": rows})


def common_args(batch_size: int, logging_steps: int, precision: str) -> dict:
    """Settings every trainer gets. `precision` "auto" leaves `bf16` as the configs resolve it on this machine (on
    by default where torch supports bfloat16, as users meet it); "fp32" / "bf16" pin it."""
    args = {
        "output_dir": tempfile.mkdtemp(prefix="rkd-speed-"),
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-5,
        "max_steps": 1000,
        "logging_steps": logging_steps,
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "save_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "temperature": 1.0,
    }
    if precision != "auto":
        args["bf16"] = precision == "bf16"
    return args


# Our variants: the defaults (α = 0.2, the LM loss on half of the rows), α = 0 (the student samples alone and
# the teacher scores the completions in one forward), without the LM loss (α = 0 and no LM loss: the same work as
# DistillationTrainer), the defaults with rollout reuse, and the LM loss on every row, a quarter or an eighth of them.
# Every variant keeps the single-step term and length normalisation.
OURS = {
    "ReverseKLDistillTrainer": {},
    "ReverseKLDistillTrainer no LM loss": {"lm_loss_weight": 0.0},
    "ReverseKLDistillTrainer α=0": {"teacher_mix_alpha": 0.0},
    "ReverseKLDistillTrainer α=0, no LM loss": {"teacher_mix_alpha": 0.0, "lm_loss_weight": 0.0},
    "ReverseKLDistillTrainer reuse": {"ppo_epochs": 4},
    "ReverseKLDistillTrainer LM loss on every row": {"lm_loss_row_share": 1.0},  # `--lm-share` only
    "ReverseKLDistillTrainer LM loss on 1/4 of the rows": {"lm_loss_row_share": 0.25},  # `--lm-share` only
    "ReverseKLDistillTrainer LM loss on 1/8 of the rows": {"lm_loss_row_share": 0.125},  # `--lm-share` only
}


def build_trainers(names, models, tokenizer, dataset, batch_size: int, max_new_tokens: int, logging_steps: int = 10,
                   precision: str = "auto"):  # fmt: skip
    """`{name: trainer}` over fresh copies of the same teacher and student weights."""

    def fresh(which):
        return copy.deepcopy(models[0] if which == "teacher" else models[1])

    args = common_args(batch_size, logging_steps, precision)
    prompt_dataset = dataset.map(lambda row: {"prompt": row["messages"][:1]}, remove_columns=["messages"])
    trainers = {}
    for name in names:
        if name == "GKDTrainer":
            config = GKDConfig(**args, lmbda=1.0, beta=1.0, max_new_tokens=max_new_tokens, max_length=512)
            trainer = GKDTrainer(model=fresh("student"), teacher_model=fresh("teacher"), args=config,
                                 train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
        elif name == "DistillationTrainer":
            config = DistillationConfig(**args, beta=1.0, max_completion_length=max_new_tokens)
            trainer = DistillationTrainer(model=fresh("student"), teacher_model=fresh("teacher"), args=config,
                                          train_dataset=prompt_dataset, processing_class=tokenizer)  # fmt: skip
        else:
            config = ReverseKLDistillConfig(**args, max_new_tokens=max_new_tokens, **OURS[name])  # the defaults
            trainer = ReverseKLDistillTrainer(model=fresh("student"), teacher_model=fresh("teacher"), args=config,
                                              train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
        trainers[name] = trainer
    return trainers


class StepRunner:
    """Runs optimizer steps of a trainer the way `Trainer.train` does (training_step, optimizer step, zero_grad, the
    step count, and at each logging step `log`, which averages and reports the trainer's metrics and runs the
    callbacks)."""

    def __init__(self, trainer):
        self.trainer = trainer
        # As `Trainer.train` holds the student: prepared by accelerate, which wraps its forward in autocast under
        # mixed precision (without this the student would run in float32 whatever `bf16` says).
        trainer.model = trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)
        trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by `train`
        self.batches = iter(trainer.get_train_dataloader())
        self.steps_per_rollout = getattr(trainer.args, "ppo_epochs", 1)

    def step(self):
        trainer = self.trainer
        loss = trainer.training_step(trainer.model, next(self.batches), None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        if trainer.state.global_step % trainer.args.logging_steps == 0:
            trainer.log({"loss": loss.item()})

    def timed_cycle(self) -> float:
        """Seconds per optimizer step, averaged over one rollout cycle (1 step, or `ppo_epochs` with reuse)."""
        start = time.perf_counter()
        for _ in range(self.steps_per_rollout):
            self.step()
        return (time.perf_counter() - start) / self.steps_per_rollout


class RolloutClock:
    """Times our trainers' training rollouts (`sample_teacher_mixed`, not the greedy probe) and records each model's
    forwards and the completion columns of each, for the trainer named `current`."""

    def __init__(self):
        self.current = None
        self.seconds, self.teacher_calls, self.student_calls, self.columns = {}, {}, {}, {}
        self.sample = rkd_trainer_module.sample_teacher_mixed

    def __enter__(self):
        def timed(student, teacher, *args, **kwargs):
            start = time.perf_counter()
            rollout = self.sample(student, teacher, *args, **kwargs)
            if teacher is not None and self.current is not None:  # the greedy probe samples the student alone
                self.seconds.setdefault(self.current, []).append(time.perf_counter() - start)
                self.teacher_calls.setdefault(self.current, []).append(rollout.teacher_calls)
                self.student_calls.setdefault(self.current, []).append(rollout.student_calls)
                self.columns.setdefault(self.current, []).append(rollout.completion_ids.size(1))
            return rollout

        rkd_trainer_module.sample_teacher_mixed = timed
        return self

    def __exit__(self, *exc):
        rkd_trainer_module.sample_teacher_mixed = self.sample


def interleaved_step_times(runners: dict, warmup: int, rounds: int, clock=None) -> dict[str, list[float]]:
    for runner in runners.values():
        for _ in range(warmup):
            runner.timed_cycle()
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            if clock is not None:
                clock.current = name
            times[name].append(runner.timed_cycle())
    if clock is not None:
        clock.current = None
    return times


# ---------------------------------------------------------------------------------------------------------- counting


class PositionCounter:
    """Counts token positions fed through a module's forward (forward pre-hook on `input_ids` / `inputs_embeds`)."""

    def __init__(self, module):
        self.positions = 0
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        self.positions += ids.numel()
        self.calls += 1

    def remove(self):
        self.handle.remove()


def teacher_forward_work(trainer) -> dict:
    """Positions fed to the teacher's backbone and rows projected by its LM head over one optimizer step,
    against the rollout's `B × (P + T)` positions (prompt columns + completion columns)."""
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    backbone = PositionCounter(language_model_backbone(teacher))
    head_rows = {"rows": 0}
    head_hook = teacher.get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_rows.__setitem__("rows", head_rows["rows"] + output[..., 0].numel())
    )
    shapes = {}
    original = trainer._generate_and_score_completions

    def record(inputs):
        batch = original(inputs)
        shapes["prompt"] = tuple(batch["prompt_ids"].shape)
        shapes["completion"] = tuple(batch["completion_ids"].shape)
        shapes["valid"] = int(batch["completion_mask"].sum())
        return batch

    trainer._generate_and_score_completions = record
    try:
        StepRunner(trainer).step()
    finally:
        trainer._generate_and_score_completions = original
        backbone.remove()
        head_hook.remove()
    (batch, prompt_length), (_, completion_length) = shapes["prompt"], shapes["completion"]
    return {
        "backbone_positions": backbone.positions,
        "backbone_calls": backbone.calls,
        "head_rows": head_rows["rows"],
        "rollout_positions": batch * (prompt_length + completion_length),
        "valid": shapes["valid"],
        "batch": batch,
        "prompt_length": prompt_length,
        "completion_length": completion_length,
    }


# ---------------------------------------------------------------------------------------------------------- profile

STAGES = {
    # label: (object, attribute) wrapped in a profiler range
    "sampling (teacher-mixed decode, both models)": (rkd_trainer_module, "sample_teacher_mixed"),
    "greedy probe (student alone)": (ReverseKLDistillTrainer, "_log_greedy_probe"),
    "advantages": (rkd_trainer_module, "advantages_from_rollout"),
    "student forward (backbone)": (ReverseKLDistillTrainer, "_completion_hidden_states"),
    "loss (heads + MiniLLM terms)": (rkd_trainer_module, "minillm_loss_sums"),
    "LM loss (forward)": (ReverseKLDistillTrainer, "_lm_loss_sum"),
    "GKD generate": (GKDTrainer, "generate_on_policy_outputs"),
    "GKD forward + loss": (GKDTrainer, "compute_loss"),
    "Distillation generate": (DistillationTrainer, "_generate"),
    "Distillation forward + loss": (DistillationTrainer, "_compute_loss"),
}


@contextlib.contextmanager
def profiled_stages():
    """Wrap each stage of `STAGES` (and `accelerator.backward`, the optimizer step) in a named profiler range."""
    originals = []

    def ranged(label, function):
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(label):
                return function(*args, **kwargs)

        return wrapper

    for label, (owner, attribute) in STAGES.items():
        raw = owner.__dict__[attribute]
        originals.append((owner, attribute, raw))
        wrapped = ranged(label, getattr(owner, attribute))
        setattr(owner, attribute, staticmethod(wrapped) if isinstance(raw, staticmethod) else wrapped)
    try:
        yield
    finally:
        for owner, attribute, raw in originals:
            setattr(owner, attribute, raw)


def profile_breakdown(runner: StepRunner, steps: int) -> list[tuple[str, float]]:
    """Milliseconds per step in each labelled stage, from torch.profiler, plus backward and optimizer."""
    trainer = runner.trainer
    backward = trainer.accelerator.backward
    optimizer_step = trainer.optimizer.step

    def ranged_backward(loss, **kwargs):
        with torch.profiler.record_function("backward"):
            return backward(loss, **kwargs)

    def ranged_optimizer_step(*args, **kwargs):
        with torch.profiler.record_function("optimizer step"):
            return optimizer_step(*args, **kwargs)

    trainer.accelerator.backward = ranged_backward
    trainer.optimizer.step = ranged_optimizer_step
    try:
        with (
            profiled_stages(),
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile,
            torch.profiler.record_function("step"),
        ):
            for _ in range(steps):
                runner.step()
    finally:
        trainer.accelerator.backward = backward
        trainer.optimizer.step = optimizer_step
    labels = [*STAGES, "backward", "optimizer step", "step"]
    totals = {
        event.key: event.cpu_time_total / 1000 / steps for event in profile.key_averages() if event.key in labels
    }
    return [(label, totals[label]) for label in labels if label in totals]


# ---------------------------------------------------------------------------------------------------------- report


def summarize(times: list[float]) -> tuple[float, float, float]:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), quartiles[0], quartiles[2]


def step_table(times: dict[str, list[float]], reference: str) -> list[str]:
    lines = [
        f"| trainer | median s/step | IQR (s) | ratio to {reference} | runs |",
        "|---|---|---|---|---|",
    ]
    reference_median = statistics.median(times[reference])
    for name, values in times.items():
        median, low, high = summarize(values)
        lines.append(
            f"| {name} | {median:.3f} | {low:.3f}–{high:.3f} | {median / reference_median:.2f} | {len(values)} |"
        )
    return lines


MODEL_SHAPE = (256, 4, 2)  # hidden size, teacher layers, student layers


def header(description: str, options) -> list[str]:
    return [
        (
            f"{description}; batch {options.batch_size}; torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s), this CPU computes bf16 {'natively' if cpu_computes_bf16_natively() else 'by emulation'}; "
            f"{options.warmup} warm-up steps per trainer, then {options.rounds} interleaved rounds."
        ),
        (
            "ReverseKLDistillTrainer: its defaults (teacher_mix_alpha=0.2, the LM loss on half of the rows of "
            "reference completions, the greedy probe every 20 steps); `LM loss on every row` / `on 1/4` / `on 1/8 of "
            "the rows`: lm_loss_row_share 1 / 0.25 / 0.125; `no LM loss`: lm_loss_weight=0 (the same work as "
            "DistillationTrainer plus teacher mixing); `α=0`: teacher_mix_alpha=0 (the student samples alone, the "
            "teacher scores the completions in one forward); `α=0, no LM loss`: both; `reuse`: the defaults with "
            "ppo_epochs=4 (time per optimizer step averaged over the 4 steps of one rollout). GKDTrainer: lmbda=1, "
            "beta=1. DistillationTrainer: beta=1. Every step as `Trainer.train` runs it, `log` at each logging step "
            f"included; bf16 as the configs resolve it on this machine unless `--precision` pins it "
            f"({options.precision})."
        ),
        "",
    ]


# Step-time targets against DistillationTrainer(beta=1) and GKDTrainer(lmbda=1, beta=1), for the tiny models and the
# real pair: the defaults no slower than the peer, and mixing nearly free next to sampling alone.
TARGETS = {
    "tiny": {("ReverseKLDistillTrainer", "DistillationTrainer"): 1.0, ("ReverseKLDistillTrainer", "GKDTrainer"): 0.8},
    "real": {("ReverseKLDistillTrainer", "DistillationTrainer"): 1.2,
             ("ReverseKLDistillTrainer no LM loss", "DistillationTrainer"): 1.0},
}  # fmt: skip
ROLLOUT_TARGET = 1.15  # rollout time at α = 0.2 over that at α = 0


def distillation_ratios(medians: dict, names, setup: str) -> list[str]:
    """The ratio of each of our variants to DistillationTrainer and to GKDTrainer, with the targets of `setup`."""
    lines = ["| ours | ratio to DistillationTrainer | ratio to GKDTrainer | targets |", "|---|---|---|---|"]
    for name in names:
        if name in OURS:
            targets = [f"≤ {target} × {peer}" for (ours, peer), target in TARGETS[setup].items() if ours == name]
            lines.append(
                f"| {name} | {medians[name] / medians['DistillationTrainer']:.2f} | "
                f"{medians[name] / medians['GKDTrainer']:.2f} | {', '.join(targets) or '–'} |"
            )
    return [*lines, ""]


def rollout_lines(clock: RolloutClock, alpha: float) -> list[str]:
    """Median rollout seconds of our variants, the ratio of the defaults' to α = 0's, and each model's forwards per
    rollout against their expectation α·T + 2(1-α) and (1-α)·T + 2α (the prompt, its own steps after the first
    column, the last catch-up; at α = 0 one teacher forward and T student forwards)."""
    ours, alone = "ReverseKLDistillTrainer", "ReverseKLDistillTrainer α=0"
    lines = ["| ours | median rollout s | teacher forwards per rollout | α·T + 2(1-α) | student forwards per rollout | "
             "(1-α)·T + 2α | completion columns T |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, seconds in clock.seconds.items():
        if name.endswith("reuse"):
            continue
        columns = statistics.mean(clock.columns[name])
        teacher, student = (statistics.mean(calls[name]) for calls in (clock.teacher_calls, clock.student_calls))
        share = 0.0 if "α=0" in name else alpha
        teacher_expected = share * columns + 2 * (1 - share) if share else 1
        student_expected = (1 - share) * columns + 2 * share if share else columns
        lines.append(f"| {name} | {statistics.median(seconds):.3f} | {teacher:.1f} | {teacher_expected:.1f} | "
                     f"{student:.1f} | {student_expected:.1f} | {columns:.1f} |")  # fmt: skip
    ratio = statistics.median(clock.seconds[ours]) / statistics.median(clock.seconds[alone])
    lines += ["", f"Rollout time of the defaults (α = {alpha}) over α = 0: {ratio:.2f} (target ≤ {ROLLOUT_TARGET}).", ""]
    return lines


def teacher_work_lines(work: dict, name: str, max_new_tokens: int) -> list[str]:
    # Each row is fed its prompt columns and every sampled token but its last (which predicts nothing).
    expected = work["batch"] * work["prompt_length"] + work["valid"] - work["batch"]
    return [
        f"### Teacher forward work, one optimizer step of {name} (max_new_tokens = {max_new_tokens})",
        "",
        (
            f"Rollout: B={work['batch']}, prompt columns P={work['prompt_length']}, completion columns "
            f"T={work['completion_length']}, valid completion tokens {work['valid']}."
        ),
        (
            f"- positions fed to the teacher backbone: {work['backbone_positions']} in {work['backbone_calls']} "
            f"calls; prompt positions + every sampled position but the last of each row = B×P + Σ(len-1) = "
            f"{expected}; B×(P+T) = {work['rollout_positions']}."
        ),
        f"- teacher forwards per token position: {work['backbone_positions'] / expected:.3f}",
        (
            f"- rows projected by the teacher LM head (`H × V` product, not a forward): {work['head_rows']} = the "
            "last row of each teacher forward in the rollout (the distribution a teacher step draws from) + the valid "
            "completion rows scored from the recorded hidden states + those rows again in the loss."
        ),
        "",
    ]


def breakdown_lines(breakdown: dict, steps: int, max_new_tokens: int) -> list[str]:
    lines = [
        (
            f"### Where the time goes (torch.profiler ranges, ms per step, mean of {steps} steps, "
            f"max_new_tokens = {max_new_tokens})"
        ),
        "",
    ]
    for name, rows in breakdown.items():
        lines += [f"{name}:", "", "| stage | ms/step |", "|---|---|"]
        lines += [f"| {label} | {ms:.0f} |" for label, ms in rows]
        lines.append("")
    return lines


def tiny_setup(options):
    """Random Llama models from config over a word-level tokenizer, random-word prompts."""
    tokenizer = build_tokenizer([f"w{i}" for i in range(options.vocab_size - 5)])
    models = build_models(tokenizer, *MODEL_SHAPE)
    description = (
        f"Models: Llama from config, vocabulary {len(tokenizer)}, hidden {MODEL_SHAPE[0]}, teacher {MODEL_SHAPE[1]} "
        f"layers, student {MODEL_SHAPE[2]} layers; prompts 8-24 words (+ chat template), left-padded"
    )
    return tokenizer, models, conversations(tokenizer, num_rows=512), description


def real_setup(options):
    """SmolLM2-135M-Instruct teaching the student of the real-model benchmark (`benchmarks/real_quality.py`: its
    SFT-initialised student when that run has cached it, else the pruned student before SFT), on the `train`
    instructions and the teacher's greedy answers to them (cached)."""
    from real_quality import REPO, Settings, sft_student_path
    from transformers import AutoModelForCausalLM

    from rkd_trl.demo.instructions import cached_teacher_answers, load_instructions
    from rkd_trl.demo.instructions import conversations as instruction_conversations
    from rkd_trl.demo.models import keep_layers, load_smollm2

    settings, work_dir = Settings(), REPO / "benchmarks" / ".cache" / "real" / "full"
    teacher, tokenizer = load_smollm2()
    prompts = load_instructions("train")
    answers = cached_teacher_answers(teacher, tokenizer, prompts, 128, work_dir / "cache", batch_size=32)
    sft = sft_student_path(settings, work_dir)
    if (sft / "config.json").exists():
        student, which = AutoModelForCausalLM.from_pretrained(sft), "its SFT-initialised student"
    else:
        student, which = keep_layers(teacher, settings.student_layers), "the pruned student before SFT"
    description = (
        f"Models: SmolLM2-135M-Instruct (30 layers, vocabulary {len(tokenizer)}, float32) teaching {which} "
        f"(layers {settings.student_layers}); the 240 `train` instructions of the real-model benchmark, with the "
        f"teacher's answers as references; max_new_tokens {options.max_new_tokens}"
    )
    return tokenizer, (teacher.eval(), student.eval()), instruction_conversations(prompts, answers), description


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="the real SmolLM2 pair (one length, no profile)")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 (32 with --real)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="default: 7 (5 with --real)")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 as the configs resolve it on this machine (users' default)")  # fmt: skip
    parser.add_argument("--lm-share", action="store_true",
                        help="only the defaults, the LM loss on every row, 1/4 and 1/8 of them, no LM loss and "
                        "DistillationTrainer, at logging_steps 10 (section speed-lm-share)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=DOCS)
    options = parser.parse_args(argv)
    options.max_new_tokens = options.max_new_tokens or (32 if options.real else 64)
    options.rounds = options.rounds or (5 if options.real else 7)
    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()

    torch.manual_seed(0)
    tokenizer, models, dataset, description = (real_setup if options.real else tiny_setup)(options)
    setup = "real" if options.real else "tiny"
    ours = "ReverseKLDistillTrainer"
    names = [ours, f"{ours} no LM loss", f"{ours} α=0", f"{ours} α=0, no LM loss", "GKDTrainer",
             "DistillationTrainer", f"{ours} reuse"]  # fmt: skip
    out = header(description, options)
    medians = {}
    low, high = options.max_new_tokens, 2 * options.max_new_tokens
    # (max_new_tokens, logging_steps): users log every 1-10 steps; the scaling to twice the length at 10.
    runs = [(low, 10), (low, 1)] + ([] if options.real else [(high, 10)])
    if options.lm_share:
        names = [ours, f"{ours} LM loss on every row", f"{ours} LM loss on 1/4 of the rows",
                 f"{ours} LM loss on 1/8 of the rows", f"{ours} no LM loss", "DistillationTrainer"]  # fmt: skip
        runs = [(low, 10)]
    for max_new_tokens, logging_steps in runs:
        trainers = build_trainers(names, models, tokenizer, dataset, options.batch_size, max_new_tokens,
                                  logging_steps, options.precision)  # fmt: skip
        bf16 = trainers[ours].args.bf16
        runners = {name: StepRunner(trainer) for name, trainer in trainers.items()}
        with RolloutClock() as clock:
            times = interleaved_step_times(runners, options.warmup, options.rounds, clock)
        medians[max_new_tokens, logging_steps] = {name: statistics.median(values) for name, values in times.items()}
        section = [
            f"### Step time, max_new_tokens = {max_new_tokens}, logging_steps = {logging_steps}, bf16 = {bf16}",
            "",
            *step_table(times, "DistillationTrainer" if options.lm_share else "GKDTrainer"),
            "",
        ]
        if not options.lm_share:
            section += [*distillation_ratios(medians[max_new_tokens, logging_steps], names, setup),
                        *rollout_lines(clock, trainers[ours].args.teacher_mix_alpha)]  # fmt: skip
        print("\n".join(section), flush=True)
        out += section
        if (max_new_tokens, logging_steps) == (low, 10) and not options.real and not options.lm_share:
            work = teacher_forward_work(trainers[ours])
            profiled = (ours, "GKDTrainer", "DistillationTrainer")
            breakdown = {name: profile_breakdown(runners[name], options.profile_steps) for name in profiled}
        del trainers, runners

    if not options.real and not options.lm_share:
        out += [f"### Scaling, max_new_tokens {high} vs {low} (logging_steps = 10)", "",
                "| trainer | ratio of medians |", "|---|---|"]  # fmt: skip
        out += [f"| {name} | {medians[high, 10][name] / medians[low, 10][name]:.2f} |" for name in names]
        out += ["", *teacher_work_lines(work, ours, low), *breakdown_lines(breakdown, options.profile_steps, low)]
    text = "\n".join(out)
    print(text)
    section = "speed-real" if options.real else "speed"
    if options.lm_share:  # as the configs resolve bf16 on this machine, and pinned to float32, side by side
        section += "-lm-share" + ("-fp32" if options.precision == "fp32" else "")
    write_section(options.output, section, text)
    return medians


if __name__ == "__main__":
    main()
