"""Ecosystem integrations on CPU: loggers (wandb offline, trackio local), model card and push_to_hub (offline), PEFT
adapter save/reload, bitsandbytes-quantised teacher."""

import json
import types
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig
from transformers import AutoModelForCausalLM
from trl.distributed import DistributedBackend

from rkd_trl import ReverseKLDistillTrainer
from rkd_trl.teacher import BNB_CPU_4BIT_ROW_BLOCK, check_quantized_teacher_placement

REPO = Path(__file__).resolve().parents[1]
# Logged by transformers itself; everything else the trainer logs must be in docs/logging.md.
TRANSFORMERS_METRICS = {"loss", "grad_norm", "learning_rate", "epoch", "step", "step_time", "train_runtime",
                        "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"}  # fmt: skip
# Every metric docs/logging.md documents for a run without LM loss.
LOGGED_METRICS = [
    "minillm/reward_mean", "minillm/reverse_kl", "minillm/importance_weight_mean", "minillm/importance_weight_max",
    "minillm/clip_fraction", "loss/policy_gradient", "loss/single_step", "completions/mean_length",
    "completions/min_length", "completions/max_length", "completions/clipped_ratio", "entropy",
]  # fmt: skip


def build(student, teacher, tokenizer, dataset, args, **kwargs):
    return ReverseKLDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                   processing_class=tokenizer, **kwargs)  # fmt: skip


def test_wandb_offline_and_trackio_receive_metrics_and_completion_tables(
    tmp_path, monkeypatch, make_config, make_student, teacher, tokenizer, task
):
    import trackio.sqlite_storage
    import wandb
    from trackio.sqlite_storage import SQLiteStorage

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setattr(trackio.sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")  # read when trackio is imported
    args = make_config(report_to=["wandb", "trackio"], project="rkd-trl-tests", run_name="logging",
                       trackio_static_space_id=False, log_completions=True, max_steps=2, per_device_train_batch_size=4)  # fmt: skip
    trainer = build(make_student(), teacher, tokenizer, task.prompt_dataset(repeats=2), args)
    trainer.train()
    trainer.end()
    wandb.finish()
    wandb.teardown()  # waits for the wandb service to write the offline run file

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = run_file.read_bytes()
    for name in LOGGED_METRICS:
        assert f"train/{name}".encode() in history, name
    tables = sorted((tmp_path / "wandb").glob("offline-run-*/files/media/table/completions_*.table.json"))
    assert tables
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "prompt", "completion"]
    assert len(table["data"]) == 4 and all(row[1].startswith("q") for row in table["data"])

    logs = SQLiteStorage.get_logs("rkd-trl-tests", "logging")
    logged = [entry for entry in logs if "train/minillm/reverse_kl" in entry]
    assert len(logged) == 2  # logging_steps=1, 2 steps
    expected = [entry["minillm/reverse_kl"] for entry in trainer.state.log_history if "minillm/reverse_kl" in entry]
    assert [entry["train/minillm/reverse_kl"] for entry in logged] == pytest.approx(expected)
    for name in LOGGED_METRICS:
        assert f"train/{name}" in logged[0], name
    assert any("completions" in entry for entry in logs)

    documented = (REPO / "docs" / "logging.md").read_text()
    for entry in trainer.state.log_history:
        for name in set(entry) - TRANSFORMERS_METRICS:
            assert f"`{name}`" in documented, f"{name} is logged but not in docs/logging.md"


def test_model_card_has_citation_teacher_settings_and_final_metrics(
    tmp_path, make_config, make_student, teacher, tokenizer, task
):
    teacher_path = tmp_path / "teacher-checkpoint"
    teacher.save_pretrained(teacher_path)
    tokenizer.save_pretrained(teacher_path)
    args = make_config(teacher_mix_alpha=0.35, gamma=0.9, max_steps=2)
    trainer = build(make_student(), str(teacher_path), tokenizer, task.prompt_dataset(repeats=2), args)
    trainer.train()
    trainer.create_model_card(model_name="tiny-student", dataset_name="synthetic-multi-answer")

    card = (tmp_path / "out" / "README.md").read_text()
    assert "gu2024minillm" in card and "https://huggingface.co/papers/2306.08543" in card
    assert f"Teacher: `{teacher_path}` (a local checkpoint)." in card
    assert "| `teacher_mix_alpha` | 0.35 |" in card and "| `gamma` | 0.9 |" in card
    assert "| optimizer steps | 2 |" in card
    last_kl = [e["minillm/reverse_kl"] for e in trainer.state.log_history if "minillm/reverse_kl" in e][-1]
    assert f"| `minillm/reverse_kl` | {last_kl:.4g} |" in card
    assert card.index("### Distillation") < card.index("### Framework versions")  # inside TRL's card layout


