"""The start-up probe: before the first step, the scores this package computes from a model (output head, token-by-token
and multi-token cached decoding) must equal the model's own plain forward up to its own rounding noise, in the dtype
training computes in, or the trainer refuses the model (docs/reliability.md).
"""

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .decoding import IncrementalDecoder, catch_up
from .scoring import (
    OutputHead,
    causal_lm,
    decoder_layers_name,
    final_hidden_states,
    forward_arguments,
    subset_per_layer_config,
)

logger = logging.get_logger(__name__)

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


def prefix_length(config) -> int:
    """How many of its first decoder layers a float32 copy keeps: two, or as many as it takes to hold each of the
    model's layer types once (per-layer lists such as `layer_types`: sliding and full attention, linear attention,
    SSM; `mlp_layer_types`: dense and sparse)."""
    num_layers = config.num_hidden_layers
    needed = 2
    for key, value in config.to_dict().items():
        if "type" in key and isinstance(value, (list, tuple)) and len(value) == num_layers:
            first_of_each = {}
            for index, kind in enumerate(value):
                first_of_each.setdefault(repr(kind), index)
            needed = max(needed, max(first_of_each.values()) + 1)
    return min(num_layers, needed)


def float32_prefix_copy(lm) -> tuple[torch.nn.Module | None, str]:
    """A float32 copy of the causal LM `lm` cut to its first `prefix_length` decoder layers, and a description of it;
    or None and why it cannot be made (quantised, sharded or dispatched weights, a nested config).

    The probe of a model whose weights are 16-bit runs it there too: on the real SmolLM2 in bf16 weights, positions off
    by one under left padding lie at 2.3-3.4× the bf16 noise floor, under the tolerance, and 10⁴× above the float32
    one. The copy is a deep copy, so what the model computes is what the copy computes (its own forward, an
    instance's replaced forward, its hooks), but for the layers after the prefix, which are not copied; the first
    layers keep their indices, so per-layer settings given as positions or periods stay valid. It costs float32
    embeddings and output layer for the duration of the probe."""
    config = lm.config
    parameters = list(lm.parameters())
    if config.get_text_config() is not config:
        return None, "its config nests a text config"
    if getattr(lm, "is_quantized", False) or getattr(lm, "hf_quantizer", None) is not None:
        return None, "its weights are quantised"
    if any(hasattr(p, "ds_id") or "DTensor" in (type(p).__name__, type(p.data).__name__) for p in parameters):
        return None, "its weights are sharded (DeepSpeed ZeRO-3 or FSDP)"
    if len({p.device for p in parameters}) > 1 or any(hasattr(m, "_hf_hook") for m in lm.modules()):
        return None, "its weights are dispatched over devices"
    try:
        stack_name = decoder_layers_name(lm)
    except ValueError as error:
        return None, str(error)
    keep = prefix_length(config)
    stack = lm.get_submodule(stack_name)
    memo = {id(layer): layer for layer in stack[keep:]}  # the layers after the prefix are not copied
    try:
        prefix = copy.deepcopy(lm, memo)
    except Exception as error:  # a module holding something that cannot be copied (a lock, a compiled kernel)
        return None, f"it cannot be copied ({type(error).__name__}: {error})"
    del prefix.get_submodule(stack_name)[keep:]
    # In place: the copied layers hold this config object too.
    subset_per_layer_config(prefix.config, config.num_hidden_layers, range(keep))
    return prefix.float().eval(), f"a float32 copy of its first {keep} decoder layers"


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
    under that autocast, where training computes. A model whose weights are 16-bit is probed in float32 too, on
    `float32_prefix_copy` (one logged line when no copy can be made).
    """
    lm = causal_lm(model)
    batch = _probe_batch(vocab_size, pad_token_id, next(lm.parameters()).device)
    model_named = f"The {name} ({type(lm).__name__}, model_type={lm.config.model_type!r})"
    weights = parameter_dtype(lm)
    precisions = [compute_dtype]
    if compute_dtype is not None and torch.finfo(compute_dtype).bits < torch.finfo(weights).bits:
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
                check = ScoringCheck(
                    drop_ended_rows, probes[-1].mass_past_vocab, catch_up_error is None, catch_up_error,
                    noise=probes[-1].noise,
                    head_discrepancy=probes[-1].head_discrepancy, decode_discrepancy=errors[drop_ended_rows][-1],
                )  # fmt: skip
                if torch.finfo(weights).bits < 32:
                    _probe_float32_prefix(lm, vocab_size, pad_token_id, batch, model_named, check)
                return check
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


def _probe_float32_prefix(lm, vocab_size, pad_token_id, batch, model_named, check: ScoringCheck) -> None:
    """For a model whose weights are 16-bit, the decoding `check` chose and the catch-up checked again in float32, on
    `float32_prefix_copy`, where a defect stands out of a floor thousands of times lower than bf16's. A discrepancy
    there refuses the model (`ValueError`), or its catch-up (`check.catch_up` set False); a copy that cannot be made
    or run (the error is the copy's, not a number) leaves the 16-bit check as it is, with one logged line."""
    precision = _dtype_name(parameter_dtype(lm))
    prefix, described = float32_prefix_copy(lm)

    def skipped(why: str) -> None:
        logger.warning(f"{model_named} is probed in {precision} only, not also in float32 on a copy: {why}.")

    if prefix is None:
        return skipped(described)
    try:
        probe = _ForwardProbe(prefix, vocab_size, pad_token_id, batch, None, model_named, described)
    except ValueError as error:
        if error.__cause__ is None:  # a number, not an error of the copy: the head or the forward differs in float32
            raise
        return skipped(f"{described} cannot run ({error.__cause__})")
    discrepancy = probe.decode_discrepancy(check.drop_ended_rows)
    if isinstance(discrepancy, str):
        return skipped(f"{described} cannot decode ({discrepancy})")
    if not probe.accepts(discrepancy):
        raise ValueError(
            f"{model_named} cannot be decoded token by token reproducibly: its incremental log-probs differ from its "
            f"own full forward over the same tokens by more than rounding explains. In float32 (on {described}), "
            f"the expected error in a sampled token's log-probability at the worst position is "
            f"{_describe(discrepancy)}, while {probe.noise.describe()}; in {precision} the same defect hides in the "
            "rounding noise. Training on these scores would learn the wrong distribution, so this model is not "
            "supported as a student or a teacher of the teacher-mixed sampler."
        )
    for feeds in CATCH_UP_SCHEDULES if check.catch_up else ():
        with probe.precision():
            error = _catch_up_discrepancy(prefix, vocab_size, pad_token_id, batch, probe.head, check.drop_ended_rows,
                                          feeds)  # fmt: skip
        if isinstance(error, float) and not probe.accepts(error):  # an error raised would be the copy's
            check.catch_up = False
            check.catch_up_error = (f"in float32 on {described}, feeding {feeds} tokens at a time, its log-probs "
                                    f"differ from its forward by up to {error:.3g}")  # fmt: skip
            break


class _ForwardProbe:
    """The probe in one precision (`compute_dtype` under autocast, None: the weights' own): the plain forward, the
    noise floor and the output head are checked when built (raising on a failure); `decode_discrepancy` runs the
    decoding."""

    def __init__(self, lm, vocab_size, pad_token_id, batch, compute_dtype, model_named, described=None):
        self.lm, self.vocab_size, self.pad_token_id, self.batch = lm, vocab_size, pad_token_id, batch
        self.compute_dtype = compute_dtype
        self.where = f" (on {described})" if described else ""  # the model itself, or a copy of it
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
                    f"{model_named}{self.where} cannot be scored: its forward over left-padded sequences (positions "
                    "from the attention mask, as `generate` gives them), or its output head on its final hidden "
                    f"states, raises {type(error).__name__}: {error}"
                ) from error
        # The same forward twice must give the same scores: the noise floor cannot tell a random forward (dropout
        # that ignores eval mode, non-deterministic kernels) from rounding, since its own forwards would be random too.
        repeat = distribution_discrepancy(
            F.log_softmax(all_logits[:, :vocab_size], -1), F.log_softmax(repeated_logits[:, :vocab_size], -1)
        )
        dtype = compute_dtype or parameter_dtype(lm)
        if not repeat <= scoring_tolerance(dtype):
            raise ValueError(
                f"{model_named}{self.where} does not score deterministically: two plain forwards of the same tokens "
                f"in {_dtype_name(dtype)} give next-token distributions {_describe(repeat)} apart (expected error "
                f"in a sampled token's log-probability at the worst position; at most {scoring_tolerance(dtype):.2g} "
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
                f"{model_named}{self.where} cannot be scored from its hidden states: its output head applied to its "
                f"backbone's final hidden states differs from its own forward's logits (the expected error in a "
                f"sampled token's log-probability at the worst position is {_describe(self.head_discrepancy)}), while "
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
        error = _catch_up_discrepancy(model, vocab_size, pad_token_id, batch, head, drop_ended_rows, feeds)
        if isinstance(error, str):
            return f"feeding {feeds} tokens at a time raises {error}"
        if not error <= tolerance:
            return f"feeding {feeds} tokens at a time, its log-probs differ from its forward by up to {error:.3g}"
    return None


def _catch_up_discrepancy(model, vocab_size, pad_token_id, batch, head, drop_ended_rows, feeds) -> float | str:
    """`_decode_probe` fed `feeds` columns at a time, or what it raised."""
    try:
        return _decode_probe(model, vocab_size, pad_token_id, batch, head, drop_ended_rows, feeds)
    except Exception as exception:  # a cache or forward that takes one new token at a time only
        return f"{type(exception).__name__}: {exception}"


def _describe(error) -> str:
    return f"{error:.3g}" if isinstance(error, float) else f"not computed ({error})"


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
