"""Scoring through the models' own code: final hidden states, the output head, and KV-cached decoding.

The losses need the vocabulary projection separately from the backbone (to project a chunk of tokens at a time), and
the sampler needs both models one token at a time. Neither re-implements a model: hidden states come from the model's
own forward (a hook on its backbone), logits from hidden states come from the model's own forward code with the
backbone replaced by a pass-through (`OutputHead`), and decoding runs the model's forward with the inputs and cache
updates that `generate` uses (`prepare_inputs_for_generation`, `_update_model_kwargs_for_generation`), dropping
finished rows with the cache's own beam-search reordering. `verify_scoring` checks all of it against one plain
forward at start-up and refuses a model whose numbers differ.
"""

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerationMode
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


class IncrementalDecoder:
    """Runs a causal LM one token at a time over its cache and returns next-token log-probs (and, with
    `record_hidden`, the final hidden state that predicted them).

    Each step is what `generate` does: the cache `generate` would prepare, the model's `prepare_inputs_for_generation`,
    its forward, and
    `_update_model_kwargs_for_generation` (which keeps the cache under the model's own name for it, extends the
    attention mask and the positions). Rows that finished are dropped with the cache's `reorder_cache` (the API beam
    search uses, which covers attention and linear-attention / SSM states) when `drop_ended_rows`; a model whose state
    lives outside its cache object keeps every row instead and is fed padding for the finished ones, as `generate`
    does (`verify_scoring` tells which works).
    """

    def __init__(self, model, vocab_size: int, temperature: float = 1.0, record_hidden=False, drop_ended_rows=True):
        self.model = causal_lm(model)
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.record_hidden = record_hidden
        self.drop_ended_rows = drop_ended_rows
        self.model_kwargs = {}
        self.input_ids = None
        self.active = None  # rows still generating, when ended rows are kept in the batch

    @torch.no_grad()
    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """Feed left-padded prompts `[B, P]`; returns `(hidden [B, H] or None, logprobs [B, V])` for the next token."""
        accepted = accepted_arguments(self.model)
        self.model_kwargs = {"attention_mask": prompt_mask, "use_cache": True}
        if "position_ids" in accepted:
            self.model_kwargs["position_ids"] = position_ids_from_mask(prompt_mask)
        if "logits_to_keep" in accepted:
            self.model_kwargs["logits_to_keep"] = 1
        # The cache `generate` would create for this model (none for models that make their own on the first call).
        self.model._prepare_cache_for_generation(
            GenerationConfig(), self.model_kwargs, GenerationMode.SAMPLE, prompt_ids.size(0), prompt_ids.size(1)
        )
        self.input_ids = prompt_ids
        self.active = torch.arange(prompt_ids.size(0), device=prompt_ids.device)
        inputs = self.model.prepare_inputs_for_generation(prompt_ids, is_first_iteration=True, **self.model_kwargs)
        hidden, logprobs = self._forward(inputs)
        return (hidden[:, -1] if hidden is not None else None), logprobs

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pad_token_id: int):
        """Feed one token per active row (`[b]`); returns `(hidden [b, H] or None, logprobs [b, V])`."""
        hidden, logprobs = self.feed(tokens[:, None], pad_token_id)
        return (hidden[:, -1] if hidden is not None else None), logprobs

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor, pad_token_id: int, mask: torch.Tensor | None = None):
        """Feed `k` tokens per active row (`[b, k]`) in one cached forward, as assisted generation verifies a draft:
        returns `(hidden [b, k, H] or None, logprobs [b, V])`, the final hidden states at the `k` positions (each
        predicts the token after it) and the log-probs of the token after the last. `mask` (`[b, k]`, default all
        ones) marks the fed positions later positions attend to: 0 for the padding after a row's end. `verify_scoring`
        checks per model that a multi-token feed reproduces the plain forward (`ScoringCheck.catch_up`)."""
        if not self.drop_ended_rows:
            fed = tokens.new_full((self.input_ids.size(0), tokens.size(1)), pad_token_id)
            fed[self.active] = tokens
            tokens = fed
            if mask is not None:
                mask = torch.zeros_like(fed).index_copy_(0, self.active, mask.to(fed.dtype))
        count = tokens.size(1)
        if count > 1:  # the last forward prepared the mask and positions for one new token: extend them to `count`
            self.model_kwargs = self.model._update_model_kwargs_for_generation(
                ModelOutput(), self.model_kwargs, num_new_tokens=count - 1
            )
        if mask is not None:
            attention_mask = self.model_kwargs["attention_mask"].clone()
            attention_mask[:, -count:] = mask
            self.model_kwargs["attention_mask"] = attention_mask
        self.input_ids = torch.cat([self.input_ids, tokens], dim=1)
        model_kwargs = self.model_kwargs
        if count > 1 and "logits_to_keep" in model_kwargs:
            # Logits for the last position only, given as its index: an integer would let some backbones (Gemma 4's
            # KV-shared layers) skip the earlier positions, whose hidden states the caller wants.
            model_kwargs = {**model_kwargs, "logits_to_keep": torch.tensor([count - 1], device=tokens.device)}
        inputs = self.model.prepare_inputs_for_generation(self.input_ids, next_sequence_length=count, **model_kwargs)
        hidden, logprobs = self._forward(inputs, count)
        if not self.drop_ended_rows:
            hidden = hidden[self.active] if hidden is not None else None
            logprobs = logprobs[self.active]
        return hidden, logprobs

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the active rows, in order) of the batch: the others have ended."""
        if not self.drop_ended_rows:
            self.active = self.active[rows]
            return
        batch_size = self.input_ids.size(0)
        self.input_ids = self.input_ids[rows]
        for name, value in self.model_kwargs.items():
            if isinstance(value, Cache):
                value.reorder_cache(rows)
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == batch_size:
                self.model_kwargs[name] = value[rows]

    def _forward(self, inputs, new_positions: int | None = None):
        """Run the model; returns the final hidden states of the last `new_positions` positions (all: None) and the
        next-token log-probs after the last. A model without a cache is fed its whole sequence again."""
        if self.record_hidden:
            with captured_hidden_states(self.model) as box:
                outputs = self.model(**inputs, return_dict=True)
            hidden = box["hidden"] if new_positions is None else box["hidden"][:, -new_positions:]
        else:
            outputs = self.model(**inputs, return_dict=True)
            hidden = None
        self.model_kwargs = self.model._update_model_kwargs_for_generation(outputs, self.model_kwargs)
        logits = outputs.logits[:, -1, : self.vocab_size].float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return hidden, F.log_softmax(logits, dim=-1)


def catch_up(decoder: IncrementalDecoder, rows, fed: int, upto: int, completion_ids, completion_mask, active_rows,
             pad_token_id: int):
    """Feed completion columns `fed .. upto-1` of the batch `rows` held in `decoder` (a model that last read column
    `fed - 1`, or the prompt), so that it predicts column `upto` for `active_rows`, the rows still generating there.

    One column is one `step` of the rows still generating (those that ended are dropped first, as in token-by-token
    decoding); several are one cached multi-token forward (`IncrementalDecoder.feed`) of every row in the cache,
    where a position whose prediction no row needs (at or after its row's end) is masked out, and rows that ended on
    the way are dropped after it.

    Args:
        rows: `[b]` batch indices of the decoder's rows, in its order (ascending); `active_rows` a subset of them.
        completion_ids, completion_mask: `[B, T]` for the whole batch; columns before `upto` are filled.

    Returns:
        `(fed_rows, hidden [len(fed_rows), upto - fed, H] or None, logprobs [len(active_rows), V])`: the rows fed,
        their final hidden states at the fed positions (each predicts the next column), and the next-token log-probs
        after column `upto - 1` of the active rows. Afterwards the decoder holds `active_rows`.
    """
    keep = torch.isin(rows, active_rows).nonzero().squeeze(1)
    if upto - fed == 1 and keep.numel() < rows.numel():
        decoder.keep_rows(keep)
        rows, keep = rows[keep], torch.arange(keep.numel(), device=keep.device)
    columns = slice(fed, upto)
    needed = None
    if upto - fed > 1:
        needed = completion_mask[rows, fed + 1 : upto + 1].clone()
        needed[:, -1] = torch.isin(rows, active_rows).to(needed.dtype)
    hidden, logprobs = decoder.feed(completion_ids[rows, columns], pad_token_id, needed)
    if keep.numel() < rows.numel():
        decoder.keep_rows(keep)
        logprobs = logprobs[keep]
    return rows, hidden, logprobs


# ----------------------------------------------------------------------------------------------- start-up probe

# A computation is accepted when it stays within this multiple of the model's own rounding noise (`NoiseFloor`):
# correct decoding of the real SmolLM2 stays below 1× in float32, bfloat16 and float16, the defects the probe exists
# for are several times above it (docs/reliability.md, benchmarks/probe_margins.py).
NOISE_MULTIPLE = 4


def distribution_discrepancy(expected_logprobs: torch.Tensor, got_logprobs: torch.Tensor) -> float:
    """How far two computations of the same next-token distributions are apart, as training sees it.

    For each of the `N` positions (`[N, V]` log-probs, `p` expected, `q` got), the expected error in the
    log-probability of a token drawn from `p`, `E_{y~p} |log p(y) − log q(y)|`: the error a reward `log p − log q`
    or an importance weight inherits on average. It bounds the total-variation distance between `p` and `q`, and
    unlike the worst error over the vocabulary it does not grow with the rounding of tail tokens that no sampler
    draws. Returns the largest over the positions (0.0 for none); NaN or inf where `got` is not finite.
    """
    expected, got = expected_logprobs.float(), got_logprobs.float()
    probabilities = expected.exp()
    errors = torch.where(probabilities > 0, probabilities * (expected - got).abs(), 0.0).sum(-1)
    return errors.max().item() if errors.numel() else 0.0


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter of the causal LM (its weights' dtype)."""
    return next(p for p in causal_lm(model).parameters() if p.is_floating_point()).dtype


@contextmanager
def compute_precision(model: torch.nn.Module, compute_dtype: torch.dtype | None):
    """Within the block the model's forwards run in `compute_dtype` under autocast, as they do in mixed-precision
    training (accelerate wraps the forward in autocast; a PEFT model's inner causal LM, or a model not yet prepared,
    is not wrapped); nothing changes where `compute_dtype` is None or the parameters' own dtype."""
    if compute_dtype is None or compute_dtype == parameter_dtype(model):
        yield
        return
    with torch.autocast(next(causal_lm(model).parameters()).device.type, dtype=compute_dtype):
        yield


@contextmanager
def _parameter_precision(lm: torch.nn.Module):
    """Within the block the model's forward runs in its parameters' dtype: autocast off, also inside the forward that
    accelerate wrapped in autocast (`prepare_model` keeps the unwrapped one as `_original_forward`)."""
    wrapped, unwrapped = lm.__dict__.get("forward"), getattr(lm, "_original_forward", None)
    if wrapped is not None and unwrapped is not None:
        lm.forward = unwrapped
    try:
        with torch.autocast(next(lm.parameters()).device.type, enabled=False):
            yield
    finally:
        if wrapped is not None and unwrapped is not None:
            lm.forward = wrapped


@contextmanager
def _rounded_anew(lm: torch.nn.Module):
    """Within the block every floating-point output of every leaf module (linear layers, norms, activations, the
    output layer) is multiplied by `1 + u·eps/2`, `u` uniform in [-1, 1] and `eps` that of the output's dtype, and
    rounded again: the discrepancy a computation in another order (other kernels, other shapes) makes at each
    rounding, accumulated through every layer of the model as deep as it is."""
    generators = {}

    def round_anew(module, args, output):
        if not (isinstance(output, torch.Tensor) and output.is_floating_point()):
            return None
        device = output.device
        if device not in generators:
            generators[device] = torch.Generator(device).manual_seed(0)
        relative = torch.rand(output.shape, generator=generators[device], device=device) * 2 - 1
        return output * (1 + relative * (torch.finfo(output.dtype).eps / 2)).to(output.dtype)

    leaves = [module for module in lm.modules() if next(module.children(), None) is None]
    handles = [leaf.register_forward_hook(round_anew) for leaf in leaves]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _plain_logprobs(lm, input_ids, attention_mask, vocab_size) -> torch.Tensor:
    """`[B, L, vocab_size]` next-token log-probs of one plain forward over left-padded `input_ids`."""
    arguments = forward_arguments(lm, input_ids, attention_mask, use_cache=False)
    arguments.pop("logits_to_keep", None)
    return F.log_softmax(lm(**arguments).logits[..., :vocab_size].float(), dim=-1)


@dataclass
class NoiseFloor:
    """A model's own rounding noise in the dtype it computes in: the `distribution_discrepancy` between plain forwards
    over the same sequences that agree in exact arithmetic, by source, and the tolerance it gives.

    Sources: `rounded anew` (every leaf module's output rounded again, `_rounded_anew`) and, under autocast over
    higher-precision weights, the forward in the weights' dtype (`float32`). `minimum`: the floor of the dtype itself,
    so that computations that happen to round alike (a measured 0) do not make the tolerance 0. Other pairs that agree
    in exact arithmetic are no floor: more left padding, or tokens appended after the sequences, change the results
    of the very models the probe refuses (docs/reliability.md).
    """

    dtype: torch.dtype
    sources: dict[str, float]
    minimum: float

    @property
    def floor(self) -> float:
        return max(self.minimum, *self.sources.values())

    @property
    def tolerance(self) -> float:
        """The largest `distribution_discrepancy` accepted from another computation of the same scores."""
        return NOISE_MULTIPLE * self.floor

    def describe(self) -> str:
        sources = ", ".join(f"{source} {value:.2g}" for source, value in self.sources.items())
        return (
            f"its own rounding noise in {_dtype_name(self.dtype)} is {self.floor:.2g} ({sources}; at least "
            f"{self.minimum:.2g}), tolerance {NOISE_MULTIPLE} × that = {self.tolerance:.2g}"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure_noise_floor(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vocab_size: int,
    compute_dtype: torch.dtype | None = None,
) -> NoiseFloor:
    """The `NoiseFloor` of `model` on left-padded `input_ids` `[B, L]`, its forward run in `compute_dtype` (autocast,
    see `compute_precision`) or in its parameters' dtype: two or three plain forwards, no cache."""
    lm = causal_lm(model)
    weights = parameter_dtype(lm)
    dtype = compute_dtype or weights  # what the forward computes in
    valid = attention_mask.bool()
    with compute_precision(lm, compute_dtype):
        expected = _plain_logprobs(lm, input_ids, attention_mask, vocab_size)[valid]
        with _rounded_anew(lm):
            rounded_anew = _plain_logprobs(lm, input_ids, attention_mask, vocab_size)[valid]
        sources = {"rounded anew": distribution_discrepancy(expected, rounded_anew)}
        if torch.finfo(weights).bits > torch.finfo(dtype).bits:
            with _parameter_precision(lm):
                in_weights_dtype = _plain_logprobs(lm, input_ids, attention_mask, vocab_size)[valid]
            sources[_dtype_name(weights)] = distribution_discrepancy(in_weights_dtype, expected)
    # At least two units in the last place of float32, where products accumulate in every dtype: accumulating in
    # another order (a one-token and a many-token matmul) differs by that much where rounding each output anew shows
    # less (a correct tiny Llama decoded token by token differed from its forward by 2.4e-7 in float32, 4.5x its
    # rounded-anew floor). In 16-bit dtypes the measured sources are far above it.
    return NoiseFloor(dtype, sources, minimum=2 * torch.finfo(torch.float32).eps)


@dataclass
class ScoringCheck:
    """What `verify_scoring` found: whether finished rows can be dropped from the model's cache while decoding, the
    largest next-token probability the model put on its vocabulary rows past the shared ones, whether it can catch up
    on several tokens in one cached forward, and the figures it judged by: the model's `noise` floor (its `tolerance`
    is what any other computation of the same scores must stay within), and the `distribution_discrepancy` from the
    plain forward of the output head and of the decoding chosen."""

    drop_ended_rows: bool
    mass_past_vocab: float = 0.0
    catch_up: bool = True  # several tokens can be fed in one cached forward (`catch_up`), as the teacher is
    catch_up_error: str | None = None  # why not, when not
    noise: NoiseFloor | None = None
    head_discrepancy: float = 0.0
    decode_discrepancy: float = 0.0


def scoring_tolerance(dtype: torch.dtype) -> float:
    """Largest log-prob discrepancy of a sampled token accepted between two float computations of the same scores
    of a tiny model: 1e-3 in float32 (where correct paths agree to ~1e-6), proportionally more for 16-bit weights."""
    return max(1e-3, 20 * torch.finfo(dtype).eps)


def _probe_batch(vocab_size: int, pad_token_id: int, device):
    """Three left-padded prompts (2, 5 and 4 tokens) and completions that end after 1, 3 and 4 tokens."""
    generator = torch.Generator().manual_seed(0)
    prompt_lengths, completion_lengths = (2, 5, 4), (1, 3, 4)
    prompt_ids = torch.randint(min(vocab_size, 1000), (3, 5), generator=generator)
    prompt_mask = torch.tensor([[0] * (5 - n) + [1] * n for n in prompt_lengths])
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, pad_token_id)
    completion_ids = torch.randint(min(vocab_size, 1000), (3, 4), generator=generator)
    completion_mask = torch.tensor([[1] * n + [0] * (4 - n) for n in completion_lengths])
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_token_id)
    return [tensor.to(device) for tensor in (prompt_ids, prompt_mask, completion_ids, completion_mask)]


