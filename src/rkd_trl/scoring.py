"""Scoring through the models' own code: final hidden states and the output head, and the vocabulary both models
share.

The losses need the vocabulary projection separately from the backbone (to project a chunk of tokens at a time).
Nothing here re-implements a model: hidden states come from the model's own forward (a hook on its backbone), logits
from hidden states come from the model's own forward code with the backbone replaced by a pass-through
(`OutputHead`). Decoding one token at a time is in `decoding`; the start-up probe that checks all of it against one
plain forward, and refuses a model whose numbers differ, is in `probe`.
"""

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from trl.trainer.utils import pad


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers `*ForCausalLM` inside a model that may be PEFT-wrapped (adapters stay active in it)."""
    # An isinstance check: accelerate's `is_peft_model` reads package metadata at every call (milliseconds), and this
    # runs at every decoding step.
    return model.base_model.model if isinstance(model, PeftModel) else model


def language_model_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module of a causal LM (PEFT-wrapped or not) that returns the final hidden states: all but the output head.

    The base model (its pretrained submodule where `base_model_prefix` names no attribute, as in Llama 4), or the
    decoder inside it (`get_decoder()`) where the causal LM's forward calls that directly (OPT: `self.model.decoder`).
    """
    lm = causal_lm(model)
    base_model = lm.base_model
    if base_model is lm:
        base_model = next(module for module in lm.children() if isinstance(module, PreTrainedModel))
    return base_model.get_decoder()


