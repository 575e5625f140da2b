"""`ReverseKLDistillTrainer`: MiniLLM distillation on top of `trl.DistillationTrainer`.

The trainer orchestrates; the math lives in `sampling`, `advantages` and `losses`. One optimisation round reads like
the algorithm:

    sample (teacher-mixed, KV-cached)  →  score (teacher log-probs recorded while sampling)
    →  advantages (rewards, length-normalised returns, importance weights)  →  loss (policy gradient + single step)
"""

import functools
import re
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ClassVar

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from transformers.utils import logging
from trl import DistillationTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler, shuffle_sequence_dict, split_tensor_dict

from .advantages import advantages_from_rollout, importance_weights
from .config import ReverseKLDistillConfig
from .crosstokenizer import cross_tokenizer_metrics, score_rollout_across_tokenizers
from .data import cycle_texts, lm_rows_from_completions, lm_rows_from_texts, pad_lm_batch, sample_lm_rows
from .fsdp import forget_forwards, fsdp_modules, gathered, hidden_states_for_head, output_head
from .guard import DegenerationGuard, GreedyProbe
from .input_checks import (
    check_constructor_arguments,
    check_distributed_setup,
    check_prompts,
    check_tokenizer,
    prompt_length_limit,
    renders_as_an_unknown_role,
    resolve_datasets,
)
from .losses import chunk_count_over_processes, lm_loss_sum, minillm_loss_sums
from .model_card import MINILLM_PAPER, hub_repo_id, write_distillation_card
from .probe import check_teacher_mass_past_vocab, verify_scoring
from .reliability import ReliableTrainingMixin
from .rollout_metrics import degeneration_metrics, rollout_metrics
from .sampling import sample_teacher_mixed
from .scoring import check_finite_parameters, left_pad
from .teacher import check_teacher_frozen, load_teacher, set_up_teacher

logger = logging.get_logger(__name__)


@contextmanager
def silenced(category, message: str):
    """Inside `warnings.catch_warnings()`: ignore the warnings of `category` whose message starts with `message`."""
    warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    yield


