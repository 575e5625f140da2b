import warnings

import pytest

from rkd_trl import ReverseKLDistillConfig


def make(tmp_path, **kwargs):
    return ReverseKLDistillConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **kwargs)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("teacher_mix_alpha", -0.1, "teacher_mix_alpha must be in"),
        ("teacher_mix_alpha", 1.5, "teacher_mix_alpha must be in"),
        ("gamma", 1.01, "gamma must be in"),
        ("ppo_clip_epsilon", 0.0, "ppo_clip_epsilon must be > 0"),
        ("ppo_epochs", 0, "ppo_epochs must be >= 1"),
        ("reward_scaling", 0.0, "reward_scaling must be > 0"),
        ("reward_clip", -1.0, "reward_clip must be > 0"),
        ("importance_weight_max", 0.0, "importance_weight_max must be > 0"),
        ("loss_chunk_size", 0, "loss_chunk_size must be >= 1"),
        ("max_new_tokens", 0, "max_completion_length must be >= 1"),
        ("lm_loss_weight", -1.0, "lm_loss_weight must be >= 0"),
        ("lm_loss_row_share", 0.0, "lm_loss_row_share must be in"),
        ("lm_loss_row_share", 1.5, "lm_loss_row_share must be in"),
        ("temperature", 0.0, "temperature must be > 0"),
        ("max_consecutive_nonfinite_steps", -1, "max_consecutive_nonfinite_steps must be >= 0"),
        ("use_vllm", True, "use_vllm=True is not supported"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **{field: value})


def test_some_reverse_kl_term_must_stay_on(tmp_path):
    make(tmp_path, policy_gradient=False)
    make(tmp_path, single_step_regularization=False)
    with pytest.raises(ValueError, match="leave no reverse-KL term"):
        make(tmp_path, policy_gradient=False, single_step_regularization=False)


def test_max_length_must_leave_room_for_the_prompt(tmp_path):
    with pytest.raises(ValueError, match="max_length"):
        make(tmp_path, max_new_tokens=64, max_length=64)


def test_gkd_names(tmp_path):
    config = make(tmp_path, max_new_tokens=17, lmbda=1.0, beta=1.0, temperature=0.9)
    assert config.max_completion_length == 17 and config.temperature == 0.9
    with pytest.warns(UserWarning, match="lmbda"):
        make(tmp_path, lmbda=0.5)
    with pytest.warns(UserWarning, match="beta"):
        config = make(tmp_path, beta=0.5)
    assert config.beta == 1.0
    with pytest.warns(UserWarning, match="seq_kd"):
        make(tmp_path, seq_kd=True)


def test_defaults_follow_paper_and_reference(tmp_path):
    config = make(tmp_path)
    assert config.teacher_mix_alpha == 0.2 and config.gamma == 0.95 and config.ppo_clip_epsilon == 0.2
    assert config.length_normalization and config.single_step_regularization and config.disable_dropout


def test_activation_checkpointing_is_on_by_default_without_a_deprecation_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert make(tmp_path).activation_checkpointing is True  # trl's default
        assert make(tmp_path, activation_checkpointing=False).gradient_checkpointing is False  # the alias mirrors it
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):  # transformers' warning
        assert make(tmp_path, gradient_checkpointing=False).activation_checkpointing is False  # the alias still works


@pytest.mark.parametrize("native", [False, True])
def test_unset_bf16_means_float32_on_a_cpu_that_emulates_bf16(tmp_path, monkeypatch, caplog, native):
    """Decided explicitly for both kinds of CPU, so the test does not depend on the machine it runs on."""
    import rkd_trl.config

    monkeypatch.setattr(rkd_trl.config, "cpu_computes_bf16_natively", lambda: native)
    with caplog.at_level("INFO", logger="rkd_trl.config"):
        config = ReverseKLDistillConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert config.bf16 is native  # TRL's default (on) where the CPU computes bf16, float32 where it emulates it
    assert ("training in float32" in caplog.text) is not native
    explicit = ReverseKLDistillConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=True)
    assert explicit.bf16 is True  # asked for: kept, emulated or not
    fp16 = ReverseKLDistillConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, fp16=True)
    assert fp16.fp16 and not fp16.bf16


def test_native_bf16_check_reads_the_cpu(monkeypatch):
    import torch

    import rkd_trl.config

    monkeypatch.setattr(rkd_trl.config.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value)
        assert rkd_trl.config.cpu_computes_bf16_natively() is expected
    monkeypatch.setattr(rkd_trl.config.platform, "machine", lambda: "aarch64")
    assert rkd_trl.config.cpu_computes_bf16_natively() is True  # not checked there: TRL's default kept
