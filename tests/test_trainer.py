import copy
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.evaluation.metrics import reverse_kl_estimate


def build(make_config, student, teacher, tokenizer, dataset, **config):
    return ReverseKLDistillTrainer(
        model=student, teacher_model=teacher, args=make_config(**config), train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip


def loss_and_grads(trainer, inputs, num_items):
    trainer.model.zero_grad()
    loss, _, _ = trainer._compute_loss(trainer.model, inputs, num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_padding_and_masked_tokens_do_not_change_loss_or_gradients(make_config, make_student, teacher, tokenizer, task):
    trainer = build(make_config, make_student(), teacher, tokenizer, task.conversations(), max_new_tokens=5)
    torch.manual_seed(0)
    examples = [{"prompt": [{"role": "user", "content": p}]} for p in ["q0", "q1 q2 q3", "q4", "q5 q6"]]
    inputs = trainer._generate_and_score_completions(examples)
    num_items = inputs["completion_mask"].sum().float()
    assert inputs["prompt_mask"][:, 0].eq(0).any()  # there is left padding already
    reference_loss, reference_grads = loss_and_grads(trainer, inputs, num_items)

    # More left padding on prompts, more right padding on completions with junk ids under mask 0.
    padded = dict(inputs)
    pad = tokenizer.pad_token_id
    B = inputs["prompt_ids"].size(0)
    padded["prompt_ids"] = torch.cat([torch.full((B, 3), pad), inputs["prompt_ids"]], 1)
    padded["prompt_mask"] = torch.cat([torch.zeros(B, 3, dtype=torch.long), inputs["prompt_mask"]], 1)
    junk = torch.full((B, 4), 7)
    completion_ids = inputs["completion_ids"].clone()
    completion_ids[inputs["completion_mask"] == 0] = 9  # junk after EOS too
    padded["completion_ids"] = torch.cat([completion_ids, junk], 1)
    padded["completion_mask"] = torch.cat([inputs["completion_mask"], torch.zeros(B, 4, dtype=torch.long)], 1)
    for key in ("old_logprobs", "advantages", "importance_weights"):
        padded[key] = torch.cat([inputs[key], torch.randn(B, 4)], 1)
    padded["teacher_hidden"] = torch.cat([inputs["teacher_hidden"], torch.randn(B, 4, inputs["teacher_hidden"].size(2))], 1)
    loss, grads = loss_and_grads(trainer, padded, num_items)
    assert torch.allclose(loss, reference_loss, atol=1e-6)
    for name in reference_grads:
        assert torch.allclose(grads[name], reference_grads[name], atol=1e-6), name

    # Each row alone, without any padding, sums to the batch.
    total_loss = 0.0
    total_grads = {name: torch.zeros_like(g) for name, g in reference_grads.items()}
    for row in range(B):
        keep_prompt = inputs["prompt_mask"][row].bool()
        keep_completion = inputs["completion_mask"][row].bool()
        single = {
            "prompt_ids": inputs["prompt_ids"][row][keep_prompt][None],
            "prompt_mask": inputs["prompt_mask"][row][keep_prompt][None],
        }
        for key in ("completion_ids", "completion_mask", "old_logprobs", "advantages", "importance_weights", "teacher_hidden"):
            single[key] = inputs[key][row][keep_completion][None]
        loss, grads = loss_and_grads(trainer, single, num_items)
        total_loss += loss
        for name in total_grads:
            total_grads[name] += grads.get(name, 0)
    assert torch.allclose(total_loss, reference_loss, atol=1e-5)
    for name in reference_grads:
        assert torch.allclose(total_grads[name], reference_grads[name], atol=1e-5), name


def test_without_policy_gradient_the_loss_is_the_token_level_reverse_kl(make_config, make_student, teacher,
                                                                       tokenizer, task):
    # policy_gradient=False leaves the single-step term: the exact KL(q || p) over the vocabulary at each sampled
    # position, computed here from both models' own forwards.
    for policy_gradient in (False, True):
        trainer = build(make_config, make_student(), teacher, tokenizer, task.conversations(), max_new_tokens=5,
                        policy_gradient=policy_gradient)  # fmt: skip
        torch.manual_seed(0)
        examples = [{"prompt": [{"role": "user", "content": p}]} for p in ["q0", "q1 q2 q3", "q4", "q5 q6"]]
        inputs = trainer._generate_and_score_completions(examples)
        mask = inputs["completion_mask"].bool()
        num_items = mask.sum().float()
        loss, grads = loss_and_grads(trainer, inputs, num_items)

        student = trainer.model
        student.zero_grad()
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        start = inputs["prompt_ids"].size(1) - 1
        forward = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        student_logprobs = student(**forward).logits[:, start:-1].float().log_softmax(-1)
        with torch.no_grad():
            teacher_logprobs = teacher(**forward).logits[:, start:-1].float().log_softmax(-1)
        kl = (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)
        expected = kl[mask].sum() / num_items
        expected.backward()
        matches = torch.allclose(loss, expected.detach(), atol=1e-5) and all(
            torch.allclose(grads[name], parameter.grad, atol=1e-5)
            for name, parameter in student.named_parameters() if parameter.grad is not None
        )  # fmt: skip
        if policy_gradient:
            assert inputs["advantages"][mask].abs().sum() > 0
            assert not matches  # with the policy gradient on, the loss is more than the token-level KL
        else:
            assert inputs["advantages"].abs().sum() == 0
            assert matches


def train_one_step(make_config, student, teacher, tokenizer, dataset, batch_size, accumulation):
    args = make_config(per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1,
                       max_grad_norm=0.0, shuffle_dataset=False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    trainer = ReverseKLDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                      processing_class=tokenizer, optimizers=(optimizer, None))
    trainer.train()
    return {n: p.detach().clone() for n, p in student.named_parameters()}


def test_gradient_accumulation_matches_a_full_batch(make_config, make_student, teacher, tokenizer, task):
    dataset = task.prompt_dataset()
    start = make_student()
    initial = {n: p.detach().clone() for n, p in start.named_parameters()}
    full = train_one_step(make_config, copy.deepcopy(start), teacher, tokenizer, dataset, 4, 1)
    accumulated = train_one_step(make_config, copy.deepcopy(start), teacher, tokenizer, dataset, 2, 2)
    moved = max((full[n] - initial[n]).abs().max().item() for n in full)
    assert moved > 1e-4  # the step did something
    for name in full:
        assert torch.allclose(full[name], accumulated[name], atol=1e-6), name


GKD_STYLE_SCRIPT = """
args = Config(output_dir=output_dir, per_device_train_batch_size=2, max_steps=2, learning_rate=5e-2,
              lmbda=1.0, beta=1.0, max_new_tokens=4, temperature=1.0, report_to=[], bf16=False, use_cpu=True,
              save_strategy="no", activation_checkpointing=False)
trainer = Trainer(model=student_path, teacher_model=teacher, args=args, train_dataset=dataset,
                  processing_class=tokenizer,
                  peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
trainer.train()
"""


@pytest.mark.parametrize("teacher_as", ["object", "path"])
def test_gkd_script_runs_after_swapping_class_names(tmp_path, make_student, teacher, tokenizer, task, teacher_as):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student_path = tmp_path / "student"
    make_student().save_pretrained(student_path)
    tokenizer.save_pretrained(student_path)
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    if teacher_as == "path":
        teacher.save_pretrained(tmp_path / "teacher")
    namespace = {
        "output_dir": str(tmp_path / "out"), "student_path": str(student_path), "tokenizer": tokenizer,
        "dataset": task.conversations(), "LoraConfig": LoraConfig,
        "teacher": teacher if teacher_as == "object" else str(tmp_path / "teacher"),
    }  # fmt: skip

    exec(GKD_STYLE_SCRIPT, {**namespace, "Config": GKDConfig, "Trainer": GKDTrainer})  # noqa: S102 (valid GKD)
    ours = {**namespace, "Config": ReverseKLDistillConfig, "Trainer": ReverseKLDistillTrainer}
    exec(GKD_STYLE_SCRIPT, ours)  # noqa: S102 (the same script, our classes)

    trainer = ours["trainer"]
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().max() > 0 for p in lora.values())  # lora_B starts at 0: it moved
    for name, parameter in trainer.accelerator.unwrap_model(trainer.teacher_model).named_parameters():
        assert torch.equal(parameter.detach(), teacher_before[name]), name
    assert trainer.state.global_step == 2


def test_ignored_gkd_arguments_warn(make_config, make_student, teacher, tokenizer, task):
    with pytest.warns(UserWarning, match="formatting_func"):
        ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=make_config(),
                                train_dataset=task.conversations(), processing_class=tokenizer,
                                formatting_func=lambda x: x)