class ReverseKLDistillTrainer(ReliableTrainingMixin, DistillationTrainer):
    """Trainer for MiniLLM-style reverse-KL distillation ([MiniLLM: Knowledge Distillation of Large Language
    Models](https://huggingface.co/papers/2306.08543)).

    The student `q_θ` is trained to minimise the sequence-level reverse KL `KL(q_θ || p)` to the teacher `p` by policy
    gradient on its own samples, with the three parts of the paper: teacher-mixed sampling (`teacher_mix_alpha`),
    single-step regularisation (the exact per-position reverse KL) and length-normalised returns, plus PPO clipping when
    rollouts are reused (`ppo_epochs`) and an optional LM loss (`lm_loss_weight`).

    It is a drop-in replacement for `trl.experimental.gkd.GKDTrainer`: the constructor accepts the same arguments and
    datasets (conversational `messages`, or `prompt`/`completion` as `trl.DistillationTrainer`).

    A teacher with another tokenizer is scored across tokenizers (`teacher_processing_class`, docs/cross-tokenizer.md):
    it reads the student's completions as text, re-tokenised with its own tokenizer and chat template, and its token
    log-probs are credited to the student's tokens, so the sequence-level reverse KL is the same objective over texts.

    Example:

    ```python
    >>> from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer

    >>> args = ReverseKLDistillConfig(output_dir="out", teacher_mix_alpha=0.2, max_new_tokens=64)
    >>> trainer = ReverseKLDistillTrainer(
    ...     model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    ... )
    >>> trainer.train()
    ```

    Args:
        model: the student: a model id or local path, a `PreTrainedModel` or a `PeftModel`.
        teacher_model: the teacher: a model id or local path (loaded with `args.teacher_model_init_kwargs`, e.g. a
            bitsandbytes `quantization_config`) or a `PreTrainedModel`. Shares the student's tokenizer (vocabulary
            rows past the tokenizer, embedding padding, may differ), or has its own: `teacher_processing_class`.
        args: a `ReverseKLDistillConfig`.
        train_dataset, eval_dataset: prompts, in GKD's `messages` format or DistillationTrainer's `prompt` format.
        processing_class: the student's tokenizer (the teacher's too, unless `teacher_processing_class` is given).
        peft_config: wraps the student in a PEFT adapter (e.g. LoRA).
        quantization_config: quantisation of the student when `model` is a string.
        lm_dataset: optional dataset with a `text` column for the LM loss (`args.lm_loss_weight > 0`); without it the
            LM loss uses the training set's reference completions.
        data_collator, compute_metrics, preprocess_logits_for_metrics, formatting_func: accepted for GKDTrainer
            compatibility; they have no meaning here and warn when given.
        teacher_processing_class: the teacher's tokenizer when it differs from the student's (a fast tokenizer, with
            a chat template for conversational data). Not needed for a teacher given as an id or path whose folder
            holds its tokenizer: that one is loaded. The teacher is then scored across tokenizers, which needs
            `args.teacher_mix_alpha = 0` and `args.single_step_regularization = False` (both need the teacher's
            distribution over the student's vocabulary).
        tools: refused (tool calls inside sampled completions are not supported); accepted as a keyword so that
            trl.DistillationTrainer's call says so.

    Positional arguments follow GKDTrainer's order (`data_collator` fourth); trl.DistillationTrainer's order, with the
    train dataset fourth, is refused with the keyword call to write. The trainer never modifies `args`: what it
    resolves (`lm_loss_weight=None`) it resolves on its own copy, `trainer.args`. It adds a `DegenerationGuard`
    callback (a warning when the rollouts or the greedy answers start to loop or stop ending) unless one is given or
    `args.degeneration_guard` is False.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "distillation", "minillm", "reverse-kl", "rkd-trl"]
    _name = "Reverse-KL Distillation (MiniLLM)"
    _paper: ClassVar[dict[str, str]] = MINILLM_PAPER  # the citation of TRL's model card

    def __init__(
        self,
        model=None,
        teacher_model=None,
        args: ReverseKLDistillConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        formatting_func=None,
        quantization_config=None,
        lm_dataset: Dataset | None = None,
        teacher_processing_class=None,
        tools=None,
    ):
        args, teacher_model = check_constructor_arguments(model, teacher_model, args, data_collator, tools,
                                                          compute_metrics=compute_metrics,
                                                          preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                                                          formatting_func=formatting_func)  # fmt: skip
        args, train_dataset, eval_dataset = resolve_datasets(args, train_dataset, eval_dataset, lm_dataset)
        teacher_source = teacher_model if isinstance(teacher_model, str) else None
        teacher_model = load_teacher(teacher_model, args)
        super().__init__(
            model=model,
            teacher_model=None,  # set up below: the parent requires identical vocabulary sizes, we allow padding rows
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if self._is_vlm:
            raise ValueError("Vision-language models are not supported: give a text-only causal LM student.")
        guarded = any(isinstance(callback, DegenerationGuard) for callback in self.callback_handler.callbacks)
        if args.degeneration_guard and not guarded:
            self.add_callback(DegenerationGuard())  # warns when the rollouts start to loop or stop ending
        check_distributed_setup(self._dist, args)
        check_tokenizer(self._tokenizer, train_dataset)
        self.teacher_model, self.vocab_size, self._cross_tokenizer_teacher = set_up_teacher(
            teacher_model, self.model, self._tokenizer, args, self.accelerator, source=teacher_source,
            teacher_processing_class=teacher_processing_class, train_dataset=train_dataset,
            eos_token_ids=self.eos_token_ids, chat_template=self.chat_template,
        )  # fmt: skip
        self._warned_unscored = False  # a completion the cross-tokenizer teacher cannot score warns once
        for model_name, checked in (("student", self.model), ("teacher", self.teacher_model)):
            check_finite_parameters(checked, model_name)
        self._drop_ended_rows = self._verify_scoring()
        self._check_prompts({"train_dataset": train_dataset, "eval_dataset": eval_dataset})

        self.lm_dataset = lm_dataset
        self._lm_batches = None
        self._greedy_probe = GreedyProbe(args.greedy_probe_steps)
        self._pending_loss_metrics = {}

    def _check_prompts(self, datasets: dict):
        """`input_checks.check_prompts` with this trainer's tokenization, chat template and length limit."""
        models = {"student": self.model, "teacher": self.teacher_model}
        unwrapped = {name: self.accelerator.unwrap_model(model) for name, model in models.items()}
        limit = prompt_length_limit(self.args.max_length, unwrapped, self.max_completion_length)
        template = {"chat_template": self.chat_template, "chat_template_kwargs": self.chat_template_kwargs}
        unknown_role = functools.partial(renders_as_an_unknown_role, self.processing_class, **template)
        for name, dataset in datasets.items():
            check_prompts(dataset, name, lambda prompts: self._tokenize_prompts(prompts)[0], limit, unknown_role)

    @property
    def teacher_tokenizer(self):
        """The teacher's own tokenizer when it is scored across tokenizers; None when it shares the student's."""
        return None if self._cross_tokenizer_teacher is None else self._cross_tokenizer_teacher.tokenizer

    def train(self, *args, **kwargs):
        self._teacher_checked = False  # checked again at the run's first step (the optimizer exists by then)
        output = super().train(*args, **kwargs)
        check_teacher_frozen(self.accelerator.unwrap_model(self.teacher_model), self.optimizer, "after training")
        return output

    def training_step(self, model, inputs, num_items_in_batch):
        if not getattr(self, "_teacher_checked", True):
            check_teacher_frozen(self.accelerator.unwrap_model(self.teacher_model), self.optimizer, "at the first step")
            self._teacher_checked = True
        return super().training_step(model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------ model card

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, license=None):
        """TRL's model card (tags, tracker links, framework versions, MiniLLM citation), with a "Distillation" section
        (the teacher, the distillation settings and the last logged metrics) and with the names that TRL's template
        gets wrong for local paths and model objects set right (`model_card`): the title is `model_name`, by default
        the repository or output folder's name; the base model and the dataset are Hub links and metadata only when
        they are Hub ids; the quick-start snippet loads the Hub repository, or the output folder before a push.
        `license` (a Hub license id, e.g. "apache-2.0") goes into the metadata. `push_to_hub` calls it too."""
        if model_name is None:
            model_name = Path(self.args.hub_model_id or self.args.output_dir).name
        super().create_model_card(model_name=model_name, dataset_name=hub_repo_id(dataset_name), tags=tags)
        if self.is_world_process_zero():
            write_distillation_card(self, dataset_name, license)

    # ------------------------------------------------------------------ set-up

    def _verify_scoring(self) -> tuple[bool, bool]:
        """Start-up probe of both models (`probe.verify_scoring`): their hidden states, output heads and token-by-token
        decoding reproduce their own forward, or the trainer refuses them. Records whether each model can catch up on
        several tokens in one cached forward, and returns, for (student, teacher), whether finished rows can be
        dropped from the model's cache while sampling."""
        # Mixed precision runs each model's forward in autocast (accelerate wraps it) and the loss's output head in the
        # training step's autocast: the probe then compares at that precision.
        compute_dtype = self._autocast_dtype
        with self._models_for_rollout() as (student, teacher):
            pad_token_id = self._tokenizer.pad_token_id
            cross = self._cross_tokenizer_teacher
            teacher_vocab = (cross.vocab_size, cross.pad_token_id) if cross else (self.vocab_size, pad_token_id)
            checks = [verify_scoring(student, self.vocab_size, pad_token_id, "student", compute_dtype),
                      verify_scoring(teacher, *teacher_vocab, "teacher", compute_dtype)]  # fmt: skip
        if self._cross_tokenizer_teacher is None:  # a teacher of another tokenizer is scored over all its rows
            check_teacher_mass_past_vocab(checks[1], self.vocab_size)
        self._student_catch_up, self._teacher_catch_up = checks[0].catch_up, checks[1].catch_up
        for name, model, check in (("student", student, checks[0]), ("teacher", teacher, checks[1])):
            if self.args.teacher_mix_alpha > 0 and not check.catch_up:
                logger.warning(
                    f"The {name} ({type(model).__name__}) cannot catch up on several tokens in one cached forward "
                    f"({check.catch_up_error}): teacher-mixed sampling feeds it every sampled token instead, which "
                    f"costs one {name} forward per token (docs/performance.md)."
                )
        return checks[0].drop_ended_rows, checks[1].drop_ended_rows

    @property
    def _autocast_dtype(self) -> torch.dtype | None:
        """The dtype of mixed precision's autocast (bf16 / fp16), None without it."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision)

    def _get_train_sampler(self, dataset=None):
        # Each generation batch is served `gradient_accumulation_steps × ppo_epochs` times: once per micro-batch of
        # every pass over the rollouts (see `_prepare_inputs`).
        args = self.args
        generation_batch = args.per_device_train_batch_size * self.accelerator.num_processes
        return RepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=1,
            batch_size=generation_batch * args.gradient_accumulation_steps,
            repeat_count=args.gradient_accumulation_steps * args.ppo_epochs,
            shuffle=self.shuffle_dataset,
            seed=args.seed,
        )

    # ------------------------------------------------------------------ sample → score → advantages

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        accumulation_steps = self.args.gradient_accumulation_steps
        if self._step % (accumulation_steps * self.args.ppo_epochs) == 0 or self._buffered_inputs is None:
            rollouts = shuffle_sequence_dict(self._generate_and_score_completions(generation_batch))
            self._buffered_inputs = split_tensor_dict(rollouts, accumulation_steps)
        return self._buffered_inputs[self._step % accumulation_steps]

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_token_lists, _, _ = self._tokenize_prompts([example["prompt"] for example in inputs])
        prompt_ids, prompt_mask = left_pad(prompt_token_lists, self._tokenizer.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(self.accelerator.device), prompt_mask.to(self.accelerator.device)

        with self._models_for_rollout() as (student, teacher):
            rollout = sample_teacher_mixed(
                student,
                teacher if self._cross_tokenizer_teacher is None else None,  # one of another tokenizer scores text
                prompt_ids,
                prompt_mask,
                vocab_size=self.vocab_size,
                max_new_tokens=self.max_completion_length,
                alpha=self.args.teacher_mix_alpha,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self._tokenizer.pad_token_id,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                drop_ended_rows=self._drop_ended_rows,
                teacher_catch_up=self._teacher_catch_up,
                student_catch_up=self._student_catch_up,
                autocast_dtype=self._autocast_dtype,
            )
            if mode == "train" and self.args.greedy_probe and self._greedy_probe.due(
                self.state.global_step, self.args.logging_steps, self.state.max_steps, self.args.ppo_epochs
            ):  # `due` records the probe: asked in training rollouts only, as before
                self._log_greedy_probe(student, prompt_ids, prompt_mask)
            scored_mask, teacher_token_counts, cross = rollout.completion_mask, None, self._cross_tokenizer_teacher
            if cross is not None:  # the teacher's log-probs of the sampled texts, credited to the student's tokens
                rollout, scored_mask, scores = score_rollout_across_tokenizers(
                    teacher, cross, self._tokenizer, [example["prompt"] for example in inputs], rollout,
                    eos_token_ids=self.eos_token_ids, temperature=self.temperature, warn=not self._warned_unscored,
                )  # fmt: skip
                teacher_token_counts = scores.credited_tokens
                self._warned_unscored |= not bool(scores.scored.all())
                for name, value in cross_tokenizer_metrics(scores, rollout.completion_mask,
                                                           self.accelerator.gather).items():  # fmt: skip
                    self._metrics[mode][name].append(value)

        mask = rollout.completion_mask
        advantages, _ = advantages_from_rollout(
            rollout.teacher_logprobs,
            rollout.student_logprobs,
            scored_mask,
            gamma=self.args.gamma,
            include_current=not self.args.single_step_regularization,
            length_normalized=self.args.length_normalization,
            whiten_advantages=self.args.whiten_advantages,
            reward_scaling=self.args.reward_scaling,
            reward_clip=self.args.reward_clip,
            sum_over_processes=lambda tensor: self.accelerator.reduce(tensor, reduction="sum"),
            teacher_token_counts=teacher_token_counts,
        )
        if not self.args.policy_gradient:
            advantages = torch.zeros_like(advantages)  # no policy-gradient term: the single-step term and LM loss
        weights = importance_weights(
            rollout.student_logprobs, rollout.sampling_logprobs, mask, self.args.importance_weight_max
        )
        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": rollout.completion_ids,
            "completion_mask": mask,
            "old_logprobs": rollout.student_logprobs,
            "advantages": advantages,
            "importance_weights": weights,
            "num_items_in_batch": self.accelerator.gather(mask.sum()).sum(),
        }
        if rollout.teacher_hidden is not None:
            batch["teacher_hidden"] = rollout.teacher_hidden
        if self.args.lm_loss_weight > 0 and mode == "train":
            batch.update(self._lm_batch(inputs))
        self._log_rollout(mode, rollout, weights, prompt_ids, prompt_mask)
        return batch

    def _lm_batch(self, inputs):
        """Token ids and labels for the LM loss: rows of `lm_dataset`, or the reference completions of `inputs`."""
        if self.lm_dataset is not None:
            if self._lm_batches is None:
                accelerator = self.accelerator
                self._lm_batches = cycle_texts(self.lm_dataset, len(inputs), self.args.seed,
                                               accelerator.num_processes, accelerator.process_index)  # fmt: skip
            max_length = self.args.max_length or self.model.config.get_text_config().max_position_embeddings
            rows, labels = lm_rows_from_texts(self._tokenizer, next(self._lm_batches), max_length)
        else:
            rows, labels = lm_rows_from_completions(self._tokenizer, inputs)
        batch = pad_lm_batch(rows, labels, self._tokenizer.pad_token_id, self.accelerator.device)
        batch["lm_num_items"] = self.accelerator.gather(batch.pop("num_lm_tokens")).sum()
        return batch

    @torch.no_grad()
    def _log_greedy_probe(self, student, prompt_ids, prompt_mask):
        """The student's greedy answers (`guard.GreedyProbe`): their repeated 4-grams and truncation, logged."""
        greedy = self._greedy_probe.answers(
            student, prompt_ids, prompt_mask, vocab_size=self.vocab_size, max_new_tokens=self.max_completion_length,
            eos_token_ids=self.eos_token_ids, pad_token_id=self._tokenizer.pad_token_id,
            drop_ended_rows=self._drop_ended_rows,
        )  # fmt: skip
        repetition, truncated = degeneration_metrics(greedy.completion_ids, greedy.completion_mask, self.eos_token_ids,
                                                     self.accelerator.gather)  # fmt: skip
        self._metrics["train"]["completions/greedy_repeated_4grams"].append(repetition)
        self._metrics["train"]["completions/greedy_clipped_ratio"].append(truncated)

    def _log_rollout(self, mode, rollout, weights, prompt_ids, prompt_mask):
        """`rollout_metrics` of the rollout, the tokens seen, and the completions table (`log_completions`)."""
        metrics = self._metrics[mode]
        for name, value in rollout_metrics(rollout, weights, self.eos_token_ids, self.accelerator.gather).items():
            metrics[name].append(value)
        if mode == "train":
            tokens = self.accelerator.gather(prompt_mask.sum() + rollout.completion_mask.sum()).sum()
            self.state.num_input_tokens_seen += tokens.item()
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        if self.log_completions:
            prompts = self.processing_class.batch_decode(prompt_ids, skip_special_tokens=True)
            completions = self.processing_class.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            self._logs["prompt"].extend(gather_object(prompts))
            self._logs["completion"].extend(gather_object(completions))

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.is_deepspeed_enabled and self.model.training:
            # DeepSpeed applies the update inside backward, so a non-finite loss must stop the run before it.
            loss = output[0] if return_outputs else output
            if self.accelerator.gather((~torch.isfinite(loss.detach())).float().reshape(1)).max() > 0:
                raise FloatingPointError(self._nonfinite_message("The loss is NaN/inf at this step under DeepSpeed"))
        # Gathered here, outside the wrapped forward, as the parent does for the entropy.
        mode = "train" if self.model.training else "eval"
        pending, self._pending_loss_metrics = self._pending_loss_metrics, {}
        for name, (total, count) in pending.items():
            count = self.accelerator.gather(count).sum().clamp(min=1)
            self._metrics[mode][name].append((self.accelerator.gather(total).sum() / count).item())
        return output

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        completion_mask = inputs["completion_mask"].bool()
        num_tokens = completion_mask.sum()
        if num_items_in_batch is None:
            num_items_in_batch = num_tokens.clamp(min=1)
        hidden = self._completion_hidden_states(unwrapped_student, inputs)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        # Without a shared vocabulary (a teacher of another tokenizer) the teacher is in the advantages only.
        shared_vocabulary = "teacher_hidden" in inputs
        teacher_head_block = output_head(teacher, self.vocab_size) if shared_vocabulary else nullcontext()
        with output_head(unwrapped_student, self.vocab_size) as student_head, teacher_head_block as teacher_head:
            sums = minillm_loss_sums(
                hidden[completion_mask],
                inputs["teacher_hidden"][completion_mask] if shared_vocabulary else None,
                student_head,
                teacher_head,
                inputs["completion_ids"][completion_mask],
                inputs["old_logprobs"][completion_mask],
                inputs["advantages"][completion_mask],
                inputs["importance_weights"][completion_mask],
                temperature=self.temperature,
                clip_epsilon=self.args.ppo_clip_epsilon,
                chunk_size=self.args.loss_chunk_size,
                single_step_weight=1.0 if self.args.single_step_regularization else 0.0,
                sharded_head=self._dist.is_zero3,
                min_chunks=chunk_count_over_processes(num_tokens, self.args.loss_chunk_size, self.accelerator,
                                                      self._dist.is_zero3),
            )
        loss = sums["objective"] / num_items_in_batch
        tokens = num_tokens.detach().float()
        metrics = {  # name: (sum over tokens, token count), averaged over all processes in `compute_loss`
            "loss/policy_gradient": (sums["policy_gradient"], tokens),
            "loss/single_step": (sums["single_step"], tokens),
            "minillm/clip_fraction": (sums["clipped"], tokens),
        }
        if self.args.lm_loss_weight > 0 and "lm_input_ids" in inputs:
            lm_sum, lm_tokens = self._lm_loss_sum(unwrapped_student, inputs)
            lm_items = inputs["lm_num_items"].clamp(min=1) / self.accelerator.num_processes
            loss = loss + self.args.lm_loss_weight * lm_sum / lm_items
            metrics["loss/lm"] = (lm_sum.detach(), lm_tokens.float())
        self._pending_loss_metrics = metrics
        return loss, sums["entropy"], num_tokens

    def _completion_hidden_states(self, unwrapped_student, inputs):
        """Student final hidden states that predict each completion token: `[B, C, H]`, from the student's own forward
        (positions from the attention mask, as in sampling, so left padding changes nothing)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        hidden = hidden_states_for_head(unwrapped_student, input_ids, attention_mask, self.vocab_size)
        prompt_length = inputs["prompt_ids"].size(1)
        return hidden[:, prompt_length - 1 : -1]

    def _lm_loss_sum(self, unwrapped_student, inputs):
        """The LM loss's sum over its tokens (estimated from `lm_loss_row_share` of the rows), and the tokens run."""
        input_ids, attention_mask, labels, scale = sample_lm_rows(
            inputs["lm_input_ids"], inputs["lm_attention_mask"], inputs["lm_labels"], self.args.lm_loss_row_share
        )
        hidden = hidden_states_for_head(unwrapped_student, input_ids, attention_mask, self.vocab_size)
        labels = labels[:, 1:]
        valid = labels != -100
        with output_head(unwrapped_student, self.vocab_size) as student_head:
            total = lm_loss_sum(
                hidden[:, :-1][valid],
                student_head,
                labels[valid],
                self.args.loss_chunk_size,
                sharded_head=self._dist.is_zero3,
                min_chunks=chunk_count_over_processes(valid.sum(), self.args.loss_chunk_size, self.accelerator,
                                                      self._dist.is_zero3),
            )
        return total * scale, valid.sum() * scale  # scaled alike: the logged loss/lm stays a mean per token

    # ------------------------------------------------------------------ sharded models (DeepSpeed ZeRO-3, FSDP2)

    @contextmanager
    def _models_for_rollout(self):
        """`(student, teacher)` ready for token-by-token sampling: unwrapped by trl (ZeRO-3 gathers each model for the
        block); under FSDP2 every FSDP module of both models is gathered once for the block, so the decode loop
        makes no collective call and processes may decode different numbers of steps. Afterwards FSDP2 forgets the
        block's forwards of both models (`fsdp.forget_forwards`): their number differs between processes (the output
        head runs on the hidden states of however many tokens the other model drew), and a backward that prefetched
        by them would issue different collectives on each."""
        with (
            # trl 1.16's `unwrap_model_for_generation` (pinned) reads transformers' deprecated
            # `is_gradient_checkpointing` at every rollout: a warning addressed to trl, silenced for this block only.
            warnings.catch_warnings(),
            silenced(FutureWarning, "`is_gradient_checkpointing` is deprecated"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as student,
            unwrap_model_for_generation(self.teacher_model, self.accelerator) as teacher,
            gathered(fsdp_modules(student)),
            gathered(fsdp_modules(teacher)),
        ):
            yield student, teacher
        forget_forwards(self.model)
        forget_forwards(self.teacher_model)
