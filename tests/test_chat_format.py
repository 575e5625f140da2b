"""The start-up check of chat formats (`teacher.check_chat_formats`): a student whose template does not end answers
with an EOS the sampler stops at is refused; a teacher that shares the student's vocabulary but reads another chat
format is refused with both renderings; a difference only in a default system prompt is a warning; the same format
passes silently. Through the trainer too, with a teacher loaded from a folder that holds its own tokenizer."""

import copy
import warnings

import pytest

from rkd_trl import ReverseKLDistillTrainer
from rkd_trl.demo.synthetic import CHAT_TEMPLATE, SEPARATOR
from rkd_trl.teacher import check_chat_formats

PROMPT = [{"role": "user", "content": "q1"}]
# The task's format, with system messages rendered like user turns.
WITH_SYSTEM = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user'] %}{{ message['content'] }} " + SEPARATOR + "{% else %}"
    " {{ message['content'] }} </s>{% endif %}"
    "{% endfor %}"
)


def with_template(tokenizer, template):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def test_the_same_format_passes_silently(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_chat_formats(tokenizer, with_template(tokenizer, CHAT_TEMPLATE), PROMPT, [tokenizer.eos_token_id])
        check_chat_formats(tokenizer, None, PROMPT, [tokenizer.eos_token_id])  # no teacher tokenizer to compare
        check_chat_formats(tokenizer, None, "q1", [tokenizer.eos_token_id])  # plain text: nothing to render


def test_a_student_template_that_ends_answers_without_an_eos_is_refused(tokenizer):
    student = with_template(tokenizer, CHAT_TEMPLATE.replace("</s>", "<s>"))  # BOS where the answer should end
    with pytest.raises(ValueError, match=r"student's chat template closes an answer with ' <s>', which holds none of the EOS"):
        check_chat_formats(student, None, PROMPT, [tokenizer.eos_token_id])
    check_chat_formats(student, None, PROMPT, [tokenizer.eos_token_id, tokenizer.bos_token_id])  # if it is an EOS


def test_a_teacher_that_reads_another_format_is_refused_with_both_renderings(tokenizer):
    teacher = with_template(tokenizer, CHAT_TEMPLATE.replace(SEPARATOR, SEPARATOR + " <s>"))  # its generation prompt
    with pytest.raises(ValueError, match=r"share a vocabulary but not a chat format.*'q1 ->'.*'q1 -> <s>'"):
        check_chat_formats(tokenizer, teacher, PROMPT, [tokenizer.eos_token_id])


def test_a_default_system_prompt_of_one_template_is_a_warning(tokenizer):
    student = with_template(tokenizer, WITH_SYSTEM)
    teacher = with_template(tokenizer, "{% if messages[0]['role'] != 'system' %}q2 " + SEPARATOR + "{% endif %}"
                            + WITH_SYSTEM)  # fmt: skip
    with pytest.warns(UserWarning, match="differ in their default system prompt"):
        check_chat_formats(student, teacher, PROMPT, [tokenizer.eos_token_id])
    system = [{"role": "system", "content": "q3"}, *PROMPT]  # with a system message both render the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_chat_formats(student, teacher, system, [tokenizer.eos_token_id])


def test_the_trainer_refuses_a_teacher_folder_whose_tokenizer_reads_another_format(
    tmp_path, make_config, make_student, teacher, tokenizer, task
):
    teacher.save_pretrained(tmp_path / "teacher")
    with_template(tokenizer, CHAT_TEMPLATE.replace(SEPARATOR, SEPARATOR + " <s>")).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="share a vocabulary but not a chat format"):
        ReverseKLDistillTrainer(model=make_student(), teacher_model=str(tmp_path / "teacher"), args=make_config(),
                                train_dataset=task.conversations(), processing_class=tokenizer)  # fmt: skip
    tokenizer.save_pretrained(tmp_path / "teacher")  # the student's own format: accepted
    ReverseKLDistillTrainer(model=make_student(), teacher_model=str(tmp_path / "teacher"), args=make_config(),
                            train_dataset=task.conversations(), processing_class=tokenizer)  # fmt: skip
