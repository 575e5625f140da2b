"""What makes a run safe to leave alone, as a mixin over `transformers.Trainer`: updates with a NaN/inf loss or gradient
are withheld (and the run stops after `max_consecutive_nonfinite_steps` in a row), every `checkpoint-N` folder is
complete (written under a staging folder, then renamed), and a checkpoint taken inside a `ppo_epochs` window holds the
rollouts that the window's remaining passes reuse, so a resumed run continues exactly. docs/reliability.md.

It overrides private methods of `transformers.Trainer` (`_save_checkpoint`, `_get_output_dir`, `_push_from_checkpoint`,
`_save_rng_state`, `_load_rng_state`) and reads TRL's rollout buffer (`_step`, `_buffered_inputs`): the list of every
private name the package relies on is `rkd_trl.private_api.PRIVATE_API`, checked by tests/test_private_api.py."""

import os
import shutil

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Written next to `rng_state*.pth` in a checkpoint taken in the middle of a `ppo_epochs` window: the rollouts that the
# remaining passes of the window reuse.
ROLLOUT_BUFFER_NAME = "rollout_buffer"
# Parent folder of a checkpoint while it is being written; it is renamed to `checkpoint-N` once complete. The leading
# underscore keeps it out of Hub uploads of the output folder.
STAGING_DIR_NAME = "_incomplete-checkpoint"


