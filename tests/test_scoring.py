import math

import pytest
import torch
import torch.nn.functional as F
from architectures import TOKENIZER, VOCAB_SIZE, tiny_model
from defects import DEFECTS, reordered_cache_loses_a_row
from peft import LoraConfig, get_peft_model
from transformers.cache_utils import Cache

from rkd_trl.demo.synthetic import build_tokenizer, tiny_causal_lm
from rkd_trl.losses import lm_loss_sum
from rkd_trl.scoring import (
    NOISE_MULTIPLE,
    OutputHead,
    ScoringCheck,
    check_teacher_mass_past_vocab,
    distribution_discrepancy,
    final_hidden_states,
    language_model_backbone,
    measure_noise_floor,
    output_logits,
    padded_vocab_limit,
    position_ids_from_mask,
    same_vocabulary,
    shared_vocab_size,
    verify_scoring,
)


def test_output_logits_reproduce_the_model_forward(tokenizer, make_student):
    model = make_student(padded_vocab_rows=3)
    ids = torch.tensor([[5, 6, 7, 8]])
    hidden = language_model_backbone(model)(input_ids=ids).last_hidden_state
    expected = model(input_ids=ids).logits[..., : len(tokenizer)]
    assert torch.allclose(output_logits(model, hidden, len(tokenizer)), expected, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite", "hyperclovax", "falcon_h1"])
def test_output_head_applies_the_models_own_logit_post_processing(model_type):
    """Soft-capping (Gemma 2), logit scale (Cohere), logit division (Granite) and multiplication (HyperCLOVAX), a
    multiplier read from the backbone (Falcon-H1): the head is the model's own forward code, so it reproduces each."""
    model = tiny_model(model_type)
    ids = torch.randint(VOCAB_SIZE, (2, 6), generator=torch.Generator().manual_seed(0))
    hidden = final_hidden_states(model, ids, torch.ones_like(ids))
    head = OutputHead(model, VOCAB_SIZE)
    assert torch.allclose(head(hidden), model(input_ids=ids).logits.float(), atol=1e-5)
    assert torch.allclose(head(hidden[0, 2]), model(input_ids=ids).logits[0, 2].float(), atol=1e-5)  # any shape


def test_output_head_without_module_hooks_skips_the_hooks_and_computes_the_same_logits(tokenizer, make_student):
    # Under FSDP2 the trainer gathers the output layer itself and calls it without the per-call hooks FSDP registers.
    model = make_student(padded_vocab_rows=3)
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    calls = []
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: calls.append(module))
    expected = OutputHead(model, len(tokenizer))(hidden)
    assert len(calls) == 1
    logits = OutputHead(model, len(tokenizer), module_hooks=False)(hidden)
    assert len(calls) == 1
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["opt", "llama4_text", "mllama", "gemma4_unified_text"])
def test_backbone_and_output_head_are_the_ones_the_forward_uses(model_type):
    """OPT's causal LM calls `self.model.decoder` directly, Llama 4 and Mllama keep their backbone under another name
    than `base_model_prefix`, Gemma 4's forward reads the input length: hidden states and head reproduce each forward."""
    model = tiny_model(model_type)
    ids = torch.randint(VOCAB_SIZE, (2, 6), generator=torch.Generator().manual_seed(0))
    hidden = final_hidden_states(model, ids, torch.ones_like(ids))
    assert torch.allclose(OutputHead(model, VOCAB_SIZE)(hidden), model(input_ids=ids).logits.float(), atol=1e-5)


def test_final_hidden_states_cover_every_position_of_a_backbone_that_can_skip_positions():
    """Gemma 4 runs its KV-shared layers on the last `logits_to_keep` positions only when that is an integer."""
    model = tiny_model("gemma4_text")
    ids = torch.randint(VOCAB_SIZE, (2, 6), generator=torch.Generator().manual_seed(0))
    hidden = final_hidden_states(model, ids, torch.ones_like(ids))
    assert hidden.shape[:2] == ids.shape
    assert torch.allclose(OutputHead(model, VOCAB_SIZE)(hidden), model(input_ids=ids).logits.float(), atol=1e-5)


