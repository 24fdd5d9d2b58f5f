"""The PyTorch transformer block: attention with a KV cache, dense or Mixture-of-Experts FFN."""

from .attention import MultiHeadAttention
from .block import TransformerBlock
from .cache import KVCache, LatentCache
from .feed_forward import FeedForward
from .generate import generate
from .lm import TransformerLM
from .mla import MultiHeadLatentAttention
from .moe import MixtureOfExperts
from .sampling import sample_next_token

__all__ = [
    "FeedForward",
    "KVCache",
    "LatentCache",
    "MixtureOfExperts",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "TransformerBlock",
    "TransformerLM",
    "generate",
    "sample_next_token",
]
