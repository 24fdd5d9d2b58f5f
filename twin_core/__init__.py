"""What both twins share and needs neither framework: config, checks, rope, files.

Imports only the standard library and NumPy.
"""

from .checks import check_prompt, check_sampling, check_token_id, expert_capacity, prompt_bucket
from .config import (
    FROZEN_MOE_TENSORS,
    LLAMA_OPTIONS,
    MLA_NORM_EPS,
    ROPE_TYPES,
    BlockConfig,
    LMConfig,
    RopeScaling,
    TrainConfig,
    check_heads,
    check_moe_config,
    mla_absorbs,
    rotary_dims,
)
from .files import atomic_write, digest
from .rope import (
    DynamicNTK,
    RopeTables,
    inv_frequencies,
    mla_softmax_scale,
    recompute_position,
    rope_tables,
)

__all__ = [
    "FROZEN_MOE_TENSORS",
    "LLAMA_OPTIONS",
    "MLA_NORM_EPS",
    "ROPE_TYPES",
    "BlockConfig",
    "DynamicNTK",
    "LMConfig",
    "RopeScaling",
    "RopeTables",
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
    "mla_absorbs",
    "mla_softmax_scale",
    "prompt_bucket",
    "recompute_position",
    "rope_tables",
    "rotary_dims",
]
