"""The documentation stays true: the configuration reference matches the config's help metadata, and what the
quickstart's commands write is ignored by git, and no sentence is left unfinished."""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

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


def shell_commands(page: str) -> list[str]:
    """The commands of a page: lines of its ```bash blocks (continuation lines joined) and inline code spans."""
    blocks = re.findall(r"```bash\n(.*?)```", page, flags=re.DOTALL)
    lines = [line.split("#")[0].strip() for line in "\n".join(blocks).replace("\\\n", " ").splitlines()]
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", page, flags=re.DOTALL))
    return [line for line in lines + inline if line]


def written_paths(page: str) -> set[str]:
    """Files and folders that the commands and Python snippets of a page write in the current directory."""
    paths = set()
    for command in shell_commands(page):
        paths.update(re.findall(r"make_tiny_models\.py (\S+)", command))
        named = re.findall(r"--output(?:_dir|-dir)? (\S+)", command)
        paths.update(named)
        recipe = re.search(r"--config (\S+\.yaml)", command)
        if recipe and not re.search(r"--output_dir ", command):
            paths.add(yaml.safe_load((REPO / recipe.group(1)).read_text())["output_dir"])
    paths.update(re.findall(r"""output_dir=["']([^"']+)["']""", page))
    return paths


def test_what_the_quickstart_writes_is_ignored_by_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    pages = [(REPO / "docs" / "quickstart.md").read_text(), (REPO / "README.md").read_text()]
    paths = set().union(*(written_paths(page) for page in pages))
    assert {"tiny", "tiny-student-rkd", "results.json"} <= paths  # the commands were found
    not_ignored = [
        path for path in sorted(paths)
        if subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO).returncode != 0
    ]  # fmt: skip
    assert not not_ignored, f"add to .gitignore what the documented commands write: {not_ignored}"


def test_no_sentence_ends_in_a_colon_with_nothing_after_it():
    pages = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
    dangling = []
    for page in pages:
        text = re.sub(r"```.*?```", "(code block)", page.read_text(), flags=re.DOTALL)
        paragraphs = [paragraph.strip() for paragraph in re.split(r"\n\s*\n", text) if paragraph.strip()]
        for paragraph, following in zip(paragraphs, [*paragraphs[1:], None]):
            if paragraph.endswith(":") and (following is None or following.startswith("#")):
                dangling.append(f"{page.relative_to(REPO)}: …{paragraph[-60:]}")
    assert not dangling, dangling
