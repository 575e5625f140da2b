"""Run by `tests/test_distributed.py` under `accelerate launch` (2 CPU processes, FSDP2, through
examples/accelerate/fsdp_on_cpu.py): train a few steps per teacher-mixing α where the two processes decode
different numbers of steps, and write per process what the teacher's parameters were between and during rollouts
and how many all-gathers each rollout made; then whether the non-finite check catches a NaN held by one process's
shard on both processes.

Process 0 decodes the full `max_new_tokens` (no EOS id), process 1 stops after one token (every token is an EOS id):
with collectives inside the decode loop the processes would wait for each other forever. The LM loss is on, so each
step's backward runs through two student forwards whose hidden states meet the output head outside the root forward.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.distributed.tensor import DTensor

import rkd_trl.trainer
from rkd_trl import ReverseKLDistillConfig, ReverseKLDistillTrainer
from rkd_trl.demo.synthetic import MultiAnswerTask, tiny_causal_lm
from rkd_trl.fsdp import shard_teacher
from rkd_trl.scoring import check_finite_parameters

ALL_GATHERS = ("all_gather_single", "all_gather_into_tensor")  # FSDP2's all-gather calls the first in torch 2.13
all_gathers = {"count": 0}


def counted(collective):
    def call(*args, **kwargs):
        all_gathers["count"] += 1
        return collective(*args, **kwargs)

    return call


for name in ALL_GATHERS:
    if hasattr(dist, name):
        setattr(dist, name, counted(getattr(dist, name)))


def parameter_layout(model) -> dict:
    """Per parameter: whether it is a DTensor, its placements, the shapes of this process's part and of the whole."""
    layout = {}
    for name, parameter in model.named_parameters():
        sharded = isinstance(parameter, DTensor)
        layout[name] = {
            "dtensor": sharded,
            "placements": [repr(p) for p in parameter.placements] if sharded else None,
            "local": list(parameter.to_local().shape if sharded else parameter.shape),
            "full": list(parameter.shape),
        }
    return layout


def record_rollouts(records):
    """Wrap the trainer's `sample_teacher_mixed` and `_generate_and_score_completions`: what the models held while
    sampling, the decode steps, and the all-gathers inside the decode loop and over the whole rollout."""
    sample = rkd_trl.trainer.sample_teacher_mixed
    generate = ReverseKLDistillTrainer._generate_and_score_completions

    def sample_and_record(student, teacher, *args, **kwargs):
        if teacher is None:  # the greedy probe (student alone, inside the same gathered rollout): not a rollout
            return sample(student, teacher, *args, **kwargs)
        before = all_gathers["count"]
        rollout = sample(student, teacher, *args, **kwargs)
        records.append({
            "decode_steps": rollout.completion_ids.size(1),
            "teacher_calls": rollout.teacher_calls,
            "student_calls": rollout.student_calls,
            "all_gathers_in_decode": all_gathers["count"] - before,
            "teacher": parameter_layout(teacher),
            "student": parameter_layout(student),
        })  # fmt: skip
        return rollout

    def generate_and_record(self, inputs):
        before = all_gathers["count"]
        batch = generate(self, inputs)
        records[-1]["all_gathers_in_rollout"] = all_gathers["count"] - before
        return batch

    rkd_trl.trainer.sample_teacher_mixed = sample_and_record
    ReverseKLDistillTrainer._generate_and_score_completions = generate_and_record


def main(output_dir: Path):
    state = PartialState()
    task = MultiAnswerTask(num_prompts=8, answers_per_prompt=3, answer_length=3, num_letters=6, seed=0)
    tokenizer = task.tokenizer()
    records = []
    record_rollouts(records)
    result = {"process": state.process_index, "runs": []}
    # top_k=1: the teacher in the decode loop at every step (the per-step path of a filtered mixture); top_k=0: the
    # one-coin sampler, the teacher catching up at its own steps in one cached forward.
    for alpha, top_k in ((0.2, 1), (0.2, 0), (0.0, 1)):
        args = ReverseKLDistillConfig(
            output_dir=str(output_dir / f"alpha{alpha}-top_k{top_k}"), max_new_tokens=6, teacher_mix_alpha=alpha,
            top_k=top_k,
            lm_loss_weight=0.5, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3, logging_steps=1,
            report_to=[], bf16=False, use_cpu=True, save_strategy="no", seed=0,
        )  # fmt: skip
        trainer = ReverseKLDistillTrainer(
            model=tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, seed=2),
            teacher_model=tiny_causal_lm(tokenizer, hidden_size=48, num_layers=2, seed=1),
            args=args, train_dataset=task.conversations(), processing_class=tokenizer,
        )  # fmt: skip
        trainer.eos_token_ids = [] if state.process_index == 0 else list(range(len(tokenizer)))
        teacher_at_start = parameter_layout(trainer.teacher_model)
        del records[:]  # the start-up probe is not a rollout
        trainer.train()
        result["runs"].append({
            "alpha": alpha,
            "top_k": top_k,
            "teacher_at_start": teacher_at_start,
            "teacher_after_training": parameter_layout(trainer.teacher_model),
            "rollouts": list(records),
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        })  # fmt: skip
    corrupt = shard_teacher(tiny_causal_lm(tokenizer, hidden_size=48, num_layers=2, seed=1), trainer.accelerator)
    if state.process_index == 1:
        corrupt.lm_head.weight.to_local()[0, 0] = float("nan")
    try:
        check_finite_parameters(corrupt, "teacher")
        result["nan_in_one_shard_raised"] = False
    except ValueError:
        result["nan_in_one_shard_raised"] = True
    (output_dir / f"process_{state.process_index}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
