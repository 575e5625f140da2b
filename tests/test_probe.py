"""The start-up probe (`rkd_trl.probe`): a correct model is accepted in every precision with its margin, and a model
whose scores differ from its own forward (injected defects, non-determinism, a forward that raises) is refused."""

import math

import pytest
import torch
import torch.nn.functional as F
from architectures import VOCAB_SIZE, tiny_model
from defects import DEFECTS, reordered_cache_loses_a_row
from transformers.cache_utils import Cache

from rkd_trl.probe import (
    NOISE_MULTIPLE,
    ScoringCheck,
    check_teacher_mass_past_vocab,
    distribution_discrepancy,
    measure_noise_floor,
    verify_scoring,
)

# (compute_dtype under autocast, weights' dtype): float32, bf16 and fp16 autocast over float32 weights, bf16 weights.
PRECISIONS = {
    "float32": (None, torch.float32),
    "bf16 autocast": (torch.bfloat16, torch.float32),
    "fp16 autocast": (torch.float16, torch.float32),
    "bf16 weights": (None, torch.bfloat16),
}


def test_teacher_probability_on_rows_past_the_shared_vocabulary_is_limited():
    check_teacher_mass_past_vocab(ScoringCheck(drop_ended_rows=True, mass_past_vocab=0.004), VOCAB_SIZE)
    with pytest.raises(ValueError, match="teacher puts up to 5.0% of its next-token probability"):
        check_teacher_mass_past_vocab(ScoringCheck(drop_ended_rows=True, mass_past_vocab=0.05), VOCAB_SIZE)
    padded = tiny_model("llama", vocab_size=VOCAB_SIZE + 40)  # random output rows: they carry probability
    assert 0.2 < verify_scoring(padded, VOCAB_SIZE, 0, "teacher").mass_past_vocab < 0.6


@pytest.mark.parametrize(
    "model_type, drops_rows",
    [("llama", True), ("qwen3_next", True), ("mamba", True), ("falcon_h1", True), ("recurrent_gemma", False)],
)
def test_probe_drops_finished_rows_where_the_cache_can_and_keeps_them_elsewhere(model_type, drops_rows):
    """Linear-attention, SSM and hybrid caches are reordered by their own `reorder_cache`; RecurrentGemma keeps its
    recurrent state in its modules, so the probe finds that only keeping every row reproduces its forward."""
    assert verify_scoring(tiny_model(model_type), VOCAB_SIZE, 0, "student").drop_ended_rows is drops_rows


def test_probe_refuses_a_model_whose_logits_are_not_a_function_of_its_hidden_states(make_student, tokenizer):
    model = make_student().eval()
    forward = type(model).forward

    def forward_with_input_bias(self, input_ids=None, **kwargs):
        output = forward(self, input_ids=input_ids, **kwargs)
        if input_ids is not None:  # logits that depend on the input ids beyond the backbone: not reproducible
            vocabulary = torch.arange(output.logits.size(-1)) / output.logits.size(-1)
            output.logits = output.logits + input_ids[..., None].float() * vocabulary
        return output

    model.forward = forward_with_input_bias.__get__(model)
    with pytest.raises(ValueError, match="teacher .*LlamaForCausalLM.*cannot be scored from its hidden states"):
        verify_scoring(model, len(tokenizer), tokenizer.pad_token_id, "teacher")


