"""The field table of docs/configuration.md, from the help metadata of `ReverseKLDistillConfig` (a generated block,
see docs/generated.py). After changing a field:

    PYTHONPATH=src python docs/generated.py

tests/test_docs.py checks that the page holds the table this renders, so a new or changed field must be documented
before the tests pass.
"""

import dataclasses


def field_table() -> str:
    """Markdown table of the fields `ReverseKLDistillConfig` adds to or redefines from `trl.DistillationConfig`."""
    from trl import DistillationConfig

    from rkd_trl import ReverseKLDistillConfig

    parent = {field.name: field for field in dataclasses.fields(DistillationConfig)}
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(ReverseKLDistillConfig):
        inherited = parent.get(field.name)
        if inherited is not None and (inherited.default, inherited.metadata) == (field.default, field.metadata):
            continue
        meaning = field.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{field.name}` | `{field.default}` | {meaning} |")
    return "\n".join(rows)


def doc_blocks() -> dict[str, str]:
    return {"fields": field_table()}
