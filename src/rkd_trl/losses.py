"""MiniLLM loss terms, each a function of tensors (paper Eq. 5-7 and the reference code's PPO objective).

The per-token functions work on `[N, V]` logits of the `N` valid completion tokens (the plain path, differentiated by
autograd). `minillm_loss_sums` and `lm_loss_sum` are their memory-bounded twins: they take final hidden states and
project `chunk_size` tokens at a time to the vocabulary, with the gradient with respect to the logits in closed form
(`minillm_logit_gradients`), so at most a few `chunk_size × V` arrays are alive at once and no projection is
recomputed in the backward.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def per_position_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Single-step term of Eq. 5: `KL(q(·|y<t) || p(·|y<t)) = Σ_v q_v (log q_v - log p_v)`, exact over the vocabulary.

    Args:
        student_logprobs, teacher_logprobs: `[N, V]` log-probs at `N` positions.

    Returns:
        `[N]`. Its gradient is `-(∇L)_Single` of paper Eq. 5: the part of the reverse-KL gradient that flows through
        the distribution of the current token, computed without sampling.
    """
    student_probs = student_logprobs.exp()
    return (student_probs * (student_logprobs - teacher_logprobs)).sum(-1)


def clipped_policy_gradient_loss(
    token_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip_epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clipped policy-gradient loss of the long-term term (`(∇L)_Long`, Eq. 5-7; reference `_pg_loss`).

    `ratio = w_t · exp(log q_θ(y_t) - log q_old(y_t))`; loss `max(-A·ratio, -A·clip(ratio, 1±ε))`. At the first
    pass over fresh rollouts `q_θ = q_old` and the gradient is `-w_t A_t ∇log q_θ(y_t)`.

    Args:
        token_logprobs: `[N]` `log q_θ(y_t)` with gradient.
        old_logprobs, advantages, weights: `[N]`, no gradient.

    Returns:
        `(loss [N], clipped [N] bool)` where `clipped` marks tokens whose clipped branch is active (no gradient).
    """
    ratio = weights * torch.exp(token_logprobs - old_logprobs)
    clipped_ratio = ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * clipped_ratio
    return torch.maximum(unclipped_loss, clipped_loss), (clipped_loss > unclipped_loss).detach()


@dataclass
class TokenTerms:
    """Per-token terms, each `[N]`."""

    policy_gradient: torch.Tensor
    single_step: torch.Tensor
    clipped: torch.Tensor
    entropy: torch.Tensor


def minillm_token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    temperature: float,
    clip_epsilon: float,
) -> TokenTerms:
    """All MiniLLM per-token terms from full logits (the plain path).

    Args:
        student_logits: `[N, V]` with gradient; teacher_logits: `[N, V]`.
        token_ids: `[N]` the sampled tokens `y_t`.
        old_logprobs, advantages, weights: `[N]` from the rollout (see `advantages.py`).

    The single-step term is not multiplied by `w_t` (reference code): `w_t` corrects the draw of `y_t`, while the
    single-step term is an exact expectation over `y_t` given the sampled context.
    """
    student_logprobs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    with torch.no_grad():
        teacher_logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    token_logprobs = student_logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
    policy_gradient, clipped = clipped_policy_gradient_loss(
        token_logprobs, old_logprobs, advantages, weights, clip_epsilon
    )
    single_step = per_position_reverse_kl(student_logprobs, teacher_logprobs)
    with torch.no_grad():
        entropy = -(student_logprobs.exp() * student_logprobs).sum(-1)
    return TokenTerms(policy_gradient, single_step, clipped, entropy)


class _ChunkedHeadLoss(torch.autograd.Function):
    """`Σ_chunks objective(head(hidden[chunk]))` whose gradient is computed in the forward, one chunk at a time.

    For each chunk of `chunk_size` rows the head's logits are computed once, `chunk_objective` returns the objective
    *and its gradient with respect to those logits* (closed form), and one vector-Jacobian product through the head
    gives the chunk's gradient with respect to the hidden states and the head's parameters. Only `[N, H]` hidden-state
    gradients and parameter-sized gradients are kept for the backward, which just scales them; no logits are
    recomputed (activation checkpointing would project every chunk a second time in the backward, and a teacher
    head with it). Logits exist for one chunk at a time: peak memory is a few `chunk_size × V` floats.
    """

    @staticmethod
    def forward(ctx, hidden, head, chunk_objective, chunk_size, per_token, *parameters):
        grad_hidden = torch.zeros_like(hidden)
        grad_parameters = [torch.zeros_like(parameter) for parameter in parameters]
        objective = hidden.new_zeros((), dtype=torch.float32)
        statistics = None
        for start in range(0, hidden.size(0), chunk_size):
            piece = slice(start, start + chunk_size)
            hidden_chunk = hidden[piece].detach().requires_grad_(hidden.requires_grad)
            with torch.enable_grad():
                logits = head(hidden_chunk)
            chunk_value, grad_logits, chunk_statistics = chunk_objective(
                logits.detach(), piece, *(values[piece] for values in per_token)
            )
            objective = objective + chunk_value
            statistics = (
                chunk_statistics if statistics is None else [a + b for a, b in zip(statistics, chunk_statistics)]
            )
            inputs = ([hidden_chunk] if hidden.requires_grad else []) + list(parameters)
            if inputs:
                grads = torch.autograd.grad(logits, inputs, grad_logits, allow_unused=True)
                if hidden.requires_grad:
                    grad_hidden[piece] = grads[0]
                    grads = grads[1:]
                for total, grad in zip(grad_parameters, grads):
                    if grad is not None:
                        total += grad
            del logits, grad_logits
        ctx.save_for_backward(grad_hidden, *grad_parameters)
        ctx.mark_non_differentiable(*(statistics or []))
        return (objective, *(statistics or []))

    @staticmethod
    def backward(ctx, grad_objective, *_):
        grad_hidden, *grad_parameters = ctx.saved_tensors
        return (
            grad_hidden * grad_objective,
            None, None, None, None,
            *(grad * grad_objective for grad in grad_parameters),
        )  # fmt: skip


def _checkpointed_head_loss(hidden, head, chunk_objective, chunk_size, per_token, min_chunks=0):
    """Twin of `_ChunkedHeadLoss` for a head whose parameters are sharded across processes (DeepSpeed ZeRO-3).

    Such parameters exist in full only inside the head module's own forward, so their gradients must come from
    autograd through that forward. Each chunk runs under activation checkpointing and back-propagates the same
    closed-form logit gradient as the surrogate `Σ logits ⊙ ∂objective/∂logits`: same values and gradients, at the
    cost of projecting every chunk again in the backward. Every head call gathers the parameters collectively, so
    all processes must make the same number of calls: `min_chunks` (the largest chunk count over processes) pads
    the loop with empty chunks.
    """

    def chunk(hidden_chunk, start, *values):
        logits = head(hidden_chunk)
        value, grad_logits, statistics = chunk_objective(
            logits.detach(), slice(start, start + hidden_chunk.size(0)), *values
        )
        surrogate = (logits * grad_logits).sum()
        return value, surrogate - surrogate.detach(), *statistics

    objective = hidden.sum() * 0.0  # anchored to the graph: an all-masked batch back-propagates zero gradients
    statistics = None
    for index in range(max(chunk_count(hidden.size(0), chunk_size), min_chunks)):
        piece = slice(index * chunk_size, (index + 1) * chunk_size)  # empty past the data
        value, surrogate, *chunk_statistics = checkpoint(
            chunk, hidden[piece], piece.start, *(values[piece] for values in per_token), use_reentrant=False
        )
        objective = objective + value + surrogate
        chunk_statistics = [part.detach() for part in chunk_statistics]
        statistics = (
            chunk_statistics if statistics is None else [a + b for a, b in zip(statistics, chunk_statistics)]
        )
    return (objective, *(statistics or []))


def chunk_count(num_tokens: int, chunk_size: int) -> int:
    """Number of `chunk_size` chunks the chunked losses split `num_tokens` tokens into."""
    return -(-num_tokens // chunk_size)


def chunk_count_over_processes(num_tokens: torch.Tensor, chunk_size: int, accelerator, sharded_head: bool) -> int:
    """`min_chunks` of the chunked losses: under ZeRO-3 (`sharded_head`) every LM-head call gathers parameters
    collectively, so each process runs the loss over the largest chunk count of all processes
    (`_checkpointed_head_loss`); elsewhere chunks are local (0)."""
    if not sharded_head:
        return 0
    count = torch.tensor([chunk_count(int(num_tokens), chunk_size)], device=accelerator.device)
    return int(accelerator.gather(count).max())


def _chunked_head_loss(hidden, head, chunk_objective, chunk_size, per_token, sharded_head, min_chunks):
    if sharded_head:
        return _checkpointed_head_loss(hidden, head, chunk_objective, chunk_size, per_token, min_chunks)
    return _ChunkedHeadLoss.apply(hidden, head, chunk_objective, chunk_size, per_token, *_trainable_parameters(head))


def _trainable_parameters(head) -> list[torch.Tensor]:
    """The head parameters to differentiate: none under `torch.no_grad()` (evaluation), where no backward follows."""
    if not torch.is_grad_enabled():
        return []
    return [parameter for parameter in head.parameters() if parameter.requires_grad]


TERMS = ("policy_gradient", "single_step", "clipped", "entropy")


def minillm_logit_gradients(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    temperature: float,
    clip_epsilon: float,
    single_step_weight: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sums of the MiniLLM terms over `N` tokens and the gradient of `Σ policy_gradient + c · Σ single_step`
    (`c = single_step_weight`) with respect to the student logits, in closed form (no autograd).

    With `s = z/τ`, `q = softmax(s)`, `a = log q - log p`, `KL = Σ_v q_v a_v`:

    - single step: `∂KL/∂s = q ⊙ (a - KL)`;
    - policy gradient: `∂ℓ/∂ log q(y) = -A·ρ` where the unclipped branch is active (in the clip range the two branches
      are equal and together carry this full gradient, as autograd gives it), else 0; `∂ log q(y)/∂s = onehot(y) - q`.

    Args:
        student_logits, teacher_logits: `[N, V]` float logits, no gradient (`teacher_logits` is overwritten to save
            memory; `student_logits` is left alone, it may be saved by the head's autograd graph). `teacher_logits`
            None (a teacher of another vocabulary) leaves the policy gradient alone: `single_step_weight` must be 0
            and the single-step sum is 0.
        token_ids, old_logprobs, advantages, weights: `[N]`.

    Returns:
        `({"policy_gradient", "single_step", "clipped", "entropy"} sums, [N, V] gradient w.r.t. student logits)`.
    """
    # Each pass over `[N, V]` counts on CPU, exponentials most: one `exp` per model, the rest in place.
    scaled = student_logits / temperature if temperature != 1.0 else student_logits
    student_logprobs = scaled - scaled.amax(-1, keepdim=True)
    student_probs = student_logprobs.exp()
    normalizer = student_probs.sum(-1, keepdim=True)
    student_probs /= normalizer
    student_logprobs -= normalizer.log()

    token_logprobs = student_logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
    policy_gradient, clipped = clipped_policy_gradient_loss(
        token_logprobs, old_logprobs, advantages, weights, clip_epsilon
    )
    entropy = -torch.einsum("nv,nv->n", student_probs, student_logprobs)
    ratio = weights * torch.exp(token_logprobs - old_logprobs)
    grad_token_logprob = torch.where(clipped, 0.0, -advantages * ratio)

    if teacher_logits is None:
        if single_step_weight != 0.0:
            raise ValueError("The single-step term needs the teacher's logits over the student's vocabulary.")
        reverse_kl = torch.zeros_like(entropy)
        # ∂/∂s = g·(onehot(y) - q), with g = ∂ℓ/∂log q(y).
        grad = student_probs * -grad_token_logprob[:, None]
    else:
        teacher_logprobs = teacher_logits.div_(temperature) if temperature != 1.0 else teacher_logits
        teacher_logprobs -= teacher_logprobs.logsumexp(-1, keepdim=True)
        reverse_kl = -entropy - torch.einsum("nv,nv->n", student_probs, teacher_logprobs)
        # ∂/∂s = q ⊙ (c·(a - KL) - g) + g·onehot(y), with g = ∂ℓ/∂log q(y); built in the teacher's buffer.
        grad = teacher_logprobs.neg_().add_(student_logprobs)
        if single_step_weight != 1.0:
            grad.mul_(single_step_weight)
        grad.sub_((single_step_weight * reverse_kl + grad_token_logprob)[:, None]).mul_(student_probs)
    del student_logprobs
    grad.scatter_add_(-1, token_ids[:, None], grad_token_logprob[:, None])
    if temperature != 1.0:
        grad.div_(temperature)
    sums = {
        "policy_gradient": policy_gradient.sum(),
        "single_step": reverse_kl.sum(),
        "clipped": clipped.float().sum(),
        "entropy": entropy.sum(),
    }
    return sums, grad


def minillm_loss_sums(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None,
    token_ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    temperature: float,
    clip_epsilon: float,
    chunk_size: int,
    single_step_weight: float = 1.0,
    sharded_head: bool = False,
    min_chunks: int = 0,
) -> dict[str, torch.Tensor]:
    """Sums over the `N` valid tokens of the MiniLLM terms, `chunk_size` tokens at a time (memory-bounded twin of
    `minillm_token_losses`, with the gradient of `minillm_logit_gradients` instead of autograd over the vocabulary).

    Args:
        student_hidden: `[N, H]` student final hidden states, with gradient.
        teacher_hidden: `[N, H']` teacher final hidden states recorded while sampling; None for a teacher of another
            vocabulary (`crosstokenizer`), whose scores are in the advantages only (then `single_step_weight = 0`).
        student_head, teacher_head: map hidden states to `[n, V]` float logits and expose `parameters()` (an
            `nn.Module`, or `scoring.OutputHead`); the student head's trainable parameters receive gradients.
            `teacher_head` is None when `teacher_hidden` is.
        single_step_weight: weight `c` of the single-step sum in `objective`.
        sharded_head: the student head's parameters are sharded across processes (DeepSpeed ZeRO-3): differentiate
            them through the head's forward under checkpointing (`_checkpointed_head_loss`).
        min_chunks: with `sharded_head`, run at least this many chunks (the largest count over processes), so that
            every process makes the same number of collective head calls.

    Returns:
        `objective = Σ policy_gradient + c · Σ single_step` with gradient, and the detached sums
        `{"policy_gradient", "single_step", "clipped", "entropy"}`.
    """

    def chunk_objective(student_logits, piece, tokens, old, adv, w):
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden[piece]) if teacher_hidden is not None else None
        sums, grad = minillm_logit_gradients(
            student_logits, teacher_logits, tokens, old, adv, w,
            temperature=temperature, clip_epsilon=clip_epsilon, single_step_weight=single_step_weight,
        )  # fmt: skip
        objective = sums["policy_gradient"] + single_step_weight * sums["single_step"]
        return objective, grad, [sums[name] for name in TERMS]

    per_token = (token_ids, old_logprobs, advantages, weights)
    objective, *statistics = _chunked_head_loss(
        student_hidden, student_head, chunk_objective, chunk_size, per_token, sharded_head, min_chunks
    )
    if not statistics:  # no tokens at all
        statistics = [objective.detach()] * len(TERMS)
    return {"objective": objective, **dict(zip(TERMS, statistics, strict=True))}


def lm_loss_sum(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int,
    sharded_head: bool = False,
    min_chunks: int = 0,
) -> torch.Tensor:
    """Summed next-token cross-entropy of `labels` `[N]` from hidden states `[N, H]` (the paper's `L_PT`),
    `chunk_size` tokens at a time; gradient in closed form (`softmax - onehot`), as in `minillm_loss_sums`."""

    def chunk_objective(logits, piece, label_chunk):
        shifted = logits - logits.amax(-1, keepdim=True)
        probs = shifted.exp()
        normalizer = probs.sum(-1, keepdim=True)
        total = (normalizer.log() - shifted.gather(-1, label_chunk[:, None])).sum()
        del shifted
        grad = probs.div_(normalizer)  # ∂/∂logits of -log softmax(logits)[y] = softmax - onehot(y)
        grad.scatter_add_(-1, label_chunk[:, None], grad.new_full((label_chunk.size(0), 1), -1.0))
        return total, grad, []

    (total,) = _chunked_head_loss(hidden, head, chunk_objective, chunk_size, (labels,), sharded_head, min_chunks)
    return total
