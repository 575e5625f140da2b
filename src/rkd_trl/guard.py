"""A warning when the student starts to degenerate: its answers loop (repeated 4-grams) or stop ending (cut off at
`max_completion_length`) well beyond where they started.

On-policy reverse KL can be lowered by text the teacher also finds likely once it is under way: repetition loops.
The reverse KL estimate keeps falling while the answers get worse, so the loss curve does not show it. Measured on a
real model (docs/benchmarks.md), the sampled training rollouts hardly show it either (their repeated 4-grams stayed
below 0.02 while the student's greedy answers' rose from 0.19 to 0.39): its most likely answer loops first. The
trainer logs both, the rollouts' (`completions/repeated_4grams`, `completions/clipped_ratio`) and, with
`greedy_probe`, those of the student's greedy answers to the same prompts every `greedy_probe_steps` steps
(`completions/greedy_*`). `DegenerationGuard` compares each logged value with the first one of the run and warns
once per signal when it has risen past its threshold in `threshold_logs` consecutive logs."""

import math

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .sampling import sample_teacher_mixed

logger = logging.get_logger(__name__)

SIGNALS = {  # logged key: (what it means, absolute rise over the start that triggers the warning)
    "completions/repeated_4grams": ("repeated 4-grams in the rollouts", 0.10),
    "completions/clipped_ratio": ("rollouts cut off at max_completion_length (no EOS)", 0.30),
    "completions/greedy_repeated_4grams": ("repeated 4-grams in the student's greedy answers", 0.10),
    "completions/greedy_clipped_ratio": ("greedy answers cut off at max_completion_length (no EOS)", 0.30),
}
ADVICE = (
    "The student may be degenerating (reverse-KL reward hacking: loops the teacher finds likely score well). Check "
    "its answers; a lower learning_rate, lm_loss_weight > 0 on reference answers, or a larger teacher_mix_alpha "
    'usually prevent it (docs/reliability.md, "Degeneration").'
)


class DegenerationGuard(TrainerCallback):
    """Warns (once per signal) when repetition or truncation of the training rollouts rises `rise` above its first
    logged value for `threshold_logs` logs in a row; `thresholds` overrides the rises of `SIGNALS`. Added by
    `ReverseKLDistillTrainer` unless `degeneration_guard=False`; remove it with
    `trainer.remove_callback(DegenerationGuard)`."""

    def __init__(self, thresholds: dict[str, float] | None = None, threshold_logs: int = 2):
        self.thresholds = {key: rise for key, (_, rise) in SIGNALS.items()} | (thresholds or {})
        self.threshold_logs = threshold_logs
        self.start: dict[str, float] = {}
        self.streak: dict[str, int] = {}
        self.warned: set[str] = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, rise in self.thresholds.items():
            if logs is None or key not in logs or key in self.warned:
                continue
            value = float(logs[key])
            start = self.start.setdefault(key, value)
            self.streak[key] = self.streak.get(key, 0) + 1 if value >= start + rise else 0
            if self.streak[key] >= self.threshold_logs:
                self.warned.add(key)
                if state.is_world_process_zero:
                    logger.warning(
                        f"step {state.global_step}: {SIGNALS.get(key, (key,))[0]} rose from {start:.2f} at the start "
                        f"to {value:.2f} ({key}). {ADVICE}"
                    )


def repeated_ngram_share(token_lists: list[list[int]], n: int = 4) -> float:
    """Mean over answers of the share of their n-grams that repeat an earlier n-gram of the same answer (`seq-rep-n`
    of Welleck et al., 2020, on tokens): 0 for answers without repetition, near 1 for a loop. Answers shorter than
    `n` tokens count as 0."""
    shares = []
    for tokens in token_lists:
        ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        shares.append(1 - len(set(ngrams)) / len(ngrams) if ngrams else 0.0)
    return sum(shares) / max(len(shares), 1)


def repetition_and_truncation(completion_ids, completion_mask, eos_token_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion: its share of repeated 4-grams (`repeated_ngram_share`), and 1.0 where it has no EOS
    (cut off at `max_completion_length`)."""
    mask = completion_mask.bool()
    ended = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=mask.device)) & mask
    shares = [repeated_ngram_share([row[valid].tolist()], 4) for row, valid in zip(completion_ids, mask, strict=True)]
    repetition = torch.tensor(shares, device=mask.device)
    return repetition, (~ended.any(1)).float()


class GreedyProbe:
    """The student's greedy answers to the prompts of the first probed rollout (kept, on each process, and answered
    again at every probe), on a schedule of their own: at a logging step, at least `every_steps` steps after the last
    probe. A student that starts to loop does so in its most likely answer (what greedy decoding and low
    temperatures return) before its samples at temperature 1 show it. The same prompts every time make a change in
    the figures a change in the student, not in the prompts drawn (8 prompts vary a lot)."""

    def __init__(self, every_steps: int):
        self.every_steps = every_steps
        self.prompts = None  # (ids, mask) of the first probed rollout
        self.last_step = None  # the step whose log carried the last probe

    def due(self, global_step: int, logging_steps: float, max_steps: int, ppo_epochs: int) -> bool:
        """Whether to probe in this rollout: one of the optimizer steps it trains (`ppo_epochs` of them) will be
        logged, so that the probe's figures land in that log, at least `every_steps` steps after the step whose log
        carried the last probe. The same on every process (it depends on the step only). Records the probe."""
        steps = logging_steps
        if steps < 1:  # a fraction of max_steps, as transformers reads it
            steps = max(1, math.ceil(max_steps * steps))
        logged = [global_step + i for i in range(1, ppo_epochs + 1) if (global_step + i) % int(steps) == 0]
        if not logged:
            return False
        if self.last_step is not None and logged[-1] - self.last_step < self.every_steps:
            return False
        self.last_step = logged[-1]
        return True

    @torch.no_grad()
    def answers(self, student, prompt_ids, prompt_mask, **sampling):
        """The student's greedy answers (`sample_teacher_mixed` at `top_k=1`, `alpha=0`; `sampling`: its other
        arguments) to the kept prompts, those given the first time."""
        if self.prompts is None:
            self.prompts = (prompt_ids.clone(), prompt_mask.clone())
        prompt_ids, prompt_mask = self.prompts
        # The sampler draws its random numbers even at top_k=1: on a forked generator, so that the probe leaves the
        # run's own sampling (and a resumed run, which probes other prompts) as it would be without it.
        device = prompt_ids.device
        with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
            return sample_teacher_mixed(student, None, prompt_ids, prompt_mask, alpha=0.0, top_k=1, **sampling)
