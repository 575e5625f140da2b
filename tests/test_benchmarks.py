"""Smoke run of the quality benchmark: every method trains and every metric is produced and reported; the report's
tables read the saved results as the run wrote them."""

import importlib.util
import json
import math
from pathlib import Path

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
    page = (REPO / "docs" / "benchmarks.md").read_text()
    for task_name, task_results in results["tasks"].items():
        table = quality.sweep_table(task_results, results["settings"]["learning_rates"])
        assert table in page, f"the sweep table of task {task_name} in docs/benchmarks.md is not the saved results'"
        assert "–" not in table  # every method ran at every learning rate of the sweep
