"""Defects the start-up probe exists for, injected into a correct model: each a context manager that makes one part
of the scoring path compute something else. Shared by tests/test_scoring.py and benchmarks/probe_margins.py (which
measures how far above the noise floor each one lies on the real SmolLM2)."""

from contextlib import contextmanager

from transformers.cache_utils import Cache

from rkd_trl import scoring


def _cache(kwargs) -> Cache | None:
    """The cache among a forward's arguments, by type (transformers renamed `past_key_values` to `cache` in 5.24)."""
    return next((value for value in kwargs.values() if isinstance(value, Cache)), None)


@contextmanager
def _forward_replaced(model, make_forward):
    forward = type(model).forward
    model.forward = make_forward(forward).__get__(model)
    try:
        yield
    finally:
        del model.forward


def cached_logits_scaled(model, factor: float = 2.0):
    """The cached (incremental) path computes logits `factor` times too large: a cache path that computes something
    else than the forward."""

    def make(forward):
        def scaled_when_cached(self, *args, **kwargs):
            output = forward(self, *args, **kwargs)
            cache = _cache(kwargs)
            if cache is not None and cache.get_seq_length() > 1:
                output.logits = output.logits * factor
            return output

        return scaled_when_cached

    return _forward_replaced(model, make)


def positions_off_by_one_under_left_padding(model):
    """On the cached path, rows with left padding get positions one too large (padding counted as a position)."""

    def make(forward):
        def shifted_when_cached(self, *args, position_ids=None, attention_mask=None, **kwargs):
            cache = _cache(kwargs)
            if cache is not None and cache.get_seq_length() > 0 and position_ids is not None:
                position_ids = position_ids + (attention_mask == 0).any(-1, keepdim=True).to(position_ids.dtype)
            return forward(self, *args, position_ids=position_ids, attention_mask=attention_mask, **kwargs)

        return shifted_when_cached

    return _forward_replaced(model, make)


@contextmanager
def head_misses_a_logit_multiplier(factor: float):
    """`OutputHead` returns logits `factor` times the model's: a head that misses the model's own logit scaling
    (Granite divides its logits by `logits_scaling`)."""
    call = scoring.OutputHead.__call__
    scoring.OutputHead.__call__ = lambda self, hidden: call(self, hidden) * factor
    try:
        yield
    finally:
        scoring.OutputHead.__call__ = call


@contextmanager
def reordered_cache_loses_a_row():
    """Dropping finished rows from the cache (`reorder_cache`) zeroes the last kept row's keys and values."""
    reorder = Cache.reorder_cache

    def losing(self, beam_idx):
        reorder(self, beam_idx)
        for layer in self.layers:
            layer.keys[-1].zero_()
            layer.values[-1].zero_()

    Cache.reorder_cache = losing
    try:
        yield
    finally:
        Cache.reorder_cache = reorder


# name -> (model type of `architectures.tiny_model` it is injected into, context manager factory taking the model)
DEFECTS = {
    "cached logits ×2": ("llama", cached_logits_scaled),
    "positions off by one under left padding": ("llama", positions_off_by_one_under_left_padding),
    "head misses a logit multiplier": ("granite", lambda model: head_misses_a_logit_multiplier(4.0)),
}
