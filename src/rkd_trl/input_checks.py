"""The checks of a trainer's inputs, before training: the distributed set-up, the tokenizer, the datasets (the text
the LM loss needs, every prompt's rendering and length). Plain functions of their inputs, each raising a ValueError
that says what to fix; `ReverseKLDistillTrainer.__init__` calls them (docs/reliability.md)."""

import copy
import warnings

from datasets import Dataset, IterableDataset
from trl.data_utils import is_conversational

from .config import ReverseKLDistillConfig
from .data import to_prompt_completion


def check_distributed_setup(backend, args) -> None:
    """The distributed set-ups the decode loop cannot run under (`backend`: trl's `DistributedBackend`), refused."""
    # The teacher-mixed decode loop calls both models once per token, and each process stops when its own
    # completions have ended. With parameters gathered per layer at every call, processes would then make
    # different numbers of collective calls and wait for each other forever.
    if backend.is_fsdp and backend.fsdp_version != 2:
        raise ValueError(
            "FSDP1 (fsdp_version: 1) is not supported; set `fsdp_version: 2` in the accelerate config "
            "(examples/accelerate/fsdp2.yaml). The teacher-mixed sampler calls both models token by token and "
            "each process stops when its own completions end, so the trainer gathers each model once per rollout. "
            "FSDP2 offers that (`unshard`/`reshard`); FSDP1 does not: its `summon_full_params` must not be used "
            "around a forward, and with FULL_SHARD it gathers each wrapped module at every call, so processes "
            "that decode different numbers of steps would wait for each other forever."
        )
    if backend.is_zero3 and not args.ds3_gather_for_generation:
        raise ValueError(
            "ds3_gather_for_generation=False is not supported: the teacher-mixed sampler would gather ZeRO-3 "
            "parameters layer by layer at every token, and processes whose completions end at different steps "
            "would wait for each other forever. Keep ds3_gather_for_generation=True (the default)."
        )


def default_lm_loss_weight(train_dataset, lm_dataset, stacklevel: int = 2) -> float:
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
        stacklevel=stacklevel,
    )
    return 0.0


def require_completions(dataset) -> None:
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


def check_tokenizer(tokenizer, dataset) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "The tokenizer has no EOS token: completions could never end. Set `tokenizer.eos_token` (and "
            "`tokenizer.pad_token`, which defaults to it)."
        )
    if dataset is None or isinstance(dataset, IterableDataset):
        return
    if is_conversational(dataset[0]) and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The dataset is conversational but the tokenizer has no chat template: set "
            "`tokenizer.chat_template`, or give plain-text prompts in a `prompt` column."
        )


def prompt_length_limit(max_length: int | None, models: dict, max_completion_length: int) -> tuple[int | None, str]:
    """Longest prompt allowed: `max_length` (if set) and the models' position range (`models`: name -> model),
    minus the completion; with the sentence that says where it comes from."""
    limits = []
    if max_length is not None:
        limits.append((max_length, "max_length"))
    for name, model in models.items():
        positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if positions is not None:
            limits.append((positions, f"the {name}'s max_position_embeddings"))
    if not limits:
        return None, ""
    total, source = min(limits)
    return total - max_completion_length, f"{source} ({total}) - max_completion_length ({max_completion_length})"


def check_prompts(dataset, name: str, tokenize_prompts, limit: tuple[int | None, str], unknown_role) -> None:
    """Every prompt must render as intended (`check_conversations`), have at least one token and leave room for
    `max_completion_length` new ones. `tokenize_prompts`: prompts -> token id lists (the trainer's own tokenization);
    `limit`: `prompt_length_limit`; `unknown_role(role)`: whether the chat template renders `role` as a made-up one."""
    if isinstance(dataset, dict):
        for key, split in dataset.items():
            check_prompts(split, f"{name}[{key!r}]", tokenize_prompts, limit, unknown_role)
        return
    if dataset is None or isinstance(dataset, IterableDataset):
        return
    limit, source = limit
    for start in range(0, len(dataset), 1000):
        prompts = dataset[start : start + 1000]["prompt"]
        if is_conversational({"prompt": prompts[0]}):
            check_conversations(prompts, name, start, unknown_role)
        for offset, ids in enumerate(tokenize_prompts(prompts)):
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


def check_conversations(prompts, name: str, first_row: int, unknown_role) -> None:
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
        if role not in ("user", "assistant") and unknown_role(role):
            raise ValueError(
                f"{name} row {row}: the chat template does not know the role {role!r}: it renders a {role!r} "
                "message exactly as it renders one of a made-up role. Rename or drop those messages (e.g. fold a "
                f"system message into the first user turn), or give the tokenizer a chat template for {role!r}."
            )


