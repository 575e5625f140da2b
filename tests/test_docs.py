"""The documentation stays true: the configuration reference matches the config's help metadata, the architecture
tables match the catalog of tests/architectures.py."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_the_config_help():
    module = load_script("config_reference")
    page = (REPO / "docs" / "configuration.md").read_text()
    assert module.generated_section(page) == module.field_table(), (
        "docs/configuration.md is out of date: run `PYTHONPATH=src python docs/config_reference.py`"
    )
    assert "| `teacher_mix_alpha` | `0.2` |" in page  # the table holds the fields, not an empty section


def test_architecture_tables_are_generated_from_the_catalog():
    module = load_script("architectures")
    page = (REPO / "docs" / "architectures.md").read_text()
    assert module.generated_section(page) == module.family_tables(), (
        "docs/architectures.md is out of date: run `PYTHONPATH=src python docs/architectures.py`"
    )
    assert "| `llama` | `LlamaForCausalLM` | supported |" in page
