"""Run a script with accelerate's FSDP on CPU processes (gloo), to check an FSDP2 set-up without GPUs:

    accelerate launch --config_file examples/accelerate/cpu_2proc_fsdp2.yaml examples/accelerate/fsdp_on_cpu.py \
        examples/distill.py --config examples/recipes/tiny.yaml --per_device_train_batch_size 8

accelerate (1.15) turns FSDP on only for accelerator devices: on CPU processes its state stays MULTI_CPU and drops the
FSDP plugin that `accelerate launch` configured, so the trainer would silently run DDP instead. torch's FSDP2 itself
runs on CPU tensors with gloo. This launcher makes accelerate's state FSDP when an FSDP plugin reaches it on CPU
processes, then runs SCRIPT with its arguments as `python SCRIPT ARGS...` would. Used by the tests and
benchmarks/fsdp_memory.py; on GPUs use `examples/accelerate/fsdp2.yaml` with the script directly.
"""

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Every later AcceleratorState() copies the distributed type from the process-wide PartialState: set both.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


if __name__ == "__main__":
    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
