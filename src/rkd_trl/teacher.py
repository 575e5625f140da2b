"""The teacher's set-up, before training: loading (with a quantisation config), the placement checks of quantised
teachers, and the teacher's tokenizer: the student's (one shared vocabulary), or its own, when the teacher is scored
across tokenizers (`crosstokenizer`, docs/cross-tokenizer.md) with the checks that needs; its preparation for the
distributed backend, frozen (`set_up_teacher`, the trainer's one call). The trainer then probes it
(`probe.verify_scoring`)."""

import os
import warnings
from dataclasses import dataclass

from datasets import Dataset
from transformers import AutoTokenizer, BitsAndBytesConfig
from transformers.quantizers import AutoQuantizationConfig
from transformers.utils import is_bitsandbytes_available, logging
from trl.data_utils import is_conversational
from trl.distributed import DistributedBackend
from trl.models import prepare_deepspeed
from trl.trainer.utils import create_model_from_path

from .crosstokenizer import CONTENT_SENTINEL, teacher_eos_token_ids, teacher_turn_end_ids
from .fsdp import shard_teacher
from .scoring import same_vocabulary, shared_vocab_size

logger = logging.get_logger(__name__)


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


def load_teacher(teacher_model, args):
    """The teacher: a model object as given (refusing `teacher_model_init_kwargs` for it), or loaded from an id or
    path with `args.teacher_model_init_kwargs` (a quantised one on this process's device)."""
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


def find_teacher_tokenizer(teacher_processing_class, teacher_source, teacher, args):
    """The teacher's own tokenizer, or None when there is none to find: `teacher_processing_class`, or the tokenizer
    saved where the teacher was loaded from (the id or path it was given as, or the local folder a teacher object was
    loaded from). With none, the teacher is taken to share the student's tokenizer, and `shared_vocab_size` rejects it
    if its vocabulary does not cover that tokenizer."""
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
    return None if teacher_tokenizer is None else getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer)


def teacher_tokenizer_if_different(student_tokenizer, teacher_tokenizer):
    """`teacher_tokenizer` when it is another tokenizer than the student's (the teacher is then scored across
    tokenizers), else None (one shared vocabulary)."""
    if teacher_tokenizer is None or same_vocabulary(student_tokenizer, teacher_tokenizer):
        return None
    return teacher_tokenizer


def _render(tokenizer, conversation, chat_template=None, **kwargs) -> str:
    return tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template, **kwargs)


