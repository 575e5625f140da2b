"""Distil a tiny student from a tiny teacher with ReverseKLDistillTrainer, on models built locally.

    python examples/distill.py

Replace the models, tokenizer and dataset with your own (hub ids or local paths work for `model` and
`teacher_model`); the dataset may be GKD's `messages` format or DistillationTrainer's `prompt` format.
"""

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.synthetic import MultiAnswerTask, tiny_causal_lm, train_causal_lm

task = MultiAnswerTask()
tokenizer = task.tokenizer()
teacher = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, seed=0)
train_causal_lm(teacher, tokenizer, task.conversations(), steps=300)
student = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, seed=1)

args = ReverseKLDistillConfig(
    output_dir="distilled-student",
    teacher_mix_alpha=0.2,
    max_new_tokens=8,
    per_device_train_batch_size=8,
    max_steps=50,
    learning_rate=3e-3,
    logging_steps=10,
    report_to=[],
    bf16=False,
    gradient_checkpointing=False,
)
trainer = ReverseKLDistillTrainer(
    model=student,
    teacher_model=teacher,
    args=args,
    train_dataset=task.conversations(repeats=10),
    processing_class=tokenizer,
)
trainer.train()
trainer.save_model()
