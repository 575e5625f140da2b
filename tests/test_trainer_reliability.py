"""Faults, checkpoints and resume: NaN/inf steps are withheld, checkpoints are atomic, a resumed run ends where an
uninterrupted one does, and bad input fails before any step."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from architectures import TOKENIZER, VOCAB_SIZE, tiny_model
from datasets import Dataset, IterableDataset
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from rkd_trl import ReverseKLDistillTrainer
from rkd_trl.input_checks import check_distributed_setup


def build(make_config, student, teacher, tokenizer, dataset, **config):
    return ReverseKLDistillTrainer(
        model=student, teacher_model=teacher, args=make_config(**config), train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same(a, b):
    return all(torch.equal(a[name], b[name]) for name in a)


class RecordWeights(TrainerCallback):
    """Student weights after every optimizer step (index 0: before training)."""

    def __init__(self, model):
        self.model = model
        self.history = [weights(model)]

    def on_step_end(self, args, state, control, **kwargs):
        self.history.append(weights(self.model))


class StopAt(TrainerCallback):
    """Interrupts training after `step` (the checkpoint of that step is written first)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def poison_loss_at(trainer, calls):
    """Make the loss NaN on the given (0-based) `_compute_loss` calls of training."""
    compute_loss = trainer._compute_loss
    counter = {"calls": 0}

    def poisoned(*args, **kwargs):
        loss, entropy, num_tokens = compute_loss(*args, **kwargs)
        if trainer.model.training:
            if counter["calls"] in calls:
                loss = loss * float("nan")
            counter["calls"] += 1
        return loss, entropy, num_tokens

    trainer._compute_loss = poisoned


def poison_advantages_at(trainer, generations):
    """Put an inf advantage in the rollouts of the given (0-based) generations."""
    generate = trainer._generate_and_score_completions
    counter = {"calls": 0}

    def poisoned(inputs):
        batch = generate(inputs)
        if counter["calls"] in generations:
            batch["advantages"][0, 0] = float("inf")
        counter["calls"] += 1
        return batch

    trainer._generate_and_score_completions = poisoned


# ---------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("poison", ["nan_loss", "inf_advantage"])
def test_nonfinite_step_is_withheld_and_counted(make_config, make_student, teacher, tokenizer, task, poison):
    trainer = build(make_config, make_student(), teacher, tokenizer, task.prompt_dataset(), max_steps=4)
    if poison == "nan_loss":
        poison_loss_at(trainer, calls={1})
    else:
        poison_advantages_at(trainer, generations={1})
    recorder = RecordWeights(trainer.model)
    trainer.add_callback(recorder)
    trainer.train()

    before, after_bad, after_next = recorder.history[1], recorder.history[2], recorder.history[3]
    assert same(before, after_bad)  # the poisoned step changed nothing
    assert not same(after_bad, after_next)  # training goes on
    assert all(torch.isfinite(p).all() for p in recorder.history[-1].values())
    adam_steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert adam_steps == {3}  # the optimizer state did not advance on the skipped step
    logged = [log["nonfinite/skipped_steps"] for log in trainer.state.log_history if "nonfinite/skipped_steps" in log]
    assert logged == [0, 1, 1, 1]


def test_nonfinite_steps_in_a_row_stop_the_run(make_config, make_student, teacher, tokenizer, task):
    trainer = build(
        make_config, make_student(), teacher, tokenizer, task.prompt_dataset(), max_steps=4,
        max_consecutive_nonfinite_steps=1,
    )  # fmt: skip
    poison_loss_at(trainer, calls={0, 1, 2, 3})
    initial = weights(trainer.model)
    with pytest.raises(FloatingPointError, match=r"2 optimizer step\(s\) in a row .*max_consecutive_nonfinite_steps=1"):
        trainer.train()
    assert same(initial, weights(trainer.model))


