"""The Flax Linen transformer block: attention with a KV cache pytree, dense or MoE FFN."""

from .attention import MultiHeadAttention
from .block import TransformerBlock
from .cache import KVCache
from .decode import decode_step
from .feed_forward import FeedForward
from .generate import cached_forward, generate
from .lm import TransformerLM
from .moe import MixtureOfExperts
from .sampling import sample_next_token
from .train import (
    TrainConfig,
    TrainState,
    create_train_state,
    load_train_state,
    loss_and_grads,
    save_model,
    save_train_state,
    train_step,
)

__all__ = [
    "FeedForward",
    "KVCache",
    "MixtureOfExperts",
    "MultiHeadAttention",
    "TransformerBlock",
    "TrainConfig",
    "TrainState",
    "TransformerLM",
    "cached_forward",
    "decode_step",
    "generate",
    "create_train_state",
    "load_train_state",
    "loss_and_grads",
    "sample_next_token",
    "save_model",
    "save_train_state",
    "train_step",
]
