"""The PyTorch transformer block: attention with a KV cache, dense or Mixture-of-Experts FFN."""

from .attention import MultiHeadAttention
from .block import TransformerBlock
from .cache import KVCache
from .feed_forward import FeedForward
from .generate import generate
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
    "generate",
    "create_train_state",
    "load_train_state",
    "loss_and_grads",
    "sample_next_token",
    "save_model",
    "save_train_state",
    "train_step",
]
