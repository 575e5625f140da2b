"""Teacher-logit scoring: next-token log-probs of a causal LM over a shared vocabulary.

Both models are run as backbone (→ final hidden state) + output projection, so that the teacher's hidden states
can be kept from sampling and projected to vocabulary logits one chunk at a time in the loss, instead of storing
`batch × length × vocab` teacher log-probs.
"""

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from trl.trainer.utils import pad


def language_model_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module of a causal LM (PEFT-wrapped or not) that returns `last_hidden_state`, i.e. all but the LM head."""
    if is_peft_model(model):
        model = model.base_model.model
    return model.base_model


class OutputHead:
    """`hidden → vocabulary logits` of a causal LM, exactly as the model's own forward computes them.

    Resolved once (PEFT unwrapping, the LM head module, the config's logit post-processing) so that calling it in a
    decode loop costs the projection only. Exposes `parameters()`, the parameters it reads, which the chunked losses
    differentiate directly (see `losses.minillm_loss_sums`).

    Args:
        model: the causal LM whose output embeddings (LM head) and logit post-processing are applied.
        vocab_size: number of leading vocabulary rows kept; rows past it are padding rows of the embedding matrix.
        dtype: cast hidden states to this dtype first (the head's, when they were stored in another one).
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, dtype: torch.dtype | None = None):
        if is_peft_model(model):
            model = model.base_model.model
        self.projection = model.get_output_embeddings()
        self.vocab_size = vocab_size
        self.dtype = dtype
        config = model.config.get_text_config()
        # The few architectures whose forward post-processes the head's output (Cohere, Granite, Gemma 2/3).
        self.logit_scale = getattr(config, "logit_scale", None)
        self.logits_scaling = getattr(config, "logits_scaling", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[..., H]` final hidden states (after the backbone's last norm) → `[..., vocab_size]` float logits."""
        if self.dtype is not None:
            hidden = hidden.to(self.dtype)
        logits = self.projection(hidden)[..., : self.vocab_size]
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def parameters(self):
        return self.projection.parameters()


def output_logits(model: torch.nn.Module, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[..., vocab_size]` float logits of `model` from its final hidden states `[..., H]` (see `OutputHead`)."""
    return OutputHead(model, vocab_size)(hidden)


def shared_vocab_size(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer) -> int:
    """Number of vocabulary rows both models score: the smaller embedding matrix, which must cover the tokenizer.

    Embedding matrices are often padded past the tokenizer's vocabulary (Qwen2.5: 151936 rows in small models,
    152064 in large ones); those rows are never produced by the tokenizer and are dropped from both distributions.
    Anything else (a teacher whose vocabulary is not the student's) is an error.
    """
    student_rows = student.config.get_text_config().vocab_size
    teacher_rows = teacher.config.get_text_config().vocab_size
    tokenizer_size = len(tokenizer)
    vocab_size = min(student_rows, teacher_rows)
    if tokenizer_size > vocab_size:
        raise ValueError(
            f"The student has {student_rows} vocabulary rows and the teacher {teacher_rows}, but the tokenizer has "
            f"{tokenizer_size} tokens: the models do not share the tokenizer's vocabulary. Reverse-KL distillation "
            "compares the two next-token distributions token by token, so both models must use the same tokenizer. "
            "For teachers with another tokenizer use a cross-tokenizer method (e.g. trl's GOLD trainer)."
        )
    return vocab_size


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """Raise if two tokenizers do not map the same strings to the same ids."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            "The teacher's tokenizer differs from the student's (different token → id maps). Reverse-KL "
            "distillation needs one shared vocabulary; for teachers with another tokenizer use a cross-tokenizer "
            "method (e.g. trl's GOLD trainer)."
        )


def check_finite_parameters(model: torch.nn.Module, name: str) -> None:
    """Raise if a floating-point parameter of `model` holds NaN or inf (a corrupt or badly converted checkpoint)."""
    for parameter_name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not torch.isfinite(parameter).all():
            raise ValueError(
                f"The {name}'s parameter `{parameter_name}` contains NaN or inf values: the checkpoint is corrupt or "
                "was converted to a dtype it overflows. Reload it in float32/bfloat16 or from another checkpoint."
            )


def left_pad(token_lists: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, mask)` `[B, L]` of token lists padded on the left, as prompts must be for sampling."""
    ids = pad([torch.tensor(ids) for ids in token_lists], padding_value=pad_token_id, padding_side="left")
    mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in token_lists], padding_value=0, padding_side="left")
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens, so left padding does not shift them (as `generate` does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class IncrementalScorer:
    """Runs a causal LM one token at a time over a KV cache and returns next-token log-probs.

    Used for both the student and the teacher while sampling; the teacher's hidden states and log-probs from here are
    the only teacher forward over the sampled tokens (rewards and the single-step term reuse them).
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, temperature: float):
        self.backbone = language_model_backbone(model)
        self.head = OutputHead(model, vocab_size)
        self.temperature = temperature
        self.cache = None

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, position_ids):
        """Feed `input_ids` `[B, L]` (the prompt, then one token a call).

        Returns:
            `(hidden [B, H], logprobs [B, V])` for the next token after the last fed position.
        """
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = outputs.past_key_values
        hidden = outputs.last_hidden_state[:, -1]
        logits = self.head(hidden)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return hidden, F.log_softmax(logits, dim=-1)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every other row from the KV cache (rows that finished generating)."""
        self.cache.batch_select_indices(rows)
