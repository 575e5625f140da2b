"""Real text: short instructions shipped with the package, and a teacher's answers to them.

`data/instructions.jsonl` holds 360 short user instructions written for this project (facts, definitions, how-to
steps, short lists, comparisons, advice, rewriting, arithmetic, classification, summaries, translations, short
creative writing), each with a category and a split: 240 `train` (training prompts, SFT data), 60 `dev` (tuning) and
60 `test` (held out: reported, never tuned on).

A teacher's greedy answers (the SeqKD / SFT data, and the references Rouge-L is measured against) are generated with
the model's own `generate` and cached on disk, keyed by the teacher's weights and the generation settings.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset

from . import DATA

DATA_FILE = DATA / "instructions.jsonl"
SPLITS = ("train", "dev", "test")


def load_instructions(split: str | None = None) -> list[str]:
    """The instructions of one split (`train`, `dev`, `test`), or all of them, in file order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: choose one of {SPLITS}.")
    rows = [json.loads(line) for line in DATA_FILE.read_text().splitlines() if line.strip()]
    return [row["instruction"] for row in rows if split is None or row["split"] == split]


def user_turns(prompts: list[str]) -> list[list[dict]]:
    """Conversational prompts (one user turn each), the `prompt` format of TRL's trainers."""
    return [[{"role": "user", "content": prompt}] for prompt in prompts]


@dataclass
class Answers:
    """Answers to a list of prompts: the text (special tokens removed), the token ids (EOS included when the answer
    ended) and whether it ended with EOS within the token budget."""

    texts: list[str]
    token_ids: list[list[int]]
    ended: list[bool]


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> Answers:
    """Answers of `model` (its own `generate`, chat template, left padding) to the prompt texts.

    `greedy=False` samples at `temperature` with no top-k / top-p (at 1, the distribution the student is trained on).
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    texts, token_ids, ended = [], [], []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer.apply_chat_template(
                user_turns(prompts[start : start + batch_size]),
                add_generation_prompt=True,
                padding=True,
                return_tensors="pt",
                return_dict=True,
            ).to(device)
            sampling = (
                {"do_sample": False}
                if greedy
                else {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": temperature}
            )
            output = model.generate(
                **batch, **sampling, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
            )
            for row in output[:, batch["input_ids"].size(1) :].tolist():
                end = row.index(eos) + 1 if eos in row else len(row)
                token_ids.append(row[:end])
                ended.append(eos in row)
                texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
    return Answers(texts, token_ids, ended)


def weights_fingerprint(model) -> str:
    """A short hash of a model's class, config and weights (a cache key for anything computed from it)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    digest.update(model.config.to_json_string(use_diff=True).encode())
    for name, parameter in model.state_dict().items():
        digest.update(name.encode())
        digest.update(f"{parameter.double().sum().item():.10e}".encode())
    return digest.hexdigest()[:16]


def cached_teacher_answers(
    teacher, tokenizer, prompts: list[str], max_new_tokens: int, cache_dir, batch_size=16, temperature=None, seed=0
):
    """`generate_answers` of `teacher` (greedy, or sampled at `temperature`), cached in `cache_dir` under a key of its
    weights and the settings."""
    settings = {"teacher": weights_fingerprint(teacher), "prompts": prompts, "max_new_tokens": max_new_tokens}
    if temperature is not None:
        settings.update(temperature=temperature, seed=seed)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"teacher-answers-{key}.json"
    if path.is_file():
        return Answers(**json.loads(path.read_text()))
    answers = generate_answers(
        teacher, tokenizer, prompts, max_new_tokens, greedy=temperature is None,
        temperature=temperature or 1.0, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(answers.__dict__))
    return answers


def conversations(prompts: list[str], answers: Answers, ended_only: bool = True) -> Dataset:
    """GKD-format `messages` (user prompt, assistant answer) for SFT or a reference completion. The chat template
    closes every assistant turn with EOS, so with `ended_only` answers cut off by the token budget are left out
    rather than taught as complete."""
    rows = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        for prompt, text, ended in zip(prompts, answers.texts, answers.ended, strict=True)
        if ended or not ended_only
    ]
    return Dataset.from_dict({"messages": rows})


def sft_student(student, tokenizer, prompts: list[str], answers: list[Answers], output_dir, **config):
    """Supervised fine-tuning of `student` on answers to `prompts` (TRL's `SFTTrainer`, loss on the answer tokens
    only): the usual initialisation of a distillation student (the MiniLLM paper and reference code SFT the student
    first). Each `Answers` in `answers` adds its ended answers; answers cut off by the token budget are left out.
    `config`: `SFTConfig` fields (steps, learning rate, batch size, ...). Returns the trained student in eval mode."""
    from trl import SFTConfig, SFTTrainer

    rows = [
        (prompt, text)
        for source in answers
        for prompt, text, ended in zip(prompts, source.texts, source.ended, strict=True)
        if ended
    ]
    if not rows:
        raise ValueError(
            "None of the answers ended (EOS) within their token budget, so there is nothing to fine-tune on: generate "
            "them with a larger max_new_tokens."
        )
    dataset = Dataset.from_dict(
        {
            "prompt": user_turns([prompt for prompt, _ in rows]),
            "completion": [[{"role": "assistant", "content": text}] for _, text in rows],
        }
    )
    settings = dict(save_strategy="no", report_to=[], activation_checkpointing=False, disable_tqdm=True)
    args = SFTConfig(output_dir=str(output_dir), **{**settings, **config})
    SFTTrainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    return student.eval()