def test_distillation_trainers_positional_order_and_tools_are_refused_with_the_call_to_write(
    make_config, make_student, teacher, tokenizer, task
):
    """trl.DistillationTrainer's positional order puts the dataset where GKDTrainer (and this trainer) take
    `data_collator`: refused at once with the keyword call, not later with an unrelated error; `tools=` too."""
    args = make_config()
    with pytest.raises(TypeError, match=r"4th positional argument.*train_dataset=\.\.\., eval_dataset=\.\.\."):
        ReverseKLDistillTrainer(make_student(), teacher, args, task.prompt_dataset(), None, tokenizer)
    with pytest.raises(ValueError, match="`tools`.* is not supported"):
        ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=args,
                                train_dataset=task.prompt_dataset(), processing_class=tokenizer, tools=[print])  # fmt: skip
    # GKDTrainer's positional order works
    trainer = ReverseKLDistillTrainer(make_student(), teacher, args, None, task.prompt_dataset(), None, tokenizer)
    assert len(trainer.train_dataset) == len(task.prompt_dataset())


def test_the_users_config_is_never_modified_and_no_warning_filter_outlives_a_rollout(
    make_config, make_student, teacher, tokenizer, task
):
    import warnings

    args = make_config(lm_loss_weight=None, max_steps=1)
    before = copy.deepcopy(args.to_dict())
    filters = list(warnings.filters)
    trainer = ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=args,
                                      train_dataset=task.conversations(), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    assert trainer.args.lm_loss_weight == 1.0 and args.lm_loss_weight is None
    assert args.to_dict() == before
    assert warnings.filters == filters  # running the trainer leaves the process's filters alone
    assert not any(f[1] is not None and "is_gradient_checkpointing" in f[1].pattern for f in warnings.filters)


