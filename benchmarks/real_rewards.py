"""Why on-policy reverse KL makes a real student loop: the rewards and advantages of its own rollouts, by kind of token
and of completion.

The SFT-initialised student of `real_quality.py` (SmolLM2-135M-Instruct with 10 of its 30 layers) samples
completions to the `train` prompts (temperature 1, α = 0, as on-policy training does); the teacher scores them; the
trainer's own `advantages_from_rollout` turns the rewards into advantages with the trainer's defaults (γ, length
normalisation, whitening, reward scaling). Reported:

- per token: the reward `log p − log q`, `log p` and `log q` on tokens that repeat an earlier 4-gram of the same
  completion ("in a loop") and on the others; the EOS token's reward;
- per completion: the mean advantage of completions that loop (≥ 20% repeated 4-grams) against those that do not,
  and of completions cut off at the token budget against those that end.

    PYTHONPATH=src python benchmarks/real_rewards.py        # needs the SFT student of real_quality.py (cached)
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_quality  # noqa: E402

RESULTS = real_quality.REPO / "docs" / "benchmarks" / "real_rewards.json"


def loop_positions(tokens: list[int], n: int = 4) -> list[bool]:
    """Whether each token completes an n-gram that already occurred earlier in the same list."""
    seen, flags = set(), []
    for end in range(len(tokens)):
        gram = tuple(tokens[end - n + 1 : end + 1]) if end >= n - 1 else None
        flags.append(gram is not None and gram in seen)
        if gram is not None:
            seen.add(gram)
    return flags


def anatomy(student, teacher, tokenizer, prompts, max_new_tokens, samples, args, seed=0) -> dict:
    from rkd_trl.advantages import advantages_from_rollout
    from rkd_trl.evaluation.metrics import sample_with_scores

    torch.manual_seed(seed)
    rollout, _ = sample_with_scores(student, teacher, tokenizer, [p for p in prompts for _ in range(samples)],
                                    max_new_tokens)  # fmt: skip
    mask = rollout.completion_mask.float()
    advantages, _ = advantages_from_rollout(
        rollout.teacher_logprobs, rollout.student_logprobs, mask, gamma=args.gamma, include_current=False,
        length_normalized=args.length_normalization, whiten_advantages=args.whiten_advantages,
        reward_scaling=args.reward_scaling, reward_clip=args.reward_clip,
    )  # fmt: skip
    reward = (rollout.teacher_logprobs - rollout.student_logprobs) * mask
    groups = {"in a loop": [], "not in a loop": [], "EOS": []}
    per_completion = []
    for row in range(mask.size(0)):
        valid = mask[row].bool()
        tokens = rollout.completion_ids[row][valid].tolist()
        flags = loop_positions(tokens)
        for t, (token, looped) in enumerate(zip(tokens, flags)):
            kind = "EOS" if token == tokenizer.eos_token_id else "in a loop" if looped else "not in a loop"
            groups[kind].append((reward[row, t].item(), rollout.teacher_logprobs[row, t].item(),
                                 rollout.student_logprobs[row, t].item()))  # fmt: skip
        per_completion.append({
            "loop_share": sum(flags) / max(len(flags), 1), "ended": tokenizer.eos_token_id in tokens,
            "advantage": (advantages[row][valid].mean().item() if valid.any() else 0.0),
            "first_advantage": advantages[row, 0].item(), "reward_sum": reward[row].sum().item(),
            "length": len(tokens),
        })  # fmt: skip

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    tokens = {kind: {"count": len(rows), "reward": mean([r for r, _, _ in rows]),
                     "teacher_logprob": mean([p for _, p, _ in rows]), "student_logprob": mean([q for _, _, q in rows])}
              for kind, rows in groups.items()}  # fmt: skip
    kinds = {
        "loops (≥ 20% repeated 4-grams)": [c for c in per_completion if c["loop_share"] >= 0.2],
        "no loop (< 5%)": [c for c in per_completion if c["loop_share"] < 0.05],
        "cut off (no EOS)": [c for c in per_completion if not c["ended"]],
        "ended with EOS": [c for c in per_completion if c["ended"]],
    }
    completions = {kind: {"count": len(rows), "mean_advantage": mean([c["advantage"] for c in rows]),
                          "reward_per_token": mean([c["reward_sum"] / max(c["length"], 1) for c in rows]),
                          "reward_sum": mean([c["reward_sum"] for c in rows]), "length": mean([c["length"] for c in rows])}
                   for kind, rows in kinds.items()}  # fmt: skip
    return {"tokens": tokens, "completions": completions}


def table(result: dict) -> str:
    lines = ["| tokens | count | reward log p − log q | log p (teacher) | log q (student) |", "|---|---|---|---|---|"]
    for kind, row in result["tokens"].items():
        lines.append(f"| {kind} | {row['count']} | {row['reward']:.2f} | {row['teacher_logprob']:.2f} | "
                     f"{row['student_logprob']:.2f} |")  # fmt: skip
    lines += ["", "| completions | count | mean advantage (whitened) | reward per token | reward sum | length |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for kind, row in result["completions"].items():
        lines.append(f"| {kind} | {row['count']} | {row['mean_advantage']:+.2f} | {row['reward_per_token']:.2f} | "
                     f"{row['reward_sum']:.1f} | {row['length']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def doc_blocks() -> dict[str, str]:
    return {"real-rewards": table(json.loads(RESULTS.read_text()))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=str(real_quality.REPO / "benchmarks" / ".cache" / "real"))
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--samples", type=int, default=2)
    options = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from rkd_trl import ReverseKLDistillConfig

    hf_logging.set_verbosity_error()
    settings = real_quality.Settings()
    bench = real_quality.Benchmark(settings, Path(options.work_dir) / "full")
    student = bench.sft_student()
    # Whitened advantages, as measured (the default then): the table shows what whitening does to a looping completion.
    args = ReverseKLDistillConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to=[],
                                  whiten_advantages=True)  # fmt: skip
    result = anatomy(student, bench.teacher, bench.tokenizer, bench.train_prompts[: options.prompts],
                     settings.max_new_tokens, options.samples, args)  # fmt: skip
    result["settings"] = {"prompts": options.prompts, "samples": options.samples,
                          "max_new_tokens": settings.max_new_tokens}  # fmt: skip
    RESULTS.write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
