"""duallora_kernels: fused kernels and drop-in layers for DualLoRA continual learning of ViTs."""
from .ops import dual_lora_linear, gram, task_scores

__version__ = "0.1.0"

__all__ = ["dual_lora_linear", "gram", "task_scores", "__version__"]
