"""`rkd-trl` command line: help, `train` (YAML + flags), `eval` (Rouge-L, exact match, reverse KL)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

from rkd_trl.cli import main, make_train_parser

REPO = Path(__file__).resolve().parents[1]
# Libraries the core does not need: the trackers, the backends, and what only rkd_trl.demo / rkd_trl.evaluation use.
OPTIONAL_LIBRARIES = ("bitsandbytes", "deepspeed", "wandb", "trackio", "matplotlib", "evaluate", "rouge_score", "nltk",
                      "gguf", "rkd_trl.demo", "rkd_trl.evaluation")  # fmt: skip


def run_python(*arguments, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *arguments], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_import_loads_no_optional_library_and_help_prints_nothing_on_stderr():
    code = f"import sys, rkd_trl, rkd_trl.cli; print([name for name in {OPTIONAL_LIBRARIES} if name in sys.modules])"
    loaded = run_python("-c", code)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.splitlines()[-1] == "[]", loaded.stdout
    for command in (["--help"], ["eval", "--help"]):  # `train` imports trl: its output is checked by the next test
        result = run_python("-m", "rkd_trl.cli", *command)
        assert result.returncode == 0 and result.stdout.startswith("usage: rkd-trl"), command
        assert result.stderr == "", (command, result.stderr)


def test_training_prints_no_library_notice_or_warning(tmp_path, tiny):
    result = run_python("-m", "rkd_trl.cli", "train", "--config", str(REPO / "examples/recipes/tiny.yaml"),
                        "--max_steps", "1", "--output_dir", str(tmp_path / "out"), cwd=tiny.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = result.stderr.replace("\r", "\n")  # progress bars are expected there, nothing else
    for noise in ("Warning", "warn(", "gemm_4bit_forward", "Setting accelerator"):
        assert noise not in stderr + result.stdout, stderr[-3000:]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "eval"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: rkd-trl train [--config RECIPE.yaml]")
    assert "--teacher_mix_alpha" in out and "--model_name_or_path" in out


def test_train_from_yaml_with_flags_overriding_it(tmp_path, tiny):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        (REPO / "examples/recipes/tiny.yaml").read_text().replace("tiny/", f"{tiny}/").replace("max_steps: 60", "max_steps: 50")
    )
    main(["train", "--config", str(recipe), "--max_steps", "2", "--teacher_mix_alpha", "0.3",
          "--output_dir", str(tmp_path / "out")])  # fmt: skip
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| optimizer steps | 2 |" in card  # the flag beat the YAML's 50
    assert "| `teacher_mix_alpha` | 0.3 |" in card
    assert f"Teacher: `{tiny}/teacher` (a local checkpoint)." in card
    assert (tmp_path / "out" / "model.safetensors").exists()


def failing_command(capsys, *argv):
    """Exit status and stderr of `rkd-trl ARGV`, which must fail."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


def test_train_without_a_teacher_says_which_flag_is_missing(tmp_path, capsys, tiny):
    assert failing_command(capsys, "train", "--model_name_or_path", str(tiny / "student"), "--dataset_name",
                           str(tiny / "data"), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true") == (
        2, "rkd-trl train: error: set the teacher with --teacher_model_name_or_path (a hub id or a local path)\n"
    )  # fmt: skip


@pytest.mark.parametrize(
    "flag, typo, meant",
    [("--dataset_name", "tiny/dta", "tiny/data"), ("--teacher_model_name_or_path", "tiny/teachr", "tiny/teacher"),
     ("--model_name_or_path", "./tny/student", "tiny/student")],
)  # fmt: skip
def test_a_mistyped_local_path_fails_before_loading_and_names_the_closest_path(
    monkeypatch, capsys, tiny, flag, typo, meant
):
    monkeypatch.chdir(tiny.parent)  # the recipe's relative paths, as in the quickstart
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # `tiny/dta` could be a Hub id
    assert failing_command(capsys, "train", "--config", str(REPO / "examples/recipes/tiny.yaml"), flag, typo) == (
        2, f"rkd-trl train: error: {flag} {typo}: no such file or directory (did you mean {meant}?)\n"
    )  # fmt: skip
    assert failing_command(capsys, "eval", "--model", "tiny/student", "--dataset", "tiny/dta") == (
        2, "rkd-trl eval: error: --dataset tiny/dta: no such file or directory (did you mean tiny/data?)\n"
    )  # fmt: skip


