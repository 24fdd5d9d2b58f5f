"""The PyTorch transformer block: attention with a KV cache, dense or Mixture-of-Experts FFN."""

from .attention import MultiHeadAttention
from .block import TransformerBlock
from .cache import KVCache
from .feed_forward import FeedForward
from .moe import MixtureOfExperts

__all__ = ["FeedForward", "KVCache", "MixtureOfExperts", "MultiHeadAttention", "TransformerBlock"]
