"""Steps 2–4 of docs/quickstart.md, run as a new user runs them: the documented commands, in a fresh folder holding a
copy of `examples/`, one process each, timed. Their results go to benchmarks/results/quickstart.json and the page's
commands and figures are rendered from it (generated blocks, docs/generated.py):

    PYTHONPATH=src python benchmarks/quickstart.py

The figures depend on the CPU and on the versions of torch and the libraries; the results record both.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "quickstart.json"
RECIPE = "examples/recipes/tiny.yaml"
COMMANDS = {
    "make": ["python examples/make_tiny_models.py tiny"],
    "train": [f"rkd-trl train --config {RECIPE}"],
    "eval": [
        "rkd-trl eval --model tiny/student --teacher tiny/teacher --dataset tiny/data --max-new-tokens 5",
        "rkd-trl eval --model tiny-student-rkd --teacher tiny/teacher --dataset tiny/data --max-new-tokens 5",
    ],
}
LIBRARIES = ("torch", "transformers", "trl", "accelerate", "datasets")


def run(command: str, folder: Path) -> float:
    """Run a documented command in `folder` with this interpreter's `python` and `rkd-trl`; return its wall time."""
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    print(f"$ {command}", flush=True)
    started = time.perf_counter()
    subprocess.run(shlex.split(command), cwd=folder, env=environment, check=True)
    return time.perf_counter() - started


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_quickstart(folder: Path) -> dict:
    shutil.copytree(REPO / "examples", folder / "examples")
    seconds = {step: 0.0 for step in COMMANDS}
    for command in COMMANDS["make"] + COMMANDS["train"]:
        seconds["make" if command in COMMANDS["make"] else "train"] += run(command, folder)
    evaluations = []
    for index, command in enumerate(COMMANDS["eval"]):
        output = folder / f"eval-{index}.json"
        seconds["eval"] += run(f"{command} --output {output}", folder)
        evaluations.append(json.loads(output.read_text()))
    steps = yaml.safe_load((REPO / RECIPE).read_text())["max_steps"]
    return {
        "commands": COMMANDS,
        "evaluations": [
            {
                "model": result["model"],
                "label": "SFT init" if index == 0 else f"{steps} steps",
                **{key: result[key] for key in ("num_prompts", "rouge_l", "exact_match", "length", "reverse_kl",
                                                "reverse_kl_stderr")},  # fmt: skip
            }
            for index, result in enumerate(evaluations)
        ],
        "seconds": seconds,
        "environment": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg()[1],  # over the last 5 minutes: other work slows the steps down
            "python": platform.python_version(),
            **{library: importlib.metadata.version(library) for library in LIBRARIES},
        },
    }


def bash_block(commands: list[str]) -> str:
    return "```bash\n" + "\n".join(commands) + "\n```"


def eval_table(results: dict) -> str:
    """The table of `rkd-trl eval`'s figures, with a note of how and where they were measured."""
    rows = [
        f"| `{row['model']}` ({row['label']}) | {row['rouge_l']:.2f} | {row['exact_match']:.1%} | {row['length']:.2f} "
        f"| {row['reverse_kl']:.2f} ± {row['reverse_kl_stderr']:.2f} |"
        for row in results["evaluations"]
    ]
    environment = results["environment"]
    versions = ", ".join(f"{library} {environment[library]}" for library in LIBRARIES)
    note = (
        "(Answers sampled at temperature 1, seed 0; the reverse KL from 8 samples per prompt, ± its standard error. "
        "Measured by `benchmarks/quickstart.py`, which runs steps 2–4 in a fresh folder and renders this table, on "
        f"{environment['cpu']} ({environment['cpu_count']} cores) with Python {environment['python']}, {versions}; "
        "the figures move with the CPU and with the versions of torch and the libraries. Steps 2–4 took "
        f"{sum(results['seconds'].values()):.0f} s, at a load average of {environment['load_average']:.1f}.)"
    )
    header = ["| model | Rouge-L | exact match | length | reverse KL (nats) |", "|---|---|---|---|---|"]
    return "\n".join([*header, *rows, "", textwrap.fill(note, width=119, break_on_hyphens=False)])


def doc_blocks() -> dict[str, str]:
    """The blocks of docs/quickstart.md, rendered from the saved results (docs/generated.py)."""
    results = json.loads(RESULTS.read_text())
    return {
        "make-command": bash_block(results["commands"]["make"]),
        "train-command": bash_block(results["commands"]["train"]),
        "eval-commands": bash_block(results["commands"]["eval"]),
        "eval-table": eval_table(results),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help=f"results JSON (default: {RESULTS.relative_to(REPO)})")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rkd-trl-quickstart-") as folder:
        results = run_quickstart(Path(folder))
    Path(options.results).write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {options.results}")
    if Path(options.results) == RESULTS:
        for page in runpy.run_path(str(REPO / "docs" / "generated.py"))["update_pages"]():
            print(f"updated {page}")


if __name__ == "__main__":
    main()
