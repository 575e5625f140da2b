"""Scoring through the models' own code (`rkd_trl.scoring`): the output head and hidden states reproduce the forward, and
the vocabulary both models share."""


import pytest
import torch
from architectures import TOKENIZER, VOCAB_SIZE, tiny_model
from peft import LoraConfig, get_peft_model

from rkd_trl.demo.synthetic import build_tokenizer, tiny_causal_lm
from rkd_trl.losses import lm_loss_sum
from rkd_trl.scoring import (
    OutputHead,
    final_hidden_states,
    language_model_backbone,
    output_logits,
    padded_vocab_limit,
    position_ids_from_mask,
    same_vocabulary,
    shared_vocab_size,
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
