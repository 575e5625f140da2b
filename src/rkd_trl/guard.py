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

from transformers import TrainerCallback
from transformers.utils import logging

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
    "usually prevent it (docs/reliability.md, \"Degeneration\")."
)


class DegenerationGuard(TrainerCallback):
    """Warns (once per signal) when repetition or truncation of the training rollouts rises `rise` above its first
    logged value for `threshold_logs` logs in a row; `thresholds` overrides the rises of `SIGNALS`. Added by
    `ReverseKLDistillTrainer`; remove it with `trainer.remove_callback(DegenerationGuard)`."""

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
