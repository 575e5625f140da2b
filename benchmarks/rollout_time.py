"""Rollout time alone: teacher-mixed sampling at α = 0.2 (the defaults) against α = 0 (the student samples alone and
the teacher scores the completions in one forward), interleaved, with the time inside each model's backbone.

`speed.py` times rollouts inside training steps, five to seven per configuration, and its ratio of the two medians
moved by more than 0.15 between runs of the same code. This script runs only `sampling.sample_teacher_mixed`, as the
trainer calls it (under bf16 autocast where the configs resolve bf16), on the same models and prompts, many rounds
(each round: the same prompts and seed for both α), and splits each rollout into the teacher's backbone forwards, the
student's, and the rest (sampling, the output heads, bookkeeping).

    PYTHONPATH=src python benchmarks/rollout_time.py          # speed.py's tiny models, T = 64 and 128
    PYTHONPATH=src python benchmarks/rollout_time.py --real   # the real SmolLM2 pair of speed.py --real, T = 32
"""

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory import DOCS, write_section

ALPHAS = (0.2, 0.0)


@contextlib.contextmanager
def backbone_clock(models: dict):
    """Seconds spent in each model's backbone forward (`{name: seconds}`, reset by the caller), by forward hooks."""
    from rkd_trl.scoring import language_model_backbone

    spent = dict.fromkeys(models, 0.0)
    started = {}
    handles = []
    for name, model in models.items():
        backbone = language_model_backbone(model)

        def pre(module, args, kwargs, name=name):
            started[name] = time.perf_counter()

        def post(module, args, kwargs, output, name=name):
            spent[name] += time.perf_counter() - started.pop(name)

        handles += [backbone.register_forward_pre_hook(pre, with_kwargs=True),
                    backbone.register_forward_hook(post, with_kwargs=True)]  # fmt: skip
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


def prompt_batches(tokenizer, dataset, batch_size: int, count: int):
    """`count` batches of left-padded chat prompts (the user turns of `dataset`'s conversations), cycling."""
    texts = [tokenizer.apply_chat_template(row[:1], tokenize=False, add_generation_prompt=True)
             for row in dataset["messages"]]  # fmt: skip
    tokenizer.padding_side = "left"
    batches = []
    for index in range(count):
        start = (index * batch_size) % max(len(texts) - batch_size, 1)
        encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batches.append((encoded.input_ids, encoded.attention_mask))
    return batches


def time_rollouts(teacher, student, tokenizer, batches, max_new_tokens: int, autocast_dtype) -> dict:
    """Per α: a list of `(seconds, teacher backbone s, student backbone s, teacher calls, student calls, columns)`,
    one per batch, the two α interleaved (the first batch warms up and is left out). `autocast_dtype`: the dtype the
    models' forwards run in under autocast (`main` wraps them), None without it."""
    from rkd_trl.sampling import sample_teacher_mixed

    records = {alpha: [] for alpha in ALPHAS}
    with backbone_clock({"teacher": teacher, "student": student}) as spent:
        for index, (prompt_ids, prompt_mask) in enumerate(batches):
            for alpha in ALPHAS:
                torch.manual_seed(index)
                spent["teacher"] = spent["student"] = 0.0
                started = time.perf_counter()
                rollout = sample_teacher_mixed(
                    student, teacher, prompt_ids, prompt_mask, vocab_size=student.config.vocab_size,
                    max_new_tokens=max_new_tokens, alpha=alpha, eos_token_ids=[tokenizer.eos_token_id],
                    pad_token_id=tokenizer.pad_token_id, autocast_dtype=autocast_dtype,
                )  # fmt: skip
                seconds = time.perf_counter() - started
                if index:
                    records[alpha].append((seconds, spent["teacher"], spent["student"], rollout.teacher_calls,
                                           rollout.student_calls, rollout.completion_ids.size(1)))  # fmt: skip
    return records


