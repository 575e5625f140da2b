"""In which precision each forward of a training step runs, for ReverseKLDistillTrainer and trl.DistillationTrainer,
under `bf16=True` (mixed precision) and under the configs' own default on this machine.

Mixed precision in transformers' Trainer is accelerate's: `prepare` wraps each model's `forward` in autocast. A
forward that does not go through that wrapper runs in the weights' dtype whatever `bf16` says. This script counts, over
one `Trainer.train` step of each trainer on tiny Llama models from config (float32 weights), the calls of every
`nn.Linear` of the student and the teacher by (model, training forward or not, autocast on, output dtype), and writes
docs/benchmarks/precision_paths.json; `doc_blocks()` renders its table for docs/performance.md.

    PYTHONPATH=src python benchmarks/precision_paths.py
"""

import collections
import json
import platform
import runpy
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
import trl

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks" / "precision_paths.json"
sys.path.insert(0, str(Path(__file__).parent))


def linear_calls(trainer) -> dict:
    """{"model | training forward? | autocast | dtype": calls} over one `train()` step."""
    counts = collections.Counter()
    hooks = []
    for who, model in (("student", trainer.model), ("teacher", trainer.teacher_model)):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):

                def hook(module, args, output, who=who):
                    phase = "training forward" if torch.is_grad_enabled() else "no-grad (rollout, scores)"
                    autocast = "autocast" if torch.is_autocast_enabled(output.device.type) else "no autocast"
                    counts[f"{who} | {phase} | {autocast} | {str(output.dtype).removeprefix('torch.')}"] += 1

                hooks.append(module.register_forward_hook(hook))
    trainer.args.max_steps = 1
    trainer.train()
    for hook in hooks:
        hook.remove()
    return dict(sorted(counts.items()))


def measure() -> dict:
    from speed import build_models, build_trainers, conversations

    from rkd_trl.config import cpu_computes_bf16_natively
    from rkd_trl.demo.synthetic import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer([f"w{i}" for i in range(2000)])
    models = build_models(tokenizer, 128, 4, 2)
    dataset = conversations(tokenizer, 64)
    names = ["DistillationTrainer", "ReverseKLDistillTrainer"]
    runs = {}
    for precision in ("bf16", "auto"):
        trainers = build_trainers(names, models, tokenizer, dataset, 4, 16, 10, precision)
        for name, trainer in trainers.items():
            trainer.args.output_dir = tempfile.mkdtemp(prefix="rkd-precision-")
            label = "bf16=True" if precision == "bf16" else "bf16 as the config resolves it"
            runs[f"{name}, {label}"] = {
                "bf16": trainer.args.bf16,
                "linear_calls": linear_calls(trainer),
            }
    return {
        "runs": runs,
        "machine": {
            "processor": platform.machine(),
            "cpu_computes_bf16_natively": cpu_computes_bf16_natively(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "setting": "Llama from config (hidden 128; teacher 4 layers, student 2), float32 weights, batch 4, 16 new "
        "tokens, one Trainer.train step, CPU",
    }


def doc_blocks() -> dict[str, str]:
    results = json.loads(RESULTS.read_text())
    machine = results["machine"]
    lines = [
        f"{results['setting']}; torch {machine['torch']}, transformers {machine['transformers']}, "
        f"trl {machine['trl']}; "
        f"this CPU computes bf16 natively: {machine['cpu_computes_bf16_natively']}. Calls of the models' `nn.Linear` "
        "layers (the output head included where it is called as a module):",
        "",
        "| trainer, precision | bf16 | model | forward | autocast | dtype | calls |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, entry in results["runs"].items():
        for key, calls in entry["linear_calls"].items():
            model, phase, autocast, dtype = key.split(" | ")
            lines.append(f"| {run} | {entry['bf16']} | {model} | {phase} | {autocast} | {dtype} | {calls} |")
    return {"precision-paths": "\n".join(lines)}


def main():
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    RESULTS.write_text(json.dumps(measure(), indent=1) + "\n")
    runpy.run_path(str(REPO / "docs" / "generated.py"))["update_pages"]()
    print(doc_blocks()["precision-paths"])


if __name__ == "__main__":
    main()
