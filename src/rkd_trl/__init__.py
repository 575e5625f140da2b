"""rkd_trl: MiniLLM-style reverse-KL knowledge distillation for Hugging Face TRL."""

from .config import ReverseKLDistillConfig
from .trainer import ReverseKLDistillTrainer

__all__ = ["ReverseKLDistillConfig", "ReverseKLDistillTrainer"]
__version__ = "0.1.0"
