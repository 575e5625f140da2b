"""How the student's model card (`ReverseKLDistillTrainer.create_model_card`) names the models and the data: a Hub
repository id as a link to its Hub page (and in the card's metadata), a local path as a path, never as a Hub link,
and a model object without a name by its class. The name of a model is the `config.name_or_path` it was loaded from;
set it to name a model object (`teacher.config.name_or_path = "org/teacher"`)."""

import os

from huggingface_hub.utils import HFValidationError, validate_repo_id

HUB_URL = "https://huggingface.co"


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
