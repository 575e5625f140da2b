"""The family tables of docs/architectures.md, rendered from the architecture catalog of the tests (a generated block,
see docs/generated.py; `PYTHONPATH=src python docs/generated.py` rewrites it).

The catalog (tests/architectures.py) holds every family of the causal-LM mapping of every supported transformers
release: the decoder-only text families, among them those the start-up probe refuses and those whose finished rows
stay in the batch, the excluded families with the reason, and the release that added each family newer than the
oldest supported one. tests/test_architectures.py checks that the installed release ships exactly the families the
catalog lists for it and that the probe returns what the catalog says for each of them; tests/test_docs.py that the
page holds this rendering. The rendering is the same on every supported release: the classes of the families the
installed one lacks come from the catalog.
"""

import importlib.util
from pathlib import Path

CATALOG = Path(__file__).resolve().parents[1] / "tests" / "architectures.py"


def load_catalog():
    spec = importlib.util.spec_from_file_location("architectures", CATALOG)
    catalog = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(catalog)
    return catalog


def status(catalog, model_type: str) -> str:
    """What the start-up probe makes of the family (tests/test_architectures.py holds it to this)."""
    if model_type in catalog.REFUSED:
        return f"refused: {catalog.REFUSED[model_type].reason}"
    notes = []
    if model_type in catalog.KEEPS_ENDED_ROWS:
        notes.append("keeps finished rows in the batch")
    if model_type in catalog.FEEDS_EVERY_TOKEN:
        notes.append("fed every sampled token (no multi-token catch-up)")
    return ", ".join(["supported", *notes])


def releases(catalog, model_type: str) -> str:
    """The supported transformers releases that ship the family."""
    if model_type in catalog.ADDED:
        return f"{catalog.ADDED[model_type].release} and later"
    return "all"


def family_tables() -> str:
    """Markdown: a summary line, the catalogued families with the releases that ship them and their status, the
    excluded families with the reason."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as INSTALLED

    catalog = load_catalog()
    classes = {**INSTALLED, **{name: added.causal_lm_class for name, added in catalog.ADDED.items()}}
    families = sorted(catalog.ARCHITECTURES)
    refused = [name for name in families if name in catalog.REFUSED]
    specifiers = sorted(map(str, catalog.supported_transformers()), key=lambda spec: not spec.startswith(">"))
    rows = [
        f"transformers {', '.join(specifiers)} (setup.cfg): {len(families) - len(refused)} families supported "
        f"({len(catalog.KEEPS_ENDED_ROWS)} of them keeping finished rows, {len(catalog.FEEDS_EVERY_TOKEN)} fed every "
        f"sampled token), {len(refused)} refused, "
        f"{len(catalog.EXCLUDED)} excluded. The *releases* column says which supported releases ship a family: all, "
        f"or those from the one that added it ({len(catalog.ADDED)} families are newer than "
        f"{catalog.oldest_supported_transformers()}).",
        "",
        "| family (`model_type`) | causal-LM class | releases | status |",
        "|---|---|---|---|",
        *(f"| `{name}` | `{classes[name]}` | {releases(catalog, name)} | {status(catalog, name)} |"
          for name in families),
        "",
        "Excluded (not decoder-only text language models):",
        "",
        "| family (`model_type`) | causal-LM class | releases | reason |",
        "|---|---|---|---|",
        *(f"| `{name}` | `{classes[name]}` | {releases(catalog, name)} | {catalog.EXCLUDED[name]} |"
          for name in sorted(catalog.EXCLUDED)),
    ]  # fmt: skip
    return "\n".join(rows)


def doc_blocks() -> dict[str, str]:
    """The page's generated block (see docs/generated.py)."""
    return {"families": family_tables() + "\n"}
