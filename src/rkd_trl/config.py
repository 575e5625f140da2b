"""Configuration of the reverse-KL (MiniLLM) distillation trainer."""

import logging
import platform
import warnings
from dataclasses import dataclass, field

import torch
from trl import DistillationConfig

logger = logging.getLogger(__name__)


def cpu_computes_bf16_natively() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (x86 `avx512_bf16` or AMX). Without them torch emulates
    every bf16 product: measured 3.4x float32's time per product on a 2-core AVX-512 CPU without either
    (docs/benchmarks/bf16_rollout.json). Other architectures than x86 are taken to have them (not checked)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def trains_on_cpu(use_cpu: bool) -> bool:
    return use_cpu or not torch.accelerator.is_available()


@dataclass
class ReverseKLDistillConfig(DistillationConfig):
    r"""
    Configuration for [`ReverseKLDistillTrainer`]: MiniLLM-style distillation (Gu et al., ICLR 2024,
    arXiv 2306.08543). The student `q` minimises the sequence-level reverse KL `KL(q || p)` to the teacher `p` by
    policy gradient with single-step regularisation, teacher-mixed sampling and length normalisation.

    Every field of [`trl.DistillationConfig`] keeps its meaning. The field names of
    `trl.experimental.gkd.GKDConfig` are accepted so that a GKD script runs unchanged; their meaning here is given
    below, and a GKD field that has no meaning for this algorithm warns when set instead of silently changing it.

    Defaults cite where they come from: "paper" is the MiniLLM paper, "reference" is the authors' code
    (microsoft/LMOps, `minillm/`).

    Args:
        teacher_mix_alpha (`float`, *optional*, defaults to `0.2`):
            Share `α` of the teacher in the sampling distribution `p̃ = α·p + (1-α)·q` (paper §2.2, α = 0.2).
            `0.0` samples from the student alone (plain on-policy sampling, importance weights all 1).
        gamma (`float`, *optional*, defaults to `0.95`):
            Discount of future rewards in the long-term return (reference `--gamma 0.95`; the paper writes the
            undiscounted sum, `γ = 1`).
        length_normalization (`bool`, *optional*, defaults to `True`):
            Divide the return at each position by the number of rewards it sums (paper Eq. 7, `R^Norm`).
        whiten_advantages (`bool`, *optional*, defaults to `False`):
            Whiten the returns (zero mean, unit variance over the valid tokens of the generation batch, all processes
            together) before the policy-gradient loss (the reference code does; the paper does not). It rescales each
            batch's policy gradient by the spread of its returns: on a real model, where one looping completion
            stands out in a batch of similar ones, that multiplied its push (docs/benchmarks.md), so it is off by
            default and the returns enter the loss as the paper writes them.
        single_step_regularization (`bool`, *optional*, defaults to `True`):
            Add the exact per-position reverse KL `KL(q(·|y<t) || p(·|y<t))` summed over the vocabulary (paper
            Eq. 5, `(∇L)_Single`). When on, the policy-gradient part uses the future return `R_{t+1}` (paper);
            when off, it uses the full return `R_t`, so both settings estimate the same gradient.
        policy_gradient (`bool`, *optional*, defaults to `True`):
            Train on the policy-gradient term of the future returns (paper Eq. 5, `(∇L)_Long`): the part of the
            sequence-level reverse KL that the single-step term leaves out, through which the student learns what
            its next token does to the rest of its answer (including when to end it). False leaves the single-step
            term (token-level reverse KL on the teacher-mixed samples) and the LM loss: an ablation, measured in
            docs/benchmarks.md. At least one of `policy_gradient` and `single_step_regularization` must be on.
        ppo_clip_epsilon (`float`, *optional*, defaults to `0.2`):
            PPO clip range of the ratio `w_t · q_θ/q_old` (reference `--cliprange 0.2`).
        ppo_epochs (`int`, *optional*, defaults to `1`):
            Number of optimisation passes over each batch of rollouts. `1` samples fresh rollouts for every optimizer
            step (as `trl.DistillationTrainer`); the reference uses 4 passes over 256 rollouts.
        reward_scaling (`float`, *optional*, defaults to `0.5`):
            Per-token rewards `log p - log q` are divided by this value (reference `--reward-scaling 0.5`).
        reward_clip (`float` or `None`, *optional*, defaults to `100.0`):
            Scaled rewards are clipped to `[-reward_clip, reward_clip]` (reference `--cliprange-reward 100`).
            `None` disables clipping.
        importance_weight_max (`float` or `None`, *optional*, defaults to `None`):
            Upper bound on the per-token importance weight `w_t = q/p̃`. `None` (reference) relies on the PPO clip
            alone. Note `w_t ≤ 1/(1-α)` always holds, so this only matters below that bound.
        lm_loss_weight (`float` or `None`, *optional*, defaults to `None`):
            Weight of a language-modelling (cross-entropy) loss added to the distillation loss. It is computed on the
            dataset's reference completions, or on `lm_dataset` when one is given to the trainer (the paper's
            pre-training loss `L_PT`). `None`: 1.0 when the trainer has such text, else off with a warning (on real
            models the on-policy reverse KL alone drives students into repetition loops, docs/benchmarks.md).
            `0.0` disables it.
        lm_loss_row_share (`float`, *optional*, defaults to `0.5`):
            Share of each micro-batch's LM-loss rows (reference completions or `lm_dataset` texts) the LM loss is
            computed on: `ceil(share × rows)` rows drawn at random, their token losses scaled by rows / drawn, so that
            the loss is an unbiased estimate of the one over every row at a fraction of its forward and backward.
            `0.5` (the default): on the real SmolLM2 pair, three seeds each on its test and dev prompts, the same
            Rouge-L, repetition and share of answers ending as every row, at 0.94x trl.DistillationTrainer's step
            instead of 1.20x (bf16, docs/performance.md). `0.25` was as good on dev but on test repeated more and
            ended fewer answers than every row (docs/benchmarks.md). Without the LM loss the answers repeated more.
            `1.0`: every row.
        degeneration_guard (`bool`, *optional*, defaults to `True`):
            The trainer adds a `DegenerationGuard` callback (unless `callbacks` holds one): it warns once per signal
            when the repeated 4-grams or the truncation of the rollouts or of the greedy answers rise well above their
            first logged value (docs/reliability.md). `False`: no guard.
        loss_chunk_size (`int`, *optional*, defaults to `1024`):
            Number of completion tokens whose vocabulary logits are materialised at once in the loss. Bounds loss
            memory to `loss_chunk_size × vocab_size` floats; the result does not depend on it.
        max_consecutive_nonfinite_steps (`int`, *optional*, defaults to `5`):
            An optimizer step whose loss or gradients contain NaN/inf is skipped (the weights and optimizer state are
            left untouched) and counted in the `nonfinite/skipped_steps` metric. After this many skipped steps in a
            row the run stops with an error. `0` stops at the first one. Under DeepSpeed the update cannot be
            withheld once backward ran, so a non-finite loss stops the run before its backward.
        max_new_tokens (`int` or `None`, *optional*, defaults to `None`):
            GKD name of `max_completion_length`. When set, it overrides `max_completion_length`.
        max_length (`int` or `None`, *optional*, defaults to `None`):
            GKD name: the longest prompt + completion. When set, a prompt longer than
            `max_length - max_completion_length` tokens is rejected when the trainer is built.
        lmbda (`float` or `None`, *optional*, defaults to `None`):
            GKD's share of on-policy batches. This trainer always samples on-policy (mixed with the teacher through
            `teacher_mix_alpha`); any value other than `1.0` warns and is ignored.
        beta (`float` or `None`, *optional*, defaults to `None`):
            GKD's generalised-JSD interpolation. This trainer minimises the reverse KL (`beta = 1`); any other value
            warns and is ignored.
        seq_kd (`bool`, *optional*, defaults to `False`):
            GKD's sequence-level KD on teacher samples. Not part of this algorithm; `True` warns and is ignored.
        temperature (`float`, *optional*, defaults to `1.0`):
            Temperature applied to both models' logits everywhere: sampling, rewards, single-step term and ratio
            (reference: 1.0). `q` and `p` in the equations are the temperature-scaled distributions.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Disable dropout in the student (reference and GKD default) so sampling-time and training-time log-probs
            agree.
        learning_rate (`float`, *optional*, defaults to `5e-6`):
            AdamW learning rate (reference `--lr 5e-6`).
        max_completion_length (`int`, *optional*, defaults to `256`):
            Longest sampled completion (reference: 512 total, prompts up to 256).
        activation_checkpointing (`bool` or `None`, *optional*, defaults to `None`):
            Recompute the student's activations in the backward pass to save memory. `None` means on (trl's default)
            unless the deprecated alias `gradient_checkpointing` is set.
        gradient_checkpointing (`bool` or `None`, *optional*, defaults to `None`):
            transformers' deprecated alias of `activation_checkpointing`: still accepted, with transformers'
            deprecation warning.
    """

    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW learning rate (reference: 5e-6)."})
    max_completion_length: int | None = field(
        default=256, metadata={"help": "Maximum number of tokens sampled per completion (reference: 256)."}
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Disable dropout in the student so sampling-time and training-time log-probs agree."},
    )
    # trl's configs default transformers' deprecated `gradient_checkpointing` to True, which made every config warn
    # about the deprecation; here the deprecated name stays unset unless given, and `__post_init__` sets the default.
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute the student's activations in backward to save memory. None = on (as in trl)."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers); warns if set."}
    )

    # MiniLLM
    teacher_mix_alpha: float = field(
        default=0.2,
        metadata={"help": "Teacher share α of the sampling distribution α·p + (1-α)·q (paper: 0.2). 0 = on-policy."},
    )
    gamma: float = field(
        default=0.95, metadata={"help": "Discount of future rewards (reference: 0.95; paper: 1.0)."}
    )
    length_normalization: bool = field(
        default=True, metadata={"help": "Divide each return by the number of rewards it sums (paper Eq. 7)."}
    )
    whiten_advantages: bool = field(
        default=False, metadata={"help": "Whiten returns over the generation batch (reference code; not the paper)."}
    )
    single_step_regularization: bool = field(
        default=True,
        metadata={"help": "Add the exact per-position reverse KL over the vocabulary (paper Eq. 5)."},
    )
    policy_gradient: bool = field(
        default=True,
        metadata={"help": "Train on the policy gradient of the future returns (paper Eq. 5, long-term term). False "
                  "leaves the single-step term and the LM loss (an ablation)."},
    )
    ppo_clip_epsilon: float = field(
        default=0.2, metadata={"help": "PPO clip range of the ratio w·q/q_old (reference: 0.2)."}
    )
    ppo_epochs: int = field(
        default=1, metadata={"help": "Optimisation passes over each batch of rollouts (reference: 4)."}
    )
    reward_scaling: float = field(
        default=0.5, metadata={"help": "Rewards log p - log q are divided by this value (reference: 0.5)."}
    )
    reward_clip: float | None = field(
        default=100.0, metadata={"help": "Clip scaled rewards to ±reward_clip (reference: 100). None = no clip."}
    )
    importance_weight_max: float | None = field(
        default=None, metadata={"help": "Upper bound on importance weights q/p̃. None = PPO clip only (reference)."}
    )
    lm_loss_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the LM loss on reference completions or on `lm_dataset`. None = 1.0 when "
                  "there is such text, else off (with a warning). 0 = off."},
    )
    lm_loss_row_share: float = field(
        default=0.5,
        metadata={"help": "Share of each micro-batch's LM-loss rows the LM loss runs on, drawn at random and scaled "
                  "to an unbiased estimate of the loss over every row. 1 = every row."},
    )
    greedy_probe: bool = field(
        default=True,
        metadata={"help": "At a logging step every `greedy_probe_steps` steps, decode the first probed step's prompts "
                  "greedily (student alone) and log completions/greedy_repeated_4grams and "
                  "completions/greedy_clipped_ratio (DegenerationGuard)."},
    )
    greedy_probe_steps: int = field(
        default=20,
        metadata={"help": "Fewest optimizer steps between two greedy probes: bounds the probe's cost (one greedy "
                  "decode of a batch) to a small share of the steps whatever `logging_steps` is."},
    )
    degeneration_guard: bool = field(
        default=True,
        metadata={"help": "Add a DegenerationGuard callback (unless one is given): a warning when the rollouts' or the "
                  "greedy answers' repeated 4-grams or truncation rise well above where the run started."},
    )
    loss_chunk_size: int = field(
        default=1024, metadata={"help": "Completion tokens whose vocabulary logits are materialised at once."}
    )

    max_consecutive_nonfinite_steps: int = field(
        default=5,
        metadata={"help": "Steps with NaN/inf loss or gradients are skipped; this many in a row stop the run."},
    )

    # GKDConfig names
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "GKD name of `max_completion_length`; overrides it when set."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt + completion; longer prompts are rejected when the trainer is built."},
    )
    lmbda: float | None = field(
        default=None, metadata={"help": "GKD on-policy share; always on-policy here, values other than 1 warn."}
    )
    beta: float | None = field(
        default=None, metadata={"help": "GKD JSD interpolation; reverse KL (1.0) here, other values warn."}
    )
    seq_kd: bool = field(default=False, metadata={"help": "GKD sequence-level KD; not used here, True warns."})

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        self._resolve_gkd_fields()
        self._resolve_default_precision()
        super().__post_init__()
        self._validate()

    def _resolve_default_precision(self):
        """TRL turns `bf16` on when it is left unset. On a CPU that has no bf16 instructions every bf16 product is
        emulated, several times slower than float32, and autocast saves no memory over float32 weights: there an
        unset `bf16` means float32. An explicit `bf16=True` is kept."""
        if self.bf16 is None and not self.fp16 and trains_on_cpu(self.use_cpu) and not cpu_computes_bf16_natively():
            self.bf16 = False
            logger.info("bf16 left unset, on a CPU without bf16 instructions (avx512_bf16 / AMX): training in "
                        "float32, which runs faster there than emulated bf16. Pass bf16=True to train in bf16.")

    def _resolve_gkd_fields(self):
        if self.max_new_tokens is not None:
            self.max_completion_length = self.max_new_tokens
        if self.lmbda is not None and self.lmbda != 1.0:
            warnings.warn(
                f"`lmbda={self.lmbda}` has no meaning in ReverseKLDistillTrainer: every batch is sampled on-policy "
                "from the teacher-mixed distribution (see `teacher_mix_alpha`). It is ignored.",
                UserWarning,
                stacklevel=3,
            )
        if self.beta is not None and self.beta != 1.0:
            warnings.warn(
                f"`beta={self.beta}` has no meaning in ReverseKLDistillTrainer, which minimises the sequence-level "
                "reverse KL (beta=1). It is ignored; use trl.DistillationTrainer for forward KL or JSD.",
                UserWarning,
                stacklevel=3,
            )
        self.beta = 1.0
        if self.seq_kd:
            warnings.warn(
                "`seq_kd=True` has no meaning in ReverseKLDistillTrainer (MiniLLM samples from the student mixed with "
                "the teacher, see `teacher_mix_alpha`). It is ignored.",
                UserWarning,
                stacklevel=3,
            )

    def _validate(self):
        checks = [
            (0.0 <= self.teacher_mix_alpha <= 1.0, f"teacher_mix_alpha must be in [0, 1], got {self.teacher_mix_alpha}."),
            (0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}."),
            (self.ppo_clip_epsilon > 0, f"ppo_clip_epsilon must be > 0, got {self.ppo_clip_epsilon}."),
            (self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}."),
            (self.reward_scaling > 0, f"reward_scaling must be > 0, got {self.reward_scaling}."),
            (self.reward_clip is None or self.reward_clip > 0, f"reward_clip must be > 0 or None, got {self.reward_clip}."),
            (
                self.importance_weight_max is None or self.importance_weight_max > 0,
                f"importance_weight_max must be > 0 or None, got {self.importance_weight_max}.",
            ),
            (
                self.lm_loss_weight is None or self.lm_loss_weight >= 0,
                f"lm_loss_weight must be >= 0 or None, got {self.lm_loss_weight}.",
            ),
            (
                0 < self.lm_loss_row_share <= 1,
                f"lm_loss_row_share must be in (0, 1], got {self.lm_loss_row_share}.",
            ),
            (self.loss_chunk_size >= 1, f"loss_chunk_size must be >= 1, got {self.loss_chunk_size}."),
            (self.greedy_probe_steps >= 1, f"greedy_probe_steps must be >= 1, got {self.greedy_probe_steps}."),
            (
                self.max_consecutive_nonfinite_steps >= 0,
                f"max_consecutive_nonfinite_steps must be >= 0, got {self.max_consecutive_nonfinite_steps}.",
            ),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}."),
            (
                self.max_completion_length is not None and self.max_completion_length >= 1,
                f"max_new_tokens / max_completion_length must be >= 1, got {self.max_completion_length}.",
            ),
            (
                self.policy_gradient or self.single_step_regularization,
                "policy_gradient=False and single_step_regularization=False leave no reverse-KL term to train on: "
                "turn at least one of them on.",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.max_length is not None and self.max_length <= self.max_completion_length:
            raise ValueError(
                f"max_length ({self.max_length}) must exceed max_completion_length ({self.max_completion_length}): "
                "it bounds prompt + completion. Raise max_length or lower max_new_tokens."
            )
        if self.use_vllm:
            raise ValueError(
                "use_vllm=True is not supported: teacher-mixed sampling draws every token from α·p + (1-α)·q, which "
                "needs the teacher's next-token distribution inside the decode loop, and vLLM samples from the "
                "student alone. Set use_vllm=False (the built-in sampler keeps KV caches for both models)."
            )
