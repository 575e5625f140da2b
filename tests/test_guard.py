"""The degeneration warning: silent on a healthy run, once per signal when repetition or truncation of the rollouts
rises past its threshold for consecutive logs, and on by default in the trainer."""

import logging

import pytest
from transformers import TrainerControl, TrainerState

from rkd_trl import DegenerationGuard, ReverseKLDistillTrainer


def feed(guard, series, caplog, key="completions/repeated_4grams"):
    state = TrainerState()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rkd_trl.guard"):
        for step, value in enumerate(series, start=1):
            state.global_step = step
            guard.on_log(None, state, TrainerControl(), logs={key: value, "loss": 1.0})
    return [record.getMessage() for record in caplog.records if record.name == "rkd_trl.guard"]


def test_a_run_that_keeps_its_repetition_level_is_not_warned(caplog):
    assert feed(DegenerationGuard(), [0.05, 0.12, 0.08, 0.14, 0.1], caplog) == []  # noisy, never 0.10 above 0.05


def test_one_spike_is_not_a_trend(caplog):
    assert feed(DegenerationGuard(), [0.02, 0.3, 0.03, 0.25, 0.04], caplog) == []


def test_rising_repetition_warns_once_with_the_figures(caplog):
    messages = feed(DegenerationGuard(), [0.02, 0.05, 0.15, 0.31, 0.5, 0.7], caplog)
    assert len(messages) == 1
    assert messages[0].startswith("step 4: repeated 4-grams in the rollouts rose from 0.02 at the start to 0.31")
    assert "lm_loss_weight" in messages[0]


def test_truncation_has_its_own_signal_and_threshold(caplog):
    guard = DegenerationGuard()
    key = "completions/clipped_ratio"
    assert feed(guard, [0.3, 0.5, 0.55, 0.5], caplog, key) == []  # +0.25: below the 0.30 rise
    messages = feed(DegenerationGuard(threshold_logs=1), [0.3, 0.65], caplog, key)
    assert len(messages) == 1 and "cut off at max_completion_length" in messages[0]


def test_the_trainer_adds_the_guard_once(make_config, make_student, teacher, tokenizer, task):
    def guards(config=None, **kwargs):
        trainer = ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=make_config(**(config or {})),
                                          train_dataset=task.prompt_dataset(), processing_class=tokenizer, **kwargs)  # fmt: skip
        return [c for c in trainer.callback_handler.callbacks if isinstance(c, DegenerationGuard)]

    assert len(guards()) == 1
    assert [guard.threshold_logs for guard in guards(callbacks=[DegenerationGuard(threshold_logs=5)])] == [5]
    assert guards({"degeneration_guard": False}) == []  # the config switch


def test_the_greedy_probe_logs_the_students_greedy_answers(make_config, make_student, teacher, tokenizer, task):
    """The probe's figures are those of the student's own greedy decoding (transformers' `generate`), logged at
    logging steps."""
    from rkd_trl.evaluation.metrics import chat_prompt_batch, repeated_ngram_share

    student = make_student(seed=5)
    args = make_config(logging_steps=2, max_steps=3, learning_rate=0.0, max_new_tokens=12)
    trainer = ReverseKLDistillTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=task.prompt_dataset(), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    logged = [entry["step"] for entry in trainer.state.log_history if "completions/greedy_repeated_4grams" in entry]
    assert logged == [2]  # logging steps only (step 2 of 3)

    prompts = [row["prompt"] for row in task.prompt_dataset()][:6]
    ids, mask = chat_prompt_batch(tokenizer, prompts)
    trainer._metrics["train"].clear()
    trainer._greedy_probe.prompts = None  # probe these prompts (the run kept those of its first probe)
    trainer._log_greedy_probe(student.eval(), ids, mask)
    out = student.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[:, ids.size(1):]
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    cut_off = sum(tokenizer.eos_token_id not in row for row in rows) / len(rows)
    repetition = sum(repeated_ngram_share([row], 4) for row in rows) / len(rows)
    metrics = trainer._metrics["train"]
    assert metrics["completions/greedy_clipped_ratio"] == [cut_off]
    assert abs(metrics["completions/greedy_repeated_4grams"][0] - repetition) < 1e-6


