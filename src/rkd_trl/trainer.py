"""`ReverseKLDistillTrainer`: MiniLLM distillation on top of `trl.DistillationTrainer`.

The trainer orchestrates; the math lives in `sampling`, `advantages` and `losses`. One optimisation round reads like
the algorithm:

    sample (teacher-mixed, KV-cached)  →  score (teacher log-probs recorded while sampling)
    →  advantages (rewards, length-normalised returns, importance weights)  →  loss (policy gradient + single step)
"""

import dataclasses
import math
import os
import re
import shutil
import textwrap
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ClassVar

import torch
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, BitsAndBytesConfig
from transformers.quantizers import AutoQuantizationConfig
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import is_bitsandbytes_available, logging
from trl import DistillationTrainer
from trl.data_utils import apply_chat_template, is_conversational
from trl.distributed import DistributedBackend
from trl.models import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import (
    RepeatSampler,
    create_model_from_path,
    pad,
    shuffle_sequence_dict,
    split_tensor_dict,
)

from .advantages import advantages_from_rollout, importance_weights
from .config import ReverseKLDistillConfig
from .crosstokenizer import score_across_tokenizers, teacher_eos_token_ids, teacher_turn_end_ids
from .fsdp import forget_forwards, fsdp_modules, gathered, modules_holding, shard_teacher, unshard_before_backward
from .guard import DegenerationGuard
from .losses import chunk_count, lm_loss_sum, minillm_loss_sums
from .metrics import repeated_ngram_share
from .model_card import hub_repo_id, model_reference, origin_sentence
from .sampling import sample_teacher_mixed
from .scoring import (
    OutputHead,
    check_finite_parameters,
    check_teacher_mass_past_vocab,
    final_hidden_states,
    left_pad,
    same_vocabulary,
    shared_vocab_size,
    verify_scoring,
)

logger = logging.get_logger(__name__)
# trl 1.16's `unwrap_model_for_generation` (pinned) reads transformers' deprecated `is_gradient_checkpointing` at
# every rollout; the deprecation warning is addressed to trl, and a user of this trainer can do nothing about it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# Written next to `rng_state*.pth` in a checkpoint taken in the middle of a `ppo_epochs` window: the rollouts that the
# remaining passes of the window reuse.
ROLLOUT_BUFFER_NAME = "rollout_buffer"
# Parent folder of a checkpoint while it is being written; it is renamed to `checkpoint-N` once complete. The leading
# underscore keeps it out of Hub uploads of the output folder.
STAGING_DIR_NAME = "_incomplete-checkpoint"


def to_prompt_completion(dataset: Dataset | IterableDataset | None, name: str):
    """Accept the dataset formats of GKDTrainer (`messages` ending with the assistant turn) and of
    DistillationTrainer (`prompt`, optional `completion`); return the latter."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {key: to_prompt_completion(split, f"{name}[{key!r}]") for key, split in dataset.items()}
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: give at least one prompt.")
    columns = dataset.column_names or []
    if "prompt" in columns:
        return dataset
    if "messages" not in columns:
        raise ValueError(
            f"`{name}` has columns {columns}; expected `prompt` (with optional `completion`), as for "
            "trl.DistillationTrainer, or `messages` (a conversation ending with the assistant turn), as for GKDTrainer."
        )

    def split_last_turn(example, index):
        messages = example["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(
                f"`{name}` row {index}: the conversation in `messages` must end with an assistant turn (the "
                "reference completion); its last role is "
                f"{messages[-1].get('role') if messages else 'missing (empty conversation)'}."
            )
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    return dataset.map(split_last_turn, with_indices=True, remove_columns=["messages"])


def teacher_quantization_config(config):
    """The teacher's quantisation config from `teacher_model_init_kwargs["quantization_config"]`: a config object, or
    a dict as written in YAML/JSON (bitsandbytes keys such as `load_in_4bit`, or any method with `quant_method`)."""
    if isinstance(config, dict):
        config = AutoQuantizationConfig.from_dict(config) if "quant_method" in config else BitsAndBytesConfig(**config)
    if isinstance(config, BitsAndBytesConfig) and not is_bitsandbytes_available():
        raise ImportError(
            "The teacher's quantization_config asks for bitsandbytes, which is not installed: "
            "`pip install bitsandbytes` (or `pip install rkd-trl[bitsandbytes]`), or drop the quantization_config."
        )
    return config


def check_quantized_teacher_placement(teacher, backend: DistributedBackend) -> None:
    """A bitsandbytes-quantised teacher is held whole by every process: it cannot be sharded by ZeRO-3 or FSDP."""
    quantized = getattr(teacher, "is_loaded_in_4bit", False) or getattr(teacher, "is_loaded_in_8bit", False)
    if quantized and (backend.is_zero3 or backend.is_fsdp):
        raise ValueError(
            "The teacher is quantised with bitsandbytes, and DeepSpeed ZeRO-3 / FSDP cannot shard 4-bit or 8-bit "
            "weights. Use data parallelism (examples/accelerate/multi_gpu.yaml), where each process holds the "
            "whole quantised teacher, or an unquantised teacher sharded by ZeRO-3 / FSDP."
        )


# bitsandbytes' 4-bit kernel for CPUs with AVX512-BF16 repacks each weight at the layer's first inference forward
# (`bitsandbytes.functional._convert_weight_packed_for_cpu`) in blocks of this many output rows.
BNB_CPU_4BIT_ROW_BLOCK = 32


def check_4bit_teacher_runs_on_cpu(teacher) -> None:
    """A 4-bit teacher on a CPU with AVX512-BF16 takes bitsandbytes' packed kernel, which needs every quantised
    layer's `out_features` divisible by 32 and `in_features` by the quantisation block size; other CPUs (and GPUs) run
    any shape. Raise here rather than with bitsandbytes' bare assertion at the first sampled token."""
    if not getattr(teacher, "is_loaded_in_4bit", False) or next(teacher.parameters()).device.type != "cpu":
        return
    import bitsandbytes

    if not bitsandbytes.functional.has_avx512bf16():
        return
    unsupported = [
        f"{name} ({module.in_features} -> {module.out_features})"
        for name, module in teacher.named_modules()
        if isinstance(module, bitsandbytes.nn.Linear4bit)
        and (module.out_features % BNB_CPU_4BIT_ROW_BLOCK or module.in_features % module.weight.blocksize)
    ]
    if unsupported:
        listed = ", ".join(unsupported[:3]) + (", ..." if len(unsupported) > 3 else "")
        raise ValueError(
            "The 4-bit teacher cannot run on this CPU: with AVX512-BF16, bitsandbytes' 4-bit kernel needs each "
            f"quantised layer's output size divisible by {BNB_CPU_4BIT_ROW_BLOCK} and input size by the quantisation "
            f"block size, and {len(unsupported)} layer(s) are not: {listed}. Load the teacher in 8-bit "
            "(`load_in_8bit: true`), unquantised, or on a GPU."
        )


