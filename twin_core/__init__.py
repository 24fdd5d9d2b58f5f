"""What both twins share and needs neither framework: config, checks, rope, files.

Imports only the standard library and NumPy.
"""

from .checks import check_prompt, check_sampling, check_token_id, expert_capacity, prompt_bucket
from .config import (
    LLAMA_OPTIONS,
    BlockConfig,
    LMConfig,
    RopeScaling,
    TrainConfig,
    check_heads,
    check_moe_config,
)
from .files import atomic_write, digest
from .rope import inv_frequencies

__all__ = [
    "LLAMA_OPTIONS",
    "BlockConfig",
    "LMConfig",
    "RopeScaling",
    "TrainConfig",
    "atomic_write",
    "check_heads",
    "check_moe_config",
    "check_prompt",
    "check_sampling",
    "check_token_id",
    "digest",
    "expert_capacity",
    "inv_frequencies",
    "prompt_bucket",
]
