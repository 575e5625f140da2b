"""How far the start-up probe's tolerance lies from rounding and from defects: the margins behind `NOISE_MULTIPLE`.

For the real SmolLM2-135M-Instruct teacher (30 layers) and a student keeping 2 of its layers, in float32, bf16 and fp16
autocast over float32 weights, and bf16 weights: the noise floor by source, the discrepancy of correct decoding and of
the output head, and that of each injected defect of `tests/defects.py`, all as multiples of the floor. For every family
of the architecture catalog (tiny random models), in float32, bf16 autocast and bf16 weights: the same ratio of correct
decoding, and the refused families' own. Writes docs/benchmarks/probe_margins.json and the tables of docs/reliability.md
(`doc_blocks`).

    PYTHONPATH=src python benchmarks/probe_margins.py      # ~5 min on 2 CPU cores (bf16 emulated without native bf16)
"""

import gc
import json
import platform
import runpy
import sys
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
RESULTS = REPO / "docs" / "benchmarks" / "probe_margins.json"

from architectures import (  # noqa: E402
    ARCHITECTURES,
    REFUSED,
    REFUSED_IN_16_BIT,
    TOKENIZER,
    VOCAB_SIZE,
    tiny_model,
)
from defects import DEFECTS, head_misses_a_logit_multiplier, reordered_cache_loses_a_row  # noqa: E402

from rkd_trl.probe import (  # noqa: E402
    NOISE_MULTIPLE,
    _ForwardProbe,
    _plain_logprobs,
    _probe_batch,
    distribution_discrepancy,
)
from rkd_trl.scoring import OutputHead, final_hidden_states  # noqa: E402

# name -> (compute_dtype under autocast, weights' dtype)
PRECISIONS = {
    "float32": (None, torch.float32),
    "bf16 autocast": (torch.bfloat16, torch.float32),
    "fp16 autocast": (torch.float16, torch.float32),
    "bf16 weights": (None, torch.bfloat16),
}
CATALOG_PRECISIONS = ("float32", "bf16 autocast", "bf16 weights")
PAGE = REPO / "docs" / "reliability.md"


def _ratio(discrepancy, floor):
    return discrepancy / floor if isinstance(discrepancy, float) else None


@torch.no_grad()
def probe_figures(model, vocab_size, pad_token_id, precision) -> dict:
    """Floor, tolerance and the discrepancies (as multiples of the floor) in the precision training computes in."""
    compute_dtype, weights = PRECISIONS[precision]
    model = model.to(weights)
    probe = _ForwardProbe(model, vocab_size, pad_token_id, _probe_batch(vocab_size, pad_token_id, "cpu"),
                          compute_dtype, "model")  # fmt: skip
    floor = probe.noise.floor
    figures = {
        "floor": floor, "sources": probe.noise.sources, "minimum": probe.noise.minimum, "tolerance": probe.noise.tolerance,
        "head": _ratio(probe.head_discrepancy, floor), "decoding": _ratio(probe.decode_discrepancy(True), floor),
        "defects": {},
    }  # fmt: skip
    injected = {name: inject for name, (model_type, inject) in DEFECTS.items() if model_type == "llama"}
    for name, inject in injected.items():
        with inject(model):
            figures["defects"][name] = _ratio(probe.decode_discrepancy(True), floor)
    with reordered_cache_loses_a_row():
        figures["defects"]["reordered cache loses a row"] = _ratio(probe.decode_discrepancy(True), floor)
    with head_misses_a_logit_multiplier(2.0):
        figures["defects"]["head misses a logit multiplier (×2)"] = _ratio(head_discrepancy(probe), floor)
    return figures


