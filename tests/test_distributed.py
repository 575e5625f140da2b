"""Multi-process runs on CPU (gloo): `accelerate launch` with 2 processes (DDP, DeepSpeed ZeRO-3, FSDP2) equals 1
process at the same global batch and seed, ZeRO-3 copes with processes that score different numbers of tokens, and
FSDP2 shards the teacher and gathers each model once per rollout, however many steps each process decodes."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rkd_trl.cli import make_train_parser, train

REPO = Path(__file__).resolve().parents[1]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """Tiny models, the training arguments, and the weights after 3 steps in one process with 8 prompts a step."""
    root = tmp_path_factory.mktemp("distributed")
    tiny = load_example("make_tiny_models").make_tiny_models(root / "tiny", teacher_steps=30, student_sft_steps=10)
    # Greedy decoding (top_k=1) makes the rollouts independent of how prompts are split over processes; whitening
    # (turned on here) takes its statistics over all processes; the LM loss on every row, since the rows a share
    # draws depend on the split. SGD keeps weight differences = lr × gradient differences.
    arguments = [
        "--config", str(REPO / "examples/recipes/tiny.yaml"),
        "--model_name_or_path", str(tiny / "student"),
        "--teacher_model_name_or_path", str(tiny / "teacher"),
        "--dataset_name", str(tiny / "data"),
        "--max_steps", "3", "--top_k", "1", "--whiten_advantages", "true", "--lm_loss_row_share", "1.0",
        "--optim", "sgd", "--learning_rate", "0.5", "--max_grad_norm", "0", "--logging_steps", "1",
    ]  # fmt: skip
    parser = make_train_parser()
    train(*parser.parse_args_and_config([*arguments, "--per_device_train_batch_size", "8",
                                         "--output_dir", str(root / "one")]))  # fmt: skip
    return tiny, arguments, load_file(root / "one" / "model.safetensors")


def launch_two_processes(tmp_path, accelerate_config, arguments, script=REPO / "examples/distill.py", timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    # accelerate turns FSDP on only for accelerator devices; this launcher turns it on for the CPU processes.
    launcher = [str(REPO / "examples/accelerate/fsdp_on_cpu.py")] if "fsdp" in accelerate_config else []
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "examples/accelerate" / accelerate_config), "--main_process_port", str(free_port()),
        *launcher, str(script), *arguments,
    ]  # fmt: skip
    # Own session: a run that hangs is killed with all its processes, not just the launcher.
    with subprocess.Popen(launch, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(launch, process.returncode, stdout, stderr)


def test_zero3_loss_with_different_token_counts_per_process(tmp_path, one_process_run):
    # Sampled (not greedy) completions and 1-token loss chunks: the processes run different numbers of chunks, and
    # every ZeRO-3 LM-head call is a collective, so the shorter process pads with empty chunks.
    pytest.importorskip("deepspeed", reason="optional dependency: pip install rkd-trl[deepspeed]")
    _, arguments, _ = one_process_run
    result = launch_two_processes(tmp_path, "cpu_2proc_zero3.yaml", [
        *arguments, "--top_k", "0", "--loss_chunk_size", "1", "--lm_loss_weight", "0.5",
        "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two"),
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "two" / "model.safetensors").exists()


@pytest.mark.parametrize("accelerate_config", ["cpu_2proc.yaml", "cpu_2proc_zero3.yaml", "cpu_2proc_fsdp2.yaml"])
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path, one_process_run, accelerate_config):
    if "zero3" in accelerate_config:
        pytest.importorskip("deepspeed", reason="optional dependency: pip install rkd-trl[deepspeed]")
    tiny, arguments, one = one_process_run
    result = launch_two_processes(tmp_path, accelerate_config, [
        *arguments, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two"),
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    start = load_file(tiny / "student" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    moved = max((one[name] - start[name]).abs().max().item() for name in start)
    difference = max((one[name] - two[name]).abs().max().item() for name in start)
    assert moved > 1e-2, moved
    # A launch that silently ran one process would train on a global batch of 4, not 8, and not match.
    # Measured after 3 steps: DDP, ZeRO-3 and FSDP2 all ~1e-7 (float32 rounding), weights moved by ~0.1.
    assert difference < 1e-4 * max(1.0, moved), (difference, moved)


def test_every_process_ends_with_the_published_best_checkpoint(tmp_path):
    # Checkpoints are written under a staging folder and renamed; the best-checkpoint path recorded during the save
    # must be the final one on every process, not only on the one that renames.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "examples/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
        str(REPO / "tests" / "distributed_best_checkpoint.py"), str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(launch, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = sorted(line for line in result.stdout.splitlines() if "best checkpoint:" in line)
    assert len(reported) == 2, result.stdout[-2000:]
    for line in reported:
        best = line.split("best checkpoint: ")[1]
        assert os.path.dirname(best) == str(tmp_path / "out") and os.path.basename(best).startswith("checkpoint-")


def test_fsdp2_shards_the_teacher_and_gathers_each_model_once_per_rollout(tmp_path):
    # Process 0 decodes 6 steps, process 1 one step (tests/distributed_fsdp2_rollouts.py), for α = 0.2 (both models
    # in the decode loop: the teacher at every step with top_k=1, catching up at its own steps with top_k=0) and
    # α = 0 (the teacher scores in one parallel forward). With collectives in the decode loop
    # the processes would wait for each other forever: the timeout turns that into a failure.
    try:
        result = launch_two_processes(
            tmp_path, "cpu_2proc_fsdp2.yaml", [str(tmp_path)], script=REPO / "tests/distributed_fsdp2_rollouts.py",
            timeout=180,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process FSDP2 run hung (processes that decode different numbers of steps)")
    assert result.returncode == 0, result.stderr[-3000:]
    processes = [json.loads((tmp_path / f"process_{index}.json").read_text()) for index in (0, 1)]

    for run_0, run_1 in zip(processes[0]["runs"], processes[1]["runs"], strict=True):
        alpha = run_0["alpha"]
        for name in run_0["teacher_at_start"]:
            layouts = [run[when][name] for when in ("teacher_at_start", "teacher_after_training")
                       for run in (run_0, run_1)]  # fmt: skip
            # Sharded between rollouts: each process holds its half of the rows (dim 0) of every teacher parameter.
            assert all(layout["dtensor"] and layout["placements"] == ["Shard(dim=0)"] for layout in layouts), name
            rows = layouts[0]["full"][0]
            assert [layout["local"][0] for layout in layouts] == [-(-rows // 2), rows // 2] * 2, name
            assert all(layout["local"][1:] == layout["full"][1:] for layout in layouts), name

        rollouts = [run_0["rollouts"], run_1["rollouts"]]
        assert len(rollouts[0]) == len(rollouts[1]) == 2, alpha  # one per step
        for rollout_0, rollout_1 in zip(*rollouts):
            assert (rollout_0["decode_steps"], rollout_1["decode_steps"]) == (6, 1), alpha
            for rollout in (rollout_0, rollout_1):
                # Gathered while sampling: plain tensors holding every element, in both models.
                for model in ("teacher", "student"):
                    assert all(not p["dtensor"] and p["local"] == p["full"] for p in rollout[model].values()), model
                # No all-gather per decoded token: none inside the decode loop, ...
                assert rollout["all_gathers_in_decode"] == 0, (alpha, rollout["all_gathers_in_decode"])
            # ... and the same number over the whole rollout on both processes (6 steps and 1 step).
            assert rollout_0["all_gathers_in_rollout"] == rollout_1["all_gathers_in_rollout"] > 0, alpha
        assert run_0["losses"] == run_1["losses"] and len(run_0["losses"]) == 2, alpha
    # The one-coin sampler's models ran at their own steps only: fewer forwards of each than at every step.
    assert processes[0]["runs"][1]["top_k"] == 0
    for model in ("teacher", "student"):
        per_step, catch_up = (sum(r[f"{model}_calls"] for r in processes[0]["runs"][i]["rollouts"]) for i in (0, 1))
        assert catch_up < per_step, (model, catch_up, per_step)
    # A NaN in one process's shard of the teacher stops every process, not just the one holding it.
    assert processes[0]["nan_in_one_shard_raised"] and processes[1]["nan_in_one_shard_raised"]
