"""rkd_trl: MiniLLM-style reverse-KL knowledge distillation for Hugging Face TRL."""

import importlib
from typing import TYPE_CHECKING

# The public classes load on first use, so that `import rkd_trl` (and `rkd-trl --help`) imports neither trl nor
# transformers, nor the optional libraries they pull in (bitsandbytes through peft, trackers, deepspeed).
_MODULE_OF = {"ReverseKLDistillConfig": ".config", "ReverseKLDistillTrainer": ".trainer", "DegenerationGuard": ".guard"}

__all__ = ["DegenerationGuard", "ReverseKLDistillConfig", "ReverseKLDistillTrainer"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import ReverseKLDistillConfig
    from .guard import DegenerationGuard
    from .trainer import ReverseKLDistillTrainer


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