@torch.no_grad()
def head_discrepancy(probe) -> float:
    """`distribution_discrepancy` of the output head on the final hidden states from the model's own logits, as the
    probe computes it."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = probe.batch
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    valid = mask.bool()
    with probe.precision():
        expected = _plain_logprobs(probe.lm, ids, mask, probe.vocab_size)[valid]
        head = OutputHead(probe.lm, probe.vocab_size)
        got = torch.log_softmax(head(final_hidden_states(probe.lm, ids, mask)[valid]), -1)
    return distribution_discrepancy(expected, got)


def real_model() -> dict:
    from rkd_trl.demo.models import keep_layers, load_smollm2

    teacher, tokenizer = load_smollm2()
    results = {}
    for name, layers in (("teacher (30 layers)", None), ("student (layers 0 and 29)", [0, 29])):
        model = teacher if layers is None else keep_layers(teacher, layers)
        results[name] = {}
        for precision in PRECISIONS:
            model = model.float()
            results[name][precision] = probe_figures(model, len(tokenizer), tokenizer.pad_token_id, precision)
            print(name, precision, json.dumps(results[name][precision]), flush=True)
    return results


@torch.no_grad()
def catalog() -> dict:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch.set_num_threads(1)
    gc.freeze()
    results = {}
    for model_type in sorted(ARCHITECTURES):
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            continue
        results[model_type] = {}
        for precision in CATALOG_PRECISIONS:
            compute_dtype, weights = PRECISIONS[precision]
            model = tiny_model(model_type).to(weights)
            pad = TOKENIZER.pad_token_id
            try:
                probe = _ForwardProbe(model, VOCAB_SIZE, pad, _probe_batch(VOCAB_SIZE, pad, "cpu"), compute_dtype, "model")
            except ValueError as error:
                results[model_type][precision] = {"error": str(error).split(": ", 1)[-1][:200]}
                continue
            ratios = [_ratio(probe.decode_discrepancy(drop), probe.noise.floor) for drop in (True, False)]
            results[model_type][precision] = {"floor": probe.noise.floor, "decoding": ratios}
        print(model_type, json.dumps(results[model_type]), flush=True)
    return results


def _fmt(ratio) -> str:
    return "fails" if ratio is None else f"{ratio:.2g}×"


def doc_blocks() -> dict[str, str]:
    results = json.loads(RESULTS.read_text())
    real = ["| model | precision | noise floor | sources | correct decoding | " + " | ".join(
        results["defect_names"]) + " |", "|---|---|---|---|---|" + "---|" * len(results["defect_names"])]
    for model, by_precision in results["real"].items():
        for precision, figures in by_precision.items():
            sources = ", ".join(f"{name} {value:.2g}" for name, value in figures["sources"].items())
            defects = " | ".join(_fmt(figures["defects"][name]) for name in results["defect_names"])
            real.append(f"| {model} | {precision} | {figures['floor']:.2g} | {sources} | {_fmt(figures['decoding'])} | "
                        f"{defects} |")
    refused_families = sorted({*REFUSED, *(name for names in REFUSED_IN_16_BIT.values() for name in names)})
    catalog_rows = ["| families | " + " | ".join(CATALOG_PRECISIONS) + " |", "|---|" + "---|" * len(CATALOG_PRECISIONS)]
    worst = []
    for precision in CATALOG_PRECISIONS:
        accepted = {}
        for model_type, by_precision in results["catalog"].items():
            figures = by_precision[precision]
            if model_type not in refused_families and "decoding" in figures:
                ratios = [r for r in figures["decoding"] if r is not None]
                accepted[model_type] = min(ratios) if ratios else None
        ratio, model_type = max((r, m) for m, r in accepted.items() if r is not None)
        worst.append(f"{ratio:.2g}× (`{model_type}`)")
    catalog_rows.append(f"| accepted ({len(accepted)}): the largest | " + " | ".join(worst) + " |")
    for model_type in refused_families:
        cells = []
        for precision in CATALOG_PRECISIONS:
            figures = results["catalog"].get(model_type, {}).get(precision)
            if figures is None:
                cells.append("not measured")
            elif "error" in figures:
                cells.append("forward raises")
            else:
                ratios = [r for r in figures["decoding"] if r is not None]
                cells.append(_fmt(min(ratios)) if ratios else "decoding raises")
        catalog_rows.append(f"| `{model_type}` | " + " | ".join(cells) + " |")
    settings = (f"tolerance: {results['noise_multiple']} × floor; torch {results['torch']}, transformers "
                f"{results['transformers']}, {results['cpu']}")
    return {"real-margins": "\n".join(real) + "\n\n" + settings + "\n", "catalog-margins": "\n".join(catalog_rows) + "\n"}


def cpu() -> str:
    """The CPU's model name and whether it computes bf16 natively (else torch emulates it)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    bf16 = "native bf16 (avx512_bf16)" if "avx512_bf16" in info else "bf16 emulated (no avx512_bf16)"
    return f"{name or platform.machine()}, {bf16}"


def main():
    defect_names = [name for name, (model_type, _) in DEFECTS.items() if model_type == "llama"]
    defect_names += ["reordered cache loses a row", "head misses a logit multiplier (×2)"]
    results = {
        "noise_multiple": NOISE_MULTIPLE, "torch": torch.__version__, "transformers": transformers.__version__,
        "cpu": cpu(), "threads": torch.get_num_threads(),
        "defect_names": defect_names, "real": real_model(),
    }  # fmt: skip
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")  # the real model's figures, should the catalog fail
    results["catalog"] = catalog()
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {RESULTS}")
    render = runpy.run_path(str(REPO / "docs" / "generated.py"))["render"]
    PAGE.write_text(render(PAGE.read_text()))
    print(f"updated {PAGE}")


if __name__ == "__main__":
    main()
