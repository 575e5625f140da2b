"""KV-cached decoding through the models' own generation code, for the sampler and the teacher's catch-up.

Decoding runs the model's forward with the inputs and cache updates that `generate` uses
(`prepare_inputs_for_generation`, `_update_model_kwargs_for_generation`), and drops finished rows with the cache's own
beam-search reordering. `probe.verify_scoring` checks per model at start-up that it reproduces the plain forward.
"""


import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerationMode
from transformers.modeling_outputs import ModelOutput

from .scoring import accepted_arguments, captured_hidden_states, causal_lm, position_ids_from_mask


class IncrementalDecoder:
    """Runs a causal LM one token at a time over its cache and returns next-token log-probs (and, with
    `record_hidden`, the final hidden state that predicted them).

    Each step is what `generate` does: the cache `generate` would prepare, the model's `prepare_inputs_for_generation`,
    its forward, and
    `_update_model_kwargs_for_generation` (which keeps the cache under the model's own name for it, extends the
    attention mask and the positions). Rows that finished are dropped with the cache's `reorder_cache` (the API beam
    search uses, which covers attention and linear-attention / SSM states) when `drop_ended_rows`; a model whose state
    lives outside its cache object keeps every row instead and is fed padding for the finished ones, as `generate`
    does (`verify_scoring` tells which works).
    """

    def __init__(self, model, vocab_size: int, temperature: float = 1.0, record_hidden=False, drop_ended_rows=True):
        self.model = causal_lm(model)
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.record_hidden = record_hidden
        self.drop_ended_rows = drop_ended_rows
        self.model_kwargs = {}
        self.input_ids = None
        self.active = None  # rows still generating, when ended rows are kept in the batch

    @torch.no_grad()
    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """Feed left-padded prompts `[B, P]`; returns `(hidden [B, H] or None, logprobs [B, V])` for the next token."""
        accepted = accepted_arguments(self.model)
        self.model_kwargs = {"attention_mask": prompt_mask, "use_cache": True}
        if "position_ids" in accepted:
            self.model_kwargs["position_ids"] = position_ids_from_mask(prompt_mask)
        if "logits_to_keep" in accepted:
            self.model_kwargs["logits_to_keep"] = 1
        # The cache `generate` would create for this model (none for models that make their own on the first call).
        self.model._prepare_cache_for_generation(
            GenerationConfig(), self.model_kwargs, GenerationMode.SAMPLE, prompt_ids.size(0), prompt_ids.size(1)
        )
        self.input_ids = prompt_ids
        self.active = torch.arange(prompt_ids.size(0), device=prompt_ids.device)
        inputs = self.model.prepare_inputs_for_generation(prompt_ids, is_first_iteration=True, **self.model_kwargs)
        hidden, logprobs = self._forward(inputs)
        return (hidden[:, -1] if hidden is not None else None), logprobs

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor, pad_token_id: int, mask: torch.Tensor | None = None):
        """Feed `k` tokens per active row (`[b, k]`) in one cached forward, as assisted generation verifies a draft:
        returns `(hidden [b, k, H] or None, logprobs [b, V])`, the final hidden states at the `k` positions (each
        predicts the token after it) and the log-probs of the token after the last. `mask` (`[b, k]`, default all
        ones) marks the fed positions later positions attend to: 0 for the padding after a row's end. `verify_scoring`
        checks per model that a multi-token feed reproduces the plain forward (`ScoringCheck.catch_up`)."""
        if not self.drop_ended_rows:
            fed = tokens.new_full((self.input_ids.size(0), tokens.size(1)), pad_token_id)
            fed[self.active] = tokens
            tokens = fed
            if mask is not None:
                mask = torch.zeros_like(fed).index_copy_(0, self.active, mask.to(fed.dtype))
        count = tokens.size(1)
        if count > 1:  # the last forward prepared the mask and positions for one new token: extend them to `count`
            self.model_kwargs = self.model._update_model_kwargs_for_generation(
                ModelOutput(), self.model_kwargs, num_new_tokens=count - 1
            )
        if mask is not None:
            attention_mask = self.model_kwargs["attention_mask"].clone()
            attention_mask[:, -count:] = mask
            self.model_kwargs["attention_mask"] = attention_mask
        self.input_ids = torch.cat([self.input_ids, tokens], dim=1)
        model_kwargs = self.model_kwargs
        if count > 1 and "logits_to_keep" in model_kwargs:
            # Logits for the last position only, given as its index: an integer would let some backbones (Gemma 4's
            # KV-shared layers) skip the earlier positions, whose hidden states the caller wants.
            model_kwargs = {**model_kwargs, "logits_to_keep": torch.tensor([count - 1], device=tokens.device)}
        inputs = self.model.prepare_inputs_for_generation(self.input_ids, next_sequence_length=count, **model_kwargs)
        hidden, logprobs = self._forward(inputs, count)
        if not self.drop_ended_rows:
            hidden = hidden[self.active] if hidden is not None else None
            logprobs = logprobs[self.active]
        return hidden, logprobs

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the active rows, in order) of the batch: the others have ended."""
        if not self.drop_ended_rows:
            self.active = self.active[rows]
            return
        batch_size = self.input_ids.size(0)
        self.input_ids = self.input_ids[rows]
        for name, value in self.model_kwargs.items():
            if isinstance(value, Cache):
                value.reorder_cache(rows)
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == batch_size:
                self.model_kwargs[name] = value[rows]

    def _forward(self, inputs, new_positions: int | None = None):
        """Run the model; returns the final hidden states of the last `new_positions` positions (all: None) and the
        next-token log-probs after the last. A model without a cache is fed its whole sequence again."""
        if self.record_hidden:
            with captured_hidden_states(self.model) as box:
                outputs = self.model(**inputs, return_dict=True)
            hidden = box["hidden"] if new_positions is None else box["hidden"][:, -new_positions:]
        else:
            outputs = self.model(**inputs, return_dict=True)
            hidden = None
        self.model_kwargs = self.model._update_model_kwargs_for_generation(outputs, self.model_kwargs)
        logits = outputs.logits[:, -1, : self.vocab_size].float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return hidden, F.log_softmax(logits, dim=-1)


def catch_up(decoder: IncrementalDecoder, rows, fed: int, upto: int, completion_ids, completion_mask, active_rows,
             pad_token_id: int):
    """Feed completion columns `fed .. upto-1` of the batch `rows` held in `decoder` (a model that last read column
    `fed - 1`, or the prompt), so that it predicts column `upto` for `active_rows`, the rows still generating there.

    One column is a one-token `feed` of the rows still generating (those that ended are dropped first, as in
    token-by-token decoding); several are one cached multi-token forward (`IncrementalDecoder.feed`) of every row in
    the cache, where a position whose prediction no row needs (at or after its row's end) is masked out, and rows
    that ended on the way are dropped after it.

    Args:
        rows: `[b]` batch indices of the decoder's rows, in its order (ascending); `active_rows` a subset of them.
        completion_ids, completion_mask: `[B, T]` for the whole batch; columns before `upto` are filled.

    Returns:
        `(fed_rows, hidden [len(fed_rows), upto - fed, H] or None, logprobs [len(active_rows), V])`: the rows fed,
        their final hidden states at the fed positions (each predicts the next column), and the next-token log-probs
        after column `upto - 1` of the active rows. Afterwards the decoder holds `active_rows`.
    """
    keep = torch.isin(rows, active_rows).nonzero().squeeze(1)
    if upto - fed == 1 and keep.numel() < rows.numel():
        decoder.keep_rows(keep)
        rows, keep = rows[keep], torch.arange(keep.numel(), device=keep.device)
    columns = slice(fed, upto)
    needed = None
    if upto - fed > 1:
        needed = completion_mask[rows, fed + 1 : upto + 1].clone()
        needed[:, -1] = torch.isin(rows, active_rows).to(needed.dtype)
    hidden, logprobs = decoder.feed(completion_ids[rows, columns], pad_token_id, needed)
    if keep.numel() < rows.numel():
        decoder.keep_rows(keep)
        logprobs = logprobs[keep]
    return rows, hidden, logprobs