class ReverseKLDistillTrainer(DistillationTrainer):
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
    """

    _tag_names: ClassVar[list[str]] = ["trl", "distillation", "minillm", "reverse-kl", "rkd-trl"]
    _name = "Reverse-KL Distillation (MiniLLM)"
    _paper: ClassVar[dict[str, str]] = {
        "title": "MiniLLM: Knowledge Distillation of Large Language Models",
        "id": "2306.08543",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{gu2024minillm,
                title        = {{MiniLLM: Knowledge Distillation of Large Language Models}},
                author       = {Yuxian Gu and Li Dong and Furu Wei and Minlie Huang},
                year         = 2024,
                booktitle    = {The Twelfth International Conference on Learning Representations, {ICLR} 2024, Vienna, Austria, May 7-11, 2024},
                publisher    = {OpenReview.net},
                url          = {https://openreview.net/forum?id=5h0qf7IBZZ},
            }"""),
    }

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
    ):
        if model is None:
            raise ValueError("`model` (the student) is required: a model id, a local path or a model object.")
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "student"
            args = ReverseKLDistillConfig(f"{name.split('/')[-1]}-ReverseKLDistill")
        elif not isinstance(args, ReverseKLDistillConfig):
            raise TypeError(
                f"`args` must be a ReverseKLDistillConfig, got {type(args).__name__}. It accepts GKDConfig's field "
                "names: swap the class name and keep the arguments."
            )
        ignored_gkd_arguments = {
            "data_collator": data_collator,
            "compute_metrics": compute_metrics,
            "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
            "formatting_func": formatting_func,
        }
        for argument, value in ignored_gkd_arguments.items():
            if value is not None:
                warnings.warn(
                    f"`{argument}` has no meaning in ReverseKLDistillTrainer (prompts are tokenized and completions "
                    "sampled inside the trainer); it is ignored.",
                    UserWarning,
                    stacklevel=2,
                )
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError("`teacher_model` is required: a model id, a local path or a model object.")
        if args.ppo_epochs > 1 and isinstance(train_dataset, IterableDataset):
            raise ValueError("ppo_epochs > 1 needs a map-style train_dataset (rollout reuse repeats batches by index).")
        train_dataset = to_prompt_completion(train_dataset, "train_dataset")
        eval_dataset = to_prompt_completion(eval_dataset, "eval_dataset")
        if args.lm_loss_weight is None:
            args.lm_loss_weight = self._default_lm_loss_weight(train_dataset, lm_dataset)
        if args.lm_loss_weight > 0 and lm_dataset is None:
            self._require_completions(train_dataset)
        if lm_dataset is not None and "text" not in (lm_dataset.column_names or []):
            raise ValueError(f"`lm_dataset` needs a `text` column; it has {lm_dataset.column_names}.")

        teacher_source = teacher_model if isinstance(teacher_model, str) else None
        teacher_model = self._load_teacher(teacher_model, args)
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
        if not any(isinstance(callback, DegenerationGuard) for callback in self.callback_handler.callbacks):
            self.add_callback(DegenerationGuard())  # warns when the rollouts start to loop or stop ending
        self._check_distributed_setup(args)
        self._check_tokenizer(train_dataset)
        self.teacher_tokenizer = self._teacher_tokenizer_if_different(
            teacher_processing_class, teacher_source, teacher_model, args
        )
        if self.teacher_tokenizer is None:
            self.vocab_size = shared_vocab_size(self.model, teacher_model, self._tokenizer)
        else:
            self._set_up_cross_tokenizer_teacher(teacher_model, train_dataset, args)
        check_quantized_teacher_placement(teacher_model, DistributedBackend(self.accelerator))
        check_4bit_teacher_runs_on_cpu(teacher_model)
        self.teacher_model = self._prepare_teacher(teacher_model)
        self.teacher_model.eval()
        for parameter in self.teacher_model.parameters():
            parameter.requires_grad_(False)
        for model_name, checked in (("student", self.model), ("teacher", self.teacher_model)):
            check_finite_parameters(checked, model_name)
        self._drop_ended_rows = self._verify_scoring()
        self._check_prompts(train_dataset, "train_dataset")
        self._check_prompts(eval_dataset, "eval_dataset")

        self.lm_dataset = lm_dataset
        self._lm_batches = None
        self._probe_prompts = None  # the greedy probe's prompts: those of its first rollout
        self._last_probed_step = None  # the step whose log carried the last greedy probe
        self._pending_loss_metrics = {}
        self._window_nonfinite = None  # NaN/inf seen in a loss of the current optimizer step (a device tensor)
        self._nonfinite_streak = 0
        self._skipped_steps = 0
        self._checkpoint_staging_dir = None

    # ------------------------------------------------------------------ model card

    # Settings and metrics the card reports, in this order; metrics are the last logged value.
    _card_settings = ("teacher_mix_alpha", "gamma", "length_normalization", "whiten_advantages",
                      "single_step_regularization", "policy_gradient", "ppo_clip_epsilon", "ppo_epochs",
                      "reward_scaling", "reward_clip", "importance_weight_max", "lm_loss_weight", "temperature",
                      "max_completion_length", "learning_rate")  # fmt: skip
    _card_metrics = ("minillm/reverse_kl", "minillm/reward_mean", "minillm/importance_weight_mean",
                     "minillm/clip_fraction", "completions/mean_length", "completions/clipped_ratio",
                     "loss/single_step", "loss/policy_gradient", "loss/lm", "entropy", "train_loss")  # fmt: skip

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, license=None):
        """TRL's model card (tags, tracker links, framework versions, MiniLLM citation), with a "Distillation" section
        (the teacher, the distillation settings and the last logged metrics) and with the names that TRL's template
        gets wrong for local paths and model objects set right (`model_card`): the title is `model_name`, by default
        the repository or output folder's name; the base model and the dataset are Hub links and metadata only when
        they are Hub ids; the quick-start snippet loads the Hub repository, or the output folder before a push.
        `license` (a Hub license id, e.g. "apache-2.0") goes into the metadata. `push_to_hub` calls it too."""
        if model_name is None:
            model_name = Path(self.args.hub_model_id or self.args.output_dir).name
        hub_dataset = hub_repo_id(dataset_name)
        super().create_model_card(model_name=model_name, dataset_name=hub_dataset, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        card = ModelCard.load(path)
        card.data.pop("licence")  # a placeholder of TRL's template, not the Hub's `license` field
        card.data.license = license
        card.data.base_model = hub_repo_id(self.model.config.name_or_path)
        card.data.datasets = [hub_dataset] if hub_dataset else None  # the Hub's metadata schema: a list of ids
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        origin = origin_sentence(self.model, teacher, dataset_name)
        card.text = re.sub(r"^This model is a fine-tuned version of .*$", lambda _: origin, card.text, count=1,
                           flags=re.MULTILINE)  # fmt: skip
        card.text = card.text.replace('model="None"', f'model="{self.hub_model_id or self.args.output_dir}"', 1)
        card.text = card.text.replace("### Framework versions", self._distillation_card_section() + "### Framework versions", 1)
        card.save(path)

    def _distillation_card_section(self) -> str:
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        global_batch = (
            self.args.per_device_train_batch_size * self.accelerator.num_processes * self.args.gradient_accumulation_steps
        )
        lines = [
            "### Distillation",
            "",
            (
                f"Teacher: {model_reference(teacher)}. Objective: sequence-level reverse KL "
                "`KL(student || teacher)` minimised by policy gradient (MiniLLM), on completions sampled from "
                "`teacher_mix_alpha · teacher + (1 - teacher_mix_alpha) · student`."
            ),
            "",
            "| setting | value |",
            "|---|---|",
            *(f"| `{name}` | {getattr(self.args, name)} |" for name in self._card_settings),
            f"| global batch (prompts per optimizer step) | {global_batch} |",
            f"| optimizer steps | {self.state.global_step} |",
            "",
        ]
        last_logged = {}
        for entry in self.state.log_history:
            last_logged.update({key: value for key, value in entry.items() if key in self._card_metrics})
        if last_logged:
            lines += ["Last logged training metrics (names as in rkd-trl's docs/logging.md):", "",
                      "| metric | value |", "|---|---|"]  # fmt: skip
            lines += [f"| `{name}` | {last_logged[name]:.4g} |" for name in self._card_metrics if name in last_logged]
            lines.append("")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _load_teacher(teacher_model, args):
        if not isinstance(teacher_model, str):
            if args.teacher_model_init_kwargs is not None:
                raise ValueError(
                    "You passed `teacher_model_init_kwargs` but the teacher is already instantiated: pass the teacher "
                    "as a model id or path, or drop the kwargs."
                )
            return teacher_model
        init_kwargs = dict(args.teacher_model_init_kwargs or {})
        if args.teacher_model_revision is not None:
            init_kwargs.setdefault("revision", args.teacher_model_revision)
        if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            init_kwargs["device_map"] = None  # device_map="auto" does not mix with distributed training
        if init_kwargs.get("quantization_config") is not None:
            init_kwargs["quantization_config"] = teacher_quantization_config(init_kwargs["quantization_config"])
            # A quantised model cannot be moved once loaded: load it on this process's device.
            init_kwargs["device_map"] = {"": str(args.distributed_state.device)}
        init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        return create_model_from_path(teacher_model, **init_kwargs)

    def _verify_scoring(self) -> tuple[bool, bool]:
        """Start-up probe of both models (`scoring.verify_scoring`): their hidden states, output heads and token-by-token
        decoding reproduce their own forward, or the trainer refuses them. Returns, for (student, teacher), whether
        finished rows can be dropped from the model's cache while sampling."""
        # Mixed precision runs each model's forward in autocast (accelerate wraps it) and the loss's output head in the
        # training step's autocast: the probe then compares at that precision.
        compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision)
        with self._models_for_rollout() as (student, teacher):
            pad_token_id = self._tokenizer.pad_token_id
            teacher_vocab = (self.vocab_size, pad_token_id) if self.teacher_tokenizer is None else self._teacher_vocab
            checks = [verify_scoring(student, self.vocab_size, pad_token_id, "student", compute_dtype),
                      verify_scoring(teacher, *teacher_vocab, "teacher", compute_dtype)]  # fmt: skip
        if self.teacher_tokenizer is None:  # a teacher of another tokenizer is scored over all its rows
            check_teacher_mass_past_vocab(checks[1], self.vocab_size)
        self._teacher_catch_up = checks[1].catch_up
        if self.args.teacher_mix_alpha > 0 and not checks[1].catch_up:
            logger.warning(
                f"The teacher ({type(teacher).__name__}) cannot catch up on several tokens in one cached forward "
                f"({checks[1].catch_up_error}): teacher-mixed sampling feeds it every sampled token instead, which "
                "costs one teacher forward per token (docs/performance.md)."
            )
        return checks[0].drop_ended_rows, checks[1].drop_ended_rows

    def _check_distributed_setup(self, args):
        # The teacher-mixed decode loop calls both models once per token, and each process stops when its own
        # completions have ended. With parameters gathered per layer at every call, processes would then make
        # different numbers of collective calls and wait for each other forever.
        if self.is_fsdp_enabled and self._dist.fsdp_version != 2:
            raise ValueError(
                "FSDP1 (fsdp_version: 1) is not supported; set `fsdp_version: 2` in the accelerate config "
                "(examples/accelerate/fsdp2.yaml). The teacher-mixed sampler calls both models token by token and "
                "each process stops when its own completions end, so the trainer gathers each model once per rollout. "
                "FSDP2 offers that (`unshard`/`reshard`); FSDP1 does not: its `summon_full_params` must not be used "
                "around a forward, and with FULL_SHARD it gathers each wrapped module at every call, so processes "
                "that decode different numbers of steps would wait for each other forever."
            )
        if self._dist.is_zero3 and not args.ds3_gather_for_generation:
            raise ValueError(
                "ds3_gather_for_generation=False is not supported: the teacher-mixed sampler would gather ZeRO-3 "
                "parameters layer by layer at every token, and processes whose completions end at different steps "
                "would wait for each other forever. Keep ds3_gather_for_generation=True (the default)."
            )

    @staticmethod
    def _default_lm_loss_weight(train_dataset, lm_dataset) -> float:
        """`lm_loss_weight=None`: 1.0 when there is text to model (reference completions or `lm_dataset`), else 0.0
        with a warning. Measured on a real model (docs/benchmarks.md), the on-policy reverse KL alone lowers the
        teacher-scored KL while the student's greedy answers fall into repetition loops; the LM loss on the
        teacher's (or any reference) answers holds them back."""
        columns = getattr(train_dataset, "column_names", None) or []
        if lm_dataset is not None or "completion" in columns:
            return 1.0
        warnings.warn(
            "lm_loss_weight=None (the default) and no text for the LM loss: train_dataset has no reference "
            "completions and no `lm_dataset` was given, so the student is trained on the reverse KL alone. On real "
            "models that tends to end in repetition loops (docs/benchmarks.md). Give the teacher's answers as "
            "completions (or `lm_dataset=`), or set lm_loss_weight=0.0 to silence this warning.",
            UserWarning,
            stacklevel=3,
        )
        return 0.0

    @staticmethod
    def _require_completions(dataset):
        if dataset is None or "completion" not in (dataset.column_names or []):
            raise ValueError(
                "lm_loss_weight > 0 needs text to model: give `lm_dataset=` (a `text` column) to the trainer, or a "
                "train_dataset with reference completions (`completion` column or `messages` ending with the "
                "assistant turn)."
            )
        if isinstance(dataset, Dataset):
            for index, completion in enumerate(dataset["completion"]):
                if not completion:
                    raise ValueError(
                        f"train_dataset row {index} has no reference `completion`, which lm_loss_weight > 0 trains "
                        "on: fill it in, drop the row, or give `lm_dataset=`."
                    )

    def _check_tokenizer(self, dataset):
        if self._tokenizer.eos_token_id is None:
            raise ValueError(
                "The tokenizer has no EOS token: completions could never end. Set `tokenizer.eos_token` (and "
                "`tokenizer.pad_token`, which defaults to it)."
            )
        if dataset is None or isinstance(dataset, IterableDataset):
            return
        if is_conversational(dataset[0]) and getattr(self._tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The dataset is conversational but the tokenizer has no chat template: set "
                "`tokenizer.chat_template`, or give plain-text prompts in a `prompt` column."
            )

    def _prompt_length_limit(self) -> tuple[int | None, str]:
        """Longest prompt allowed: `max_length` (if set) and the models' position range, minus the completion."""
        limits = []
        if self.args.max_length is not None:
            limits.append((self.args.max_length, "max_length"))
        for name, model in (("student", self.model), ("teacher", self.teacher_model)):
            positions = getattr(self.accelerator.unwrap_model(model).config.get_text_config(), "max_position_embeddings", None)
            if positions is not None:
                limits.append((positions, f"the {name}'s max_position_embeddings"))
        if not limits:
            return None, ""
        total, source = min(limits)
        return total - self.max_completion_length, f"{source} ({total}) - max_completion_length ({self.max_completion_length})"

    def _check_prompts(self, dataset, name: str):
        """Every prompt must render as intended (`_check_conversations`), have at least one token and leave room for
        `max_completion_length` new ones."""
        if isinstance(dataset, dict):
            for key, split in dataset.items():
                self._check_prompts(split, f"{name}[{key!r}]")
            return
        if dataset is None or isinstance(dataset, IterableDataset):
            return
        limit, source = self._prompt_length_limit()
        for start in range(0, len(dataset), 1000):
            prompts = dataset[start : start + 1000]["prompt"]
            if is_conversational({"prompt": prompts[0]}):
                self._check_conversations(prompts, name, start)
            prompt_ids, _, _ = self._tokenize_prompts(prompts)
            for offset, ids in enumerate(prompt_ids):
                if len(ids) == 0:
                    raise ValueError(
                        f"{name} row {start + offset}: the prompt is empty (0 tokens); sampling needs at least one "
                        "prompt token. Drop empty prompts, or give the tokenizer a BOS token."
                    )
                if limit is not None and len(ids) > limit:
                    raise ValueError(
                        f"{name} row {start + offset}: the prompt has {len(ids)} tokens, more than {source} = "
                        f"{limit}. Shorten or drop long prompts, or lower max_new_tokens."
                    )

    def _check_conversations(self, prompts, name: str, first_row: int):
        """Conversations must be what a text chat template renders as intended: every message's content is text, and
        every role but user and assistant is one the template knows (it does not render it as a made-up role)."""
        roles = {}
        for offset, conversation in enumerate(prompts):
            for message in conversation:
                content = message.get("content")
                if not isinstance(content, str):
                    raise ValueError(
                        f"{name} row {first_row + offset}: a {message.get('role')!r} message's content is a "
                        f"{type(content).__name__}, not text, and the student and teacher are text-only language "
                        "models. Give every message's content as a string: join text parts, drop images and other "
                        "non-text parts."
                    )
                roles.setdefault(message.get("role"), first_row + offset)
        for role, row in roles.items():
            if role not in ("user", "assistant") and self._renders_as_an_unknown_role(role):
                raise ValueError(
                    f"{name} row {row}: the chat template does not know the role {role!r}: it renders a {role!r} "
                    "message exactly as it renders one of a made-up role. Rename or drop those messages (e.g. fold a "
                    f"system message into the first user turn), or give the tokenizer a chat template for {role!r}."
                )

    def _renders_as_an_unknown_role(self, role) -> bool:
        def render(message_role):
            return self.processing_class.apply_chat_template(
                [{"role": message_role, "content": "text"}], tokenize=False, chat_template=self.chat_template,
                **self.chat_template_kwargs,
            )  # fmt: skip

        try:
            return render(role) == render("made-up role")
        except Exception:  # the template raises for one of them (or for any lone message): it tells roles apart
            return False

    def _get_train_sampler(self, dataset=None):
        # Each generation batch is served `gradient_accumulation_steps × ppo_epochs` times: once per micro-batch of
        # every pass over the rollouts (see `_prepare_inputs`).
        return RepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=1,
            batch_size=self.args.per_device_train_batch_size
            * self.accelerator.num_processes
            * self.args.gradient_accumulation_steps,
            repeat_count=self.args.gradient_accumulation_steps * self.args.ppo_epochs,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
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
                teacher if self.teacher_tokenizer is None else None,  # a teacher of another tokenizer scores text
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
            )
            if mode == "train" and self.args.greedy_probe and self._greedy_probe_due():
                self._log_greedy_probe(student, prompt_ids, prompt_mask)
            scored_mask, teacher_token_counts = rollout.completion_mask, None
            if self.teacher_tokenizer is not None:
                rollout, scored_mask, teacher_token_counts = self._score_across_tokenizers(
                    mode, teacher, inputs, rollout
                )

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
        tokenizer = self._tokenizer
        if self.lm_dataset is not None:
            if self._lm_batches is None:
                self._lm_batches = self._cycle_lm_dataset(len(inputs))
            texts = next(self._lm_batches)
            max_length = self.args.max_length or self.model.config.get_text_config().max_position_embeddings
            rows = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
            labels = [list(ids) for ids in rows]
        else:
            rows, labels = [], []
            for example in inputs:
                if "completion" not in example or example["completion"] is None:
                    raise ValueError("lm_loss_weight > 0 but a training example has no reference `completion`.")
                if is_conversational(example):
                    text = apply_chat_template(
                        {"prompt": example["prompt"], "completion": example["completion"]}, tokenizer
                    )
                    prompt_text, completion_text = text["prompt"], text["completion"]
                    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
                    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
                else:
                    prompt_ids = tokenizer(example["prompt"])["input_ids"]
                    completion_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
                    completion_ids = completion_ids + [tokenizer.eos_token_id]
                rows.append(prompt_ids + completion_ids)
                labels.append([-100] * len(prompt_ids) + completion_ids)
        device = self.accelerator.device
        input_ids = pad([torch.tensor(r) for r in rows], padding_value=tokenizer.pad_token_id).to(device)
        attention_mask = pad([torch.ones(len(r), dtype=torch.long) for r in rows], padding_value=0).to(device)
        label_ids = pad([torch.tensor(r) for r in labels], padding_value=-100).to(device)
        num_lm_tokens = (label_ids[:, 1:] != -100).sum()
        return {
            "lm_input_ids": input_ids,
            "lm_attention_mask": attention_mask,
            "lm_labels": label_ids,
            "lm_num_items": self.accelerator.gather(num_lm_tokens).sum(),
        }

    def _cycle_lm_dataset(self, batch_size):
        epoch = 0
        while True:
            order = self.lm_dataset.shuffle(seed=self.args.seed + epoch)
            shard = order.shard(self.accelerator.num_processes, self.accelerator.process_index)
            for start in range(0, len(shard) - batch_size + 1, batch_size):
                yield shard[start : start + batch_size]["text"]
            epoch += 1

    def _greedy_probe_due(self) -> bool:
        """Whether to probe in this rollout: one of the optimizer steps it trains (`ppo_epochs` of them) will be
        logged, so that the probe's figures land in that log, at least `greedy_probe_steps` steps after the step whose
        log carried the last probe. The same on every process (it depends on the step only)."""
        steps = self.args.logging_steps
        if steps < 1:  # a fraction of max_steps, as transformers reads it
            steps = max(1, math.ceil(self.state.max_steps * steps))
        step = self.state.global_step
        logged = [step + i for i in range(1, self.args.ppo_epochs + 1) if (step + i) % int(steps) == 0]
        if not logged:
            return False
        if self._last_probed_step is not None and logged[-1] - self._last_probed_step < self.args.greedy_probe_steps:
            return False
        self._last_probed_step = logged[-1]
        return True

    @torch.no_grad()
    def _log_greedy_probe(self, student, prompt_ids, prompt_mask):
        """Greedy answers of the student alone to the prompts of the first probed rollout (kept, on each process, and
        probed again at every probe): their repeated 4-grams and the share cut off at `max_completion_length`.
        A student that starts to loop does so in its most likely answer (what greedy decoding and low temperatures
        return) before its samples at temperature 1 show it. The same prompts every time make a change in the figures
        a change in the student, not in the prompts drawn (8 prompts vary a lot)."""
        if self._probe_prompts is None:
            self._probe_prompts = (prompt_ids.clone(), prompt_mask.clone())
        prompt_ids, prompt_mask = self._probe_prompts
        # The sampler draws its random numbers even at top_k=1: on a forked generator, so that the probe leaves the
        # run's own sampling (and a resumed run, which probes other prompts) as it would be without it.
        device = prompt_ids.device
        with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
            greedy = sample_teacher_mixed(
                student, None, prompt_ids, prompt_mask, vocab_size=self.vocab_size,
                max_new_tokens=self.max_completion_length, alpha=0.0, eos_token_ids=self.eos_token_ids,
                pad_token_id=self._tokenizer.pad_token_id, top_k=1, drop_ended_rows=self._drop_ended_rows,
            )  # fmt: skip
        repetition, truncated = self._repetition_and_truncation(greedy)
        metrics = self._metrics["train"]
        metrics["completions/greedy_repeated_4grams"].append(repetition.mean().item())
        metrics["completions/greedy_clipped_ratio"].append(truncated.mean().item())

    def _repetition_and_truncation(self, rollout):
        """Per completion, over every process: its share of repeated 4-grams, and 1.0 where it has no EOS (cut off at
        `max_completion_length`)."""
        mask = rollout.completion_mask.bool()
        ended = torch.isin(rollout.completion_ids, torch.tensor(self.eos_token_ids, device=mask.device)) & mask
        repetition = torch.tensor([repeated_ngram_share([row[valid].tolist()], 4)
                                   for row, valid in zip(rollout.completion_ids, mask)], device=mask.device)  # fmt: skip
        return self.accelerator.gather(repetition), self.accelerator.gather((~ended.any(1)).float())

    def _log_rollout(self, mode, rollout, weights, prompt_ids, prompt_mask):
        gather = self.accelerator.gather
        mask = rollout.completion_mask.bool()
        lengths = gather(rollout.completion_mask.sum(1)).float()
        log_ratio = (rollout.teacher_logprobs - rollout.student_logprobs) * mask
        rewards = gather(log_ratio.sum()).sum() / lengths.sum().clamp(min=1)
        reverse_kl = gather(-log_ratio.sum(1)).mean()
        masked_weights = weights * mask
        valid_weights = gather(masked_weights.sum()).sum()
        max_weight = gather(masked_weights.max()).max()
        repetition, truncated = self._repetition_and_truncation(rollout)

        metrics = self._metrics[mode]
        metrics["minillm/reward_mean"].append(rewards.item())
        metrics["minillm/reverse_kl"].append(reverse_kl.item())
        metrics["minillm/importance_weight_mean"].append((valid_weights / lengths.sum().clamp(min=1)).item())
        metrics["minillm/importance_weight_max"].append(max_weight.item())
        teacher_calls = gather(torch.tensor(float(rollout.teacher_calls), device=mask.device)).mean()
        metrics["rollout/teacher_calls"].append(teacher_calls.item())
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        metrics["completions/clipped_ratio"].append(truncated.mean().item())
        metrics["completions/repeated_4grams"].append(repetition.mean().item())
        if mode == "train":
            tokens = gather(prompt_mask.sum() + rollout.completion_mask.sum()).sum()
            self.state.num_input_tokens_seen += tokens.item()
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        if self.log_completions:
            prompts = self.processing_class.batch_decode(prompt_ids, skip_special_tokens=True)
            completions = self.processing_class.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            self._logs["prompt"].extend(gather_object(prompts))
            self._logs["completion"].extend(gather_object(completions))

    # ------------------------------------------------------------------ teachers with another tokenizer

    def _teacher_tokenizer_if_different(self, teacher_processing_class, teacher_source, teacher, args):
        """The teacher's tokenizer when it differs from the student's, else None (one shared vocabulary).

        It is `teacher_processing_class`, or the tokenizer saved where the teacher was loaded from (the id or path it
        was given as, or the local folder a teacher object was loaded from). With none, the teacher is taken to share
        the student's tokenizer, and `shared_vocab_size` rejects it if its vocabulary does not cover that tokenizer.
        """
        teacher_tokenizer = teacher_processing_class
        if teacher_tokenizer is None and teacher_source is None:
            folder = getattr(teacher.config, "_name_or_path", "")
            teacher_source = folder if folder and os.path.isdir(folder) else None
        if teacher_tokenizer is None and teacher_source is not None:
            try:
                teacher_tokenizer = AutoTokenizer.from_pretrained(
                    teacher_source, revision=args.teacher_model_revision, trust_remote_code=args.trust_remote_code
                )
            except (OSError, ValueError):
                return None  # no tokenizer next to the teacher: the vocabulary-size check applies
        if teacher_tokenizer is None or same_vocabulary(self._tokenizer, teacher_tokenizer):
            return None
        return getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer)  # a processor's text tokenizer

    def _set_up_cross_tokenizer_teacher(self, teacher, train_dataset, args):
        """Checks and settings of cross-tokenizer scoring (`crosstokenizer`): the algorithm's parts that need the
        teacher's distribution over the student's vocabulary are off, the teacher tokenizer gives the words of its
        encodings, and its end of turn holds its EOS."""
        asked = [f"{name}={value}" for name, value, off in (
            ("teacher_mix_alpha", args.teacher_mix_alpha, 0.0),
            ("single_step_regularization", args.single_step_regularization, False),
        ) if value != off]  # fmt: skip
        if asked:
            raise ValueError(
                "The teacher's tokenizer differs from the student's, so the teacher is scored across tokenizers "
                "(cross-tokenizer scoring, docs/cross-tokenizer.md): it gives the log-probability of the text the "
                "student wrote, not a distribution over the student's vocabulary. Teacher-mixed sampling and the "
                f"single-step term need that distribution, and this config asks for them ({', '.join(asked)}): set "
                "teacher_mix_alpha=0.0 and single_step_regularization=False."
            )
        tokenizer = self.teacher_tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"The teacher's tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer: cross-tokenizer "
                "scoring needs the words (pre-tokens) of its encodings. Load it with AutoTokenizer (use_fast=True)."
            )
        eos_token_ids = self._teacher_eos_token_ids = teacher_eos_token_ids(teacher, tokenizer)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids[0]
        self._teacher_vocab = (teacher.config.get_text_config().vocab_size, pad_token_id)
        if len(tokenizer) > self._teacher_vocab[0]:
            raise ValueError(
                f"The teacher has {self._teacher_vocab[0]} vocabulary rows but its tokenizer {len(tokenizer)} tokens: "
                "they do not belong together. Give the teacher's own tokenizer as `teacher_processing_class`."
            )
        self.vocab_size = self.model.config.get_text_config().vocab_size
        if len(self._tokenizer) > self.vocab_size:
            raise ValueError(
                f"The student has {self.vocab_size} vocabulary rows but its tokenizer {len(self._tokenizer)} tokens: "
                "they do not belong together. Give the student's own tokenizer as `processing_class`."
            )
        self._warned_unscored = False
        if isinstance(train_dataset, Dataset) and len(train_dataset) > 0:
            teacher_turn_end_ids(tokenizer, train_dataset[0]["prompt"], eos_token_ids)  # raises if it has no EOS
        logger.info("The teacher's tokenizer differs from the student's: the teacher is scored across tokenizers.")

    def _score_across_tokenizers(self, mode, teacher, inputs, rollout):
        """The teacher's log-probs of the sampled texts, credited to the student's tokens (one teacher forward).

        Returns the rollout with those scores, the mask of the tokens whose rewards count (a completion whose text the
        teacher cannot score faithfully, `crosstokenizer.align_completion`, gets no reward and no advantage) and the
        number of teacher tokens credited to each student token (the teacher's length normalisation).
        """
        scores = score_across_tokenizers(
            teacher,
            self.teacher_tokenizer,
            self._tokenizer,
            [example["prompt"] for example in inputs],
            rollout.completion_ids,
            rollout.completion_mask,
            eos_token_ids=self.eos_token_ids,
            teacher_eos_token_ids=self._teacher_eos_token_ids,
            vocab_size=self._teacher_vocab[0],
            temperature=self.temperature,
        )
        scored = scores.scored[:, None]
        # Unscored rows count as zero divergence in the logged rewards; `crosstok/unscored_fraction` counts them.
        teacher_logprobs = torch.where(scored, scores.teacher_logprobs, rollout.student_logprobs)
        rollout = dataclasses.replace(rollout, teacher_logprobs=teacher_logprobs)
        problems = [problem for problem in scores.problems if problem is not None]
        if problems and not self._warned_unscored:
            self._warned_unscored = True
            logger.warning(
                f"A sampled completion cannot be scored by the teacher and gets no reward ({problems[0]}). The share "
                "of such completions is logged as crosstok/unscored_fraction (docs/cross-tokenizer.md)."
            )
        gather = self.accelerator.gather
        student_tokens = gather(rollout.completion_mask.sum()).sum().clamp(min=1)
        metrics = self._metrics[mode]
        metrics["crosstok/unscored_fraction"].append(gather((~scores.scored).float()).mean().item())
        metrics["crosstok/unstable_fraction"].append(gather((~scores.stable).float()).mean().item())
        metrics["crosstok/teacher_tokens_per_student_token"].append(
            (gather(scores.teacher_tokens.sum()).sum() / student_tokens).item()
        )
        return rollout, rollout.completion_mask * scored, scores.credited_tokens

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
        teacher_head_block = self._output_head(teacher) if shared_vocabulary else nullcontext()
        with self._output_head(unwrapped_student) as student_head, teacher_head_block as teacher_head:
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
                min_chunks=self._max_chunk_count(num_tokens),
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

    def _max_chunk_count(self, num_tokens: torch.Tensor) -> int:
        """Under ZeRO-3 every LM-head call gathers parameters collectively, so each process runs the loss over the
        largest chunk count of all processes (`losses._checkpointed_head_loss`); elsewhere chunks are local."""
        if not self._dist.is_zero3:
            return 0
        count = torch.tensor([chunk_count(int(num_tokens), self.args.loss_chunk_size)], device=self.accelerator.device)
        return int(self.accelerator.gather(count).max())

    def _completion_hidden_states(self, unwrapped_student, inputs):
        """Student final hidden states that predict each completion token: `[B, C, H]`, from the student's own forward
        (positions from the attention mask, as in sampling, so left padding changes nothing)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        hidden = self._student_hidden_states(unwrapped_student, input_ids, attention_mask)
        prompt_length = inputs["prompt_ids"].size(1)
        return hidden[:, prompt_length - 1 : -1]

    def _lm_loss_sum(self, unwrapped_student, inputs):
        hidden = self._student_hidden_states(unwrapped_student, inputs["lm_input_ids"], inputs["lm_attention_mask"])
        labels = inputs["lm_labels"][:, 1:]
        valid = labels != -100
        with self._output_head(unwrapped_student) as student_head:
            total = lm_loss_sum(
                hidden[:, :-1][valid],
                student_head,
                labels[valid],
                self.args.loss_chunk_size,
                sharded_head=self._dist.is_zero3,
                min_chunks=self._max_chunk_count(valid.sum()),
            )
        return total, valid.sum()

    # ------------------------------------------------------------------ sharded models (DeepSpeed ZeRO-3, FSDP2)

    def _prepare_teacher(self, teacher):
        """The teacher as the backend holds it: a ZeRO-3 inference engine, sharded by FSDP2 like the student (no
        optimizer), or placed whole on each process's device."""
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return shard_teacher(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    @contextmanager
    def _models_for_rollout(self):
        """`(student, teacher)` ready for token-by-token sampling: unwrapped by trl (ZeRO-3 gathers each model for the
        block); under FSDP2 every FSDP module of both models is gathered once for the block, so the decode loop
        makes no collective call and processes may decode different numbers of steps."""
        with (
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
        forget_forwards(self.teacher_model)

    @contextmanager
    def _output_head(self, model):
        """`scoring.OutputHead` of `model` for the loss. Under FSDP2 the head runs outside the root forward: the FSDP
        modules holding its parameters are gathered once for the block and the head bypasses their per-call hooks.
        A head that is differentiated stays gathered after the block: FSDP reduces its gradients and frees it in the
        backward, like the rest of the model."""
        if not fsdp_modules(model):
            yield OutputHead(model, self.vocab_size)
            return
        holders = modules_holding(model, OutputHead(model, self.vocab_size).parameters())
        differentiated = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
        with gathered(holders, reshard=not differentiated):
            yield OutputHead(model, self.vocab_size, module_hooks=False)

    def _student_hidden_states(self, unwrapped_student, input_ids, attention_mask):
        """`scoring.final_hidden_states` of the student, for a loss that projects them with `_output_head`; under FSDP2
        the head's unit is gathered again, if freed, when the backward reaches them (`fsdp.unshard_before_backward`)."""
        hidden = final_hidden_states(unwrapped_student, input_ids, attention_mask)
        if fsdp_modules(unwrapped_student):
            holders = modules_holding(unwrapped_student, OutputHead(unwrapped_student, self.vocab_size).parameters())
            unshard_before_backward(hidden, holders)
        return hidden

    # ------------------------------------------------------------------ faults and checkpoints

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
            if self._nonfinite_streak > self.args.max_consecutive_nonfinite_steps:
                raise FloatingPointError(
                    self._nonfinite_message(f"{self._nonfinite_streak} optimizer step(s) in a row had a NaN/inf loss or gradient")
                )
            logger.warning(
                f"Step {self.state.global_step + 1}: NaN/inf loss or gradient; the update is skipped "
                f"({self._nonfinite_streak} in a row, limit max_consecutive_nonfinite_steps="
                f"{self.args.max_consecutive_nonfinite_steps})."
            )
        self._metrics["train"]["nonfinite/skipped_steps"] = [self._skipped_steps]

    def _nonfinite_message(self, what: str) -> str:
        return (
            f"{what} (max_consecutive_nonfinite_steps={self.args.max_consecutive_nonfinite_steps}); the weights "
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
        window = self.args.gradient_accumulation_steps * self.args.ppo_epochs
        if self._buffered_inputs is not None and self._step % window != 0:
            torch.save({"step": self._step, "rollouts": self._buffered_inputs}, self._rollout_buffer_file(output_dir))

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = self._rollout_buffer_file(checkpoint)
        if os.path.isfile(path):
            state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
            self._step, self._buffered_inputs = state["step"], state["rollouts"]