def renders_as_an_unknown_role(processing_class, role, chat_template=None, chat_template_kwargs=None) -> bool:
    """Whether the chat template renders a lone `role` message exactly as one of a made-up role."""

    def render(message_role):
        return processing_class.apply_chat_template(
            [{"role": message_role, "content": "text"}], tokenize=False, chat_template=chat_template,
            **(chat_template_kwargs or {}),
        )  # fmt: skip

    try:
        return render(role) == render("made-up role")
    except Exception:  # the template raises for one of them (or for any lone message): it tells roles apart
        return False


def check_constructor_arguments(model, teacher_model, args, data_collator, tools, **ignored_gkd_arguments):
    """The trainer's arguments as given: the student and the teacher present, datasets not in `data_collator`'s place
    (trl.DistillationTrainer's positional order), no `tools`, a `ReverseKLDistillConfig` (a default one when None),
    GKDTrainer's arguments that mean nothing here warned about. Returns the config and the teacher (the config's
    `teacher_model_name_or_path` when none is given)."""
    if model is None:
        raise ValueError("`model` (the student) is required: a model id, a local path or a model object.")
    if isinstance(data_collator, (Dataset, IterableDataset, dict)):
        raise TypeError(
            "A dataset was given as the 4th positional argument, which is `data_collator` here: "
            "ReverseKLDistillTrainer takes GKDTrainer's positional order (model, teacher_model, args, "
            "data_collator, train_dataset, eval_dataset, processing_class, ...), and trl.DistillationTrainer's "
            "(model, teacher_model, args, train_dataset, ...) differs from it there. Pass the datasets and the "
            "tokenizer by keyword: ReverseKLDistillTrainer(model, teacher_model, args, train_dataset=..., "
            "eval_dataset=..., processing_class=...)."
        )
    if tools is not None:
        raise ValueError(
            "`tools` (tool calling during generation, a trl.DistillationTrainer argument) is not supported: the "
            "teacher-mixed sampler decodes plain text completions, and a tool's output inserted into a completion "
            "would be scored as if the student or the teacher had written it. Drop `tools=`, or distil with "
            "trl.DistillationTrainer."
        )
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path or "student"
        args = ReverseKLDistillConfig(f"{name.split('/')[-1]}-ReverseKLDistill")
    elif not isinstance(args, ReverseKLDistillConfig):
        raise TypeError(
            f"`args` must be a ReverseKLDistillConfig, got {type(args).__name__}. It accepts GKDConfig's field "
            "names: swap the class name and keep the arguments."
        )
    for argument, value in {"data_collator": data_collator, **ignored_gkd_arguments}.items():
        if value is not None:
            warnings.warn(
                f"`{argument}` has no meaning in ReverseKLDistillTrainer (prompts are tokenized and completions "
                "sampled inside the trainer); it is ignored.",
                UserWarning,
                stacklevel=3,
            )
    if teacher_model is None:
        teacher_model = args.teacher_model_name_or_path
    if teacher_model is None:
        raise ValueError("`teacher_model` is required: a model id, a local path or a model object.")
    return args, teacher_model


def resolve_datasets(args, train_dataset, eval_dataset, lm_dataset):
    """The datasets in DistillationTrainer's `prompt` / `completion` format (`data.to_prompt_completion`), checked
    against what the config asks of them; `lm_loss_weight=None` resolved (`default_lm_loss_weight`) on a copy of the
    config, never on the user's. Returns the config and the two datasets."""
    if args.ppo_epochs > 1 and isinstance(train_dataset, IterableDataset):
        raise ValueError("ppo_epochs > 1 needs a map-style train_dataset (rollout reuse repeats batches by index).")
    train_dataset = to_prompt_completion(train_dataset, "train_dataset")
    eval_dataset = to_prompt_completion(eval_dataset, "eval_dataset")
    if args.lm_loss_weight is None:
        args = copy.copy(args)  # the trainer's copy: the user's config stays as given
        args.lm_loss_weight = default_lm_loss_weight(train_dataset, lm_dataset, stacklevel=4)
    if args.lm_loss_weight > 0 and lm_dataset is None:
        require_completions(train_dataset)
    if lm_dataset is not None and "text" not in (lm_dataset.column_names or []):
        raise ValueError(f"`lm_dataset` needs a `text` column; it has {lm_dataset.column_names}.")
    return args, train_dataset, eval_dataset