def check_chat_formats(student_tokenizer, teacher_tokenizer, prompt, eos_token_ids, chat_template=None) -> None:
    """A student and a teacher that share a vocabulary: the teacher scores the student's rendering of each
    conversation, so the two chat formats must agree on what the teacher reads and on how an answer ends.

    On `prompt` (the first training prompt) with a placeholder answer, rendered by the student's template
    (`chat_template`: the one the trainer renders with, default the tokenizer's) and by the teacher's: (1) the
    student's template must close the assistant turn with one of `eos_token_ids` (the ids the sampler stops at),
    else sampled answers never end where the teacher expects them to; (2) the two renderings must be the same
    tokens. Where they differ only while the conversation has no system message (a default system prompt of one
    template) it is a warning; any other difference (end-of-turn token, generation prompt, special tokens) is refused
    with both renderings and the fixes. Plain-text prompts and a teacher without a chat template are not checked."""
    if not is_conversational({"prompt": prompt}) or getattr(student_tokenizer, "chat_template", None) is None:
        return
    answered = [*prompt, {"role": "assistant", "content": CONTENT_SENTINEL}]
    _, found, after = _render(student_tokenizer, answered, chat_template).rpartition(CONTENT_SENTINEL)
    if found and not set(student_tokenizer(after, add_special_tokens=False)["input_ids"]) & set(eos_token_ids):
        eos = student_tokenizer.convert_ids_to_tokens(list(eos_token_ids))
        raise ValueError(
            f"The student's chat template closes an answer with {after!r}, which holds none of the EOS tokens the "
            f"sampler stops at ({eos}, ids {list(eos_token_ids)}): sampled answers would not end where the template "
            "(and the teacher reading it) ends them, the commonest way on-policy distillation collapses. Set the "
            "student's generation_config.eos_token_id (or tokenizer.eos_token) to the template's end-of-turn token."
        )
    if teacher_tokenizer is None or getattr(teacher_tokenizer, "chat_template", None) is None:
        return
    renderings = {}
    for name, conversation, options in (("the prompt", prompt, {"add_generation_prompt": True}),
                                        ("an answered prompt", answered, {})):  # fmt: skip
        student_text = _render(student_tokenizer, conversation, chat_template, **options)
        teacher_text = _render(teacher_tokenizer, conversation, **options)
        if student_tokenizer(student_text, add_special_tokens=False)["input_ids"] != teacher_tokenizer(
            teacher_text, add_special_tokens=False
        )["input_ids"]:
            renderings[name] = (student_text, teacher_text)
    if not renderings:
        return
    has_system = any(message.get("role") == "system" for message in prompt)
    system = [{"role": "system", "content": "rkd-trl probe system prompt"}]
    only_default_system_prompt = not has_system and all(
        _render(student_tokenizer, system + conversation, chat_template, **options)
        == _render(teacher_tokenizer, system + conversation, **options)
        for conversation, options in ((prompt, {"add_generation_prompt": True}), (answered, {}))
    )
    name, (student_text, teacher_text) = next(iter(renderings.items()))
    shown = f"the student's template renders {name} as {student_text!r}, the teacher's as {teacher_text!r}"
    if only_default_system_prompt:
        warnings.warn(
            f"The student's and the teacher's chat templates differ in their default system prompt ({shown}). The "
            "teacher scores the student's rendering, with the student's default system prompt; give conversations "
            "a system message to make both the same.",
            UserWarning,
            stacklevel=4,
        )
        return
    raise ValueError(
        "The student and the teacher share a vocabulary but not a chat format: the teacher scores the student's "
        f"rendering of each conversation, which is not what it was trained to read ({shown}). Fine-tune the student "
        "on the teacher's format first (SFT on the teacher's answers rendered with the teacher's chat template), "
        "then train with the teacher's template on the student's tokenizer "
        "(`tokenizer.chat_template = teacher_tokenizer.chat_template`)."
    )


@dataclass(frozen=True)
class CrossTokenizerTeacher:
    """A teacher with a tokenizer of its own, scored across tokenizers: its tokenizer, its EOS ids, its vocabulary
    rows and padding id (what the start-up probe and the scorer run it with), and the student's vocabulary rows."""

    tokenizer: object
    eos_token_ids: list[int]
    vocab_size: int
    pad_token_id: int
    student_vocab_size: int


