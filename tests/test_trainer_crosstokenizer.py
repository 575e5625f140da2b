"""The trainer with a teacher of another tokenizer: set-up, errors, rewards end to end, and a training run."""

import pytest
import torch

from rkd_trl import ReverseKLDistillTrainer
from rkd_trl.demo.synthetic import build_tokenizer, tiny_causal_lm

CROSS = {"teacher_mix_alpha": 0.0, "single_step_regularization": False}


def build(make_config, student, teacher, tokenizer, teacher_tokenizer, dataset, **config):
    return ReverseKLDistillTrainer(
        model=student, teacher_model=teacher, args=make_config(**config), train_dataset=dataset,
        processing_class=tokenizer, teacher_processing_class=teacher_tokenizer,
    )  # fmt: skip


@pytest.mark.parametrize(
    "config, named",
    [({}, "teacher_mix_alpha=0.2, single_step_regularization=True"),
     ({"teacher_mix_alpha": 0.0}, "single_step_regularization=True"),
     ({"single_step_regularization": False}, "teacher_mix_alpha=0.2")],
)  # fmt: skip
def test_parts_that_need_a_shared_vocabulary_must_be_off(
    make_config, make_student, tokenizer, teacher_bpe_tokenizer, bpe_teacher, task, config, named
):
    with pytest.raises(ValueError, match=f"asks for them \\({named}\\): set teacher_mix_alpha=0.0 and single_step"):
        build(make_config, make_student(), bpe_teacher, tokenizer, teacher_bpe_tokenizer, task.prompt_dataset(),
              **config)  # fmt: skip


def test_teacher_path_with_its_own_tokenizer_is_scored_across_tokenizers(
    tmp_path, make_config, make_student, tokenizer, teacher_bpe_tokenizer, bpe_teacher, task
):
    bpe_teacher.save_pretrained(tmp_path / "teacher")
    teacher_bpe_tokenizer.save_pretrained(tmp_path / "teacher")
    trainer = build(make_config, make_student(), str(tmp_path / "teacher"), tokenizer, None, task.prompt_dataset(),
                    **CROSS)  # fmt: skip
    assert trainer.teacher_tokenizer.get_vocab() == teacher_bpe_tokenizer.get_vocab()
    assert trainer.vocab_size == len(tokenizer)


def test_teacher_object_of_another_vocabulary_without_its_tokenizer_is_rejected(
    make_config, make_student, tokenizer, task
):
    teacher = tiny_causal_lm(build_tokenizer(["x", "y"]))  # fewer rows than the student's tokenizer has tokens
    with pytest.raises(ValueError, match="give its tokenizer as `teacher_processing_class=`"):
        build(make_config, make_student(), teacher, tokenizer, None, task.prompt_dataset(), **CROSS)


def test_teacher_object_loaded_from_a_folder_brings_its_tokenizer(
    tmp_path, make_config, make_student, tokenizer, teacher_bpe_tokenizer, bpe_teacher, task
):
    from transformers import AutoModelForCausalLM

    bpe_teacher.save_pretrained(tmp_path / "teacher")
    teacher_bpe_tokenizer.save_pretrained(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    trainer = build(make_config, make_student(), teacher, tokenizer, None, task.prompt_dataset(), **CROSS)
    assert trainer.teacher_tokenizer.get_vocab() == teacher_bpe_tokenizer.get_vocab()


def test_teacher_tokenizer_equal_to_the_students_keeps_the_shared_vocabulary(
    make_config, make_student, tokenizer, teacher, task
):
    same = build_tokenizer(task.prompts + task.letters)
    trainer = build(make_config, make_student(), teacher, tokenizer, same, task.prompt_dataset())
    assert trainer.teacher_tokenizer is None
    inputs = trainer._generate_and_score_completions([{"prompt": [{"role": "user", "content": "q0"}]}] * 2)
    assert "teacher_hidden" in inputs


def test_returns_are_the_teachers_log_probability_of_the_text_minus_the_students(
    make_config, make_student, tokenizer, teacher_bpe_tokenizer, bpe_teacher, task
):
    """With γ = 1, no length normalisation, no whitening and no reward scaling, the return at the first token is
    `log p(text) − log q(y)`; `log p(text)` is recomputed here from the teacher's own rendering of the conversation."""
    trainer = build(
        make_config, make_student(), bpe_teacher, tokenizer, teacher_bpe_tokenizer, task.prompt_dataset(), **CROSS,
        gamma=1.0, length_normalization=False, whiten_advantages=False, reward_scaling=1.0, reward_clip=None,
    )  # fmt: skip
    torch.manual_seed(0)
    prompts = [[{"role": "user", "content": p}] for p in ("q0", "q1", "q2", "q3")]
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in prompts])
    assert "teacher_hidden" not in inputs
    eos = tokenizer.eos_token_id
    for row, prompt in enumerate(prompts):
        ids = inputs["completion_ids"][row][inputs["completion_mask"][row].bool()].tolist()
        ended = ids[-1] == eos
        text = tokenizer.decode(ids[:-1] if ended else ids)
        prompt_text = teacher_bpe_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        scored_text = prompt_text + text + ("<|end|>" if ended else "")
        teacher_ids = teacher_bpe_tokenizer(scored_text, add_special_tokens=False)["input_ids"]
        num_prompt = len(teacher_bpe_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(bpe_teacher(torch.tensor([teacher_ids])).logits[0, :-1], -1)
        log_p = logprobs[torch.arange(num_prompt - 1, len(teacher_ids) - 1), torch.tensor(teacher_ids[num_prompt:])]
        log_q = inputs["old_logprobs"][row][: len(ids)].sum()
        assert torch.allclose(inputs["advantages"][row, 0], log_p.sum() - log_q, atol=1e-4), row


def test_training_with_a_teacher_of_another_tokenizer(
    make_config, make_student, tokenizer, teacher_bpe_tokenizer, bpe_teacher, task
):
    student = make_student()
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    trainer = build(make_config, student, bpe_teacher, tokenizer, teacher_bpe_tokenizer, task.prompt_dataset(),
                    **CROSS, max_steps=2)  # fmt: skip
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"crosstok/unscored_fraction", "crosstok/teacher_tokens_per_student_token", "minillm/reverse_kl"} <= logged
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    assert torch.isfinite(torch.tensor(last["loss"]))
    assert last["crosstok/unscored_fraction"] == 0.0 and last["crosstok/unstable_fraction"] == 0.0
    assert any(not torch.equal(before[name], p) for name, p in student.named_parameters())


def test_unscored_completions_get_no_advantage(make_config, make_student, tokenizer, bpe_teacher, task):
    """A teacher tokenizer that cannot write the student's text: every completion is unscored, every advantage 0."""
    from char_tokenizers import pair_tokenizer

    teacher_tokenizer = pair_tokenizer()
    teacher_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}" \
        "{{ '<eos>' }}{% endif %}{% endfor %}"  # fmt: skip
    teacher = tiny_causal_lm(teacher_tokenizer, hidden_size=32, num_layers=1)
    trainer = build(make_config, make_student(), teacher, tokenizer, teacher_tokenizer, task.prompt_dataset(), **CROSS)
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([{"prompt": [{"role": "user", "content": "q0"}]}] * 4)
    completions = tokenizer.batch_decode(inputs["completion_ids"], skip_special_tokens=True)
    assert all(set(text) - set("ab ") for text in completions)  # letters the toy teacher does not have
    assert (inputs["advantages"] == 0).all()
    assert trainer._metrics["train"]["crosstok/unscored_fraction"] == [1.0]