def _decode_probe(model, vocab_size, pad_token_id, batch, head, drop_ended_rows, feeds=None) -> float:
    """Teacher-force the probe completions through `IncrementalDecoder` with `catch_up`, `feeds` columns at a time
    (default: one, token by token); the largest `distribution_discrepancy` of its log-probs, and of the head applied
    to its recorded hidden states, from a full forward's."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    arguments = forward_arguments(model, input_ids, attention_mask, use_cache=False)
    arguments.pop("logits_to_keep", None)
    logits = causal_lm(model)(**arguments).logits[:, prompt_ids.size(1) - 1 : -1, :vocab_size].float()
    expected = F.log_softmax(logits, dim=-1)

    decoder = IncrementalDecoder(model, vocab_size, record_hidden=True, drop_ended_rows=drop_ended_rows)
    hidden, logprobs = decoder.start(prompt_ids, prompt_mask)
    rows = torch.arange(prompt_ids.size(0), device=prompt_ids.device)
    lengths = completion_mask.sum(1)
    worst = max(
        distribution_discrepancy(expected[:, 0], logprobs),
        distribution_discrepancy(expected[:, 0], F.log_softmax(head(hidden), dim=-1)),
    )
    fed = 0
    for count in feeds or [1] * (completion_ids.size(1) - 1):
        upto = fed + count
        active = (lengths > upto).nonzero().squeeze(1)
        fed_rows, hidden, logprobs = catch_up(
            decoder, rows, fed, upto, completion_ids, completion_mask, active, pad_token_id
        )
        # `hidden[:, j]` predicts column fed + 1 + j: compare where that column is a token of the row.
        columns = torch.arange(fed + 1, upto + 1, device=rows.device)
        predicted = lengths[fed_rows, None] > columns
        from_head = F.log_softmax(head(hidden[predicted]), dim=-1)
        expected_at = expected[fed_rows[:, None].expand_as(predicted)[predicted], columns.expand_as(predicted)[predicted]]
        worst = max(worst, distribution_discrepancy(expected_at, from_head))
        if active.numel():
            worst = max(worst, distribution_discrepancy(expected[active, upto], logprobs))
        rows, fed = active, upto
    return worst


@torch.no_grad()
def verify_scoring(
    model: torch.nn.Module, vocab_size: int, pad_token_id: int, name: str, compute_dtype: torch.dtype | None = None
) -> ScoringCheck:
    """Start-up probe: the scores this package computes for `model` equal those of its own plain forward, up to the
    model's own rounding noise.

    On three short left-padded sequences that end at different steps it checks that (1) `final_hidden_states` and
    `OutputHead`, as the losses use them, reproduce the model's logits, and (2) `IncrementalDecoder` reproduces them
    token by token, first dropping finished rows from the cache, else keeping them. "Reproduce" is measured by
    `distribution_discrepancy` and means within `NOISE_MULTIPLE` × the model's noise floor, measured on the same
    sequences in the same dtype (`measure_noise_floor`). Raises a `ValueError` naming the model type, what differs
    and by how much against the floor, when neither way reproduces the forward, or when the forward cannot run (then
    training would learn from wrong numbers, or fail later).

    `compute_dtype`: the mixed-precision dtype the model's forwards run in under autocast (accelerate wraps the forward
    in autocast, the loss's output head runs in the training step's), when other than the parameters' own. The probe
    then runs twice: in the weights' own dtype, where a defect stands out of a floor thousands of times lower, and
    under that autocast, where training computes.
    """
    lm = causal_lm(model)
    batch = _probe_batch(vocab_size, pad_token_id, next(lm.parameters()).device)
    model_named = f"The {name} ({type(lm).__name__}, model_type={lm.config.model_type!r})"
    precisions = [compute_dtype]
    if compute_dtype is not None and torch.finfo(compute_dtype).bits < torch.finfo(parameter_dtype(lm)).bits:
        precisions = [None, compute_dtype]
    was_training = lm.training
    lm.eval()
    try:
        probes = [_ForwardProbe(lm, vocab_size, pad_token_id, batch, dtype, model_named) for dtype in precisions]
        errors = {}
        for drop_ended_rows in (True, False):
            errors[drop_ended_rows] = [probe.decode_discrepancy(drop_ended_rows) for probe in probes]
            if all(probe.accepts(error) for probe, error in zip(probes, errors[drop_ended_rows])):
                catch_up_error = next(filter(None, (probe.catch_up_error(drop_ended_rows) for probe in probes)), None)
                return ScoringCheck(
                    drop_ended_rows, probes[-1].mass_past_vocab, catch_up_error is None, catch_up_error,
                    noise=probes[-1].noise,
                    head_discrepancy=probes[-1].head_discrepancy, decode_discrepancy=errors[drop_ended_rows][-1],
                )  # fmt: skip
        failed = next(i for i, probe in enumerate(probes) if not all(probe.accepts(e[i]) for e in errors.values()))
        raise ValueError(
            f"{model_named} cannot be decoded token by token reproducibly: its incremental log-probs differ from its "
            f"own full forward over the same tokens by more than rounding explains. In "
            f"{_dtype_name(probes[failed].noise.dtype)}, the expected error in a sampled token's log-probability at "
            f"the worst position is {_describe(errors[True][failed])} dropping finished rows from the cache and "
            f"{_describe(errors[False][failed])} keeping them, while {probes[failed].noise.describe()}. Training on "
            "these scores would learn the wrong distribution, so this model is not supported as a student or a "
            "teacher of the teacher-mixed sampler."
        )
    finally:
        lm.train(was_training)


class _ForwardProbe:
    """The probe in one precision (`compute_dtype` under autocast, None: the weights' own): the plain forward, the
    noise floor and the output head are checked when built (raising on a failure); `decode_discrepancy` runs the
    decoding."""

    def __init__(self, lm, vocab_size, pad_token_id, batch, compute_dtype, model_named):
        self.lm, self.vocab_size, self.pad_token_id, self.batch = lm, vocab_size, pad_token_id, batch
        self.compute_dtype = compute_dtype
        input_ids = torch.cat([batch[0], batch[2]], 1)
        attention_mask = torch.cat([batch[1], batch[3]], 1)
        arguments = forward_arguments(lm, input_ids, attention_mask, use_cache=False)
        arguments.pop("logits_to_keep", None)
        valid = attention_mask.bool()
        with self.precision():
            self.head = OutputHead(lm, vocab_size)
            try:
                all_logits = lm(**arguments).logits[valid].float()
                repeated_logits = lm(**arguments).logits[valid].float()
                head_logits = self.head(final_hidden_states(lm, input_ids, attention_mask)[valid])
                self.noise = measure_noise_floor(lm, input_ids, attention_mask, vocab_size, compute_dtype)
            except Exception as error:  # a forward that cannot take left padding and positions, an unusual head
                raise ValueError(
                    f"{model_named} cannot be scored: its forward over left-padded sequences (positions from the "
                    "attention mask, as `generate` gives them), or its output head on its final hidden states, raises "
                    f"{type(error).__name__}: {error}"
                ) from error
        # The same forward twice must give the same scores: the noise floor cannot tell a random forward (dropout
        # that ignores eval mode, non-deterministic kernels) from rounding, since its own forwards would be random too.
        repeat = distribution_discrepancy(
            F.log_softmax(all_logits[:, :vocab_size], -1), F.log_softmax(repeated_logits[:, :vocab_size], -1)
        )
        dtype = compute_dtype or parameter_dtype(lm)
        if not repeat <= scoring_tolerance(dtype):
            raise ValueError(
                f"{model_named} does not score deterministically: two plain forwards of the same tokens in "
                f"{_dtype_name(dtype)} give next-token distributions {_describe(repeat)} apart (expected error in a "
                f"sampled token's log-probability at the worst position; at most {scoring_tolerance(dtype):.2g} "
                "accepted). Its forward is random in eval mode: a dropout that ignores `model.eval()` (a "
                "`F.dropout(..., training=True)` or a custom layer), or non-deterministic kernels "
                "(`torch.use_deterministic_algorithms(True)` shows which). Rewards from such scores are noise."
            )
        self.head_discrepancy = distribution_discrepancy(
            F.log_softmax(all_logits[:, :vocab_size], -1), F.log_softmax(head_logits, -1)
        )
        self.mass_past_vocab = all_logits.softmax(-1)[:, vocab_size:].sum(-1).max().item()
        if not self.accepts(self.head_discrepancy):
            raise ValueError(
                f"{model_named} cannot be scored from its hidden states: its output head applied to its backbone's "
                f"final hidden states differs from its own forward's logits (the expected error in a sampled token's "
                f"log-probability at the worst position is {_describe(self.head_discrepancy)}), while "
                f"{self.noise.describe()}. Its forward computes the logits from more than the backbone output, which "
                "the chunked losses cannot reproduce."
            )

    def precision(self):
        return compute_precision(self.lm, self.compute_dtype) if self.compute_dtype else _parameter_precision(self.lm)

    def accepts(self, discrepancy) -> bool:
        return isinstance(discrepancy, float) and discrepancy <= self.noise.tolerance

    def decode_discrepancy(self, drop_ended_rows: bool) -> float | str:
        """`_decode_probe`'s discrepancy, or what it raised."""
        try:
            with self.precision():
                return _decode_probe(
                    self.lm, self.vocab_size, self.pad_token_id, self.batch, self.head, drop_ended_rows
                )
        except Exception as error:  # a cache that cannot be reordered, a model that cannot decode step by step
            return f"{type(error).__name__}: {error}"

    def catch_up_error(self, drop_ended_rows: bool) -> str | None:
        with self.precision():
            tolerance = self.noise.tolerance
            return _catch_up_error(self.lm, self.vocab_size, self.pad_token_id, self.batch, self.head, drop_ended_rows,
                                   tolerance)  # fmt: skip


# Columns fed per `catch_up` call: a multi-token feed after a token-by-token one (rows dropped from the cache before
# it, one ending inside it), and one at the start followed by a single token.
CATCH_UP_SCHEDULES = ((1, 2), (2, 1))


def _catch_up_error(model, vocab_size, pad_token_id, batch, head, drop_ended_rows, tolerance) -> str | None:
    """None when multi-token cached feeds (`CATCH_UP_SCHEDULES`) reproduce the full forward, else what differed."""
    for feeds in CATCH_UP_SCHEDULES:
        try:
            error = _decode_probe(model, vocab_size, pad_token_id, batch, head, drop_ended_rows, feeds)
        except Exception as exception:  # a cache or forward that takes one new token at a time only
            return f"feeding {feeds} tokens at a time raises {type(exception).__name__}: {exception}"
        if not error <= tolerance:
            return f"feeding {feeds} tokens at a time, its log-probs differ from its forward by up to {error:.3g}"
    return None


def _describe(error) -> str:
    return f"{error:.3g}" if isinstance(error, float) else f"not computed ({error})"


# ----------------------------------------------------------------------------------------------- vocabulary, inputs


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


# A trained model gives the padding rows of its embedding matrix next to no probability; a teacher whose rows past the
# tokenizer hold real tokens of its own does not.
MAX_TEACHER_MASS_PAST_VOCAB = 0.01


def check_teacher_mass_past_vocab(check: ScoringCheck, vocab_size: int) -> None:
    """Raise if the teacher put more than 1% of a next-token distribution on its rows past the shared `vocab_size`
    during the start-up probe: those rows are tokens of another tokenizer, not padding."""
    if check.mass_past_vocab > MAX_TEACHER_MASS_PAST_VOCAB:
        raise ValueError(
            f"The teacher puts up to {check.mass_past_vocab:.1%} of its next-token probability on vocabulary rows "
            f"past the {vocab_size} that the tokenizer produces (padding rows get next to none in a trained model): "
            "it likely uses another tokenizer. Both models must use the tokenizer given as `processing_class`, unless "
            "the teacher's own tokenizer is given as `teacher_processing_class=` (cross-tokenizer scoring, "
            "docs/cross-tokenizer.md)."
        )


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