def test_a_hub_id_that_is_not_cached_fails_at_once_when_the_hub_is_offline(tmp_path, monkeypatch, capsys, tiny):
    import huggingface_hub

    from rkd_trl.cli_checks import check_source

    monkeypatch.chdir(tiny.parent)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code, error = failing_command(capsys, "train", "--config", str(REPO / "examples/recipes/tiny.yaml"),
                                  "--teacher_model_name_or_path", "some-org/teacher-7b")  # fmt: skip
    assert code == 2 and error.startswith(
        "rkd-trl train: error: --teacher_model_name_or_path some-org/teacher-7b: not a local path, and not in the Hub "
        "cache while the Hub is offline"
    )
    (tmp_path / "hub" / "models--some-org--teacher-7b").mkdir(parents=True)
    check_source("some-org/teacher-7b", "--teacher_model_name_or_path")  # in the cache: left to the libraries


def test_dataset_mixture_paths_are_checked_unless_they_name_a_builder_of_data_files(monkeypatch, tiny):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments
    from trl.scripts.utils import DatasetConfig

    from rkd_trl.cli import check_train_sources
    from rkd_trl.cli_checks import UsageError

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    models = (types.SimpleNamespace(teacher_model_name_or_path=str(tiny / "teacher")),
              ModelConfig(model_name_or_path=str(tiny / "student")))  # fmt: skip
    builder = DatasetConfig(path="json", data_files=str(tiny / "data" / "train.jsonl"))
    check_train_sources(ScriptArguments(), *models, DatasetMixtureConfig(datasets=[builder]))
    with pytest.raises(UsageError, match=f"datasets: path: {tiny}/dta: no such file or directory"):
        check_train_sources(ScriptArguments(), *models, DatasetMixtureConfig(datasets=[DatasetConfig(f"{tiny}/dta")]))


