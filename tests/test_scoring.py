import pytest
import torch
from peft import LoraConfig, get_peft_model

from rkd_trl.losses import lm_loss_sum
from rkd_trl.scoring import (
    OutputHead,
    check_same_tokenizer,
    language_model_backbone,
    output_logits,
    position_ids_from_mask,
    shared_vocab_size,
)
from rkd_trl.synthetic import build_tokenizer, tiny_causal_lm


def test_output_logits_reproduce_the_model_forward(tokenizer, make_student):
    model = make_student(padded_vocab_rows=3)
    ids = torch.tensor([[5, 6, 7, 8]])
    hidden = language_model_backbone(model)(input_ids=ids).last_hidden_state
    expected = model(input_ids=ids).logits[..., : len(tokenizer)]
    assert torch.allclose(output_logits(model, hidden, len(tokenizer)), expected, atol=1e-6)


def test_output_logits_apply_softcapping(tokenizer, make_student):
    model = make_student()
    hidden = torch.randn(2, model.config.hidden_size)
    raw = output_logits(model, hidden, len(tokenizer))
    model.config.final_logit_softcapping = 0.5
    capped = output_logits(model, hidden, len(tokenizer))
    assert torch.allclose(capped, torch.tanh(raw / 0.5) * 0.5)


def test_shared_vocab_drops_padding_rows(tokenizer, make_student):
    padded = make_student(padded_vocab_rows=5)
    plain = make_student()
    assert shared_vocab_size(padded, plain, tokenizer) == len(tokenizer)


def test_vocab_smaller_than_tokenizer_is_rejected(tokenizer, make_student):
    other = tiny_causal_lm(build_tokenizer(["x", "y"]))
    with pytest.raises(ValueError, match="same tokenizer"):
        shared_vocab_size(make_student(), other, tokenizer)


def test_different_tokenizers_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="cross-tokenizer"):
        check_same_tokenizer(tokenizer, build_tokenizer(["x", "y"]))
    check_same_tokenizer(tokenizer, tokenizer)


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
