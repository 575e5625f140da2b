"""Datasets and batches: the dataset formats the trainer accepts (GKDTrainer's and DistillationTrainer's), and the
token batches of the LM loss (reference completions after their prompts, or plain text). Named like `trl.data_utils`,
whose chat-template rendering they use."""

import math

import torch
from datasets import Dataset, IterableDataset
from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import pad


def to_prompt_completion(dataset: Dataset | IterableDataset | None, name: str):
    """Accept the dataset formats of GKDTrainer (`messages` ending with the assistant turn) and of
    DistillationTrainer (`prompt`, optional `completion`); return the latter."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {key: to_prompt_completion(split, f"{name}[{key!r}]") for key, split in dataset.items()}
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: give at least one prompt.")
    columns = dataset.column_names or []
    if "prompt" in columns:
        return dataset
    if "messages" not in columns:
        raise ValueError(
            f"`{name}` has columns {columns}; expected `prompt` (with optional `completion`), as for "
            "trl.DistillationTrainer, or `messages` (a conversation ending with the assistant turn), as for GKDTrainer."
        )

    def split_last_turn(example, index):
        messages = example["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(
                f"`{name}` row {index}: the conversation in `messages` must end with an assistant turn (the "
                "reference completion); its last role is "
                f"{messages[-1].get('role') if messages else 'missing (empty conversation)'}."
            )
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    return dataset.map(split_last_turn, with_indices=True, remove_columns=["messages"])


def lm_rows_from_completions(tokenizer, examples) -> tuple[list[list[int]], list[list[int]]]:
    """Each example's prompt and reference completion as one row of token ids, and its labels (-100 on the prompt):
    conversations rendered by the chat template, plain text with the tokenizer's special tokens and EOS at the end."""
    rows, labels = [], []
    for example in examples:
        if "completion" not in example or example["completion"] is None:
            raise ValueError("lm_loss_weight > 0 but a training example has no reference `completion`.")
        if is_conversational(example):
            text = apply_chat_template({"prompt": example["prompt"], "completion": example["completion"]}, tokenizer)
            prompt_ids = tokenizer(text["prompt"], add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(text["completion"], add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tokenizer(example["prompt"])["input_ids"]
            completion_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    return rows, labels


def lm_rows_from_texts(tokenizer, texts, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Plain texts (an `lm_dataset`'s `text` column) as rows of token ids, truncated to `max_length`; every token a
    label."""
    rows = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    return rows, [list(ids) for ids in rows]


def pad_lm_batch(rows, labels, pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded `lm_input_ids`, `lm_attention_mask`, `lm_labels` (-100 on padding) and the number of predicted
    label tokens of this process (`num_lm_tokens`)."""
    input_ids = pad([torch.tensor(r) for r in rows], padding_value=pad_token_id).to(device)
    attention_mask = pad([torch.ones(len(r), dtype=torch.long) for r in rows], padding_value=0).to(device)
    label_ids = pad([torch.tensor(r) for r in labels], padding_value=-100).to(device)
    return {"lm_input_ids": input_ids, "lm_attention_mask": attention_mask, "lm_labels": label_ids,
            "num_lm_tokens": (label_ids[:, 1:] != -100).sum()}  # fmt: skip


def sample_lm_rows(input_ids, attention_mask, labels, share: float):
    """`ceil(share × rows)` of an LM batch's rows drawn at random without replacement (torch's default generator, so
    a checkpoint's RNG state resumes the same draws), and the factor `rows / drawn` by which the sum of their token
    losses is an unbiased estimate of the sum over every row: each row is drawn with probability `drawn / rows`."""
    rows = input_ids.size(0)
    drawn = min(rows, max(1, math.ceil(share * rows)))
    if drawn == rows:
        return input_ids, attention_mask, labels, 1.0
    keep = torch.randperm(rows)[:drawn].to(input_ids.device)
    return input_ids[keep], attention_mask[keep], labels[keep], rows / drawn


def cycle_texts(dataset: Dataset, batch_size: int, seed: int, num_shards: int, index: int):
    """Batches of `dataset`'s `text` column for this process (shard `index` of `num_shards`), reshuffled each epoch
    (seed `seed + epoch`), without end."""
    epoch = 0
    while True:
        shard = dataset.shuffle(seed=seed + epoch).shard(num_shards, index)
        for start in range(0, len(shard) - batch_size + 1, batch_size):
            yield shard[start : start + batch_size]["text"]
        epoch += 1
