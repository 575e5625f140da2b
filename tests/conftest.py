"""Shared tiny models, tokenizer and task. Everything is built locally; nothing is downloaded."""

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from rkd_trl import ReverseKLDistillConfig  # noqa: E402
from rkd_trl.demo.synthetic import MultiAnswerTask, tiny_causal_lm, train_bpe_tokenizer, train_causal_lm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def task():
    return MultiAnswerTask(num_prompts=8, answers_per_prompt=3, answer_length=3, num_letters=6, seed=0)


@pytest.fixture(scope="session")
def tokenizer(task):
    return task.tokenizer()


@pytest.fixture(scope="session")
def teacher_bpe_tokenizer(task):
    """A tokenizer of another kind for a teacher: byte-level BPE trained on the task's conversations, with its own
    chat template (`synthetic.TURN_TEMPLATE`)."""
    texts = [" ".join(message["content"] for message in row) for row in task.conversations()["messages"]]
    return train_bpe_tokenizer(texts, vocab_size=300)


@pytest.fixture
def bpe_teacher(teacher_bpe_tokenizer):
    """A random-weight teacher over `teacher_bpe_tokenizer`."""
    return tiny_causal_lm(teacher_bpe_tokenizer, hidden_size=32, num_layers=1, seed=3).eval()


@pytest.fixture(scope="session")
def trained_teacher_state(task, tokenizer):
    teacher = tiny_causal_lm(tokenizer, hidden_size=48, num_layers=2, seed=1)
    train_causal_lm(teacher, tokenizer, task.conversations(), steps=150, lr=3e-3)
    return teacher.state_dict()


@pytest.fixture
def teacher(tokenizer, trained_teacher_state):
    """A teacher trained on the task (fresh copy per test)."""
    model = tiny_causal_lm(tokenizer, hidden_size=48, num_layers=2, seed=1)
    model.load_state_dict(trained_teacher_state)
    return model.eval()


@pytest.fixture
def quantizable_teacher(tokenizer):
    """An untrained teacher whose linear layers bitsandbytes' 4-bit kernels accept on every CPU: sizes 64 and 128,
    multiples of the 32-row packing and of the 64-weight quantisation block (the 48-dim `teacher` is not)."""
    return tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, seed=1).eval()


@pytest.fixture
def make_student(tokenizer):
    def make(seed=2, padded_vocab_rows=0):
        return tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, seed=seed, padded_vocab_rows=padded_vocab_rows)

    return make


@pytest.fixture
def make_config(tmp_path):
    """A CPU-sized config; keyword arguments override."""

    def make(**overrides):
        settings = dict(
            output_dir=str(tmp_path / "out"),
            max_new_tokens=5,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            max_steps=2,
            learning_rate=1e-3,
            logging_steps=1,
            report_to=[],
            bf16=False,
            use_cpu=True,
            activation_checkpointing=False,
            save_strategy="no",
            seed=0,
            dataloader_num_workers=0,
            lm_loss_weight=0.0,  # tests that want the LM loss, or its default, say so
        )
        settings.update(overrides)
        return ReverseKLDistillConfig(**settings)

    return make



@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """`examples/make_tiny_models.py`'s models and data (briefly trained), in a folder named `tiny` as in the docs."""
    spec = importlib.util.spec_from_file_location("make_tiny_models", REPO / "examples" / "make_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_models(tmp_path_factory.mktemp("models") / "tiny", teacher_steps=30, student_sft_steps=10)
