"""Run by `tests/test_distributed.py` under `accelerate launch` (2 processes): train with checkpoints, evaluation and
`load_best_model_at_end`, then print the best checkpoint every process ends with."""

import os
import sys

from accelerate import PartialState

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.demo.synthetic import MultiAnswerTask, tiny_causal_lm

state = PartialState()
task = MultiAnswerTask(num_prompts=8, answers_per_prompt=3, answer_length=3, num_letters=6, seed=0)
tokenizer = task.tokenizer()
args = ReverseKLDistillConfig(
    output_dir=sys.argv[1], max_new_tokens=5, per_device_train_batch_size=2, per_device_eval_batch_size=2,
    max_steps=3, learning_rate=1e-3, report_to=[], bf16=False, use_cpu=True, save_strategy="steps", save_steps=1,
    eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss", seed=0,
)  # fmt: skip
trainer = ReverseKLDistillTrainer(
    model=tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, seed=2),
    teacher_model=tiny_causal_lm(tokenizer, hidden_size=48, num_layers=2, seed=1),
    args=args, train_dataset=task.conversations(), eval_dataset=task.conversations(), processing_class=tokenizer,
)  # fmt: skip
trainer.train()
# Both processes write to one pipe: empty the buffer, then write the line in one call, which a pipe keeps whole (a
# buffered print can be split and glued to the other process's line).
line = f"process {state.process_index} best checkpoint: {trainer.state.best_model_checkpoint}\n"
sys.stdout.flush()
os.write(sys.stdout.fileno(), line.encode())