def test_the_greedy_probe_answers_the_same_prompts_at_every_logging_step(
    make_config, make_student, teacher, tokenizer, task, monkeypatch
):
    """The probe keeps the prompts of its first rollout: a change in its figures is a change in the student, not in
    the prompts that happened to be drawn."""
    from rkd_trl import guard as guard_module
    from rkd_trl import trainer as trainer_module

    probed, rollouts, sample = [], [], trainer_module.sample_teacher_mixed

    def recording(student, teacher_model, prompt_ids, prompt_mask, **kwargs):
        (probed if kwargs.get("top_k") == 1 else rollouts).append(prompt_ids.tolist())
        return sample(student, teacher_model, prompt_ids, prompt_mask, **kwargs)

    monkeypatch.setattr(trainer_module, "sample_teacher_mixed", recording)  # the rollouts
    monkeypatch.setattr(guard_module, "sample_teacher_mixed", recording)  # the greedy probe
    args = make_config(logging_steps=1, max_steps=3, max_new_tokens=6, per_device_train_batch_size=2,
                       greedy_probe_steps=1)  # fmt: skip
    trainer = ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=args,
                                      train_dataset=task.prompt_dataset(repeats=3), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    assert len(probed) == 3 and len({str(rollout) for rollout in rollouts}) > 1  # the batches differ
    assert probed == [rollouts[0]] * 3


@pytest.mark.parametrize("logging_steps, probe_steps, probed_logs", [(1, 3, [1, 4, 7]), (2, 3, [2, 6]), (4, 1, [4, 8])])
def test_the_greedy_probe_runs_on_its_own_schedule_at_logging_steps(
    make_config, make_student, teacher, tokenizer, task, logging_steps, probe_steps, probed_logs
):
    """Every `greedy_probe_steps` steps at the soonest, and only at logging steps (its figures land in that log):
    with `logging_steps=1` the probe costs one greedy decode per `greedy_probe_steps` steps, not one per step."""
    args = make_config(logging_steps=logging_steps, greedy_probe_steps=probe_steps, max_steps=8, max_new_tokens=4,
                       per_device_train_batch_size=2, learning_rate=0.0)  # fmt: skip
    trainer = ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=args,
                                      train_dataset=task.prompt_dataset(repeats=3), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    logged = [entry["step"] for entry in trainer.state.log_history if "completions/greedy_repeated_4grams" in entry]
    assert logged == probed_logs


def test_the_greedy_probe_leaves_training_as_it_is_without_it(make_config, make_student, teacher, tokenizer, task):
    """The probe only observes: a run with it ends with the weights of the same run without it."""
    import torch

    def final_weights(probe):
        torch.manual_seed(0)
        args = make_config(logging_steps=1, max_steps=3, max_new_tokens=6, per_device_train_batch_size=2,
                           greedy_probe=probe, greedy_probe_steps=1, learning_rate=1e-2)  # fmt: skip
        trainer = ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=args,
                                          train_dataset=task.prompt_dataset(repeats=3), processing_class=tokenizer)  # fmt: skip
        trainer.train()
        return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])

    with_probe, without = final_weights(True), final_weights(False)
    assert torch.equal(with_probe, without)


def test_evaluation_rollouts_leave_the_probes_schedule_alone(make_config, make_student, teacher, tokenizer, task):
    """Only training rollouts ask the schedule (which records each probe it grants): an evaluation rollout at a
    logging step must not take the next training probe's place."""
    trainer = ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher,
                                      args=make_config(logging_steps=1, max_new_tokens=3),
                                      train_dataset=task.prompt_dataset(), processing_class=tokenizer)  # fmt: skip
    trainer.model.eval()
    trainer._generate_and_score_completions([{"prompt": row["prompt"]} for row in task.prompt_dataset()][:2])
    assert trainer._greedy_probe.last_step is None
