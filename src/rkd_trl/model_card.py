"""How the student's model card (`ReverseKLDistillTrainer.create_model_card`) names the models and the data: a Hub
repository id as a link to its Hub page (and in the card's metadata), a local path as a path, never as a Hub link,
and a model object without a name by its class. The name of a model is the `config.name_or_path` it was loaded from;
set it to name a model object (`teacher.config.name_or_path = "org/teacher"`)."""

import os
import re
import textwrap

from huggingface_hub import ModelCard
from huggingface_hub.utils import HFValidationError, validate_repo_id

HUB_URL = "https://huggingface.co"


# The paper TRL's model card cites (the trainer's `_paper`).
MINILLM_PAPER = {
    "title": "MiniLLM: Knowledge Distillation of Large Language Models",
    "id": "2306.08543",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{gu2024minillm,
            title        = {{MiniLLM: Knowledge Distillation of Large Language Models}},
            author       = {Yuxian Gu and Li Dong and Furu Wei and Minlie Huang},
            year         = 2024,
            booktitle    = {The Twelfth International Conference on Learning Representations, {ICLR} 2024, Vienna, Austria, May 7-11, 2024},
            publisher    = {OpenReview.net},
            url          = {https://openreview.net/forum?id=5h0qf7IBZZ},
        }"""),
}


def hub_repo_id(name: str | None) -> str | None:
    """`name` when it is a Hub repository id (`owner/name` or `name`) and not a local path; otherwise None."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def model_reference(model) -> str:
    """Markdown naming `model`: a Hub link, a local path, or its class when it has no name."""
    name = getattr(model.config, "name_or_path", None)
    if hub_repo_id(name):
        return f"[{name}]({HUB_URL}/{name})"
    if name:
        return f"`{name}` (a local checkpoint)"
    return f"an unnamed `{type(model).__name__}` model object"


def dataset_reference(name: str | None) -> str | None:
    """Markdown naming the dataset `name` (a Hub link or a local path), or None when there is none."""
    if hub_repo_id(name):
        return f"the [{name}]({HUB_URL}/datasets/{name}) dataset"
    return f"`{name}` (a local dataset)" if name else None


def origin_sentence(student, teacher, dataset_name: str | None) -> str:
    """The card's first sentence: the student's starting point, the teacher and the data."""
    dataset = dataset_reference(dataset_name)
    return (
        f"This model is a fine-tuned version of {model_reference(student)}, distilled from "
        f"{model_reference(teacher)}{f' on {dataset}' if dataset else ''}."
    )


# Settings and metrics the card's "Distillation" section reports, in this order; metrics are the last logged value.
CARD_SETTINGS = ("teacher_mix_alpha", "gamma", "length_normalization", "whiten_advantages",
                 "single_step_regularization", "policy_gradient", "ppo_clip_epsilon", "ppo_epochs", "reward_scaling",
                 "reward_clip", "importance_weight_max", "lm_loss_weight", "temperature", "max_completion_length",
                 "learning_rate")  # fmt: skip
CARD_METRICS = ("minillm/reverse_kl", "minillm/reward_mean", "minillm/importance_weight_mean", "minillm/clip_fraction",
                "completions/mean_length", "completions/clipped_ratio", "loss/single_step", "loss/policy_gradient",
                "loss/lm", "entropy", "train_loss")  # fmt: skip


def distillation_section(args, teacher, global_batch: int, steps: int, log_history: list[dict]) -> str:
    """The card's "Distillation" section: the teacher, the objective, the settings and the last logged metrics."""
    lines = [
        "### Distillation",
        "",
        (
            f"Teacher: {model_reference(teacher)}. Objective: sequence-level reverse KL "
            "`KL(student || teacher)` minimised by policy gradient (MiniLLM), on completions sampled from "
            "`teacher_mix_alpha · teacher + (1 - teacher_mix_alpha) · student`."
        ),
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| `{name}` | {getattr(args, name)} |" for name in CARD_SETTINGS),
        f"| global batch (prompts per optimizer step) | {global_batch} |",
        f"| optimizer steps | {steps} |",
        "",
    ]
    last_logged = {}
    for entry in log_history:
        last_logged.update({key: value for key, value in entry.items() if key in CARD_METRICS})
    if last_logged:
        lines += ["Last logged training metrics (names as in rkd-trl's docs/logging.md):", "",
                  "| metric | value |", "|---|---|"]  # fmt: skip
        lines += [f"| `{name}` | {last_logged[name]:.4g} |" for name in CARD_METRICS if name in last_logged]
        lines.append("")
    return "\n".join(lines) + "\n"


def complete_trl_card(path, student, teacher, dataset_name, license, quick_start_model: str, section: str) -> None:
    """Rewrite the card TRL's template wrote at `path`: the Hub metadata (license, base model and dataset only when
    they are Hub ids), the origin sentence, the quick-start snippet's model and the "Distillation" section."""
    card = ModelCard.load(path)
    card.data.pop("licence")  # a placeholder of TRL's template, not the Hub's `license` field
    card.data.license = license
    card.data.base_model = hub_repo_id(student.config.name_or_path)
    hub_dataset = hub_repo_id(dataset_name)
    card.data.datasets = [hub_dataset] if hub_dataset else None  # the Hub's metadata schema: a list of ids
    origin = origin_sentence(student, teacher, dataset_name)
    card.text = re.sub(r"^This model is a fine-tuned version of .*$", lambda _: origin, card.text, count=1,
                       flags=re.MULTILINE)  # fmt: skip
    card.text = card.text.replace('model="None"', f'model="{quick_start_model}"', 1)
    card.text = card.text.replace("### Framework versions", section + "### Framework versions", 1)
    card.save(path)


def write_distillation_card(trainer, dataset_name: str | None, license: str | None) -> None:
    """Completes the card TRL's `create_model_card` wrote in `trainer.args.output_dir` (`complete_trl_card`) with the
    "Distillation" section of the trainer's teacher, settings and last logged metrics."""
    args = trainer.args
    processes = trainer.accelerator.num_processes
    global_batch = args.per_device_train_batch_size * processes * args.gradient_accumulation_steps
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    section = distillation_section(args, teacher, global_batch, trainer.state.global_step, trainer.state.log_history)
    complete_trl_card(os.path.join(args.output_dir, "README.md"), trainer.model, teacher, dataset_name, license,
                      trainer.hub_model_id or args.output_dir, section)  # fmt: skip
