"""Checks of what a user gives `rkd-trl` (flags, recipe keys, model and dataset names), made before anything is
loaded, so that a typo fails at once with one line that says what to fix and, when a known name is close, which
one was meant: not a traceback, not a download attempt that ends in a connection error about the Hub.
"""

import difflib
import os
from pathlib import Path

# File names that say a dataset or model argument is a local file, not a Hub repository id.
LOCAL_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".yaml", ".yml", ".safetensors")


class UsageError(ValueError):
    """A mistake in a command line or recipe: `rkd-trl` prints the message as one line and exits with status 2."""


def did_you_mean(name: str, known) -> str:
    """` (did you mean X?)` for the name of `known` closest to `name` (difflib), or an empty string."""
    match = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def closest_existing_path(path: str) -> str | None:
    """`path` with each missing component replaced by the closest name in its folder (difflib), if that path exists."""
    wanted = Path(path).expanduser()
    fixed = Path(wanted.anchor or ".")
    for part in wanted.parts[1:] if wanted.anchor else wanted.parts:
        if not (fixed / part).exists():
            siblings = [entry.name for entry in fixed.iterdir()] if fixed.is_dir() else []
            matches = difflib.get_close_matches(part, siblings, n=1)
            if not matches:
                return None
            part = matches[0]
        fixed = fixed / part
    return str(fixed) if fixed.exists() else None


def path_hint(name: str) -> str:
    """` (did you mean P?)` for the existing path closest to `name`, or an empty string."""
    suggestion = closest_existing_path(name)
    return f" (did you mean {suggestion}?)" if suggestion else ""


def looks_local(name: str) -> bool:
    """Whether `name` can only mean a local path: it is not a valid Hub repository id (`./x`, `/x`, `~/x`, `a/b/c`),
    names a file (`train.jsonl`), or starts with a folder that exists here (`tiny/dta` next to `tiny/`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    first, _, rest = name.partition("/")
    return name.endswith(LOCAL_FILE_SUFFIXES) or (bool(rest) and os.path.isdir(first))


def in_hub_cache(name: str, repo_type: str) -> bool:
    """Whether anything of the Hub repository `name` is in the local caches (huggingface_hub's, and for a dataset the
    `datasets` one), where the libraries look for it offline."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folders = [Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type=repo_type)]
    if repo_type == "dataset":
        import datasets

        folders.append(Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___"))
    return any(folder.is_dir() for folder in folders)


def check_source(name: str, argument: str, repo_type: str = "model") -> None:
    """Raise `UsageError` when `name`, given as `argument` (e.g. `--teacher_model_name_or_path`), is neither an
    existing local path nor a Hub repository that can be reached: a local-looking path that does not exist, or,
    while the Hub is offline (`HF_HUB_OFFLINE=1`), a name that is not in the cache either."""
    from huggingface_hub import is_offline_mode

    if Path(name).expanduser().exists():
        return
    if looks_local(name):
        raise UsageError(f"{argument} {name}: no such file or directory{path_hint(name)}")
    if is_offline_mode() and not in_hub_cache(name, repo_type):
        raise UsageError(
            f"{argument} {name}: not a local path, and not in the Hub cache while the Hub is offline "
            f"(HF_HUB_OFFLINE=1){path_hint(name)}. Give a local path, or unset HF_HUB_OFFLINE to download {name} "
            "from the Hub."
        )


def check_file(name: str, argument: str) -> None:
    """Raise `UsageError` when the file `name`, given as `argument`, does not exist."""
    if not Path(name).expanduser().is_file():
        raise UsageError(f"{argument} {name}: no such file{path_hint(name)}")
