"""What a CPU cannot show, in one short run on a GPU: the start-up probe and training in bf16 on models of realistic
depth, and what teacher mixing costs where decoding is bound by latency rather than arithmetic.

Models are built from config with random weights (realistic shapes, no download): Qwen2.5-1.5B's shape as the
teacher (28 layers, hidden 1536) and Qwen2.5-0.5B's as the student (24 layers, hidden 896), over a word-level
tokenizer of Qwen2.5's vocabulary size (151,936 rows).

1. `probe`: for Llama, Qwen2 and Gemma 3 in those shapes, the start-up probe (`probe.verify_scoring`) on the teacher in
   bf16 weights and on the student in float32 weights under bf16 autocast, as the trainer runs them: the noise floor,
   the discrepancy of decoding and of the output head as multiples of it, and whether the multi-token catch-up is
   exact; then two `ReverseKLDistillTrainer` steps with `bf16=True` (finite loss, seconds).
2. `rollout`: Qwen2 teacher and student, batch 8, 128 new tokens (random weights rarely end a row early): rollout
   tokens per second of the student alone (α = 0, the teacher scoring afterwards in one forward), and at α = 0.2 with
   both models fed every token (the per-step path), with the teacher alone catching up at its own steps, and with
   both catching up (the default), interleaved, medians of 3.
3. `step`: optimizer steps of the defaults, α = 0, the defaults with both models fed every token and
   `trl.DistillationTrainer` (β = 1) on the same models, interleaved (`benchmarks/speed.py`'s `StepRunner`), medians.

    PYTHONPATH=src python benchmarks/gpu_check.py --out $OUT/gpu_check.json   # on the GPU (about 5 minutes)
    PYTHONPATH=src python benchmarks/gpu_check.py --tiny --out /tmp/g.json   # the same code, tiny shapes, on a CPU

On a lent machine without trl or datasets, or with a transformers older than setup.cfg allows, carry them as wheels
(the device tool's README says how) and install them first, for example
`python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src`.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from speed import StepRunner, build_trainers, conversations  # noqa: E402

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer  # noqa: E402
from rkd_trl.demo.synthetic import build_tokenizer  # noqa: E402
from rkd_trl.probe import verify_scoring  # noqa: E402
from rkd_trl.sampling import sample_teacher_mixed  # noqa: E402
from rkd_trl.scoring import left_pad  # noqa: E402

VOCAB_SIZE = 151_936  # Qwen2.5's embedding rows
SHAPES = {  # Qwen2.5-1.5B and Qwen2.5-0.5B
    "teacher": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                "num_key_value_heads": 2},
    "student": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2},
}  # fmt: skip
TINY_SHAPES = {
    "teacher": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                "num_key_value_heads": 2},
    "student": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2},
}  # fmt: skip
FAMILIES = ["llama", "qwen2", "gemma3_text"]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(family: str, shape: dict, tokenizer, dtype: torch.dtype, seed: int):
    """A random causal LM of `family` in `shape` over the tokenizer, built on the device in `dtype`."""
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape,
    )  # fmt: skip
    torch.manual_seed(seed)
    with device():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def check_summary(check) -> dict:
    floor = check.noise.floor
    return {"noise_floor": floor, "tolerance": check.noise.tolerance, "sources": check.noise.sources,
            "decode_discrepancy": check.decode_discrepancy, "decode_margin": check.decode_discrepancy / floor,
            "head_discrepancy": check.head_discrepancy, "head_margin": check.head_discrepancy / floor,
            "catch_up": check.catch_up, "catch_up_error": check.catch_up_error,
            "drop_ended_rows": check.drop_ended_rows}  # fmt: skip


def probe_and_train(family: str, shapes: dict, tokenizer, dataset, output_dir: str) -> dict:
    """Part 1 for one family: the probe on both models as the trainer runs them, then two bf16 steps."""
    teacher = build_model(family, shapes["teacher"], tokenizer, torch.bfloat16, seed=1)
    student = build_model(family, shapes["student"], tokenizer, torch.float32, seed=2)
    result = {"teacher": check_summary(verify_scoring(teacher, len(tokenizer), tokenizer.pad_token_id, "teacher")),
              "student": check_summary(verify_scoring(student, len(tokenizer), tokenizer.pad_token_id, "student",
                                                      torch.bfloat16))}  # fmt: skip
    args = ReverseKLDistillConfig(
        output_dir=output_dir, bf16=True, max_steps=2, per_device_train_batch_size=4, max_new_tokens=32,
        learning_rate=1e-5, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    trainer = ReverseKLDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                      processing_class=tokenizer)  # fmt: skip
    synchronize()
    started = time.perf_counter()
    trainer.train()
    synchronize()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result.update(train_seconds=time.perf_counter() - started, losses=losses,
                  finite=all(map(lambda x: x == x and abs(x) != float("inf"), losses)))  # fmt: skip
    del trainer, teacher, student
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def rollout_speed(teacher, student, tokenizer, dataset, batch_size: int, max_new_tokens: int, repeats: int) -> dict:
    """Part 2: rollout tokens per second of the sampling paths, interleaved, median of `repeats`."""
    texts = [tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=False)
             for row in dataset.select(range(batch_size))]  # fmt: skip
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompt_ids, prompt_mask = (t.to(device()) for t in left_pad(prompts, tokenizer.pad_token_id))
    # (α, the teacher catches up, the student catches up): each model fed every token is the path before the one-coin
    # sampler, the teacher alone catching up the one before the student caught up too.
    paths = {"α=0 (student alone)": (0.0, True, True), "α=0.2, both models every token": (0.2, False, False),
             "α=0.2, teacher catching up": (0.2, True, False),
             "α=0.2, both catching up (default)": (0.2, True, True)}  # fmt: skip
    seconds = {name: [] for name in paths}
    tokens = {name: [] for name in paths}
    calls = {name: [] for name in paths}
    for _ in range(repeats + 1):  # the first round warms up
        for name, (alpha, teacher_catch_up, student_catch_up) in paths.items():
            synchronize()
            started = time.perf_counter()
            with torch.autocast(device().type, dtype=torch.bfloat16):  # the student's float32 weights, as in training
                rollout = sample_teacher_mixed(
                    student, teacher, prompt_ids, prompt_mask, vocab_size=len(tokenizer), max_new_tokens=max_new_tokens,
                    alpha=alpha, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                    teacher_catch_up=teacher_catch_up, student_catch_up=student_catch_up,
                )  # fmt: skip
            synchronize()
            seconds[name].append(time.perf_counter() - started)
            tokens[name].append(int(rollout.completion_mask.sum()))
            calls[name].append((rollout.teacher_calls, rollout.student_calls))
    result = {}
    for name in paths:
        median = statistics.median(seconds[name][1:])
        result[name] = {"seconds": median, "tokens_per_second": statistics.median(tokens[name][1:]) / median,
                        "teacher_calls": statistics.median(c[0] for c in calls[name][1:]),
                        "student_calls": statistics.median(c[1] for c in calls[name][1:]),
                        "forwards": statistics.median(sum(c) for c in calls[name][1:])}  # fmt: skip
    base = result["α=0 (student alone)"]["seconds"]
    for name in paths:
        result[name]["over_student_alone"] = result[name]["seconds"] / base
    return result


def step_speed(teacher, student, tokenizer, dataset, batch_size: int, max_new_tokens: int, rounds: int) -> dict:
    """Part 3: seconds per optimizer step of ours (defaults, α = 0, per-step teacher) and DistillationTrainer."""
    ours = "ReverseKLDistillTrainer"
    names = [ours, f"{ours} α=0", "DistillationTrainer"]
    trainers = build_trainers(names, (teacher, student), tokenizer, dataset, batch_size, max_new_tokens,
                              logging_steps=10, precision="bf16")  # fmt: skip
    per_step = build_trainers([ours], (teacher, student), tokenizer, dataset, batch_size, max_new_tokens,
                              logging_steps=10, precision="bf16")[ours]  # fmt: skip
    per_step._teacher_catch_up = per_step._student_catch_up = False  # each model fed every token, as before
    trainers[f"{ours}, both models every token"] = per_step
    runners = {name: StepRunner(trainer) for name, trainer in trainers.items()}
    times = {name: [] for name in runners}
    for index in range(rounds + 1):  # the first round warms up
        for name, runner in runners.items():
            synchronize()
            started = time.perf_counter()
            runner.timed_cycle()
            synchronize()
            if index:
                times[name].append(time.perf_counter() - started)
    peer = statistics.median(times["DistillationTrainer"])
    return {name: {"seconds": statistics.median(values), "over_DistillationTrainer": statistics.median(values) / peer}
            for name, values in times.items()}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and vocabulary (a CPU check of the code)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", nargs="+", choices=["probe", "rollout", "step"], default=["probe", "rollout", "step"])
    options = parser.parse_args(argv)
    shapes = TINY_SHAPES if options.tiny else SHAPES
    vocab_size = 512 if options.tiny else VOCAB_SIZE
    batch_size, max_new_tokens, repeats = (2, 8, 1) if options.tiny else (8, 128, 3)
    transformers.utils.logging.set_verbosity_error()
    tokenizer = build_tokenizer([f"w{i}" for i in range(vocab_size - 5)])
    dataset = conversations(tokenizer, num_rows=64)
    results = {"machine": {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
                           "torch": torch.__version__, "transformers": transformers.__version__},
               "tiny": options.tiny, "shapes": shapes, "vocab_size": len(tokenizer)}  # fmt: skip
    output_dir = str(options.out.parent / "gpu-check-run")

    def save():
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(results, indent=1))

    if "probe" in options.parts:
        results["probe"] = {}
        for family in FAMILIES:
            results["probe"][family] = probe_and_train(family, shapes, tokenizer, dataset, output_dir)
            print(family, json.dumps(results["probe"][family]), flush=True)
            save()
    if {"rollout", "step"} & set(options.parts):
        teacher = build_model("qwen2", shapes["teacher"], tokenizer, torch.bfloat16, seed=1)
        student = build_model("qwen2", shapes["student"], tokenizer, torch.float32, seed=2)
        if "rollout" in options.parts:
            results["rollout"] = rollout_speed(teacher, student, tokenizer, dataset, batch_size, max_new_tokens, repeats)
            print(json.dumps(results["rollout"]), flush=True)
            save()
        if "step" in options.parts:
            results["step"] = step_speed(teacher, student, tokenizer, dataset, batch_size, max_new_tokens, repeats)
            print(json.dumps(results["step"]), flush=True)
            save()
    return results


if __name__ == "__main__":
    main()
