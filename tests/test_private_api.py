"""The private names of TRL, transformers and torch that rkd-trl relies on (`rkd_trl.private_api.PRIVATE_API`) exist in
the installed versions, and the list is complete: every private method of a parent that the trainer overrides is on
it. A failure names the entry, so an upgrade says exactly what moved."""

import importlib

import pytest
import transformers
import trl

from rkd_trl import ReverseKLDistillTrainer
from rkd_trl.private_api import PRIVATE_API
from rkd_trl.reliability import ReliableTrainingMixin

VERSIONS = f"transformers {transformers.__version__}, trl {trl.__version__}"


def owner_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("entry", [e for e in PRIVATE_API if e.kind != "attribute"], ids=lambda e: f"{e.owner}.{e.name}")
def test_each_private_method_and_class_attribute_exists(entry):
    value = getattr(owner_class(entry.owner), entry.name, None)
    assert value is not None and (entry.kind not in ("method", "function") or callable(value)), (
        f"{entry.owner}.{entry.name} is gone in {VERSIONS}; rkd-trl uses it in {entry.use}"
    )


def test_each_private_attribute_is_set_by_the_parent(make_config, make_student, teacher, tokenizer, task):
    trainer = ReverseKLDistillTrainer(model=make_student(), teacher_model=teacher, args=make_config(max_steps=1),
                                      train_dataset=task.prompt_dataset(), processing_class=tokenizer)  # fmt: skip
    missing = [f"{e.owner}.{e.name} ({e.use})" for e in PRIVATE_API if e.kind == "attribute" and not hasattr(trainer, e.name)]
    assert not missing, f"attributes no longer set in {VERSIONS}: {missing}"


def test_every_overridden_private_method_is_listed():
    listed = {e.name for e in PRIVATE_API if e.kind != "attribute"}
    parents = [cls for cls in ReverseKLDistillTrainer.__mro__ if not cls.__module__.startswith("rkd_trl")]
    overridden = {
        name
        for cls in (ReverseKLDistillTrainer, ReliableTrainingMixin)
        for name in vars(cls)
        if name.startswith("_") and not name.startswith("__") and any(hasattr(parent, name) for parent in parents)
    }
    assert overridden <= listed, f"overridden but not in PRIVATE_API: {sorted(overridden - listed)}"
