"""Tokenizers, tiny models and synthetic tasks built locally: nothing is downloaded.

`MultiAnswerTask` (short answers) and `ChainTask` (long multi-step answers) give every prompt several equally valid
answers. A teacher trained on it spreads its mass over
all of them; a student too small to represent them all shows the difference between mode-covering (forward KL: it
mixes tokens of different answers into invalid strings) and mode-seeking (reverse KL: it commits to valid answers).
An exact checker says whether an answer is valid.
"""

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import trange
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
SEPARATOR = "->"
# User turns end with the separator; assistant turns are the answer followed by EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }} " + SEPARATOR + "{% else %}"
    " {{ message['content'] }} </s>{% endif %}"
    "{% endfor %}"
)


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (split on white space) with pad/BOS/EOS/UNK tokens and a chat template."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + [SEPARATOR] + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# A chat format of its own (not ChatML): a student built with it reads prompts differently from a ChatML teacher.
TURN_TOKENS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TURN_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '<|end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 pre-tokenization, every byte representable) trained on `texts`, with the chat
    format `TURN_TEMPLATE`: `<|user|>` / `<|assistant|>` headers, assistant turns closed by `<|end|>`, which is the EOS
    token (`<|pad|>` pads)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TURN_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|end|>")
    tokenizer.chat_template = TURN_TEMPLATE
    return tokenizer


def tiny_causal_lm(
    tokenizer,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    padded_vocab_rows: int = 0,
    seed: int = 0,
    max_position_embeddings: int = 128,
) -> LlamaForCausalLM:
    """A small Llama built from config (random weights) over the tokenizer's vocabulary.

    `padded_vocab_rows` adds embedding rows past the tokenizer, as real checkpoints often have.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer) + padded_vocab_rows,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


class SyntheticTask:
    """A task given by `answers`: prompt → the full list of its valid answers (white-space separated letters).

    Validity is exact (the answer is in the list) and the list doubles as the Rouge-L references.
    """

    answers: dict[str, list[str]]
    num_letters: int

    @property
    def letters(self) -> list[str]:
        return [chr(ord("a") + i) for i in range(self.num_letters)]

    @property
    def prompts(self) -> list[str]:
        return list(self.answers)

    @property
    def max_answer_tokens(self) -> int:
        return max(len(answer.split()) for options in self.answers.values() for answer in options)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        return build_tokenizer(self.prompts + self.letters)

    def is_valid(self, prompt: str, answer: str) -> bool:
        return answer.strip() in self.answers[prompt]

    def references(self, prompt: str) -> list[str]:
        return self.answers[prompt]

    def conversations(self, repeats: int = 1) -> Dataset:
        """GKD format: `messages` = user prompt + one valid assistant answer, each answer `repeats` times."""
        rows = [
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            for _ in range(repeats)
            for prompt, answers in self.answers.items()
            for answer in answers
        ]
        return Dataset.from_dict({"messages": rows})

    def prompt_dataset(self, repeats: int = 1) -> Dataset:
        """DistillationTrainer format: conversational `prompt` column only."""
        rows = [[{"role": "user", "content": prompt}] for _ in range(repeats) for prompt in self.prompts]
        return Dataset.from_dict({"prompt": rows})

    def settings(self) -> dict:
        """Everything that defines the task (a cache key for teachers trained on it)."""
        return {"type": type(self).__name__, "answers": self.answers}


@dataclass
class MultiAnswerTask(SyntheticTask):
    """Short answers: prompts `q<i>` each with `answers_per_prompt` valid answers of `answer_length` letters.

    With `min_answer_length` set, each answer's length is drawn from `min_answer_length..answer_length` instead, so
    that valid answers differ in length (the setting where a bias toward short responses can show).
    """

    num_prompts: int = 12
    answers_per_prompt: int = 3
    answer_length: int = 3
    num_letters: int = 8
    seed: int = 0
    min_answer_length: int | None = None
    answers: dict[str, list[str]] = field(init=False)

    def __post_init__(self):
        rng = random.Random(self.seed)
        self.answers = {}
        for index in range(self.num_prompts):
            options = set()
            while len(options) < self.answers_per_prompt:
                length = self.answer_length
                if self.min_answer_length is not None:
                    length = rng.randint(self.min_answer_length, self.answer_length)
                options.add(" ".join(rng.choice(self.letters) for _ in range(length)))
            self.answers[f"q{index}"] = sorted(options)


@dataclass
class ChainTask(SyntheticTask):
    """Long multi-step answers: `num_steps` segments of `segment_length` letters; at every step the prompt and the
    segment chosen before it allow `branches` next segments.

    Every prompt's valid answers are the `branches ** num_steps` root-to-leaf paths of its own random tree of
    segments. A step that leaves the tree (a segment mixed from two branches) makes the whole answer invalid, and a
    model that generates from its own broken prefixes keeps erring: the setting where exposure bias shows.
    """

    num_prompts: int = 6
    num_steps: int = 4
    branches: int = 2
    segment_length: int = 2
    num_letters: int = 6
    seed: int = 0
    answers: dict[str, list[str]] = field(init=False)

    def __post_init__(self):
        rng = random.Random(self.seed)
        self.answers = {f"c{index}": sorted(self._paths(rng, self.num_steps)) for index in range(self.num_prompts)}

    def _paths(self, rng: random.Random, steps_left: int) -> list[str]:
        if steps_left == 0:
            return [""]
        segments = set()
        while len(segments) < self.branches:
            segments.add(" ".join(rng.choice(self.letters) for _ in range(self.segment_length)))
        return [
            f"{segment} {rest}".strip() for segment in sorted(segments) for rest in self._paths(rng, steps_left - 1)
        ]


def train_causal_lm(
    model, tokenizer, dataset: Dataset, steps: int, lr: float = 3e-3, batch_size: int = 32, seed=0, progress=None
):
    """Plain supervised training on the full chat-templated `messages` (to make a teacher, or SFT a student).

    `progress`: a description to show a progress bar with, or None for none.
    """
    texts = [tokenizer.apply_chat_template(row, tokenize=False) for row in dataset["messages"]]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in trange(steps, desc=progress, disable=progress is None, leave=False):
        rows = torch.randint(len(texts), (batch_size,), generator=generator)
        loss = model(
            input_ids=encoded.input_ids[rows], attention_mask=encoded.attention_mask[rows], labels=labels[rows]
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def cached_teacher(task: SyntheticTask, tokenizer, cache_dir, hidden_size, num_layers, steps, lr=3e-3, seed=0):
    """A teacher trained from scratch on `task` (`train_causal_lm`), saved under `cache_dir` and reloaded when the
    task and training settings are the same (the directory name is a hash of them)."""
    settings = {"task": task.settings(), "hidden": hidden_size, "layers": num_layers, "steps": steps, "lr": lr}
    settings["seed"] = seed
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    teacher_dir = Path(cache_dir) / f"teacher-{key}"
    if (teacher_dir / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(teacher_dir).eval(), teacher_dir
    teacher = tiny_causal_lm(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    train_causal_lm(teacher, tokenizer, task.conversations(), steps=steps, lr=lr, seed=seed, progress="teacher")
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    (teacher_dir / "settings.json").write_text(json.dumps(settings, indent=1))
    return teacher.eval(), teacher_dir
