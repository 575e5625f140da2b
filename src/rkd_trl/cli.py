"""`rkd-trl` command line: `rkd-trl demo` distils a tiny student on a synthetic task, with nothing downloaded."""

import argparse


def _demo(options):
    from .demo import DemoSettings, run_demo

    run_demo(
        DemoSettings(
            output_dir=options.output_dir,
            task=options.task,
            steps=options.steps,
            sft_steps=options.sft_steps,
            learning_rate=options.learning_rate,
            teacher_mix_alpha=options.teacher_mix_alpha,
            seed=options.seed,
        )
    )


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
        "before/after table (validity, Rouge-L, reverse KL, length), a plot and a model card.",
    )
    demo.add_argument("--output-dir", default="rkd-trl-demo", help="where the teacher cache, student and card go")
    demo.add_argument(
        "--task",
        choices=["short", "chain"],
        default="short",
        help="short: 3-letter answers, 4 per prompt; chain: 8-letter answers built in 4 branching steps",
    )
    demo.add_argument("--steps", type=int, default=300, help="distillation optimizer steps")
    demo.add_argument(
        "--sft-steps",
        type=int,
        default=None,
        help="SFT steps that initialise the student (default: 600 short, 800 chain)",
    )
    demo.add_argument("--learning-rate", type=float, default=3e-3)
    demo.add_argument("--teacher-mix-alpha", type=float, default=0.2, help="teacher share α of the sampler")
    demo.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    if options.command == "demo":
        _demo(options)


if __name__ == "__main__":
    main()