class ReliableTrainingMixin:
    """Mix in before a `transformers.Trainer` subclass. Reads `args.max_consecutive_nonfinite_steps` (0 when absent:
    stop at the first non-finite step) and, when present, `args.ppo_epochs` and TRL's `_step` / `_buffered_inputs`."""

    _window_nonfinite = None  # NaN/inf seen in a loss of the current optimizer step (a device tensor)
    _nonfinite_streak = 0
    _skipped_steps = 0
    _checkpoint_staging_dir = None

    @property
    def _max_nonfinite_steps(self) -> int:
        return getattr(self.args, "max_consecutive_nonfinite_steps", 0)

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        nonfinite = ~torch.isfinite(loss)
        self._window_nonfinite = nonfinite if self._window_nonfinite is None else self._window_nonfinite | nonfinite
        if self.accelerator.sync_gradients and not self.is_deepspeed_enabled:
            self._withhold_nonfinite_update(model)
        return loss

    def _withhold_nonfinite_update(self, model):
        """After the last backward of an optimizer step: if any process saw a NaN/inf loss or gradient, drop the
        gradients so that the optimizer step leaves weights and optimizer state untouched (optimizers skip
        parameters whose `grad` is None); stop the run after `max_consecutive_nonfinite_steps` such steps in a row."""
        window_nonfinite, self._window_nonfinite = self._window_nonfinite, None
        nonfinite = torch.zeros(1, device=self.accelerator.device)
        if window_nonfinite is not None:
            nonfinite = nonfinite + window_nonfinite.float()
        # With float16 loss scaling, overflowing gradients are routine: the GradScaler skips those steps and lowers
        # its scale, and it must see them to do so. Only the loss is checked then, and the gradients are left alone.
        scaled = self.accelerator.scaler is not None
        grads = [] if scaled else [p.grad for p in model.parameters() if p.grad is not None]
        # FSDP2 keeps gradients as DTensor shards: each process checks its own (the verdict is gathered below).
        grads = [grad.to_local() if hasattr(grad, "to_local") else grad for grad in grads]
        if grads:
            finite = torch.stack([g.isfinite().all().to(nonfinite.device) for g in grads]).all()
            nonfinite = nonfinite + (~finite).float()
        if self.accelerator.gather(nonfinite).max() == 0:
            self._nonfinite_streak = 0
        else:
            if not scaled:
                model.zero_grad(set_to_none=True)
            self._skipped_steps += 1
            self._nonfinite_streak += 1
            if self._nonfinite_streak > self._max_nonfinite_steps:
                raise FloatingPointError(
                    self._nonfinite_message(
                        f"{self._nonfinite_streak} optimizer step(s) in a row had a NaN/inf loss or gradient"
                    )
                )
            logger.warning(
                f"Step {self.state.global_step + 1}: NaN/inf loss or gradient; the update is skipped "
                f"({self._nonfinite_streak} in a row, limit max_consecutive_nonfinite_steps="
                f"{self._max_nonfinite_steps})."
            )
        if hasattr(self, "_metrics"):  # TRL trainers' logged metrics
            self._metrics["train"]["nonfinite/skipped_steps"] = [self._skipped_steps]

    def _nonfinite_message(self, what: str) -> str:
        return (
            f"{what} (max_consecutive_nonfinite_steps={self._max_nonfinite_steps}); the weights "
            "were not updated with it. Usual causes: a model run in float16 overflowing (use bfloat16 or float32), "
            "a learning rate too high (lower `learning_rate`, keep `max_grad_norm`), `reward_clip=None` with a teacher "
            "that gives zero probability to sampled tokens. Fix the cause and resume from the last checkpoint."
        )

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint under a staging folder and rename it to `checkpoint-N` once complete, so that every
        `checkpoint-N` folder (what `resume_from_checkpoint=True` picks) is complete even if a save is interrupted."""
        run_dir = self._get_output_dir(trial=trial)
        staging_dir = os.path.join(run_dir, STAGING_DIR_NAME)
        if self.args.should_save and os.path.isdir(staging_dir):
            shutil.rmtree(staging_dir)  # left by an interrupted save
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging_dir = staging_dir
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging_dir = None
        self.accelerator.wait_for_everyone()
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final_dir = os.path.join(run_dir, name)
        staged_dir = os.path.join(staging_dir, name)
        if self.state.best_model_checkpoint == staged_dir:  # set inside the parent's save, on every process
            self.state.best_model_checkpoint = final_dir
        if self.args.should_save:
            self._publish_checkpoint(staged_dir, final_dir)
            os.rmdir(staging_dir)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            super()._push_from_checkpoint(final_dir)

    def _publish_checkpoint(self, staged_dir, final_dir):
        if os.path.isdir(final_dir):  # the same step saved again (e.g. after resuming): replace it
            shutil.rmtree(final_dir)
        os.replace(staged_dir, final_dir)
        if self.state.best_model_checkpoint == final_dir:  # the state file was written with the staged path
            self.state.save_to_json(os.path.join(final_dir, "trainer_state.json"))

    def _get_output_dir(self, trial):
        if self._checkpoint_staging_dir is not None:
            return self._checkpoint_staging_dir
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder):
        if self._checkpoint_staging_dir is not None:
            return  # called while the checkpoint is staged; `_save_checkpoint` pushes it once it is in place
        super()._push_from_checkpoint(checkpoint_folder)

    def _rollout_buffer_file(self, checkpoint_dir):
        suffix = f"_{self.args.process_index}" if self.args.world_size > 1 else ""
        return os.path.join(checkpoint_dir, f"{ROLLOUT_BUFFER_NAME}{suffix}.pt")

    def _save_rng_state(self, output_dir):
        # The sampler's state is the RNG state plus, in the middle of a `ppo_epochs` window, the rollouts that the
        # window's remaining passes reuse: without them a resumed run would sample new ones and diverge.
        super()._save_rng_state(output_dir)
        window = self.args.gradient_accumulation_steps * getattr(self.args, "ppo_epochs", 1)
        buffered = getattr(self, "_buffered_inputs", None)
        if buffered is not None and self._step % window != 0:
            torch.save({"step": self._step, "rollouts": buffered}, self._rollout_buffer_file(output_dir))

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = self._rollout_buffer_file(checkpoint)
        if os.path.isfile(path):
            state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
            self._step, self._buffered_inputs = state["step"], state["rollouts"]