def test_eos_first_completions_and_all_masked_batches_stay_finite(make_config, make_student, teacher, tokenizer, task):
    # A teacher that always ends at once and α = 1: every completion is just EOS.
    eos = tokenizer.eos_token_id

    def force_eos(module, args, output):
        output = output.clone()
        output[..., eos] += 1e4
        return output

    teacher.get_output_embeddings().register_forward_hook(force_eos)
    trainer = build(
        make_config, make_student(), teacher, tokenizer, task.prompt_dataset(), max_steps=2, teacher_mix_alpha=1.0
    )
    recorder = RecordWeights(trainer.model)
    trainer.add_callback(recorder)
    trainer.train()
    lengths = [log["completions/max_length"] for log in trainer.state.log_history if "completions/max_length" in log]
    assert lengths == [1.0, 1.0]
    assert [log["nonfinite/skipped_steps"] for log in trainer.state.log_history if "loss" in log] == [0, 0]
    assert not same(recorder.history[0], recorder.history[-1])

    # All completion tokens masked (e.g. a padded micro-batch): zero loss, zero finite gradients.
    inputs = trainer._generate_and_score_completions(
        [{"prompt": [{"role": "user", "content": p}]} for p in ["q0", "q1"]]
    )
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    trainer.model.zero_grad()
    loss, _, num_tokens = trainer._compute_loss(trainer.model, inputs, None)
    loss.backward()
    assert loss.item() == 0.0 and num_tokens.item() == 0
    assert all(p.grad is None or torch.equal(p.grad, torch.zeros_like(p.grad)) for p in trainer.model.parameters())


def test_deepspeed_stops_before_the_backward_of_a_nonfinite_loss(make_config, make_student, teacher, tokenizer, task):
    # DeepSpeed steps the optimizer inside backward; the check in `compute_loss` must fire before it. Only the flag is
    # set here, in one process; the ZeRO-3 runs of test_distributed.py use DeepSpeed itself, without a NaN.
    trainer = build(make_config, make_student(), teacher, tokenizer, task.prompt_dataset())
    inputs = trainer._generate_and_score_completions([{"prompt": [{"role": "user", "content": "q1"}]}])
    trainer.model.train()
    poison_loss_at(trainer, calls={0})
    trainer.is_deepspeed_enabled = True
    with pytest.raises(FloatingPointError, match="NaN/inf at this step under DeepSpeed"):
        trainer.compute_loss(trainer.model, inputs)


def test_sharded_decoding_that_could_hang_is_rejected(make_config):
    # Only the backend's flags are simulated: FSDP and ZeRO-3 need accelerate launch set-ups (ZeRO-3 and FSDP2 run in
    # test_distributed).
    args = make_config()
    with pytest.raises(ValueError, match=r"FSDP1 \(fsdp_version: 1\) is not supported; set `fsdp_version: 2`"):
        check_distributed_setup(SimpleNamespace(is_fsdp=True, is_zero3=False, fsdp_version=1), args)
    check_distributed_setup(SimpleNamespace(is_fsdp=True, is_zero3=False, fsdp_version=2), args)  # FSDP2: supported
    args.ds3_gather_for_generation = False
    with pytest.raises(ValueError, match="ds3_gather_for_generation=False is not supported"):
        check_distributed_setup(SimpleNamespace(is_fsdp=False, is_zero3=True, fsdp_version=None), args)
    check_distributed_setup(SimpleNamespace(is_fsdp=False, is_zero3=False, fsdp_version=None), args)  # DDP: supported


# ---------------------------------------------------------------- determinism, resume, checkpoints


def run(make_config, make_student, teacher, tokenizer, task, stop_at=None, resume=None, **config):
    settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 1, "learning_rate": 3e-3}
    settings.update(config)
    trainer = build(make_config, make_student(), teacher, tokenizer, task.prompt_dataset(repeats=2), **settings)
    if stop_at is not None:
        trainer.add_callback(StopAt(stop_at))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_same_seed_same_result(make_config, make_student, teacher, tokenizer, task):
    first = run(make_config, make_student, teacher, tokenizer, task, max_steps=2, save_strategy="no")
    second = run(make_config, make_student, teacher, tokenizer, task, max_steps=2, save_strategy="no")
    other_seed = run(make_config, make_student, teacher, tokenizer, task, max_steps=2, save_strategy="no", seed=1)
    assert same(weights(first.model), weights(second.model))
    assert not same(weights(first.model), weights(other_seed.model))


