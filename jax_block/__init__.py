"""The Flax Linen transformer block: attention with a KV cache pytree, dense or MoE FFN."""

from .attention import MultiHeadAttention
from .block import TransformerBlock
from .cache import KVCache
from .decode import decode_step
from .feed_forward import FeedForward
from .moe import MixtureOfExperts

__all__ = [
    "FeedForward",
    "KVCache",
    "MixtureOfExperts",
    "MultiHeadAttention",
    "TransformerBlock",
    "decode_step",
]
