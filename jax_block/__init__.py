"""The Flax Linen transformer block: attention with a KV cache pytree, dense or MoE FFN."""

from .attention import MultiHeadAttention
from .block import TransformerBlock
from .cache import KVCache, LatentCache
from .decode import decode_step
from .feed_forward import FeedForward
from .generate import cached_forward, generate
from .lm import TransformerLM
from .mla import MultiHeadLatentAttention
from .moe import MixtureOfExperts
from .sampling import sample_next_token
from .sharding import shard_params

__all__ = [
    "FeedForward",
    "KVCache",
    "LatentCache",
    "MixtureOfExperts",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "TransformerBlock",
    "TransformerLM",
    "cached_forward",
    "decode_step",
    "generate",
    "sample_next_token",
    "shard_params",
]