def test_a_teacher_that_does_not_stay_frozen_stops_the_run(make_config, make_student, teacher, tokenizer, task):
    """The teacher is checked at the first step and after training (examples/distill.py runs these checks under DDP,
    ZeRO-3 and FSDP2 in test_distributed): in the optimizer, or put back in training mode, it is refused."""
    from transformers import TrainerCallback

    student = make_student()
    optimizer = torch.optim.AdamW([*student.parameters(), *teacher.parameters()], lr=1e-3)
    trainer = ReverseKLDistillTrainer(model=student, teacher_model=teacher, args=make_config(max_steps=2),
                                      train_dataset=task.prompt_dataset(), processing_class=tokenizer,
                                      optimizers=(optimizer, None))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"teacher must stay frozen, but at the first step \d+ of its parameters"):
        trainer.train()

    class UnfreezeTeacher(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trainer.teacher_model.train()

    trainer = build(make_config, make_student(), teacher, tokenizer, task.prompt_dataset(), max_steps=2)
    trainer.add_callback(UnfreezeTeacher())
    with pytest.raises(RuntimeError, match="teacher must stay frozen, but after training it is in training mode"):
        trainer.train()
    trainer = build(make_config, make_student(), teacher.eval(), tokenizer, task.prompt_dataset(), max_steps=2)
    trainer.train()  # frozen as prepared: accepted
    assert not trainer.teacher_model.training and not any(p.requires_grad for p in trainer.teacher_model.parameters())


def test_short_run_lowers_reverse_kl(make_config, make_student, teacher, tokenizer, task):
    student = make_student()
    torch.manual_seed(123)
    before = reverse_kl_estimate(student, teacher, tokenizer, task.prompts, max_new_tokens=5, samples_per_prompt=32)
    trainer = build(make_config, student, teacher, tokenizer, task.prompt_dataset(repeats=20), max_steps=40,
                    per_device_train_batch_size=8, learning_rate=5e-3, max_new_tokens=5)
    trainer.train()
    torch.manual_seed(123)
    after = reverse_kl_estimate(student.eval(), teacher, tokenizer, task.prompts, max_new_tokens=5, samples_per_prompt=32)
    assert after["reverse_kl"] < 0.7 * before["reverse_kl"], (before, after)
    logged = [entry for entry in trainer.state.log_history if "minillm/reverse_kl" in entry]
    assert logged and all(key in logged[0] for key in (
        "minillm/reward_mean", "minillm/importance_weight_mean", "minillm/importance_weight_max",
        "minillm/clip_fraction", "completions/mean_length", "loss/policy_gradient", "loss/single_step"))


def test_rollout_reuse_generates_once_per_ppo_epochs(make_config, make_student, teacher, tokenizer, task, monkeypatch):
    trainer = build(make_config, make_student(), teacher, tokenizer, task.prompt_dataset(repeats=4), ppo_epochs=3,
                    max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    calls = []
    original = trainer._generate_and_score_completions
    monkeypatch.setattr(trainer, "_generate_and_score_completions", lambda inputs: calls.append(1) or original(inputs))
    trainer.train()
    assert len(calls) == 2  # 6 optimizer steps / 3 passes per batch of rollouts
    clip = [e["minillm/clip_fraction"] for e in trainer.state.log_history if "minillm/clip_fraction" in e]
    assert clip


def test_lm_loss_on_reference_completions_and_on_lm_dataset(make_config, make_student, teacher, tokenizer, task):
    trainer = build(make_config, make_student(), teacher, tokenizer, task.conversations(), lm_loss_weight=0.5)
    trainer.train()
    assert any("loss/lm" in entry for entry in trainer.state.log_history)
    with pytest.raises(ValueError, match="lm_loss_weight > 0 needs text"):
        build(make_config, make_student(), teacher, tokenizer, task.prompt_dataset(), lm_loss_weight=0.5)
    text = Dataset.from_dict({"text": ["q1 -> a b c </s>"] * 16})
    trainer = ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=make_config(lm_loss_weight=1.0),
                                      train_dataset=task.prompt_dataset(), processing_class=tokenizer, lm_dataset=text)
    trainer.train()
    assert any("loss/lm" in entry for entry in trainer.state.log_history)


def test_lm_loss_row_share_runs_the_lm_forward_on_that_share_of_the_rows(
    make_config, make_student, teacher, tokenizer, task, monkeypatch
):
    import rkd_trl.trainer

    rows, forward = [], rkd_trl.trainer.hidden_states_for_head
    monkeypatch.setattr(rkd_trl.trainer, "hidden_states_for_head",
                        lambda model, ids, *rest: rows.append(ids.size(0)) or forward(model, ids, *rest))  # fmt: skip
    trainer = build(make_config, make_student(), teacher, tokenizer, task.conversations(), lm_loss_weight=1.0,
                    lm_loss_row_share=0.25, per_device_train_batch_size=4, max_steps=2)  # fmt: skip
    trainer.train()
    assert rows == [4, 1, 4, 1]  # per step: the completions (4 rows), then the LM loss on ceil(0.25 x 4) = 1 row
    lm = [entry["loss/lm"] for entry in trainer.state.log_history if "loss/lm" in entry]
    assert len(lm) == 2 and all(math.isfinite(value) for value in lm)


def test_lm_loss_is_on_by_default_when_there_is_text_to_model(make_config, make_student, teacher, tokenizer, task):
    """lm_loss_weight=None: 1.0 with reference completions (GKD's `messages`, or `lm_dataset`), off with a warning
    that says what to do for prompts alone; an explicit 0.0 is off and silent."""
    import warnings

    trainer = build(make_config, make_student(), teacher, tokenizer, task.conversations(), lm_loss_weight=None)
    assert trainer.args.lm_loss_weight == 1.0
    text = Dataset.from_dict({"text": ["q1 -> a b c </s>"] * 16})
    trainer = ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=make_config(lm_loss_weight=None),
                                      train_dataset=task.prompt_dataset(), processing_class=tokenizer, lm_dataset=text)
    assert trainer.args.lm_loss_weight == 1.0
    with pytest.warns(UserWarning, match="no text for the LM loss.*lm_loss_weight=0.0 to silence"):
        trainer = build(make_config, make_student(), teacher, tokenizer, task.prompt_dataset(), lm_loss_weight=None)
    assert trainer.args.lm_loss_weight == 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no text for the LM loss.*")
        assert build(make_config, make_student(), teacher, tokenizer, task.prompt_dataset()).args.lm_loss_weight == 0
    assert ReverseKLDistillConfig(output_dir="unused", use_cpu=True).lm_loss_weight is None  # the default