def _module_path(root: torch.nn.Module, module: torch.nn.Module) -> list[str]:
    """Attribute names that lead from `root` to its submodule `module` (`["model"]`, `["model", "decoder"]`)."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return name.split(".")
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}.")


def decoder_layers_name(model: torch.nn.Module) -> str:
    """Qualified name of the `ModuleList` holding the decoder layers (`model.layers`, `transformer.h`, ...)."""
    num_layers = model.config.get_text_config().num_hidden_layers
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers and name
    ]
    # Layer lists nest (a layer may hold a ModuleList of experts of the same length): the outermost one is the stack.
    outermost = [name for name in candidates if not any(name.startswith(other + ".") for other in candidates)]
    if len(outermost) != 1:
        raise ValueError(
            f"Cannot tell which module list holds the {num_layers} decoder layers of this "
            f"{type(model).__name__} (candidates: {outermost or 'none'}); build the student from a config instead."
        )
    return outermost[0]


def subset_per_layer_config(config, num_layers: int, layers) -> None:
    """`config` cut, in place, to the decoder `layers` (indices): `num_hidden_layers` and every per-layer list (e.g.
    `layer_types`)."""
    for key, value in list(config.to_diff_dict().items()):
        if isinstance(value, (list, tuple)) and len(value) == num_layers and key != "architectures":
            setattr(config, key, type(value)(value[index] for index in layers))
    config.num_hidden_layers = len(layers)


def per_layer_config(config, num_layers: int, layers: list[int]):
    """A copy of `config` for `layers` (`subset_per_layer_config`)."""
    config = copy.deepcopy(config)
    subset_per_layer_config(config, num_layers, layers)
    return config


def accepted_arguments(model: torch.nn.Module) -> set[str]:
    """Names of the keyword arguments the causal LM's forward takes."""
    return set(inspect.signature(causal_lm(model).forward).parameters)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens, so left padding does not shift them (as `generate` does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_arguments(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> dict:
    """Keyword arguments of a forward over left-padded `input_ids`: positions from the mask where the model takes
    them, and logits for the last position only where it can (hidden states are what the caller wants)."""
    accepted = accepted_arguments(model)
    arguments = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    if "position_ids" in accepted:
        arguments["position_ids"] = position_ids_from_mask(attention_mask)
    if "logits_to_keep" in accepted:
        # Given as the index of the last position: an integer also lets some backbones drop the earlier positions
        # before their last layers (Gemma 4's KV-shared layers), and those hidden states are what the caller wants.
        arguments.setdefault("logits_to_keep", torch.tensor([input_ids.size(1) - 1], device=input_ids.device))
    return arguments


@contextmanager
def captured_hidden_states(model: torch.nn.Module):
    """Within the block, `box["hidden"]` holds the final hidden states `[B, L, H]` of the model's last forward: what
    its backbone returned, i.e. exactly what its own forward hands to the output head."""
    box = {}

    def keep(module, args, output):
        box["hidden"] = output[0]

    handle = language_model_backbone(model).register_forward_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B, L, H]` final hidden states of left-padded `input_ids` from one forward of the model itself (its root
    forward, so distributed wrappers and model-specific arguments work), without the full vocabulary logits."""
    with captured_hidden_states(model) as box:
        causal_lm(model)(**forward_arguments(model, input_ids, attention_mask, use_cache=False))
    return box["hidden"]


@dataclass
class _HiddenStatesOnly(ModelOutput):
    """A backbone output holding only `last_hidden_state`; any other field a model's forward reads is None."""

    last_hidden_state: torch.Tensor | None = None

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _PassThroughBackbone:
    """Stands for a backbone inside its model's forward: returns given hidden states; other attributes (e.g. a
    multiplier the forward reads from it) are the real backbone's."""

    def __init__(self, backbone, hidden):
        self._backbone = backbone
        self.hidden = hidden

    def __call__(self, *args, **kwargs):
        return _HiddenStatesOnly(last_hidden_state=self.hidden)

    def __getattr__(self, name):
        return getattr(self._backbone, name)


class _WithoutModuleHooks:
    """Stands for a module called through its `forward` alone, without the hooks `__call__` would run."""

    def __init__(self, module):
        self._module = module

    def __call__(self, *args, **kwargs):
        return self._module.forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


class _WithBackbone:
    """Stands for a causal LM inside its own `forward`, with the module at attribute path `path` replaced by
    `backbone` (each module on the way is a stand-in too, so that OPT's `self.model.decoder` reaches it) and, without
    `module_hooks`, its other submodules called without their hooks."""

    def __init__(self, model, path: list[str], backbone, module_hooks: bool = True):
        self._model = model
        self._path = path
        self._backbone = backbone
        self._module_hooks = module_hooks

    def __getattr__(self, name):
        if name == self._path[0] and len(self._path) == 1:
            return self._backbone
        value = getattr(self._model, name)
        if name != self._path[0]:
            return _WithoutModuleHooks(value) if not self._module_hooks and isinstance(value, torch.nn.Module) else value
        return _WithBackbone(value, self._path[1:], self._backbone, self._module_hooks)


class OutputHead:
    """`hidden → vocabulary logits` of a causal LM, computed by the model's own forward code.

    The model's forward runs with its backbone replaced by a pass-through that returns the given hidden states, so
    the output layer and whatever the model does after it (logit scaling, multipliers, soft-capping, ...) are the
    model's own, for any architecture; nothing is read from the config. Exposes `parameters()`: the parameters the
    head reads (the output layer, tied or not, adapters on it included), which the chunked losses differentiate.

    Args:
        model: the causal LM (PEFT-wrapped or not).
        vocab_size: number of leading vocabulary rows kept; rows past it are padding rows of the embedding matrix.
        module_hooks: call the output layer through its module hooks (the default). False calls its `forward` alone:
            under FSDP2, whose hooks would gather and free the parameters at every call and register backward hooks
            that free them before the backward is done, the caller gathers them once around all calls instead
            (`fsdp.gathered`) and builds the head while they are gathered.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, module_hooks: bool = True):
        self.model = causal_lm(model)
        self.vocab_size = vocab_size
        self.module_hooks = module_hooks
        self.backbone = language_model_backbone(self.model)
        self.backbone_path = _module_path(self.model, self.backbone)
        weight = getattr(self.model.get_output_embeddings(), "weight", None)
        self.dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        backbone_only = {id(p) for p in self.backbone.parameters()} - {
            id(p) for p in self.model.get_output_embeddings().parameters()
        }
        self._parameters = [p for p in self.model.parameters() if id(p) not in backbone_only]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[..., H]` final hidden states → `[..., vocab_size]` float logits."""
        if self.dtype is not None:
            hidden = hidden.to(self.dtype)
        leading = hidden.shape[:-1]
        pass_through = _PassThroughBackbone(self.backbone, hidden.reshape(1, -1, hidden.size(-1)))
        stand_in = _WithBackbone(self.model, self.backbone_path, pass_through, self.module_hooks)
        # The hidden states stand as input embeddings too: some forwards read the input length (Gemma 4).
        logits = type(self.model).forward(stand_in, inputs_embeds=pass_through.hidden, use_cache=False).logits
        return logits.reshape(*leading, logits.size(-1))[..., : self.vocab_size].float()

    def parameters(self):
        return iter(self._parameters)


def output_logits(model: torch.nn.Module, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[..., vocab_size]` float logits of `model` from its final hidden states `[..., H]` (see `OutputHead`)."""
    return OutputHead(model, vocab_size)(hidden)


def shared_vocab_size(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer) -> int:
    """Number of vocabulary rows both models score: the smaller embedding matrix, which must cover the tokenizer.

    Embedding matrices are often padded past the tokenizer's vocabulary (Qwen2.5: 151936 rows in small models,
    152064 in large ones); those rows are never produced by the tokenizer and are dropped from both distributions.
    Anything else is an error: fewer rows than tokens, or more than padding explains (`padded_vocab_limit`), as a
    teacher with another, larger tokenizer has.
    """
    student_rows = student.config.get_text_config().vocab_size
    teacher_rows = teacher.config.get_text_config().vocab_size
    tokenizer_size = len(tokenizer)
    vocab_size = min(student_rows, teacher_rows)
    if tokenizer_size > vocab_size:
        raise ValueError(
            f"The student has {student_rows} vocabulary rows and the teacher {teacher_rows}, but the tokenizer has "
            f"{tokenizer_size} tokens: the models do not share the tokenizer's vocabulary. Reverse-KL distillation "
            "compares the two next-token distributions token by token, so both models must use the same tokenizer, "
            "unless the teacher is scored across tokenizers: for a teacher with another tokenizer, give its tokenizer "
            "as `teacher_processing_class=` (docs/cross-tokenizer.md)."
        )
    limit = padded_vocab_limit(tokenizer_size)
    for name, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows > limit:
            raise ValueError(
                f"The {name} has {rows} vocabulary rows, {rows / tokenizer_size:.1f}× the tokenizer's "
                f"{tokenizer_size} tokens: more than embedding padding explains (at most {limit} rows), so it likely "
                "uses another tokenizer. Both models must use the tokenizer given as `processing_class`, unless the "
                "teacher's own tokenizer is given as `teacher_processing_class=` (cross-tokenizer scoring, "
                "docs/cross-tokenizer.md)."
            )
    return vocab_size


def padded_vocab_limit(tokenizer_size: int) -> int:
    """Most embedding rows padding explains for a tokenizer of `tokenizer_size` tokens: up to the next multiple of 128,
    or 1% more (Qwen2.5-7B: 152064 rows for 151665 tokens)."""
    return max(-(-tokenizer_size // 128) * 128, tokenizer_size + tokenizer_size // 100)


def same_vocabulary(student_tokenizer, teacher_tokenizer) -> bool:
    """Whether two tokenizers map the same strings to the same ids (then one vocabulary serves both models)."""
    return student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()


def check_finite_parameters(model: torch.nn.Module, name: str) -> None:
    """Raise if a floating-point parameter of `model` holds NaN or inf (a corrupt or badly converted checkpoint)."""
    for parameter_name, parameter in model.named_parameters():
        if not parameter.is_floating_point():
            continue
        finite = torch.isfinite(parameter).all()
        if hasattr(finite, "full_tensor"):  # an FSDP2 shard: reduce over the processes, so that all of them agree
            finite = finite.full_tensor()
        if not finite:
            raise ValueError(
                f"The {name}'s parameter `{parameter_name}` contains NaN or inf values: the checkpoint is corrupt or "
                "was converted to a dtype it overflows. Reload it in float32/bfloat16 or from another checkpoint."
            )


def left_pad(token_lists: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, mask)` `[B, L]` of token lists padded on the left, as prompts must be for sampling."""
    ids = pad([torch.tensor(ids) for ids in token_lists], padding_value=pad_token_id, padding_side="left")
    mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in token_lists], padding_value=0, padding_side="left")
    return ids, mask
