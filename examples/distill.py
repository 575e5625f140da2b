"""Distil a student from a teacher with ReverseKLDistillTrainer: trl's script layout (`TrlParser` over
ScriptArguments, ReverseKLDistillConfig, ModelConfig, DatasetMixtureConfig), flags or a YAML recipe.

# One process (CPU or one GPU); the tiny recipe runs on a laptop CPU in about a minute
```bash
python examples/make_tiny_models.py tiny
python examples/distill.py --config examples/recipes/tiny.yaml
```

# Two CPU processes (gloo), to check a multi-process set-up without GPUs
```bash
accelerate launch --config_file examples/accelerate/cpu_2proc.yaml examples/distill.py \
    --config examples/recipes/tiny.yaml --per_device_train_batch_size 8 --output_dir tiny-2proc
```

# 8 GPUs: DDP, DeepSpeed ZeRO-3 or FSDP2 (see docs/multi-gpu.md; FSDP1 is not supported)
```bash
accelerate launch --config_file examples/accelerate/multi_gpu.yaml examples/distill.py \
    --config examples/recipes/qwen2.5-1.5b-to-0.5b.yaml
accelerate launch --config_file examples/accelerate/zero3.yaml examples/distill.py \
    --config examples/recipes/qwen2.5-1.5b-to-0.5b.yaml
accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/distill.py \
    --config examples/recipes/qwen2.5-1.5b-to-0.5b.yaml
```

# LoRA student, 4-bit teacher (one GPU)
```bash
python examples/distill.py --config examples/recipes/qwen2.5-7b-to-0.5b-lora-4bit-teacher.yaml
```

`rkd-trl train` takes the same arguments. A GKD script (`trl.experimental.gkd`) is migrated by swapping the class
names, see docs/migrating-from-gkd.md.
"""

from rkd_trl.cli import make_train_parser, quiet_library_notices, train

if __name__ == "__main__":
    quiet_library_notices()
    parser = make_train_parser(prog="examples/distill.py")
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    train(script_args, training_args, model_args, dataset_args)
