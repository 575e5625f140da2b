"""Follow-ups of the quality benchmark: two of its methods, paired by seed, on one task, possibly with more steps.
Same students, learning rate and seeds as `quality.py`.

    # does teacher mixing (α = 0.2) catch up with on-policy sampling (α = 0) when training runs longer?
    PYTHONPATH=src python benchmarks/followup.py --steps 600 --results docs/benchmarks/teacher_mix_steps.json
    # does length normalisation matter when valid answers differ in length?
    PYTHONPATH=src python benchmarks/followup.py --task varlen --steps 200 \
        --methods "MiniLLM (ours)" "ours w/o length norm" --results docs/benchmarks/length_normalization.json
"""

import argparse
import json
import statistics
from pathlib import Path

import quality
import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="short", choices=list(quality.TASKS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--methods", nargs=2, default=["MiniLLM (ours)", "ours w/o teacher mix"])
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--work-dir", default="benchmarks/.cache")
    parser.add_argument("--results", default="docs/benchmarks/followup.json")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = quality.BenchmarkSettings(tasks=[options.task], seeds=options.seeds, steps=options.steps)
    benchmark = quality.Benchmark(settings, Path(options.work_dir))
    results = {"settings": vars(options), "methods": {}}
    for method in options.methods:
        runs = [benchmark.run(options.task, method, options.learning_rate, seed) for seed in options.seeds]
        results["methods"][method] = runs
        for key in ("validity", "rouge_l", "reverse_kl", "unique_valid_answers", "length"):
            values = [run[key] for run in runs]
            print(
                f"{method} {options.steps} steps {key}: {statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"
            )
    Path(options.results).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