def test_probe_refuses_a_model_whose_incremental_scores_differ_from_its_forward(make_student, tokenizer):
    model = make_student().eval()
    forward = type(model).forward

    def forward_off_when_cached(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        # The cache by type: transformers renamed its argument from `past_key_values` to `cache` in 5.24.
        cache = next((value for value in kwargs.values() if isinstance(value, Cache)), None)
        if cache is not None and cache.get_seq_length() > 1:
            output.logits = output.logits * 2.0  # a cache path that computes something else
        return output

    model.forward = forward_off_when_cached.__get__(model)
    with pytest.raises(ValueError, match="student .*model_type='llama'.*cannot be decoded token by token"):
        verify_scoring(model, len(tokenizer), tokenizer.pad_token_id, "student")


@pytest.mark.parametrize("precision", ["float32", "bf16 autocast"])
def test_probe_refuses_a_model_whose_scores_are_random_in_eval_mode(make_student, teacher, tokenizer, precision):
    """A dropout that ignores `eval()` makes every forward random: the noise floor, measured with the same random
    forwards, would grow with it and accept anything; two forwards of the same tokens tell. A teacher without it
    passes (its identical forwards agree)."""
    compute_dtype = torch.bfloat16 if precision == "bf16 autocast" else None
    verify_scoring(teacher, len(tokenizer), tokenizer.pad_token_id, "teacher", compute_dtype)
    teacher.model.norm.register_forward_hook(lambda module, args, output: F.dropout(output, p=0.3, training=True))
    with pytest.raises(ValueError, match="teacher .*does not score deterministically: two plain forwards"):
        verify_scoring(teacher, len(tokenizer), tokenizer.pad_token_id, "teacher", compute_dtype)


def test_probe_refuses_a_model_whose_forward_raises(make_student, tokenizer):
    model = make_student().eval()
    forward = type(model).forward

    def forward_without_positions(self, *args, position_ids=None, **kwargs):
        if position_ids is not None:
            raise RuntimeError("position ids are not supported")
        return forward(self, *args, **kwargs)

    model.forward = forward_without_positions.__get__(model)
    with pytest.raises(ValueError, match="student .*cannot be scored: its forward .*position ids are not supported"):
        verify_scoring(model, len(tokenizer), tokenizer.pad_token_id, "student")


def test_probe_checks_the_hidden_states_as_the_losses_compute_them(monkeypatch):
    """Were `final_hidden_states` to pass an integer `logits_to_keep`, Gemma 4 would return one hidden state per row:
    the probe refuses the model rather than let the losses fail or score the wrong positions."""
    import rkd_trl.scoring as scoring

    forward_arguments = scoring.forward_arguments
    monkeypatch.setattr(
        scoring, "forward_arguments", lambda *args, **kwargs: forward_arguments(*args, **kwargs) | {"logits_to_keep": 1}
    )
    with pytest.raises(ValueError, match="cannot be scored"):
        verify_scoring(tiny_model("gemma4_text"), VOCAB_SIZE, 0, "teacher")


def test_distribution_discrepancy_is_the_expected_log_prob_error_of_a_sampled_token():
    expected = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]).log()
    got = torch.tensor([[0.25, 0.5, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]).log()
    # By hand: 0.5·|ln 0.5 − ln 0.25| + 0.25·|ln 0.25 − ln 0.5| + 0.25·0 (+ the impossible token: 0) = 0.75 ln 2.
    assert distribution_discrepancy(expected, got) == pytest.approx(0.75 * math.log(2), rel=1e-6)
    assert distribution_discrepancy(expected[1:], got[1:]) == 0.0
    total_variation = 0.5 * (expected.exp() - got.exp()).abs().sum(-1).max().item()
    assert total_variation == pytest.approx(0.25) and total_variation <= distribution_discrepancy(expected, got)
    assert math.isnan(distribution_discrepancy(expected, torch.full_like(got, float("nan"))))


def test_noise_floor_is_measured_in_the_precision_the_model_computes_in():
    model = tiny_model("llama")
    ids, mask = torch.randint(VOCAB_SIZE, (2, 6), generator=torch.Generator().manual_seed(0)), torch.ones(2, 6)
    floors = {}
    for name, (compute_dtype, weights) in PRECISIONS.items():
        noise = measure_noise_floor(model.to(weights), ids, mask, VOCAB_SIZE, compute_dtype)
        assert noise.dtype == (compute_dtype or weights) and noise.tolerance == NOISE_MULTIPLE * noise.floor
        assert 0 < noise.minimum <= noise.floor and noise.sources["rounded anew"] > 0
        assert ("float32" in noise.sources) is (compute_dtype is not None)  # autocast over float32 weights
        floors[name] = noise.floor
    assert floors["float32"] < 1e-5 < floors["fp16 autocast"] < floors["bf16 autocast"] < 0.01


def test_probe_accepts_a_correct_model_in_every_precision_and_says_by_what_margin():
    for name, (compute_dtype, weights) in PRECISIONS.items():
        check = verify_scoring(tiny_model("llama").to(weights), VOCAB_SIZE, 0, "student", compute_dtype)
        assert check.drop_ended_rows and check.noise.dtype == (compute_dtype or weights), name
        assert check.decode_discrepancy <= check.noise.floor <= check.noise.tolerance, name


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("defect", DEFECTS)
def test_probe_refuses_injected_defects_in_every_precision(defect, precision):
    """Weights large enough that the next-token distributions are far from uniform, as a trained model's are (at the
    default initialisation, an off-by-one position changes them by less than bf16 rounding)."""
    model_type, inject = DEFECTS[defect]
    compute_dtype, weights = PRECISIONS[precision]
    model = tiny_model(model_type, initializer_range=0.2).to(weights)
    verify_scoring(model, VOCAB_SIZE, 0, "student", compute_dtype)  # the model itself is accepted
    message = "cannot be scored from its hidden states" if "head" in defect else "cannot be decoded token by token"
    with inject(model), pytest.raises(ValueError, match=f"{message}.* rounding noise in .* is "):
        verify_scoring(model, VOCAB_SIZE, 0, "student", compute_dtype)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_probe_keeps_finished_rows_when_dropping_them_loses_a_rows_state(precision):
    compute_dtype, weights = PRECISIONS[precision]
    model = tiny_model("llama", initializer_range=0.2).to(weights)
    with reordered_cache_loses_a_row():
        assert verify_scoring(model, VOCAB_SIZE, 0, "student", compute_dtype).drop_ended_rows is False


def test_the_float32_copy_of_a_16_bit_model_is_its_first_layers_computing_as_they_do():
    """`float32_prefix_copy`: the first two decoder layers of a bf16 model in float32, computing what the same layers
    built from the config compute (`keep_layers`, an independent construction), the model itself untouched; a model
    whose layer types alternate keeps enough layers to hold each type."""
    from rkd_trl.demo.models import keep_layers
    from rkd_trl.probe import float32_prefix_copy, prefix_length

    model = tiny_model("llama", num_hidden_layers=4).to(torch.bfloat16)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    prefix, described = float32_prefix_copy(model)
    assert described == "a float32 copy of its first 2 decoder layers"
    assert prefix.config.num_hidden_layers == 2 and len(prefix.model.layers) == 2
    assert {p.dtype for p in prefix.parameters()} == {torch.float32}
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert not {p.data_ptr() for p in prefix.parameters()} & {p.data_ptr() for p in model.parameters()}
    ids = torch.randint(VOCAB_SIZE, (2, 6), generator=torch.Generator().manual_seed(0))
    rebuilt = keep_layers(model, [0, 1]).float().eval()
    assert torch.equal(prefix(input_ids=ids).logits, rebuilt(input_ids=ids).logits)

    kinds = ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2
    alternating = tiny_model("gemma3_text", num_hidden_layers=8, layer_types=kinds)
    keep = prefix_length(alternating.config)
    assert set(kinds[:keep]) == set(kinds) and set(kinds[: keep - 1]) != set(kinds)
    assert float32_prefix_copy(alternating)[0].config.layer_types == kinds[:keep]


def test_a_16_bit_model_that_cannot_be_copied_is_probed_in_its_own_dtype_with_one_line_saying_so(caplog):
    """Quantised weights cannot be upcast: the bf16 probe still runs, and one logged line says the float32 one did
    not."""
    import logging

    model = tiny_model("llama").to(torch.bfloat16)
    model.is_quantized = True
    with caplog.at_level(logging.WARNING, logger="rkd_trl.probe"):
        check = verify_scoring(model, VOCAB_SIZE, 0, "teacher")
    assert check.noise.dtype == torch.bfloat16
    assert "is probed in bfloat16 only, not also in float32 on a copy: its weights are quantised" in caplog.text
