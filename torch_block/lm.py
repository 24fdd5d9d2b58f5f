"""A decoder-only language model (GPT-2's layout by default), built on TransformerBlock."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from twin_core import LMConfig
from twin_core.checks import check_key_mask, check_lm_call, check_token_range

from .arguments import config_from_arguments
from .block import TransformerBlock
from .cache import KVCache
from .linear import linear
from .norm import make_norm


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for the integer dtypes (bool is not one)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def position_ids(attention_mask: torch.Tensor | None, start: int, length: int) -> torch.Tensor:
    """Positions of the `length` tokens written at slot `start`: (B, length), or (1, length).

    With a mask (B, start + length) over every key slot, a token's position is the number of
    real tokens before it, so a left-padded row starts at 0; pad slots get position 0.
    """
    if attention_mask is None:
        return start + torch.arange(length)[None, :]  # (1, T)
    real_so_far = torch.cumsum(attention_mask.long(), dim=-1)  # (B, S)
    return (real_so_far - 1).clamp(min=0)[:, start : start + length]  # (B, T)


class EmbeddingParams(NamedTuple):
    """What `embed` reads of a TransformerLM."""

    token: torch.Tensor  # (vocab_size, d_model)
    position: torch.Tensor | None  # (max_seq_len, d_model) with learned positions
    scale: float | None  # with embed_scale: sqrt(d_model) rounded to the token table's dtype


def embed(ids: torch.Tensor, positions: torch.Tensor, params: EmbeddingParams) -> torch.Tensor:
    """The inputs (B, T, d_model) of the first block: token ids (B, T) at positions (B|1, T)."""
    x = F.embedding(ids, params.token)  # (B, T, d_model)
    if params.scale is not None:
        x = x * params.scale
    if params.position is not None:
        x = x + F.embedding(positions, params.position)
    return x


def unembed(x: torch.Tensor, head: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """The logits (..., vocab_size) of final hidden states x (..., d_model); head (V, d_model);
    with `softcap`, capped to softcap * tanh(logits / softcap)."""
    logits = linear(x, head)
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


class TransformerLM(nn.Module):
    """Token embedding [+ learned positions] -> dropout -> blocks -> norm -> LM head.

    With the defaults this is GPT-2's layout; `**architecture` takes any other field of
    `twin_core.LMConfig` (the family options: rope, rmsnorm, GQA, ...). With `tie_embeddings`
    the head is the token embedding matrix, and the state_dict has no `lm_head.weight`. With
    `embed_scale` the token embeddings are multiplied by sqrt(d_model) (Gemma); with
    `final_logit_softcap` the logits are capped.
    """

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        use_moe: bool = False,
        num_experts: int = 8,
        top_k_experts: int = 2,
        expert_capacity_factor: float | None = 1.25,
        tie_embeddings: bool = True,
        *,
        router_z_loss_coef: float = 0.0,
        **architecture: Any,
    ):
        config = config_from_arguments(LMConfig, locals())
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.max_seq_len = config.max_seq_len
        self.tie_embeddings = config.tie_embeddings
        learned = config.positions == "learned"
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (
            nn.Embedding(config.max_seq_len, config.d_model) if learned else None
        )
        for embedding in (self.token_embedding, self.position_embedding):
            if embedding is not None:  # drawn in this order: the original project's weights
                nn.init.normal_(embedding.weight, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        blocks = config.block_configs()
        self.blocks = nn.ModuleList([TransformerBlock.from_config(block) for block in blocks])
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )

    @classmethod
    def from_config(cls, config: LMConfig) -> TransformerLM:
        """The language model that `config` describes."""
        return cls(**config.kwargs())

    def create_kv_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> list[KVCache]:
        """One empty cache per block, each with `max_seq_len` slots."""
        return [
            block.create_kv_cache(max_batch_size, max_seq_len, dtype, device)
            for block in self.blocks
        ]

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv_cache: list[KVCache] | None,
    ) -> None:
        """Raise ValueError unless input_ids (B, T) are token ids and the mask covers every key.

        A position >= max_seq_len (possible only with a cache longer than max_seq_len) makes
        the position embedding raise IndexError.
        """
        if not isinstance(input_ids, torch.Tensor) or not is_integer_dtype(input_ids.dtype):
            raise ValueError(f"input_ids must be an integer tensor, got {_describe(input_ids)}")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(
                f"input_ids must be (batch >= 1, seq_len >= 1), got shape {tuple(input_ids.shape)}"
            )
        check_token_range(int(input_ids.min()), int(input_ids.max()), self.vocab_size)
        B, T = input_ids.shape
        caches = None if kv_cache is None else len(kv_cache)
        check_lm_call(T, self.max_seq_len, caches, len(self.blocks))
        S = T if kv_cache is None else kv_cache[0].cache_position + T
        check_key_mask(attention_mask, (B, S))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_aux_loss: bool = False,
        kv_cache: list[KVCache] | None = None,
    ) -> torch.Tensor | tuple:
        """input_ids (B, T) -> logits (B, T, vocab_size), then aux if asked, then the cache.

        `attention_mask` (B, S) marks real tokens with 1 over every key slot: S = T without a
        cache, S = cache position + T with one. Pad keys are never attended and positions count
        real tokens only. With `kv_cache` (one KVCache per block, updated in place) the tokens
        are written at the caches' position and the same list is returned last. aux is the sum
        of the blocks' MoE losses (0 for dense blocks).
        """
        self.check_inputs(input_ids, attention_mask, kv_cache)
        x, aux = self.hidden_states(input_ids, attention_mask, kv_cache, return_aux_loss)
        logits = self.logits(x)  # (B, T, vocab_size)
        outputs = [logits]
        if return_aux_loss:
            outputs.append(aux)
        if kv_cache is not None:
            outputs.append(kv_cache)
        return logits if len(outputs) == 1 else tuple(outputs)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: list[KVCache] | None = None,
        return_aux_loss: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` up to the final norm, without its input checks, for callers that made them
        (generate): (x (B, T, d_model), aux), the caches written as `forward` writes them."""
        start = 0 if kv_cache is None else kv_cache[0].cache_position
        T = input_ids.shape[1]
        positions = position_ids(attention_mask, start, T).to(input_ids.device)  # (B|1, T)
        x = self.dropout(embed(input_ids, positions, self.embedding_params()))  # (B, T, d_model)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        aux = torch.zeros((), device=x.device)
        for i, block in enumerate(self.blocks):
            layer_cache = None if kv_cache is None else kv_cache[i]
            x, _, block_aux = block(
                x,
                key_mask,
                layer_cache,
                layer_cache is not None,
                return_aux_loss=return_aux_loss,
                positions=positions,
            )
            if block_aux is not None:
                aux = aux + block_aux
        return self.norm(x), aux  # (B, T, d_model), ()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head: x (..., d_model) -> logits (..., vocab_size)."""
        return unembed(x, self.head_weight(), self.config.final_logit_softcap)

    def embedding_params(self) -> EmbeddingParams:
        """The tables `embed` reads."""
        token = self.token_embedding.weight
        position = None if self.position_embedding is None else self.position_embedding.weight
        scale = None
        if self.config.embed_scale:  # as transformers' Gemma: float32, then the weights' dtype
            scale = float(
                torch.tensor(self.config.d_model**0.5, dtype=torch.float32).to(token.dtype)
            )
        return EmbeddingParams(token, position, scale)

    def head_weight(self) -> torch.Tensor:
        """The LM head's matrix (vocab_size, d_model): the token embedding when tied."""
        return self.token_embedding.weight if self.lm_head is None else self.lm_head.weight


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
