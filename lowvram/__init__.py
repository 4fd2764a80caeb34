"""lowvram: Day 25 of the course: training a GPT on a 4 GB GPU with Hugging Face accelerate.

Light on import: torch and the config/model are loaded; transformers and matplotlib are
imported only by the functions that need them.
"""

from lowvram.config import PRESETS, ModelConfig, TrainConfig, config_table, get_preset
from lowvram.model import GPTModel

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "GPTModel",
    "ModelConfig",
    "TrainConfig",
    "__version__",
    "config_table",
    "get_preset",
]
