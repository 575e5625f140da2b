"""The start-up probe on every family of the architecture catalog in the 16-bit precisions users train in: bf16
autocast over float32 weights (the probe then also runs in float32) and bf16 weights. A family the probe accepts in
float32 is accepted, with the same way of ending rows; a refused one stays refused, for its own reason; the families
whose own forward fails in a precision (`REFUSED_IN_16_BIT`) are refused there by the probe, with the model's error;
a refused family whose defect bf16 rounding hides on the tiny model (`UNDETECTED_IN_16_BIT`) is accepted there."""

import gc

import pytest
import torch
from architectures import (
    ARCHITECTURES,
    KEEPS_ENDED_ROWS,
    PRECISIONS_16_BIT,
    REFUSED,
    REFUSED_IN_16_BIT,
    TOKENIZER,
    UNDETECTED_IN_16_BIT,
    VOCAB_SIZE,
    tiny_model,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from rkd_trl.probe import verify_scoring


@pytest.fixture(scope="module", autouse=True)
def lean_cpu():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("precision", PRECISIONS_16_BIT)
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_start_up_probe_in_16_bit(model_type, precision):
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip("not in the installed transformers")
    compute_dtype, weights = PRECISIONS_16_BIT[precision]
    student = tiny_model(model_type).to(weights)
    if model_type in REFUSED and model_type not in UNDETECTED_IN_16_BIT[precision]:
        with pytest.raises(ValueError, match=REFUSED[model_type].message):
            verify_scoring(student, VOCAB_SIZE, TOKENIZER.pad_token_id, "student", compute_dtype)
        return
    if model_type in REFUSED_IN_16_BIT[precision]:
        with pytest.raises(ValueError, match=REFUSED_IN_16_BIT[precision][model_type].message):
            verify_scoring(student, VOCAB_SIZE, TOKENIZER.pad_token_id, "student", compute_dtype)
        return
    check = verify_scoring(student, VOCAB_SIZE, TOKENIZER.pad_token_id, "student", compute_dtype)
    assert check.noise.dtype == torch.bfloat16 and check.decode_discrepancy <= check.noise.tolerance
    if model_type in UNDETECTED_IN_16_BIT[precision]:
        return
    assert check.drop_ended_rows is (model_type not in KEEPS_ENDED_ROWS)


def test_the_16_bit_exceptions_are_families_of_the_catalog():
    assert set(REFUSED_IN_16_BIT) == set(UNDETECTED_IN_16_BIT) == set(PRECISIONS_16_BIT)
    for refused in REFUSED_IN_16_BIT.values():
        assert set(refused) <= set(ARCHITECTURES) - set(REFUSED)
    for undetected in UNDETECTED_IN_16_BIT.values():
        assert set(undetected) <= set(REFUSED)