def test_push_to_hub_writes_the_card_and_uploads_the_output_dir(
    tmp_path, monkeypatch, make_config, make_student, teacher, tokenizer, task
):
    import transformers.trainer

    uploads = []

    class OfflineHub:  # stands in for the Hub API: the repository exists, uploads are recorded
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=f"user/{repo_id}")

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, folder_path, (tmp_path / "out" / "README.md").read_text()))

    monkeypatch.setattr(transformers.trainer, "hf_api", OfflineHub)
    trainer = build(make_student(), teacher, tokenizer, task.prompt_dataset(repeats=2), make_config(max_steps=1))
    trainer.train()
    trainer.push_to_hub(dataset_name="synthetic-multi-answer")

    ((repo_id, folder, card),) = uploads
    assert repo_id == "user/out" and folder == str(tmp_path / "out")
    assert "### Distillation" in card and "gu2024minillm" in card
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_lora_student_adapter_is_saved_and_reloads(tmp_path, make_config, make_student, teacher, tokenizer, task):
    student_path = tmp_path / "student"
    make_student().save_pretrained(student_path)
    tokenizer.save_pretrained(student_path)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = make_config(max_steps=3, learning_rate=5e-2)
    trainer = build(str(student_path), teacher, tokenizer, task.prompt_dataset(repeats=2), args, peft_config=lora)
    trainer.train()
    trainer.save_model()

    saved = tmp_path / "out"
    assert (saved / "adapter_config.json").exists() and (saved / "adapter_model.safetensors").exists()
    assert not (saved / "model.safetensors").exists()  # the adapter only, not a copy of the base model
    reloaded = AutoPeftModelForCausalLM.from_pretrained(saved).eval()
    base = AutoModelForCausalLM.from_pretrained(student_path).eval()
    trained = trainer.model.eval()
    input_ids = tokenizer(["q1 -> a b c </s>", "q2 -> d"], padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        trained_logits, reloaded_logits = trained(input_ids).logits, reloaded(input_ids).logits
        base_logits = base(input_ids).logits
    assert torch.allclose(reloaded_logits, trained_logits, atol=1e-5)
    assert (reloaded_logits - base_logits).abs().max() > 1e-3  # the adapter changes the model


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_teacher_from_init_kwargs_trains_on_cpu(
    tmp_path, make_config, make_student, quantizable_teacher, tokenizer, task, bits
):
    import bitsandbytes as bnb

    teacher = quantizable_teacher  # layer sizes that every CPU kernel of bitsandbytes accepts
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    # As written in a YAML recipe: a plain dict, converted to BitsAndBytesConfig by the trainer.
    quantization = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"} if bits == 4 else {"load_in_8bit": True}
    args = make_config(teacher_model_init_kwargs={"quantization_config": quantization}, max_steps=2)
    student = make_student()
    start = {name: p.detach().clone() for name, p in student.named_parameters()}
    trainer = build(student, str(tmp_path / "teacher"), tokenizer, task.prompt_dataset(repeats=2), args)

    layer = trainer.accelerator.unwrap_model(trainer.teacher_model).model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    trainer.train()
    assert any(not torch.equal(p, start[name]) for name, p in student.named_parameters())
    logged = [e["minillm/reverse_kl"] for e in trainer.state.log_history if "minillm/reverse_kl" in e]
    assert logged and all(torch.isfinite(torch.tensor(logged)))


def test_bitsandbytes_teacher_fails_early_where_it_cannot_run(
    tmp_path, monkeypatch, make_config, make_student, teacher, tokenizer, task
):
    from transformers import BitsAndBytesConfig

    teacher.save_pretrained(tmp_path / "teacher")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "teacher", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": "cpu"}
    )

    def backend(zero_stage=0, fsdp_version=None):
        state = types.SimpleNamespace(
            deepspeed_plugin=types.SimpleNamespace(zero_stage=zero_stage) if zero_stage else None,
            fsdp_plugin=types.SimpleNamespace(fsdp_version=fsdp_version) if fsdp_version else None,
        )
        return DistributedBackend(types.SimpleNamespace(state=state))

    for sharded in (backend(zero_stage=3), backend(fsdp_version=2), backend(fsdp_version=1)):
        with pytest.raises(ValueError, match="cannot shard 4-bit or 8-bit"):
            check_quantized_teacher_placement(quantized, sharded)
    check_quantized_teacher_placement(quantized, backend())  # DDP / one process: fine
    check_quantized_teacher_placement(teacher, backend(zero_stage=3))  # unquantised teacher: fine

    monkeypatch.setattr("rkd_trl.teacher.is_bitsandbytes_available", lambda: False)
    args = make_config(teacher_model_init_kwargs={"quantization_config": {"load_in_4bit": True}})
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build(make_student(), str(tmp_path / "teacher"), tokenizer, task.prompt_dataset(), args)


def test_4bit_teacher_rule_is_the_one_of_bitsandbytes_cpu_packing():
    # The trainer's early check (`check_4bit_teacher_runs_on_cpu`) must reject exactly the shapes that bitsandbytes'
    # AVX512-BF16 weight packing fails on. The packing itself is plain tensor code, so this runs on any CPU.
    import bitsandbytes.functional as bnb_functional

    for out_features in (16, 32, 48, 64, 96):
        for in_features in (32, 48, 64, 96, 128):
            weight, state = bnb_functional.quantize_4bit(torch.randn(out_features, in_features), blocksize=64)
            accepted = out_features % BNB_CPU_4BIT_ROW_BLOCK == 0 and in_features % 64 == 0
            try:
                bnb_functional._convert_weight_packed_for_cpu(weight, state)
                packed = True
            except (AssertionError, RuntimeError):
                packed = False
            assert packed == accepted, (out_features, in_features)


def test_4bit_teacher_with_unsupported_layer_sizes_fails_early_on_avx512_bf16_cpus(
    tmp_path, monkeypatch, make_config, make_student, teacher, quantizable_teacher, tokenizer, task
):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: True)
    args = make_config(teacher_model_init_kwargs={"quantization_config": {"load_in_4bit": True}})
    teacher.save_pretrained(tmp_path / "teacher-48")  # hidden size 48: not a multiple of 32
    with pytest.raises(ValueError, match=r"4-bit teacher cannot run on this CPU.*model.layers.0.self_attn.q_proj \(48 -> 48\)"):
        build(make_student(), str(tmp_path / "teacher-48"), tokenizer, task.prompt_dataset(), args)
    quantizable_teacher.save_pretrained(tmp_path / "teacher-64")
    build(make_student(), str(tmp_path / "teacher-64"), tokenizer, task.prompt_dataset(), args)
    # Other CPUs run any size; the trainer's start-up probe runs the teacher, so that case is checked on such CPUs only.
