"""Reverse KL position by position on the real model: ours, two of its ablations and GKD JSD at matched positions.

The reverse KL per token that `real_quality.py` reports pools every sampled token, and the reverse KL is higher early
in an answer than late; a method whose answers are shorter then scores a higher figure per token without being worse
at any position. This script trains the students of `real_quality.py` again (the same `Benchmark`, settings and
seeds; each saved under the work dir and reloaded on a later call), and measures on the `test` prompts, with the same
sampling seed for every student, the exact reverse KL over the vocabulary at each position of 4 samples per prompt
(`rkd_trl.evaluation.metrics.reverse_kl_by_position`). Its table gives the reverse KL per token and per sequence from that
exact form (less noisy than the sampled log-ratios of `real_quality.py`), the reverse KL in bands of positions, and
the per-token figure standardised to one length profile: the KL at each position weighted by how many of the SFT
student's samples reach it, the same weights for every method. The committed results ran one thread per process
(`OMP_NUM_THREADS=1`, recorded with each run): the thread count changes the sums enough to move a run.

    PYTHONPATH=src python benchmarks/real_positions.py                      # the grid, results to docs/benchmarks/
    PYTHONPATH=src python benchmarks/real_positions.py --runs "ours:5e-6:2"   # one share of it (run shares in parallel)
    PYTHONPATH=src python benchmarks/real_positions.py --collect            # gather the shares into the results
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import real_quality

from rkd_trl.evaluation.metrics import bootstrap_interval

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks" / "real_positions.json"
SAMPLES_PER_PROMPT = 4
SAMPLING_SEED = 7
MAX_NEW_TOKENS = 64
BANDS = [(1, 8), (9, 16), (17, 32), (33, 64)]
STARTS = {"150": real_quality.Settings(), "450": real_quality.SFT450_SETTINGS}
# (start, method, learning rate, seed): both rates from the usual start, and 5e-5 from the 450-step start, where
# GKD JSD had the lower reverse KL per token; there also ours without the LM loss and without the policy gradient.
GRID = [(start, method, rate, seed) for start, rate in (("150", 5e-6), ("150", 5e-5), ("450", 5e-5))
        for method in ("ours", "GKD JSD") for seed in (1, 2, 3)] + [
    ("450", "ours w/o LM loss", 5e-5, 1), ("450", "ours w/o policy gradient", 5e-5, 1)]  # fmt: skip


QUALITY_METHODS = ("ours w/o LM loss", "ours w/o policy gradient")


def run_folder(work_dir: Path, start: str, method: str, rate: float, seed: int) -> Path:
    """Where a run's student and record live (the SFT student's record: `<start>-SFT_init`)."""
    if method == "SFT init":
        return work_dir / "positions" / f"{start}-SFT_init"
    safe = re.sub(r"[^\w.=-]+", "_", method)
    return work_dir / "positions" / f"{start}-{safe}-{rate:g}-{seed}"


def measure(student, bench, limit_prompts=None) -> dict:
    """The position-by-position record of one student (sums and counts, so that seeds pool exactly)."""
    import torch

    from rkd_trl.evaluation.metrics import reverse_kl_by_position

    torch.manual_seed(SAMPLING_SEED)
    prompts = bench.eval_prompts[:limit_prompts]
    p = reverse_kl_by_position(student, bench.teacher, bench.tokenizer, prompts, MAX_NEW_TOKENS, SAMPLES_PER_PROMPT)
    return {"kl_sum": p["kl"].sum(0).tolist(), "log_ratio_sum": p["log_ratio"].sum(0).tolist(),
            "alive": p["mask"].sum(0).tolist(), "sequence_kl": p["kl"].sum(1).tolist(),
            "lengths": p["mask"].sum(1).tolist(), "threads": torch.get_num_threads()}  # fmt: skip


def run_one(start: str, method: str, rate: float, seed: int, work_dir: Path, limit_prompts=None) -> dict:
    """Train (or reload) one student and measure it; the record is saved next to the student."""
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback

    settings = STARTS[start]
    bench = real_quality.Benchmark(settings, work_dir)
    folder = run_folder(work_dir, start, method, rate, seed)
    record_path = folder / "positions.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if method in QUALITY_METHODS and "quality" not in record:  # measured before its answers were scored
            student = AutoModelForCausalLM.from_pretrained(folder).eval()
            record["quality"] = greedy_quality(student, bench, seed)
            record_path.write_text(json.dumps(record))
        return record
    if method == "SFT init":
        student = bench.sft_student()
    elif (folder / "config.json").exists():
        student = AutoModelForCausalLM.from_pretrained(folder).eval()
    else:
        student = bench.sft_student()
        torch.manual_seed(seed)
        trainer = bench.trainer(method, student, rate, seed)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        student = trainer.model.eval()
        student.save_pretrained(folder)
    record = {"start": start, "method": method, "learning_rate": rate, "seed": seed,
              **measure(student, bench, limit_prompts)}  # fmt: skip
    if method in QUALITY_METHODS:
        record["quality"] = greedy_quality(student, bench, seed)
    folder.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record))
    return record


def greedy_quality(student, bench, seed: int) -> dict:
    """`real_quality.py`'s scores of the student's greedy answers and samples (as its tables), without the answers."""
    scores = bench.evaluate(student, seed=1000 + seed)
    scores.pop("greedy_answers")
    return scores


def quality_table(results: dict) -> str:
    """The runs whose greedy answers were scored too (the ablations, which `real_quality.py` did not run from there)."""
    lines = [
        "| start | method | lr | seed | Rouge-L | rep-4 | ends (greedy) | length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if "quality" in r:
            q = r["quality"]
            lines.append(f"| {r['start']} SFT steps | {r['method']} | {r['learning_rate']:g} | {r['seed']} | "
                         f"{q['rouge_l']:.1f} | {q['repeated_4grams']:.3f} | {q['eos_rate']:.0%} | {q['length']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def collect(work_dir: Path, results_path: Path) -> Path:
    records = [json.loads(p.read_text()) for p in sorted((work_dir / "positions").glob("*/positions.json"))]
    settings = {"samples_per_prompt": SAMPLES_PER_PROMPT, "sampling_seed": SAMPLING_SEED,
                "max_new_tokens": MAX_NEW_TOKENS, "starts": {k: asdict(v) for k, v in STARTS.items()}}  # fmt: skip
    results_path.write_text(json.dumps({"settings": settings, "machine": real_quality.machine(), "runs": records}))
    return results_path


def summary(record: dict, weights: list[float]) -> dict:
    """Per-run figures: exact and sampled reverse KL per token, per sequence, in bands, and standardised."""
    kl, alive = record["kl_sum"], record["alive"]
    tokens = sum(alive)
    per_position = [k / a if a else 0.0 for k, a in zip(kl, alive, strict=True)]
    row = {"per_token": sum(kl) / tokens, "sampled_per_token": sum(record["log_ratio_sum"]) / tokens,
           "per_sequence": statistics.fmean(record["sequence_kl"]), "length": statistics.fmean(record["lengths"]),
           "standardised": sum(w * k for w, k in zip(weights, per_position, strict=True)) / sum(weights)}  # fmt: skip
    for low, high in BANDS:
        row[f"{low}-{high}"] = sum(kl[low - 1 : high]) / sum(alive[low - 1 : high])
    return row


def positions_table(results: dict) -> str:
    """One row per start, method and learning rate (mean ± sd over seeds)."""
    runs = results["runs"]
    lines = ["| start | method | lr | seeds | RKL/token | RKL/token, sampled | RKL/seq | length | "
             + " | ".join(f"tokens {low}–{high}" for low, high in BANDS) + " | standardised |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(BANDS) + "---|"]  # fmt: skip
    for start in sorted({r["start"] for r in runs}):
        init = next(r for r in runs if r["start"] == start and r["method"] == "SFT init")
        weights = init["alive"]
        groups = {}
        for r in runs:
            if r["start"] == start:
                key = (r["method"], None if r["method"] == "SFT init" else r["learning_rate"])
                groups.setdefault(key, []).append(summary(r, weights))
        order = sorted(groups, key=lambda k: (k[0] != "SFT init", k[1] or 0, k[0] != "ours", k[0]))
        for method, rate in order:
            rows = groups[(method, rate)]

            def cell(key, digits=2, rows=rows):
                values = [r[key] for r in rows]
                text = f"{statistics.fmean(values):.{digits}f}"
                return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")

            lines.append(f"| {start} SFT steps | {method} | {'–' if rate is None else f'{rate:g}'} | {len(rows)} | "
                         f"{cell('per_token')} | {cell('sampled_per_token')} | {cell('per_sequence', 1)} | "
                         f"{cell('length', 1)} | " + " | ".join(cell(f"{lo}-{hi}") for lo, hi in BANDS)
                         + f" | {cell('standardised')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def prompt_sums(runs: list[dict]) -> tuple[list[float], list[float]]:
    """Reverse KL and tokens of each prompt, summed over its samples in every run of `runs` (samples are stored
    prompt by prompt, `samples_per_prompt` each)."""
    kl, tokens = None, None
    for run in runs:
        n = len(run["sequence_kl"]) // SAMPLES_PER_PROMPT
        k = [sum(run["sequence_kl"][i * SAMPLES_PER_PROMPT : (i + 1) * SAMPLES_PER_PROMPT]) for i in range(n)]
        t = [sum(run["lengths"][i * SAMPLES_PER_PROMPT : (i + 1) * SAMPLES_PER_PROMPT]) for i in range(n)]
        kl = k if kl is None else [x + y for x, y in zip(kl, k, strict=True)]
        tokens = t if tokens is None else [x + y for x, y in zip(tokens, t, strict=True)]
    return kl, tokens


def paired_reverse_kl(
    a: list[dict], b: list[dict], per: str = "token", resamples: int = 10_000, seed: int = 0
) -> dict:
    """Reverse KL per token (`per="token"`: pooled over the runs' tokens) or per sequence (`per="sequence"`) of the
    runs `a` minus that of `b`, with a 95% bootstrap interval over the prompts, which both sets of runs answer."""
    (kl_a, tok_a), (kl_b, tok_b) = prompt_sums(a), prompt_sums(b)
    if per == "sequence":  # every prompt has the same number of samples in a run
        tok_a, tok_b = [len(a) * SAMPLES_PER_PROMPT] * len(kl_a), [len(b) * SAMPLES_PER_PROMPT] * len(kl_b)

    def difference(idx):
        return sum(kl_a[i] for i in idx) / sum(tok_a[i] for i in idx) - sum(kl_b[i] for i in idx) / sum(
            tok_b[i] for i in idx
        )

    low, high = bootstrap_interval(difference, len(kl_a), resamples, seed)
    return {"difference": difference(range(len(kl_a))), "low": low, "high": high}


def differences_table(results: dict, a: str = "ours", b: str = "GKD JSD") -> str:
    """`a` − `b` at each start and learning rate both ran at: reverse KL per token with its interval over prompts,
    per sequence, and standardised to the SFT student's length profile."""
    runs = results["runs"]
    lines = [f"| start | lr | seeds | {a} − {b}: RKL/token | 95% interval | RKL/seq | 95% interval | standardised |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for start in sorted({r["start"] for r in runs}):
        weights = next(r for r in runs if r["start"] == start and r["method"] == "SFT init")["alive"]
        for rate in sorted({r["learning_rate"] for r in runs if r["start"] == start and r["method"] == a}):
            runs_a, runs_b = ([r for r in runs if (r["start"], r["method"], r["learning_rate"]) == (start, m, rate)]
                              for m in (a, b))  # fmt: skip
            if not runs_b:
                continue
            d, q = paired_reverse_kl(runs_a, runs_b), paired_reverse_kl(runs_a, runs_b, per="sequence")
            standardised = [
                statistics.fmean(summary(r, weights)["standardised"] for r in rs) for rs in (runs_a, runs_b)
            ]
            lines.append(f"| {start} SFT steps | {rate:g} | {len(runs_a)}, {len(runs_b)} | {d['difference']:+.3f} | "
                         f"[{d['low']:+.3f}, {d['high']:+.3f}] | {q['difference']:+.1f} | "
                         f"[{q['low']:+.1f}, {q['high']:+.1f}] | {standardised[0] - standardised[1]:+.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def doc_blocks() -> dict[str, str]:
    results = json.loads(RESULTS.read_text())
    return {"real-positions": positions_table(results), "real-positions-differences": differences_table(results),
            "real-positions-quality": quality_table(results)}  # fmt: skip


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", help='"METHOD:LR:SEED" (start 150) or "START:METHOD:LR:SEED"')
    parser.add_argument("--collect", action="store_true", help="only gather the measured runs into --results")
    parser.add_argument("--work-dir", default=str(REPO / "benchmarks" / ".cache" / "real" / "full"))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument(
        "--limit-prompts",
        type=int,
        help="measure on the first N test prompts (a smoke run: give it its own --work-dir and --results)",
    )
    options = parser.parse_args(argv)
    work_dir, results_path = Path(options.work_dir), Path(options.results)
    if not options.collect:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        if options.runs:
            chosen = []
            for spec in options.runs:
                parts = spec.split(":")
                start, (method, rate, seed) = (parts[0], parts[1:]) if len(parts) == 4 else ("150", parts)
                chosen.append((start, method, float(rate), int(seed)))
        else:
            chosen = [(start, "SFT init", 0.0, 0) for start in sorted({g[0] for g in GRID})] + GRID
        for start, method, rate, seed in chosen:
            record = run_one(start, method, rate, seed, work_dir, options.limit_prompts)
            init = run_folder(work_dir, start, "SFT init", 0.0, 0) / "positions.json"
            weights = json.loads(init.read_text())["alive"] if init.exists() else record["alive"]
            row = summary(record, weights)
            print(
                f"{start} {method} {rate:g} {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True
            )
    return collect(work_dir, results_path)


if __name__ == "__main__":
    main()
