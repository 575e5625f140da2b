"""The documentation stays true: the configuration reference matches the config's help metadata."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_generated_from_the_config_help():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "docs" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (REPO / "docs" / "configuration.md").read_text()
    assert module.generated_section(page) == module.field_table(), (
        "docs/configuration.md is out of date: run `PYTHONPATH=src python docs/config_reference.py`"
    )
    assert "| `teacher_mix_alpha` | `0.2` |" in page  # the table holds the fields, not an empty section