def rollout_table(records: dict, max_new_tokens: int) -> list[str]:
    """Medians per α, the ratio of the two medians, and how often α = 0.2 took longer than α = 0 on the same prompts."""
    lines = [
        f"### Rollout, max_new_tokens = {max_new_tokens}, {len(records[ALPHAS[0]])} rounds",
        "",
        "| α | median s | IQR (s) | teacher backbone s | student backbone s | rest s | teacher forwards | "
        "student forwards | columns |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for alpha in ALPHAS:
        rows = records[alpha]
        median = lambda i: statistics.median(row[i] for row in rows)  # noqa: E731
        quartiles = statistics.quantiles([row[0] for row in rows], n=4) if len(rows) > 1 else [rows[0][0]] * 3
        rest = statistics.median(row[0] - row[1] - row[2] for row in rows)
        lines.append(f"| {alpha} | {median(0):.3f} | {quartiles[0]:.3f}–{quartiles[2]:.3f} | {median(1):.3f} | "
                     f"{median(2):.3f} | {rest:.3f} | {median(3):.1f} | {median(4):.1f} | {median(5):.0f} |")  # fmt: skip
    mixed, alone = (statistics.median(row[0] for row in records[alpha]) for alpha in ALPHAS)
    paired = [a[0] / b[0] for a, b in zip(records[ALPHAS[0]], records[ALPHAS[1]], strict=True)]
    quartiles = " – ".join(f"{q:.2f}" for q in statistics.quantiles(paired, n=4)) if len(paired) > 1 else "–"
    lines += ["", f"Rollout at α = 0.2 over α = 0: {mixed / alone:.2f} (ratio of medians; median of the per-round "
              f"ratios {statistics.median(paired):.2f}, quartiles {quartiles}; target ≤ 1.15).", ""]  # fmt: skip
    return lines


def main(argv=None) -> dict:
    import speed
    from code_quality import resolve_precision
    from transformers.utils import logging as hf_logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="the real SmolLM2 pair of speed.py --real")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=None, help="default: 64 128 (32 with --real)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 where the machine computes it natively, as the configs resolve it")  # fmt: skip
    parser.add_argument("--teacher-bf16", action="store_true",
                        help="the teacher in bfloat16 weights (as a user loads a frozen teacher) instead of float32 "
                        "weights cast by autocast at every forward")  # fmt: skip
    parser.add_argument("--output", type=Path, default=DOCS)
    options = parser.parse_args(argv)
    lengths = options.max_new_tokens or ([32] if options.real else [64, 128])
    options.max_new_tokens = lengths[0]  # what the set-up functions describe
    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer, (teacher, student), dataset, description = (speed.real_setup if options.real else speed.tiny_setup)(
        options
    )
    bf16 = resolve_precision(options.precision) == "bf16"
    if options.teacher_bf16:
        teacher.to(torch.bfloat16)
    # As accelerate prepares a model for mixed precision: its forward runs under autocast, the rest not (accelerate
    # also converts the outputs to float32: the decoder reads one position's logits in float32 either way).
    if bf16:
        for model in (teacher, student):
            model.forward = torch.autocast(model.device.type, dtype=torch.bfloat16)(model.forward)
    out = [
        f"{description.split('; max_new_tokens')[0]}; batch {options.batch_size}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); bf16 autocast {'on' if bf16 else 'off'} (precision {options.precision}); "
        f"the teacher's weights in {'bfloat16' if options.teacher_bf16 else 'float32'}. "
        "`sampling.sample_teacher_mixed` alone, as the trainer calls it: each round draws the same prompts with the "
        "same seed at α = 0.2 and α = 0, one after the other; the first round warms up. Teacher / student backbone: "
        "time inside each model's backbone forward (forward hooks); rest: sampling, the output heads, bookkeeping.",
        "",
    ]
    results = {}
    batches = prompt_batches(tokenizer, dataset, options.batch_size, options.rounds + 1)
    for max_new_tokens in lengths:
        records = time_rollouts(teacher, student, tokenizer, batches, max_new_tokens, torch.bfloat16 if bf16 else None)
        results[max_new_tokens] = records
        section = rollout_table(records, max_new_tokens)
        print("\n".join(section), flush=True)
        out += section
    section = ("rollout-time-real" if options.real else "rollout-time") + ("-teacher-bf16" if options.teacher_bf16 else "")
    write_section(options.output, section, "\n".join(out).rstrip())
    return results


if __name__ == "__main__":
    main()
