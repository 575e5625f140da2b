"""Memory over a long run: resident memory of the process after every optimizer step of a tiny distillation run.

    python benchmarks/long_run.py [--steps 200] [--output benchmarks/results/long_run.json]

Reports the resident set size (RSS) after warm-up and at the end, the growth per 100 steps fitted over the second
half of the run, and the number of live Python objects and tensors at the same points. A leak shows as a steady
positive slope; allocator noise as a flat line with jitter.
"""

import argparse
import gc
import json
import os
import resource
import tempfile
import time

import torch
from transformers import TrainerCallback

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.demo.synthetic import MultiAnswerTask, tiny_causal_lm, train_causal_lm


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


class MemoryTrace(TrainerCallback):
    def __init__(self):
        self.rss = []

    def on_step_end(self, args, state, control, **kwargs):
        self.rss.append(resident_mib())


def slope_per_100_steps(values: list[float]) -> float:
    """Least-squares slope of `values` against the step index, times 100."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    covariance = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    variance = sum((i - mean_x) ** 2 for i in range(n))
    return 100 * covariance / variance


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--output", default="benchmarks/results/long_run.json")
    args = parser.parse_args()

    task = MultiAnswerTask(num_prompts=12, answers_per_prompt=3, answer_length=3, num_letters=8, seed=0)
    tokenizer = task.tokenizer()
    teacher = tiny_causal_lm(tokenizer, hidden_size=48, num_layers=2, seed=1)
    train_causal_lm(teacher, tokenizer, task.conversations(), steps=150)
    student = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, seed=2)
    with tempfile.TemporaryDirectory() as output_dir:
        config = ReverseKLDistillConfig(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=8, max_new_tokens=8,
            learning_rate=1e-3, logging_steps=10, save_strategy="steps", save_steps=50, save_total_limit=1,
            report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = ReverseKLDistillTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=task.prompt_dataset(repeats=50),
            processing_class=tokenizer,
        )  # fmt: skip
        trace = MemoryTrace()
        trainer.add_callback(trace)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start

    warm = len(trace.rss) // 10
    second_half = trace.rss[len(trace.rss) // 2 :]
    gc.collect()
    result = {
        "steps": args.steps,
        "seconds": round(seconds, 1),
        "rss_mib_after_warmup": round(trace.rss[warm], 1),
        "rss_mib_end": round(trace.rss[-1], 1),
        "rss_mib_max": round(max(trace.rss), 1),
        "peak_rss_mib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_growth_mib_per_100_steps_second_half": round(slope_per_100_steps(second_half), 2),
        "live_tensors_end": live_tensors(),
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    for key, value in result.items():
        print(f"{key:45s} {value}")


if __name__ == "__main__":
    main()
