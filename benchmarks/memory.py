"""Peak memory (and time) of the MiniLLM loss step, chunked vs an unchunked reference computation.

The loss step is forward + backward of `Σ policy_gradient + Σ single_step` over `N = batch × length` completion
tokens, from final hidden states through both LM heads (vocabulary `V`). Each variant runs in its own process; the
peak is the process's peak resident set size during the step (Linux `VmHWM`, reset just before the step) minus the
resident size just before it, so it counts everything the step allocates: logits, log-probs, gradients.

- `unchunked (autograd)`: `losses.minillm_token_losses` on full `[N, V]` logits, differentiated by autograd.
- `chunked (closed form), chunk c`: `losses.minillm_loss_sums` with `chunk_size=c`, the trainer's path.

    PYTHONPATH=src python benchmarks/memory.py      # prints the table, writes it into docs/performance.md
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rkd_trl.losses import minillm_loss_sums, minillm_token_losses

DOCS = Path(__file__).parent.parent / "docs" / "performance.md"


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def loss_inputs(tokens: int, vocab_size: int, hidden_size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the heads' initialisation
    student_head = torch.nn.Linear(hidden_size, vocab_size, bias=False)
    teacher_head = torch.nn.Linear(hidden_size, vocab_size, bias=False)
    teacher_head.requires_grad_(False)
    return {
        "student_hidden": torch.randn(tokens, hidden_size, generator=generator, requires_grad=True),
        "teacher_hidden": torch.randn(tokens, hidden_size, generator=generator),
        "student_head": student_head,
        "teacher_head": teacher_head,
        "token_ids": torch.randint(vocab_size, (tokens,), generator=generator),
        "old_logprobs": -torch.rand(tokens, generator=generator) * 5 - 8,
        "advantages": torch.randn(tokens, generator=generator),
        "weights": torch.rand(tokens, generator=generator) * 1.25,
    }


def loss_step(variant: str, chunk_size: int, case: dict) -> torch.Tensor:
    if variant == "unchunked":
        terms = minillm_token_losses(
            case["student_head"](case["student_hidden"]),
            case["teacher_head"](case["teacher_hidden"]),
            case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
            temperature=1.0, clip_epsilon=0.2,
        )  # fmt: skip
        loss = terms.policy_gradient.sum() + terms.single_step.sum()
    else:
        loss = minillm_loss_sums(
            case["student_hidden"], case["teacher_hidden"], case["student_head"], case["teacher_head"],
            case["token_ids"], case["old_logprobs"], case["advantages"], case["weights"],
            temperature=1.0, clip_epsilon=0.2, chunk_size=chunk_size,
        )["objective"]  # fmt: skip
    loss.backward()
    return loss.detach()


def measure(variant: str, chunk_size: int, tokens: int, vocab_size: int, hidden_size: int) -> dict:
    """In this process: peak resident memory of one loss step above the resident memory before it, and its time."""
    torch.set_num_threads(1)
    case = loss_inputs(tokens, vocab_size, hidden_size)
    before = resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident size, to the current size
    start = time.perf_counter()
    loss = loss_step(variant, chunk_size, case)
    seconds = time.perf_counter() - start
    peak = resident_kib("VmHWM")
    return {"peak_mib": (peak - before) / 1024, "seconds": seconds, "loss": loss.item()}


def run_isolated(variant: str, chunk_size: int, options) -> dict:
    command = [
        sys.executable, __file__, "--child", variant, "--chunk-size", str(chunk_size), "--tokens", str(options.tokens),
        "--vocab-size", str(options.vocab_size), "--hidden-size", str(options.hidden_size),
    ]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in `path` (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text}\n{end}"
    document = path.read_text() if path.exists() else ""
    if begin in document and end in document:
        document = document[: document.index(begin)] + block + document[document.index(end) + len(end) :]
    else:
        document = document.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(document)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="batch × length")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--repeats", type=int, default=3, help="processes per variant (median)")
    parser.add_argument("--child", choices=["unchunked", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=DOCS)
    options = parser.parse_args()
    if options.child:
        result = measure(options.child, options.chunk_size, options.tokens, options.vocab_size, options.hidden_size)
        print(json.dumps(result))
        return

    variants = [("unchunked", options.tokens)] + [("chunked", size) for size in options.chunk_sizes]
    results = {variant: [] for variant in variants}
    for _ in range(options.repeats):  # interleaved
        for variant in variants:
            results[variant].append(run_isolated(*variant, options))
    reference_peak = statistics.median(r["peak_mib"] for r in results[variants[0]])
    reference_time = statistics.median(r["seconds"] for r in results[variants[0]])
    lines = [
        (
            f"Loss step (forward + backward) at N = batch × length = {options.tokens} tokens, vocabulary "
            f"{options.vocab_size}, hidden {options.hidden_size}, float32, 1 thread; median of {options.repeats} "
            "processes per variant."
        ),
        "",
        "| variant | peak MiB above start | ratio to unchunked | loss-step seconds | ratio | loss value |",
        "|---|---|---|---|---|---|",
    ]
    for (variant, chunk_size), runs in results.items():
        peak = statistics.median(r["peak_mib"] for r in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        label = "unchunked (autograd)" if variant == "unchunked" else f"chunked (closed form), chunk {chunk_size}"
        lines.append(
            f"| {label} | {peak:.0f} | {peak / reference_peak:.2f} | {seconds:.2f} | {seconds / reference_time:.2f} "
            f"| {runs[0]['loss']:.4f} |"
        )
    text = "\n".join(lines)
    print(text)
    write_section(options.output, "memory", text)


if __name__ == "__main__":
    main()
