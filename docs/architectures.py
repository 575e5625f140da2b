"""The family tables of docs/architectures.md, rendered from the architecture catalog of the tests (a generated block,
see docs/generated.py; `PYTHONPATH=src python docs/generated.py` rewrites it).

The catalog (tests/architectures.py) holds every family of the installed transformers' causal-LM mapping: the
decoder-only text families, among them those the start-up probe refuses and those whose finished rows stay in the
batch, and the excluded families with the reason. tests/test_architectures.py checks that the probe returns exactly
that for every family, and tests/test_docs.py that the page holds this rendering.
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
    if model_type in catalog.KEEPS_ENDED_ROWS:
        return "supported, keeps finished rows in the batch"
    return "supported"


def family_tables() -> str:
    """Markdown: a summary line, the catalogued families with their status, the excluded families with the reason."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CLASSES

    catalog = load_catalog()
    families = sorted(catalog.ARCHITECTURES)
    refused = [name for name in families if name in catalog.REFUSED]
    rows = [
        f"transformers {transformers.__version__}: {len(families) - len(refused)} families supported "
        f"({len(catalog.KEEPS_ENDED_ROWS)} of them keeping finished rows), {len(refused)} refused, "
        f"{len(catalog.EXCLUDED)} excluded.",
        "",
        "| family (`model_type`) | causal-LM class | status |",
        "|---|---|---|",
        *(f"| `{name}` | `{CLASSES[name]}` | {status(catalog, name)} |" for name in families),
        "",
        "Excluded (not decoder-only text language models):",
        "",
        "| family (`model_type`) | causal-LM class | reason |",
        "|---|---|---|",
        *(f"| `{name}` | `{CLASSES[name]}` | {catalog.EXCLUDED[name]} |" for name in sorted(catalog.EXCLUDED)),
    ]
    return "\n".join(rows)


def doc_blocks() -> dict[str, str]:
    """The page's generated block (see docs/generated.py)."""
    return {"families": family_tables() + "\n"}
