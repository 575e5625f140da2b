"""`rkd-trl` command line: help, `train` (YAML + flags), `eval` (Rouge-L, exact match, reverse KL)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rkd_trl.cli import main, make_train_parser

REPO = Path(__file__).resolve().parents[1]
OPTIONAL_LIBRARIES = ("bitsandbytes", "deepspeed", "wandb", "trackio")


def run_python(*arguments, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *arguments], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_import_loads_no_optional_library_and_help_prints_nothing_on_stderr():
    loaded = run_python("-c", f"import sys, rkd_trl, rkd_trl.cli; print([m for m in {OPTIONAL_LIBRARIES} if m in sys.modules])")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.splitlines()[-1] == "[]", loaded.stdout
    for command in (["--help"], ["train", "--help"]):
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
    assert f"Teacher: `{tiny}/teacher`" in card
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_train_without_a_teacher_says_which_flag_is_missing(tmp_path, tiny):
    with pytest.raises(ValueError, match="--teacher_model_name_or_path"):
        main(["train", "--model_name_or_path", str(tiny / "student"), "--dataset_name", str(tiny / "data"),
              "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])  # fmt: skip


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


@pytest.mark.parametrize("recipe", sorted(path.name for path in (REPO / "examples" / "recipes").glob("*.yaml")))
def test_every_recipe_parses(recipe):
    from transformers import BitsAndBytesConfig

    from rkd_trl.trainer import teacher_quantization_config

    # GPU recipes ask for bf16; on this CPU only the keys and values are checked.
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated key
        _, training_args, model_args, _ = make_train_parser().parse_args_and_config(
            ["--config", str(REPO / "examples" / "recipes" / recipe), "--bf16", "false", "--use_cpu", "true"]
        )
    assert model_args.model_name_or_path and training_args.teacher_model_name_or_path
    quantization = (training_args.teacher_model_init_kwargs or {}).get("quantization_config")
    if quantization is not None:
        assert isinstance(teacher_quantization_config(quantization), BitsAndBytesConfig)
