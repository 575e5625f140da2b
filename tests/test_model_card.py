"""The model card names the student, the teacher and the data right in every field a Hub page shows: the YAML
metadata, the title, the first sentence's links, the quick-start snippet and the "Distillation" section."""

import re
import types
from pathlib import Path

from huggingface_hub import ModelCard

from rkd_trl import ReverseKLDistillTrainer
from rkd_trl.cli import main

REPO = Path(__file__).resolve().parents[1]
TAGS = {"generated_from_trainer", "trl", "distillation", "minillm", "reverse-kl", "rkd-trl"}
PAPER = "https://huggingface.co/papers/2306.08543"


def fields(card: ModelCard) -> dict:
    """What a Hub page shows of the card: metadata (tags apart), title, Hub links, the model the snippet loads."""
    metadata = card.data.to_dict()
    assert set(metadata.pop("tags")) == TAGS
    return {
        "metadata": metadata,
        "title": card.text.strip().splitlines()[0],
        "hub_links": set(re.findall(r"\]\((https://huggingface\.co/[^)]*)\)", card.text)),
        "quick_start_model": re.search(r'pipeline\("text-generation", model="([^"]*)"', card.text).group(1),
    }


def test_card_of_a_cli_run_on_local_paths_names_them_as_local_paths(tmp_path, monkeypatch, tiny):
    monkeypatch.chdir(tiny.parent)  # the recipe's relative paths, as in the quickstart
    output_dir = tmp_path / "tiny-student-rkd"
    main(["train", "--config", str(REPO / "examples/recipes/tiny.yaml"), "--max_steps", "1",
          "--output_dir", str(output_dir)])  # fmt: skip
    card = ModelCard.load(output_dir / "README.md")

    assert fields(card) == {
        "metadata": {"library_name": "transformers", "model_name": "tiny-student-rkd"},  # no Hub ids, no licence
        "title": "# Model Card for tiny-student-rkd",
        "hub_links": {PAPER},  # no link to a local folder
        "quick_start_model": str(output_dir),
    }
    assert (
        "This model is a fine-tuned version of `tiny/student` (a local checkpoint), distilled from `tiny/teacher` "
        "(a local checkpoint) on `tiny/data` (a local dataset).\n"
    ) in card.text
    assert "Teacher: `tiny/teacher` (a local checkpoint)." in card.text


def test_card_of_a_trainer_given_model_objects(tmp_path, monkeypatch, make_config, make_student, teacher, tokenizer,
                                               task):  # fmt: skip
    import transformers.trainer

    trainer = ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=make_config(max_steps=1),
                                      train_dataset=task.prompt_dataset(), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert fields(card) == {
        "metadata": {"library_name": "transformers", "model_name": "out"},
        "title": "# Model Card for out",
        "hub_links": {PAPER},
        "quick_start_model": str(tmp_path / "out"),
    }
    unnamed = "an unnamed `LlamaForCausalLM` model object"
    assert f"This model is a fine-tuned version of {unnamed}, distilled from {unnamed}.\n" in card.text
    assert f"Teacher: {unnamed}." in card.text

    # Models named after their Hub repositories (`config.name_or_path`), a Hub dataset, a push with a license.
    trainer.model.config.name_or_path = "some-org/student-base"
    trainer.teacher_model.config.name_or_path = "some-org/teacher-7b"
    uploaded = []

    class OfflineHub:  # stands in for the Hub API: the repository exists, the card is recorded at upload
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=f"user/{repo_id}")

        def upload_folder(self, **kwargs):
            uploaded.append(ModelCard.load(tmp_path / "out" / "README.md"))

    monkeypatch.setattr(transformers.trainer, "hf_api", OfflineHub)
    trainer.push_to_hub(dataset_name="some-org/prompts", license="apache-2.0")
    (card,) = uploaded
    assert fields(card) == {
        "metadata": {"base_model": "some-org/student-base", "datasets": ["some-org/prompts"], "license": "apache-2.0",
                     "library_name": "transformers", "model_name": "out"},  # fmt: skip
        "title": "# Model Card for out",
        "hub_links": {PAPER, *(f"https://huggingface.co/{name}" for name in
                                ("some-org/student-base", "some-org/teacher-7b", "datasets/some-org/prompts"))},
        "quick_start_model": "user/out",
    }  # fmt: skip
    assert "Teacher: [some-org/teacher-7b](https://huggingface.co/some-org/teacher-7b)." in card.text