@pytest.mark.parametrize(
    "stop_at, config",
    [
        (2, {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}),
        (1, {"ppo_epochs": 2}),  # interrupted in the middle of a rollout-reuse window
    ],
    ids=["grad_accumulation", "mid_ppo_window"],
)
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(
    make_config, make_student, teacher, tokenizer, task, stop_at, config
):
    uninterrupted = run(make_config, make_student, teacher, tokenizer, task, **config)
    output_dir = uninterrupted.args.output_dir + "-interrupted"
    interrupted = run(make_config, make_student, teacher, tokenizer, task, stop_at=stop_at, output_dir=output_dir, **config)
    assert interrupted.state.global_step == stop_at
    checkpoint = os.path.join(output_dir, f"checkpoint-{stop_at}")
    resumed = run(make_config, make_student, teacher, tokenizer, task, resume=checkpoint, output_dir=output_dir, **config)
    assert resumed.state.global_step == 4
    assert same(weights(uninterrupted.model), weights(resumed.model))
    assert not same(weights(interrupted.model), weights(resumed.model))


def test_interrupted_save_leaves_the_previous_checkpoint_usable(
    make_config, make_student, teacher, tokenizer, task, monkeypatch
):
    trainer = build(
        make_config, make_student(), teacher, tokenizer, task.prompt_dataset(), max_steps=3,
        save_strategy="steps", save_steps=1,
    )  # fmt: skip
    save_scheduler = trainer._save_optimizer_and_scheduler

    def crash_on_second_save(output_dir):
        if trainer.state.global_step == 2:
            raise KeyboardInterrupt("killed while saving")
        save_scheduler(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    output_dir = trainer.args.output_dir
    assert sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-")) == ["checkpoint-1"]
    assert get_last_checkpoint(output_dir) == os.path.join(output_dir, "checkpoint-1")

    monkeypatch.undo()
    resumed = build(
        make_config, make_student(), teacher, tokenizer, task.prompt_dataset(), max_steps=3,
        save_strategy="steps", save_steps=1,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3",
    ]  # fmt: skip
    assert not any(name.startswith("_") for name in os.listdir(output_dir))


# ---------------------------------------------------------------- bad input, rejected before any step


def _prompts(*texts):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": text}] for text in texts]})


def _without_eos(tokenizer):
    broken = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    broken.chat_template = tokenizer.chat_template
    return broken


def _without_chat_template(tokenizer):
    broken = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    broken.eos_token, broken.pad_token = tokenizer.eos_token, tokenizer.pad_token
    return broken


def _corrupt(model):
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    return model


def _shrunk_vocabulary(model):
    model.resize_token_embeddings(model.config.vocab_size - 2)
    return model


# name: (change to the valid constructor arguments `kw`, given `make_config`; fragment of the expected message)
BAD_INPUTS = {
    "prompt_too_long_for_positions": (
        lambda kw, cfg: kw | {"train_dataset": _prompts("q1 " * 130)},
        "the student's max_position_embeddings",
    ),
    "empty_prompt": (lambda kw, cfg: kw | {"train_dataset": Dataset.from_dict({"prompt": [""]})}, "the prompt is empty"),
    "tokenizer_without_eos": (
        lambda kw, cfg: kw | {"processing_class": _without_eos(kw["processing_class"])},
        "no EOS token",
    ),
    "conversations_without_chat_template": (
        lambda kw, cfg: kw | {"processing_class": _without_chat_template(kw["processing_class"])},
        "no chat template",
    ),
    "corrupt_teacher_weights": (
        lambda kw, cfg: kw | {"teacher_model": _corrupt(kw["teacher_model"])},
        "contains NaN or inf",
    ),
    "student_vocabulary_short_of_tokenizer": (
        lambda kw, cfg: kw | {"model": _shrunk_vocabulary(kw["model"])},
        "do not share the tokenizer's vocabulary",
    ),
    "missing_student": (lambda kw, cfg: kw | {"model": None}, "`model` \\(the student\\) is required"),
    "lm_loss_on_a_missing_completion": (
        lambda kw, cfg: kw
        | {
            "train_dataset": Dataset.from_dict({"prompt": ["q1", "q2"], "completion": ["a b c", ""]}),
            "args": cfg(lm_loss_weight=0.5),
        },
        "row 1 has no reference `completion`",
    ),
    "missing_teacher": (lambda kw, cfg: kw | {"teacher_model": None}, "`teacher_model` is required"),
    "init_kwargs_with_teacher_object": (
        lambda kw, cfg: kw | {"args": cfg(teacher_model_init_kwargs={"dtype": "float32"})},
        "teacher is already instantiated",
    ),
    "lm_dataset_without_text": (
        lambda kw, cfg: kw | {"lm_dataset": Dataset.from_dict({"x": ["a"]})},
        "needs a `text` column",
    ),
    "rollout_reuse_on_a_stream": (
        lambda kw, cfg: kw
        | {
            "train_dataset": IterableDataset.from_generator(lambda: iter([{"prompt": "q1"}])),
            "args": cfg(ppo_epochs=2),
        },
        "ppo_epochs > 1 needs a map-style",
    ),
    "gkd_config_object": (lambda kw, cfg: kw | {"args": _gkd_config(cfg().output_dir)}, "must be a ReverseKLDistillConfig"),
    # The test tokenizer's chat template formats user turns and renders any other role as an assistant turn.
    "role_the_chat_template_does_not_know": (
        lambda kw, cfg: kw
        | {"train_dataset": _conversations([{"role": "system", "content": "q2"}, {"role": "user", "content": "q1"}])},
        "row 0: the chat template does not know the role 'system'",
    ),
    "message_content_that_is_not_text": (
        lambda kw, cfg: kw
        | {"train_dataset": _conversations([{"role": "user", "content": [{"type": "image", "text": ""}]}])},
        "row 0: a 'user' message's content is a list, not text",
    ),
}


def _conversations(*conversations):
    return Dataset.from_dict({"prompt": list(conversations)})


def _gkd_config(output_dir):
    from trl.experimental.gkd import GKDConfig

    return GKDConfig(output_dir=output_dir, report_to=[], use_cpu=True)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_rejected_when_the_trainer_is_built(make_config, make_student, teacher, tokenizer, task, case):
    # Other bad input with its own test: config ranges and GKD-only settings (test_config.py), empty datasets, missing
    # columns, conversations not ending with the assistant, prompts over `max_length`, a teacher with another
    # tokenizer (test_trainer.py).
    change, message = BAD_INPUTS[case]
    kwargs = {
        "model": make_student(), "teacher_model": teacher, "args": make_config(),
        "train_dataset": task.prompt_dataset(), "processing_class": tokenizer,
    }  # fmt: skip
    with pytest.raises((ValueError, TypeError), match=message):
        ReverseKLDistillTrainer(**change(kwargs, make_config))


def test_roles_the_chat_template_knows_are_accepted(make_config, make_student, teacher, tokenizer):
    """A template that writes each message's role (ChatML-like) knows the system role."""
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = (  # answers end with EOS, as the chat-format check asks (test_chat_format.py)
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}{% if m['role'] == 'assistant' %} </s>{% endif %} "
        "-> {% endfor %}"
    )
    dataset = _conversations([{"role": "system", "content": "q2"}, {"role": "user", "content": "q1"}])
    build(make_config, make_student(), teacher, chat_tokenizer, dataset)


def test_teacher_with_another_larger_vocabulary_is_rejected(make_config):
    """A teacher with 4× the student's vocabulary rows (another tokenizer) is refused by its row count; one whose rows
    past the tokenizer fit padding but carry probability (tokens of its own) is refused by the start-up probe."""
    dataset = _prompts("w01 w02", "w03")
    with pytest.raises(ValueError, match=r"teacher has 256 vocabulary rows, 4.0× the tokenizer's 64 tokens.*another"):
        build(make_config, tiny_model("llama"), tiny_model("llama", vocab_size=4 * VOCAB_SIZE), TOKENIZER, dataset)
    with pytest.raises(ValueError, match=r"teacher puts up to \d+\.\d% of its next-token probability .* past the 64"):
        build(make_config, tiny_model("llama"), tiny_model("llama", vocab_size=VOCAB_SIZE + 40), TOKENIZER, dataset)