def test_shared_vocab_drops_padding_rows(tokenizer, make_student):
    padded = make_student(padded_vocab_rows=5)
    plain = make_student()
    assert shared_vocab_size(padded, plain, tokenizer) == len(tokenizer)


def test_vocab_smaller_than_tokenizer_is_rejected(tokenizer, make_student):
    other = tiny_causal_lm(build_tokenizer(["x", "y"]))
    with pytest.raises(ValueError, match="same tokenizer"):
        shared_vocab_size(make_student(), other, tokenizer)


def test_padding_rows_are_told_from_another_tokenizer_by_their_number():
    assert padded_vocab_limit(64) == 128  # up to the next multiple of 128
    assert padded_vocab_limit(151665) >= 152064  # Qwen2.5-7B's padding: 399 rows, within 1%
    other_tokenizer = tiny_model("llama", vocab_size=4 * VOCAB_SIZE)
    student = tiny_model("llama")
    assert shared_vocab_size(student, tiny_model("llama", vocab_size=128), TOKENIZER) == VOCAB_SIZE
    with pytest.raises(ValueError, match="teacher has 256 vocabulary rows.*likely uses another tokenizer"):
        shared_vocab_size(student, other_tokenizer, TOKENIZER)
    with pytest.raises(ValueError, match="student has 256 vocabulary rows.*likely uses another tokenizer"):
        shared_vocab_size(other_tokenizer, student, TOKENIZER)


def test_teacher_probability_on_rows_past_the_shared_vocabulary_is_limited():
    check_teacher_mass_past_vocab(ScoringCheck(drop_ended_rows=True, mass_past_vocab=0.004), VOCAB_SIZE)
    with pytest.raises(ValueError, match="teacher puts up to 5.0% of its next-token probability"):
        check_teacher_mass_past_vocab(ScoringCheck(drop_ended_rows=True, mass_past_vocab=0.05), VOCAB_SIZE)
    padded = tiny_model("llama", vocab_size=VOCAB_SIZE + 40)  # random output rows: they carry probability
    assert 0.2 < verify_scoring(padded, VOCAB_SIZE, 0, "teacher").mass_past_vocab < 0.6


def test_different_tokenizers_are_told_apart(tokenizer):
    assert not same_vocabulary(tokenizer, build_tokenizer(["x", "y"]))
    assert same_vocabulary(tokenizer, tokenizer)


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_output_head_exposes_the_lora_parameters_of_a_peft_lm_head(tokenizer, make_student):
    """With LoRA on the LM head, the chunked loss differentiates the adapter through `OutputHead.parameters()`:
    its gradients equal autograd's through the PEFT model's own logits."""
    model = get_peft_model(make_student(), LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    head = OutputHead(model, len(tokenizer))
    adapters = [p for p in head.parameters() if p.requires_grad]
    assert len(adapters) == 2  # lora_A, lora_B; the base weight is frozen
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    hidden = language_model_backbone(model)(input_ids=ids).last_hidden_state[0].detach()
    labels = torch.tensor([6, 7, 8, 9, 10, 11])
    expected = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0], labels, reduction="sum")
    expected_grads = torch.autograd.grad(expected, adapters)
    got = lm_loss_sum(hidden, head, labels, chunk_size=4)
    got_grads = torch.autograd.grad(got, adapters)
    assert torch.allclose(got, expected, atol=1e-5)
    for a, b in zip(got_grads, expected_grads):
        assert torch.allclose(a, b, atol=1e-6)


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


# (compute_dtype under autocast, weights' dtype): float32, bf16 and fp16 autocast over float32 weights, bf16 weights.
PRECISIONS = {
    "float32": (None, torch.float32),
    "bf16 autocast": (torch.bfloat16, torch.float32),
    "fp16 autocast": (torch.float16, torch.float32),
    "bf16 weights": (None, torch.bfloat16),
}


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