def test_teacher_with_padded_vocabulary_rows_is_aligned(make_config, make_student, teacher, tokenizer, task):
    student = make_student(padded_vocab_rows=7)
    trainer = build(make_config, student, teacher, tokenizer, task.prompt_dataset())
    assert trainer.vocab_size == len(tokenizer)
    trainer.train()


@pytest.mark.parametrize(
    "dataset, message",
    [
        (Dataset.from_dict({"prompt": []}), "is empty"),
        (Dataset.from_dict({"text": ["hello"]}), "expected `prompt`"),
        (Dataset.from_dict({"messages": [[{"role": "user", "content": "q1"}]]}), "must end with an assistant turn"),
    ],
)
def test_bad_datasets_are_rejected(make_config, make_student, teacher, tokenizer, dataset, message):
    with pytest.raises(ValueError, match=message):
        build(make_config, make_student(), teacher, tokenizer, dataset)


def test_long_prompts_are_rejected(make_config, make_student, teacher, tokenizer):
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "q1 " * 20}]]})
    with pytest.raises(ValueError, match="row 0: the prompt has"):
        build(make_config, make_student(), teacher, tokenizer, dataset, max_length=12, max_new_tokens=4)


def test_teacher_with_another_tokenizer_is_rejected(tmp_path, make_config, make_student, tokenizer, task):
    from rkd_trl.demo.synthetic import build_tokenizer, tiny_causal_lm

    # Same vocabulary size, different token -> id map.
    words = [f"w{i}" for i in range(len(tokenizer) - 5)]
    other = build_tokenizer(words)
    assert len(other) == len(tokenizer)
    tiny_causal_lm(other).save_pretrained(tmp_path / "teacher")
    other.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="cross-tokenizer"):
        build(make_config, make_student(), str(tmp_path / "teacher"), tokenizer, task.prompt_dataset())