def test_unknown_recipe_keys_and_flags_fail_with_the_closest_field(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("teacher_mix_alfa: 0.3\nenv:\n  SOME_VARIABLE: 1\n")
    assert failing_command(capsys, "train", "--config", str(recipe), "--lerning_rate", "1e-3") == (
        2, f"rkd-trl train: error: unknown key `teacher_mix_alfa` in {recipe} (did you mean teacher_mix_alpha?); "
        "unknown flag --lerning_rate (did you mean --learning_rate?)\n"
    )  # fmt: skip
    assert failing_command(capsys, "train", str(recipe)) == (
        2, f"rkd-trl train: error: unexpected argument {recipe} (a recipe is given with --config {recipe})\n"
    )  # fmt: skip
    assert failing_command(capsys, "eval", "--model", "m", "--dataset", "d", "--sead", "1") == (
        2, "rkd-trl eval: error: unknown flag --sead (did you mean --seed?)\n"
    )  # fmt: skip


def test_a_bad_value_prints_the_config_message_without_a_traceback(capsys):
    assert failing_command(capsys, "train", "--config", str(REPO / "examples/recipes/tiny.yaml"),
                           "--teacher_mix_alpha", "2") == (
        2, "rkd-trl train: error: teacher_mix_alpha must be in [0, 1], got 2.0.\n"
    )  # fmt: skip


def test_an_error_past_the_arguments_keeps_its_traceback(monkeypatch, tmp_path, tiny):
    def fail(*args, **kwargs):
        raise ValueError("raised inside the trainer")

    monkeypatch.setattr("rkd_trl.trainer.ReverseKLDistillTrainer", fail)
    with pytest.raises(ValueError, match="raised inside the trainer"):
        main(["train", "--config", str(REPO / "examples/recipes/tiny.yaml"), "--model_name_or_path",
              str(tiny / "student"), "--teacher_model_name_or_path", str(tiny / "teacher"), "--dataset_name",
              str(tiny / "data"), "--output_dir", str(tmp_path / "out")])  # fmt: skip


def test_eval_of_the_teacher_against_itself_has_zero_reverse_kl(tmp_path, tiny):
    output = tmp_path / "eval.json"
    main(["eval", "--model", str(tiny / "teacher"), "--teacher", str(tiny / "teacher"), "--dataset", str(tiny / "data"),
          "--max-new-tokens", "5", "--samples-per-prompt", "2", "--output", str(output)])  # fmt: skip
    results = json.loads(output.read_text())
    references = {}
    for line in (tiny / "data" / "test.jsonl").open():
        row = json.loads(line)
        references.setdefault(row["prompt"][0]["content"], []).append(row["completion"][0]["content"])
    assert results["num_prompts"] == len(references)
    assert results["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= results["rouge_l"] <= 100.0 and 0.0 <= results["exact_match"] <= 1.0
    sample = results["samples"][0]  # rows sharing a prompt are one prompt with all their references
    assert sorted(sample["references"]) == sorted(references[sample["prompt"].split()[0]])


def recipe_script(recipe: Path) -> str:
    """The program a recipe's header runs it with: `rkd-trl train` or an example script (`examples/<name>.py`)."""
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    script = re.search(r"examples/(\w+)\.py --config|examples/(\w+)\.py \\\n#\s+--config", header)
    if script:
        return f"examples/{script.group(1) or script.group(2)}.py"
    assert f"rkd-trl train --config examples/recipes/{recipe.name}" in header, f"{recipe.name} names no program"
    return "rkd-trl train"


@pytest.mark.parametrize("recipe", sorted(path.name for path in (REPO / "examples" / "recipes").glob("*.yaml")))
def test_every_recipe_parses_with_the_program_it_names(recipe):
    from transformers import BitsAndBytesConfig

    from rkd_trl.teacher import teacher_quantization_config

    path = REPO / "examples" / "recipes" / recipe
    script = recipe_script(path)
    # GPU recipes ask for bf16; on this CPU only the keys and values are checked.
    arguments = ["--config", str(path), "--bf16", "false", "--use_cpu", "true"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated key
        if script == "examples/distill_code.py":  # its own arguments (student, teacher, evaluation) and the config
            spec = importlib.util.spec_from_file_location("distill_code", REPO / script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            options, training_args = module.make_parser().parse_args_and_config(arguments)
            assert options.student != options.teacher
            assert training_args.max_new_tokens and training_args.per_device_train_batch_size
            return
        assert script in ("rkd-trl train", "examples/distill.py"), f"{recipe} runs with {script}: parse it here"
        _, training_args, model_args, _ = make_train_parser().parse_args_and_config(arguments)
    assert model_args.model_name_or_path and training_args.teacher_model_name_or_path
    quantization = (training_args.teacher_model_init_kwargs or {}).get("quantization_config")
    if quantization is not None:
        assert isinstance(teacher_quantization_config(quantization), BitsAndBytesConfig)


def test_a_command_whose_extra_is_missing_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    missing = {"rouge_score"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r"needs rouge_score, not installed: pip install 'rkd-trl\[evaluation\]'"):
        main(["eval", "--model", str(tmp_path), "--dataset", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"pip install 'rkd-trl\[demo\]'"):
        main(["demo", "--output-dir", str(tmp_path)])


def test_the_trainer_imports_nothing_of_the_demo_or_the_evaluation():
    demo_only = ("matplotlib", "evaluate", "rouge_score", "nltk", "gguf", "rkd_trl.demo", "rkd_trl.evaluation")
    loaded = run_python("-c", f"import sys, rkd_trl.trainer; print([n for n in {demo_only} if n in sys.modules])")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.splitlines()[-1] == "[]", loaded.stdout
