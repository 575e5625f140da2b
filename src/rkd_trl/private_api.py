"""Every private name of TRL, transformers and torch that rkd-trl relies on, in one place.

The package overrides or calls these methods and reads these attributes; a release of trl, transformers or torch may
rename or drop any of them without notice. tests/test_private_api.py checks each against the installed versions
and fails with the entry's line, so an upgrade says exactly what moved and where it is used. Add an entry when the
code starts to rely on another private name."""

from typing import NamedTuple


class PrivateName(NamedTuple):
    owner: str  # the class (or module) that defines it, importable
    name: str
    # "method", "function" (of a module) or "class attribute", looked up on the owner; "attribute": set on a trainer
    kind: str
    use: str  # where rkd-trl uses it and what for


PRIVATE_API = (
    # transformers.Trainer: checkpoints, RNG state, the sampler, the inputs (rkd_trl.reliability, rkd_trl.trainer)
    PrivateName("transformers.Trainer", "_save_checkpoint", "method",
                "reliability: overridden, checkpoints written under a staging folder then renamed"),
    PrivateName("transformers.Trainer", "_get_output_dir", "method",
                "reliability: overridden, points the parent's save at the staging folder"),
    PrivateName("transformers.Trainer", "_push_from_checkpoint", "method",
                "reliability: overridden, a checkpoint is pushed once it is complete"),
    PrivateName("transformers.Trainer", "_save_rng_state", "method",
                "reliability: overridden, also saves the rollout buffer inside a ppo_epochs window"),
    PrivateName("transformers.Trainer", "_load_rng_state", "method",
                "reliability: overridden, also restores the rollout buffer"),
    PrivateName("transformers.Trainer", "_prepare_inputs", "method",
                "trainer: overridden, one rollout per generation batch, served to its micro-batches"),
    # trl.DistillationTrainer: the round's hooks and the state they share (rkd_trl.trainer)
    PrivateName("trl.DistillationTrainer", "_get_train_sampler", "method",
                "trainer: overridden, each batch repeated gradient_accumulation_steps x ppo_epochs times"),
    PrivateName("trl.DistillationTrainer", "_generate_and_score_completions", "method",
                "trainer: overridden, the teacher-mixed rollout and its advantages"),
    PrivateName("trl.DistillationTrainer", "_compute_loss", "method",
                "trainer: overridden, the MiniLLM loss (called by the parent's compute_loss)"),
    PrivateName("trl.DistillationTrainer", "_tag_names", "class attribute",
                "trainer: overridden, the model card's tags (trl's create_model_card reads it)"),
    PrivateName("trl.DistillationTrainer", "_name", "class attribute", "trainer: overridden, the model card's method"),
    PrivateName("trl.DistillationTrainer", "_paper", "class attribute",
                "trainer: overridden, the model card's paper and citation"),
    PrivateName("trl.DistillationTrainer", "_tokenize_prompts", "method",
                "trainer: called, the prompts tokenized (chat template) as the parent does"),
    PrivateName("trl.DistillationTrainer", "_tokenizer", "attribute", "trainer: the student's text tokenizer"),
    PrivateName("trl.DistillationTrainer", "_is_vlm", "attribute", "trainer: vision-language students refused"),
    PrivateName("trl.DistillationTrainer", "_dist", "attribute",
                "trainer: the distributed backend (ZeRO-3, FSDP version) for the set-up checks"),
    PrivateName("trl.DistillationTrainer", "_step", "attribute",
                "trainer, reliability: the micro-step counter that picks the buffered rollout"),
    PrivateName("trl.DistillationTrainer", "_buffered_inputs", "attribute",
                "trainer, reliability: the rollouts reused by the micro-batches and ppo_epochs passes"),
    PrivateName("trl.DistillationTrainer", "_metrics", "attribute", "trainer, reliability: logged metrics"),
    PrivateName("trl.DistillationTrainer", "_logs", "attribute", "trainer: the completions tables"),
    # transformers.GenerationMixin: the cache and model kwargs that generate uses (rkd_trl.decoding)
    PrivateName("transformers.GenerationMixin", "_prepare_cache_for_generation", "method",
                "decoding: the model's own cache for token-by-token decoding"),
    PrivateName("transformers.GenerationMixin", "_update_model_kwargs_for_generation", "method",
                "decoding: the cache and masks carried from one decode step to the next"),
    # torch.cpu: whether bf16 products are native on this CPU (rkd_trl.config)
    PrivateName("torch.cpu", "_is_avx512_bf16_supported", "function",
                "config: an unset bf16 resolves to float32 on an x86 CPU without bf16 instructions"),
    PrivateName("torch.cpu", "_is_amx_tile_supported", "function",
                "config: an unset bf16 resolves to float32 on an x86 CPU without bf16 instructions"),
    # torch FSDP2 (rkd_trl.fsdp)
    PrivateName("torch.distributed.fsdp.FSDPModule", "_get_fsdp_state", "method",
                "fsdp: the module's FSDP state, to gather each model once per rollout and bypass per-call hooks"),
)  # fmt: skip
