"""Every decoder-only architecture of the installed transformers is scored right, or refused at start-up.

For each family of `architectures.ARCHITECTURES` that the installed transformers ships, on tiny models built from
config: the start-up probe passes (or refuses the family with the expected reason), the teacher-mixed sampler records
the log-probs a full forward gives, with rows that end at different steps, and two training steps run.
"""

import copy
import gc
import inspect

import pytest
import torch
import transformers
from architectures import (
    ADDED,
    ARCHITECTURES,
    EXCLUDED,
    FEEDS_EVERY_TOKEN,
    KEEPS_ENDED_ROWS,
    REFUSED,
    TOKENIZER,
    VOCAB_SIZE,
    oldest_supported_transformers,
    ships,
    supported_transformers,
    tiny_model,
)
from datasets import Dataset
from packaging.version import Version
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from rkd_trl import ReverseKLDistillTrainer
from rkd_trl.probe import scoring_tolerance, verify_scoring
from rkd_trl.sampling import mix_logprobs, sample_teacher_mixed
from rkd_trl.scoring import left_pad, position_ids_from_mask

PROMPTS = ["w01 w02 w03", "w04", "w05 w06", "w07 w08 w09 w10", "w11", "w12 w13"]
# A quarter of the vocabulary ends a completion, so that rows end at different steps.
EOS_TOKEN_IDS = [TOKENIZER.eos_token_id, *range(VOCAB_SIZE - 15, VOCAB_SIZE)]


@pytest.fixture(scope="module", autouse=True)
def lean_cpu():
    """One torch thread (for these tiny matrices thread hand-offs cost more than they save, all the more on a shared
    CPU), and the objects alive before this module frozen out of garbage collection: `Trainer.train` runs a full
    `gc.collect()`, which would otherwise walk all of imported transformers for each of the ~140 families."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(filter(ships, ARCHITECTURES)))
def family(request):
    """`(model_type, student, teacher)`: two tiny models of one family (different seeds), shared by its tests."""
    return request.param, tiny_model(request.param, seed=0), tiny_model(request.param, seed=1)


def test_the_catalog_covers_every_causal_lm_family_of_transformers():
    catalog = {*ARCHITECTURES, *EXCLUDED}
    shipped = set(filter(ships, catalog))
    installed = f"transformers {transformers.__version__}"
    missing = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - shipped)
    assert not missing, f"families of {installed} missing from the catalog (add each, and to ADDED): {missing}"
    extra = sorted(shipped - set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    assert not extra, f"{installed} does not have these families (ADDED names a later release for each): {extra}"
    assert {name: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name] for name in ADDED if ships(name)} == {
        name: added.causal_lm_class for name, added in ADDED.items() if ships(name)
    }
    assert not set(ARCHITECTURES) & set(EXCLUDED)
    assert set(ADDED) <= catalog
    assert TOKENIZER.vocab_size == VOCAB_SIZE


def test_families_added_later_name_a_supported_release_after_the_oldest():
    oldest = oldest_supported_transformers()
    wrong = {name: added.release for name, added in ADDED.items()
             if not (Version(added.release) > oldest and added.release in supported_transformers())}  # fmt: skip
    assert not wrong, f"releases outside {supported_transformers()} or not after {oldest}: {wrong}"


def test_start_up_probe(family):
    """(a) The probe accepts the family (keeping finished rows where its cache cannot drop them), or refuses it
    with the reason."""
    model_type, student, _ = family
    if model_type in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[model_type].message):
            verify_scoring(student, VOCAB_SIZE, TOKENIZER.pad_token_id, "student")
        return
    check = verify_scoring(student, VOCAB_SIZE, TOKENIZER.pad_token_id, "student")
    assert check.drop_ended_rows is (model_type not in KEEPS_ENDED_ROWS)
    assert check.catch_up is (model_type not in FEEDS_EVERY_TOKEN), check.catch_up_error


def full_forward_logprobs(model, prompt_ids, prompt_mask, rollout):
    """`[B, T]` log-probs of the sampled tokens from one plain forward over prompt + completion."""
    ids = torch.cat([prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([prompt_mask, rollout.completion_mask], 1)
    arguments = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        arguments["position_ids"] = position_ids_from_mask(mask)
    logits = model(**arguments).logits[:, prompt_ids.size(1) - 1 : -1, :VOCAB_SIZE].float()
    return torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("alpha", [0.5, 0.0])
def test_sampled_scores_equal_a_full_forward(family, alpha):
    """(b) The log-probs recorded while sampling (student, teacher, and the mixture drawn from) equal a full
    forward's, with rows that end at different steps: dropped from the caches, or kept and fed padding. At α = 0.5
    each model catches up at its own steps (where the probe allows it); at α = 0 the teacher scores the completions
    in one parallel forward instead of decoding."""
    model_type, student, teacher = family
    if model_type in REFUSED:
        pytest.skip("refused at start-up (test_start_up_probe)")
    drop_ended_rows = model_type not in KEEPS_ENDED_ROWS
    prompt_ids, prompt_mask = left_pad([TOKENIZER(prompt)["input_ids"] for prompt in PROMPTS], TOKENIZER.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        rollout = sample_teacher_mixed(
            student, teacher, prompt_ids, prompt_mask, vocab_size=VOCAB_SIZE, max_new_tokens=6, alpha=alpha,
            eos_token_ids=EOS_TOKEN_IDS, pad_token_id=TOKENIZER.pad_token_id,
            drop_ended_rows=(drop_ended_rows, drop_ended_rows), teacher_catch_up=model_type not in FEEDS_EVERY_TOKEN,
            student_catch_up=model_type not in FEEDS_EVERY_TOKEN,
        )  # fmt: skip
        student_logprobs = full_forward_logprobs(student, prompt_ids, prompt_mask, rollout)
        teacher_logprobs = full_forward_logprobs(teacher, prompt_ids, prompt_mask, rollout)
    lengths = rollout.completion_mask.sum(1)
    assert lengths.unique().numel() > 1, f"all rows ended at the same step: {lengths.tolist()}"
    valid = rollout.completion_mask.bool()
    tolerance = scoring_tolerance(next(student.parameters()).dtype)
    for name, expected, recorded in (
        ("student", student_logprobs, rollout.student_logprobs),
        ("teacher", teacher_logprobs, rollout.teacher_logprobs),
        ("mixture", mix_logprobs(student_logprobs, teacher_logprobs, alpha), rollout.sampling_logprobs),
    ):
        error = (expected - recorded)[valid].abs().max().item()
        assert error <= tolerance, f"{name} log-probs differ from a full forward's by up to {error:.3g}"


def test_two_training_steps(family, make_config):
    """(c) Two training steps run with a finite loss and change the student's weights; a refused family is refused
    when the trainer is built."""
    model_type, student, teacher = family
    student = copy.deepcopy(student)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": prompt}] for prompt in PROMPTS[:4]]})
    build = lambda: ReverseKLDistillTrainer(  # noqa: E731
        model=student, teacher_model=teacher, args=make_config(max_new_tokens=4, max_steps=2),
        train_dataset=dataset, processing_class=TOKENIZER,
    )  # fmt: skip
    if model_type in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[model_type].message):
            build()
        return
    before = {name: parameter.detach().clone() for name, parameter in student.named_parameters()}
    trainer = build()
    assert trainer._drop_ended_rows == (model_type not in KEEPS_ENDED_ROWS,) * 2
    assert trainer._teacher_catch_up is trainer._student_catch_up is (model_type not in FEEDS_EVERY_TOKEN)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    assert any(not torch.equal(parameter, before[name]) for name, parameter in student.named_parameters())
