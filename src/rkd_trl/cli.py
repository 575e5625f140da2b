"""`rkd-trl` command line: `rkd-trl demo` distils a tiny student on a synthetic task, with nothing downloaded."""

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch


def _demo(options):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from . import ReverseKLDistillConfig, ReverseKLDistillTrainer
    from .metrics import reverse_kl_estimate, sample_with_scores, validity
    from .synthetic import MultiAnswerTask, tiny_causal_lm, train_causal_lm

    hf_logging.set_verbosity_error()
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    task = MultiAnswerTask(num_prompts=12, answers_per_prompt=3, answer_length=3, num_letters=8, seed=options.seed)
    tokenizer = task.tokenizer()
    max_new_tokens = task.answer_length + 2

    # The teacher is trained from scratch on the task and cached, keyed by the task and model settings.
    teacher_settings = {"task": task.answers, "hidden": 64, "layers": 2, "steps": 400, "seed": options.seed}
    key = hashlib.sha256(json.dumps(teacher_settings, sort_keys=True).encode()).hexdigest()[:12]
    teacher_dir = output / f"teacher-{key}"
    if (teacher_dir / "config.json").exists():
        print(f"teacher: cached at {teacher_dir}")
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    else:
        print("teacher: training a 2-layer model on the task from scratch ...")
        teacher = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, seed=options.seed)
        train_causal_lm(teacher, tokenizer, task.conversations(), steps=400, lr=3e-3, seed=options.seed)
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
    teacher.eval()

    print("student: 1-layer model, briefly SFT-initialised on the task (as in the paper) ...")
    student = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=options.seed + 1)
    train_causal_lm(student, tokenizer, task.conversations(), steps=options.sft_steps, lr=3e-3, seed=options.seed)

    def measure(model):
        torch.manual_seed(options.seed)
        prompts = [p for p in task.prompts for _ in range(16)]
        _, answers = sample_with_scores(model, teacher, tokenizer, prompts, max_new_tokens)
        kl = reverse_kl_estimate(model, teacher, tokenizer, task.prompts, max_new_tokens, samples_per_prompt=16)
        return {"validity": validity(task, prompts, answers), **kl}

    before = measure(student)
    args = ReverseKLDistillConfig(
        output_dir=str(output / "student"),
        max_new_tokens=max_new_tokens,
        per_device_train_batch_size=16,
        max_steps=options.steps,
        learning_rate=options.learning_rate,
        teacher_mix_alpha=0.2,
        logging_steps=max(1, options.steps // 10),
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        seed=options.seed,
    )
    trainer = ReverseKLDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=task.prompt_dataset(repeats=50),
        processing_class=tokenizer,
    )
    print(f"distilling for {options.steps} steps (teacher_mix_alpha=0.2) ...")
    trainer.train()
    after = measure(student.eval())
    trainer.save_model()
    trainer.create_model_card(model_name="rkd-trl-demo-student")

    teacher_scores = measure(teacher)
    rows = [("teacher", teacher_scores), ("student before", before), ("student after", after)]
    print()
    print(f"{'model':<16}{'validity':>10}{'reverse KL':>18}{'length':>9}")
    for name, scores in rows:
        kl = f"{scores['reverse_kl']:.2f} ± {scores['reverse_kl_stderr']:.2f}"
        print(f"{name:<16}{scores['validity']:>10.1%}{kl:>18}{scores['length']:>9.2f}")
    print("\nvalidity: share of sampled answers that are one of the prompt's valid answers")
    print("reverse KL: Monte-Carlo KL(student || teacher) over whole responses, nats")
    print(f"student and model card written to {args.output_dir}")
    (output / "demo_metrics.json").write_text(json.dumps(dict(rows), indent=2))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="rkd-trl",
        description="MiniLLM-style reverse-KL distillation for Hugging Face TRL.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="distil a tiny student from a tiny teacher on a synthetic multi-answer task (CPU, no downloads)",
        description="Trains (or loads from cache) a tiny teacher on a synthetic task where every prompt has several "
        "valid answers, SFT-initialises a smaller student, distils it with ReverseKLDistillTrainer and prints a "
        "before/after table.",
    )
    demo.add_argument("--output-dir", default="rkd-trl-demo", help="where the teacher cache, student and card go")
    demo.add_argument("--steps", type=int, default=300, help="distillation optimizer steps")
    demo.add_argument("--sft-steps", type=int, default=200, help="SFT steps that initialise the student")
    demo.add_argument("--learning-rate", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    if options.command == "demo":
        _demo(options)


if __name__ == "__main__":
    main()