def set_up_cross_tokenizer_teacher(student, student_tokenizer, teacher, teacher_tokenizer, train_dataset, args):
    """Checks and settings of cross-tokenizer scoring (`crosstokenizer`): the algorithm's parts that need the
    teacher's distribution over the student's vocabulary are off, the teacher tokenizer gives the words of its
    encodings, each model's vocabulary holds its tokenizer, and the teacher's end of turn holds its EOS."""
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
    tokenizer = teacher_tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The teacher's tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer: cross-tokenizer "
            "scoring needs the words (pre-tokens) of its encodings. Load it with AutoTokenizer (use_fast=True)."
        )
    eos_token_ids = teacher_eos_token_ids(teacher, tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids[0]
    teacher_vocab_size = teacher.config.get_text_config().vocab_size
    if len(tokenizer) > teacher_vocab_size:
        raise ValueError(
            f"The teacher has {teacher_vocab_size} vocabulary rows but its tokenizer {len(tokenizer)} tokens: "
            "they do not belong together. Give the teacher's own tokenizer as `teacher_processing_class`."
        )
    student_vocab_size = student.config.get_text_config().vocab_size
    if len(student_tokenizer) > student_vocab_size:
        raise ValueError(
            f"The student has {student_vocab_size} vocabulary rows but its tokenizer {len(student_tokenizer)} tokens: "
            "they do not belong together. Give the student's own tokenizer as `processing_class`."
        )
    if isinstance(train_dataset, Dataset) and len(train_dataset) > 0:
        teacher_turn_end_ids(tokenizer, train_dataset[0]["prompt"], eos_token_ids)  # raises if it has no EOS
    logger.info("The teacher's tokenizer differs from the student's: the teacher is scored across tokenizers.")
    return CrossTokenizerTeacher(tokenizer, eos_token_ids, teacher_vocab_size, pad_token_id, student_vocab_size)


def set_up_teacher(teacher, student, student_tokenizer, args, accelerator, *, source, teacher_processing_class,
                   train_dataset, eos_token_ids, chat_template):  # fmt: skip
    """The teacher's tokenizer decision (`teacher_tokenizer_if_different`: the student's, with the vocabulary alignment
    and the chat-format check, or its own, scored across tokenizers), its placement checks, its preparation for the
    distributed backend (a ZeRO-3 inference engine, sharded by FSDP2 like the student without an optimizer, or placed
    whole on each process's device), frozen in eval mode.

    Returns the teacher as the backend holds it, the student's vocabulary rows that are scored, and the
    `CrossTokenizerTeacher` record of a teacher with a tokenizer of its own (None for a shared vocabulary)."""
    found = find_teacher_tokenizer(teacher_processing_class, source, teacher, args)
    teacher_tokenizer = teacher_tokenizer_if_different(student_tokenizer, found)
    cross = None
    if teacher_tokenizer is None:
        vocab_size = shared_vocab_size(student, teacher, student_tokenizer)
        if isinstance(train_dataset, Dataset) and len(train_dataset) > 0:
            check_chat_formats(student_tokenizer, found, train_dataset[0]["prompt"], eos_token_ids, chat_template)
    else:
        cross = set_up_cross_tokenizer_teacher(student, student_tokenizer, teacher, teacher_tokenizer, train_dataset,
                                               args)  # fmt: skip
        vocab_size = cross.student_vocab_size
    backend = DistributedBackend(accelerator)
    check_quantized_teacher_placement(teacher, backend)
    check_4bit_teacher_runs_on_cpu(teacher)
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:  # as Trainer.is_deepspeed_enabled
        teacher = prepare_deepspeed(teacher, accelerator)
    elif backend.is_fsdp:
        teacher = shard_teacher(teacher, accelerator)
    else:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher, vocab_size, cross


def check_teacher_frozen(teacher, optimizer, when: str) -> None:
    """The teacher is read, never trained: in eval mode, no parameter that requires or holds a gradient, none in the
    optimizer's parameter groups (a teacher updated by the optimizer, or run with dropout, would move the target the
    student is trained towards). Raises a `RuntimeError` saying what was found `when` (e.g. "after training")."""
    found = []
    if teacher.training:
        found.append("it is in training mode (dropout on)")
    trainable = [name for name, parameter in teacher.named_parameters() if parameter.requires_grad]
    if trainable:
        found.append(f"{len(trainable)} parameter(s) require gradients ({trainable[0]}, ...)")
    with_grad = [name for name, parameter in teacher.named_parameters() if parameter.grad is not None]
    if with_grad:
        found.append(f"{len(with_grad)} parameter(s) hold gradients ({with_grad[0]}, ...)")
    teacher_ids = {id(parameter) for parameter in teacher.parameters()}
    groups = getattr(optimizer, "param_groups", None) or []
    optimized = sum(id(parameter) in teacher_ids for group in groups for parameter in group["params"])
    if optimized:
        found.append(f"{optimized} of its parameters are in the optimizer")
    if found:
        raise RuntimeError(
            f"The teacher must stay frozen, but {when} {'; '.join(found)}. Something outside the trainer changed it "
            "(a callback, a custom optimizer given with `optimizers=`, `teacher.train()`): give the optimizer the "
            "student's parameters only and leave the teacher as the trainer prepared it."
        )
