"""Where bf16 autocast costs time in a rollout on this machine: the real SmolLM2-135M-Instruct teacher (30 layers)
and a student keeping 10 of its layers, 8 prompts, 32 new tokens, each call under one autocast block
(`probe.compute_precision`) or in float32: transformers' `generate` for the student, our sampler for the student
alone, at α = 0 (the teacher scoring once) and at α = 0.2, and the teacher's plain forward; the sampler again with
both models prepared by accelerate for bf16 (an autocast block per forward call, as in the trainer); and the products
of one layer and of the output head in bf16 and float32. Writes docs/benchmarks/bf16_rollout.json.

    PYTHONPATH=src python benchmarks/bf16_rollout.py     # ~3 min on 2 cores
"""

import json
import platform
import time
from pathlib import Path

import torch

from rkd_trl.demo.models import keep_layers, load_smollm2
from rkd_trl.probe import compute_precision
from rkd_trl.sampling import sample_teacher_mixed

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "bf16_rollout.json"


def best_of(function, repeat: int = 2) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    torch.set_num_threads(2)
    teacher, tokenizer = load_smollm2()
    student = keep_layers(teacher, [0, 1, 2, 3, 4, 5, 6, 27, 28, 29]).eval()
    teacher.eval()
    prompts = [[{"role": "user", "content": f"Explain item {i} of the list in two sentences."}] for i in range(8)]
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    sampling = dict(vocab_size=len(tokenizer), max_new_tokens=32, eos_token_ids=[-1], pad_token_id=tokenizer.pad_token_id)
    full_ids, full_mask = torch.cat([ids, ids[:, :32]], 1), torch.cat([mask, torch.ones_like(ids[:, :32])], 1)
    results = {"seconds": {}, "matmul_ms": {}}
    for precision, dtype in (("float32", None), ("bf16 autocast", torch.bfloat16)):

        def block(model):
            return compute_precision(model, dtype) if dtype else torch.autocast("cpu", enabled=False)

        def generate():
            with block(student), torch.no_grad():
                student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32,
                                 do_sample=True, top_k=0, pad_token_id=tokenizer.pad_token_id)  # fmt: skip

        def ours(teacher_model, alpha):
            def run():
                with block(student), torch.no_grad():
                    sample_teacher_mixed(student, teacher_model, ids, mask, alpha=alpha, **sampling)

            return run

        def teacher_forward():
            with block(teacher), torch.no_grad():
                teacher(input_ids=full_ids, attention_mask=full_mask)

        results["seconds"][precision] = {
            "generate (student, 32 tokens)": best_of(generate),
            "our sampler, student alone": best_of(ours(None, 0.0)),
            "our sampler, alpha=0 (teacher scores once)": best_of(ours(teacher, 0.0)),
            "our sampler, alpha=0.2": best_of(ours(teacher, 0.2)),
            "teacher plain forward (8 x prompt+32)": best_of(teacher_forward),
        }
        print(precision, json.dumps(results["seconds"][precision], indent=1), flush=True)
    # As the trainer runs them: prepared by accelerate for bf16 mixed precision, each forward call in an autocast
    # block of its own (the casts of the weights are cached for one call only, and never for frozen weights).
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    for model in (student, teacher):
        accelerator.prepare_model(model, evaluation_mode=True)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)  # frozen, as the trainer holds it

    def prepared(teacher_model, alpha):
        def run():
            with torch.no_grad():
                sample_teacher_mixed(student, teacher_model, ids, mask, alpha=alpha, **sampling)

        return run

    results["seconds"]["bf16, accelerate-prepared (autocast per call)"] = {
        "our sampler, student alone": best_of(prepared(None, 0.0)),
        "our sampler, alpha=0 (teacher scores once)": best_of(prepared(teacher, 0.0)),
        "our sampler, alpha=0.2": best_of(prepared(teacher, 0.2)),
    }
    print(json.dumps(results["seconds"]["bf16, accelerate-prepared (autocast per call)"], indent=1), flush=True)
    x, layer, head = torch.randn(560, 576), torch.randn(1536, 576), torch.randn(49152, 576)
    for name, weight in (("[560,576] x [576,1536]", layer), ("[560,576] x [576,49152] (head)", head)):
        x16, weight16 = x.bfloat16(), weight.bfloat16()
        results["matmul_ms"][name] = {
            "float32": 1000 * best_of(lambda: x @ weight.T, 5),  # noqa: B023 (timed at once)
            "bf16": 1000 * best_of(lambda: x16 @ weight16.T, 5),  # noqa: B023
        }
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    results["machine"] = {
        "processor": platform.processor() or platform.machine(),
        "avx512_bf16": "avx512_bf16" in cpu_flags,
        "amx_bf16": "amx_bf16" in cpu_flags,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
