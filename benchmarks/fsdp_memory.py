"""Memory per process of a 2-process run under FSDP2 (student and teacher sharded) and under DDP, on CPU.

Both runs train the same pair of Llama models built from config (teacher ~74M parameters, student ~39M, vocabulary
32000, float32, AdamW) for a few steps with `accelerate launch` on two CPU processes (gloo):
`examples/accelerate/cpu_2proc.yaml` (DDP) and `examples/accelerate/cpu_2proc_fsdp2.yaml` (through
`examples/accelerate/fsdp_on_cpu.py`). Each process reports:

- the bytes of the tensors it holds between steps: its parameters (its shards under FSDP2) and optimizer states;
- its resident set size between steps, and its peak resident size (Linux `VmHWM`, reset at the start of each phase)
  during the rollout (sampling, both models gathered under FSDP2) and during the loss, backward and optimizer step.

The first step is left out (it builds the optimizer states and, under FSDP2, shards the student). glibc is told to
serve every allocation above 64 KiB with its own mapping (`MALLOC_MMAP_THRESHOLD_`), so that freed tensors leave the
resident size at once and it follows the live tensors.

    PYTHONPATH=src python benchmarks/fsdp_memory.py   # prints the table, writes it into docs/performance.md and
                                                       # docs/multi-gpu.md
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "docs" / "performance.md", REPO / "docs" / "multi-gpu.md"]
BACKENDS = {
    "DDP": ["examples/accelerate/cpu_2proc.yaml"],
    "FSDP2": ["examples/accelerate/cpu_2proc_fsdp2.yaml", "examples/accelerate/fsdp_on_cpu.py"],
}
MIB = 2**20


def resident_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM, the peak resident size, back to the current size


def tensor_mib(tensors) -> float:
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors) / MIB


def child(output: Path, options) -> None:
    """One process of the launched run: train and write this process's measurements."""
    import torch
    from transformers import TrainerCallback

    from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
    from rkd_trl.demo.synthetic import MultiAnswerTask, tiny_causal_lm

    torch.set_num_threads(1)
    baseline = resident_mib("VmRSS")
    task = MultiAnswerTask(num_prompts=16, answers_per_prompt=3, answer_length=3, num_letters=8, seed=0)
    tokenizer = task.tokenizer()
    padding = options.vocab_size - len(tokenizer)
    teacher = tiny_causal_lm(tokenizer, hidden_size=640, num_layers=8, num_heads=10, padded_vocab_rows=padding, seed=1)
    student = tiny_causal_lm(tokenizer, hidden_size=448, num_layers=5, num_heads=7, padded_vocab_rows=padding, seed=2)
    sizes = {"teacher_parameters": teacher.num_parameters(), "student_parameters": student.num_parameters()}
    args = ReverseKLDistillConfig(
        output_dir=str(output / "run"), max_new_tokens=options.max_new_tokens, per_device_train_batch_size=4,
        max_steps=options.steps, learning_rate=1e-5, top_k=1, logging_steps=1, report_to=[], bf16=False,
        use_cpu=True, save_strategy="no", seed=0,
    )  # fmt: skip
    phases = []

    class Phases(TrainerCallback):
        def on_step_begin(self, *_, **__):
            reset_peak()

        def on_step_end(self, *_, **__):
            phases[-1]["loss_backward_step_peak_mib"] = resident_mib("VmHWM")
            phases[-1]["resident_mib"] = resident_mib("VmRSS")
            phases[-1]["held_mib"] = tensor_mib(trainer.model.parameters()) + tensor_mib(
                trainer.teacher_model.parameters()
            )
            phases[-1]["optimizer_mib"] = tensor_mib(
                value for state in trainer.optimizer.state.values() for value in state.values() if value.dim() > 0
            )

    class Measured(ReverseKLDistillTrainer):
        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            phases.append({"rollout_peak_mib": resident_mib("VmHWM")})
            reset_peak()
            return batch

    trainer = Measured(
        model=student, teacher_model=teacher, args=args, train_dataset=task.conversations(repeats=4),
        processing_class=tokenizer, callbacks=[Phases()],
    )  # fmt: skip
    del student, teacher
    after_setup = resident_mib("VmRSS")
    trainer.train()
    measured = phases[1:]  # the first step builds the optimizer states and shards the student under FSDP2
    result = {
        **sizes,
        "baseline_mib": baseline,
        "after_setup_mib": after_setup,
        "held_mib": measured[-1]["held_mib"],
        "optimizer_mib": measured[-1]["optimizer_mib"],
        "resident_mib": measured[-1]["resident_mib"],
        "rollout_peak_mib": max(phase["rollout_peak_mib"] for phase in measured),
        "loss_backward_step_peak_mib": max(phase["loss_backward_step_peak_mib"] for phase in measured),
    }
    (output / f"process_{trainer.accelerator.process_index}.json").write_text(json.dumps(result))


def launch(backend: str, output: Path, options) -> list[dict]:
    config, *launcher = BACKENDS[backend]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config),
        *[str(REPO / path) for path in launcher], __file__, "--child", str(output),
        "--steps", str(options.steps), "--max-new-tokens", str(options.max_new_tokens),
        "--vocab-size", str(options.vocab_size),
    ]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return [json.loads((output / f"process_{index}.json").read_text()) for index in (0, 1)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    options = parser.parse_args()
    if options.child:
        child(options.child, options)
        return

    results = {}
    for backend in BACKENDS:
        with tempfile.TemporaryDirectory() as output:
            results[backend] = launch(backend, Path(output), options)
    first = results["DDP"][0]
    lines = [
        (
            f"Two CPU processes (gloo), Llama models from config: teacher {first['teacher_parameters'] / 1e6:.1f}M "
            f"parameters (hidden 640, 8 layers), student {first['student_parameters'] / 1e6:.1f}M (hidden 448, 5 "
            f"layers), vocabulary {options.vocab_size}, float32, AdamW; 4 prompts per process, "
            f"{options.max_new_tokens} new tokens (greedy), α = 0.2; steps 2-{options.steps} of one run per backend. "
            "MiB per process; `held` is the parameters (student + teacher) and optimizer states the process holds "
            "between steps, the other columns its resident set size (peaks: Linux `VmHWM` per phase), which include "
            f"about {first['baseline_mib']:.0f} MiB of Python, torch and transformers before any model exists."
        ),
        "",
        "| backend | process | held: parameters | held: optimizer states | resident between steps | peak during "
        "rollout | peak during loss + backward + optimizer step |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, processes in results.items():
        for index, process in enumerate(processes):
            lines.append(
                f"| {backend} | {index} | {process['held_mib']:.0f} | {process['optimizer_mib']:.0f} | "
                f"{process['resident_mib']:.0f} | {process['rollout_peak_mib']:.0f} | "
                f"{process['loss_backward_step_peak_mib']:.0f} |"
            )
    text = "\n".join(lines)
    print(text)
    print(json.dumps(results, indent=1))
    if not options.no_docs:
        from memory import write_section

        for page in DOCS:
            write_section(page, "fsdp-memory", text)


if __name__ == "__main__":
    main()
