"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Shards a tiny student and teacher with FSDP2 (`fully_shard` per decoder layer and at the root, as accelerate's
TRANSFORMER_BASED_WRAP does) and checks that the trainer's direct calls — the teacher-mixed sampler and the teacher's
LM head in the loss — fail on the sharded root parameters without `root_parameters_gathered` and match the unsharded
models with it.
"""

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from trl.distributed import DistributedBackend

from rkd_trl.sampling import sample_teacher_mixed
from rkd_trl.scoring import output_logits
from rkd_trl.synthetic import MultiAnswerTask, tiny_causal_lm
from rkd_trl.trainer import root_parameters_gathered


def sample(student, teacher, tokenizer, prompt_ids, prompt_mask):
    torch.manual_seed(0)
    return sample_teacher_mixed(student, teacher, prompt_ids, prompt_mask, vocab_size=len(tokenizer), max_new_tokens=4,
                                alpha=0.2, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def main():
    dist.init_process_group("gloo")
    task = MultiAnswerTask(num_prompts=4)
    tokenizer = task.tokenizer()
    student = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=1).eval()
    teacher = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, seed=2).eval()
    prompt_ids = torch.tensor([[0, 5, 4], [6, 7, 4]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    expected = sample(student, teacher, tokenizer, prompt_ids, prompt_mask)
    hidden = expected.teacher_hidden.reshape(-1, expected.teacher_hidden.size(-1))
    expected_logits = output_logits(teacher, hidden, len(tokenizer))

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for model in (student, teacher):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    state = SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=SimpleNamespace(fsdp_version=2))
    backend = DistributedBackend(SimpleNamespace(state=state))  # what accelerate's FSDP2 plugin makes trl detect

    with torch.no_grad():
        try:
            output_logits(teacher, hidden, len(tokenizer))
            raise AssertionError("the sharded LM head was expected to fail outside root_parameters_gathered")
        except RuntimeError as error:
            assert "DTensor" in str(error), error
        with root_parameters_gathered(student, backend), root_parameters_gathered(teacher, backend):
            rollout = sample(student, teacher, tokenizer, prompt_ids, prompt_mask)
        with root_parameters_gathered(teacher, backend):
            logits = output_logits(teacher, hidden, len(tokenizer))

    assert torch.equal(rollout.completion_ids, expected.completion_ids)
    for name in ("student_logprobs", "teacher_logprobs", "sampling_logprobs", "teacher_hidden"):
        assert torch.allclose(getattr(rollout, name), getattr(expected, name), atol=1e-6), name
    assert torch.allclose(logits, expected_logits, atol=1e-6)
    dist.barrier()
    print(f"rank {dist.get_rank()}: FSDP2 direct calls match")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
