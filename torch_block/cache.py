"""A static key/value cache for autoregressive decoding, updated in place."""

from __future__ import annotations

import torch

from twin_core.cache_checks import check_cache_batch, check_cache_sizes, check_cache_slots


def write_slots(
    cache: torch.Tensor, new: torch.Tensor, start: int | torch.Tensor, dim: int = 2
) -> None:
    """Write new (B, H, T, D) into slots start.. of cache (B, H, S, D), in the cache's dtype;
    the slots are along `dim` (2, or 1 for (B, S, ...) buffers). A 0-d int64 tensor `start`
    (T = 1) is written with index_copy_: the form in which torch.compile serves every position
    with one graph."""
    if isinstance(start, torch.Tensor):
        cache.index_copy_(dim, start.view(1), new.to(cache.dtype))
    else:
        slots = slice(start, start + new.shape[dim])
        cache[(slice(None),) * dim + (slots,)] = new  # cast by the copy


def empty_buffers(
    shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype, device: str | torch.device
) -> tuple[torch.Tensor, ...]:
    """A cache's buffers: zeros of each of `shapes`."""
    return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in shapes)


def write_buffers(
    buffers: tuple[torch.Tensor, ...], news: tuple[torch.Tensor, ...], start: int, dim: int
) -> tuple[torch.Tensor, ...]:
    """Write each of `news` (B rows, T slots along `dim`) into the first B rows of its buffer at
    slots [start, start+T), in the buffer's dtype; returns those rows over slots [0, start+T)."""
    B, T = news[0].shape[0], news[0].shape[dim]
    for buffer, new in zip(buffers, news, strict=True):
        write_slots(buffer[:B], new, start, dim)
    return tuple(buffer[:B].narrow(dim, 0, start + T) for buffer in buffers)


class KVCache:
    """Preallocated keys and values of shape (max_batch_size, n_heads, max_seq_len, head_dim).

    Writing T tokens at position p fills slots [p, p+T) and moves `cache_position` to p+T.
    `dtype` and `device` are the original project's attributes: what the constructor and the
    last `.to(device)` were given.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        check_cache_sizes(
            "KVCache",
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            n_heads=n_heads,
            head_dim=head_dim,
        )
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        shape = (max_batch_size, n_heads, max_seq_len, head_dim)
        self.k_cache, self.v_cache = empty_buffers((shape, shape), dtype, device)  # (B, H, S, D)
        self.cache_position = 0

    def check_write(self, batch_size: int, n_heads: int, head_dim: int, start: int, length: int):
        """Raise ValueError unless writing `length` tokens at `start` fits this cache."""
        check_cache_batch(batch_size, self.max_batch_size)
        if (n_heads, head_dim) != (self.n_heads, self.head_dim):
            raise ValueError(
                f"cache holds n_heads={self.n_heads}, head_dim={self.head_dim}; "
                f"got n_heads={n_heads}, head_dim={head_dim}"
            )
        check_cache_slots(start, length, self.max_seq_len)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start_pos: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at `start_pos` (default: the current position).

        Returns the keys and values of slots [0, start_pos + T), each (B, H, start_pos + T, D).
        """
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(
                f"k and v must both be (B, H, T, D); got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        start = self.cache_position if start_pos is None else start_pos
        B, H, T, D = k.shape
        self.check_write(B, H, D, start, T)
        return self.write(k, v, start)

    def write(
        self, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` for a write already checked with `check_write`: no check of its own."""
        keys, values = write_buffers((self.k_cache, self.v_cache), (k, v), start, dim=2)
        self.cache_position = start + k.shape[2]
        return keys, values  # (B, H, start + T, D)

    def get(
        self, batch_size: int | None = None, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `batch_size` rows and `seq_len` slots (default: written)."""
        B = self.max_batch_size if batch_size is None else batch_size
        S = self.cache_position if seq_len is None else seq_len
        return self.k_cache[:B, :, :S], self.v_cache[:B, :, :S]

    def reset(self) -> None:
        """Zero the cache and move its position back to 0."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.cache_position = 0

    def to(self, device: str | torch.device) -> KVCache:
        """Move the cache to `device` in place; returns self."""
        self.k_cache = self.k_cache.to(device)
        self.v_cache = self.v_cache.to(device)
        self.device = device
        return self

    def __repr__(self) -> str:
        """Shape (B, H, S, D) of keys and of values, dtype, device and position."""
        return (
            f"KVCache(shape={tuple(self.k_cache.shape)}, dtype={self.k_cache.dtype}, "
            f"device={self.k_cache.device}, cache_position={self.cache_position})"
        )


class LatentCache:
    """The cache of a multi-head latent attention layer: per token the normalised latent
    (max_batch_size, max_seq_len, kv_lora_rank) and the one rotated rope key shared by all
    heads (max_batch_size, max_seq_len, rope_dim); never expanded keys or values.

    Writing T tokens at position p fills slots [p, p+T) and moves `cache_position` to p+T.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        check_cache_sizes(
            "LatentCache",
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            kv_lora_rank=kv_lora_rank,
            rope_dim=rope_dim,
        )
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.device = device
        B, S = max_batch_size, max_seq_len
        shapes = (B, S, kv_lora_rank), (B, S, rope_dim)
        self.latent, self.rope_key = empty_buffers(shapes, dtype, device)  # (B, S, R), (B, S, Dr)
        self.cache_position = 0

    def check_write(self, batch_size: int, rank: int, rope_dim: int, start: int, length: int):
        """Raise ValueError unless writing `length` tokens at `start` fits this cache."""
        check_cache_batch(batch_size, self.max_batch_size)
        if (rank, rope_dim) != (self.latent.shape[2], self.rope_key.shape[2]):
            raise ValueError(
                f"cache holds kv_lora_rank={self.latent.shape[2]}, rope_dim="
                f"{self.rope_key.shape[2]}; got {rank}, {rope_dim}"
            )
        check_cache_slots(start, length, self.max_seq_len)

    def write(
        self, latent: torch.Tensor, rope_key: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write latent (B, T, R) and rope_key (B, T, Dr) at slots [start, start+T), checked
        with `check_write`; returns both over slots [0, start+T) as the cache holds them."""
        written = write_buffers((self.latent, self.rope_key), (latent, rope_key), start, dim=1)
        self.cache_position = start + latent.shape[1]
        return written  # (B, start + T, R), (B, start + T, Dr)

    def reset(self) -> None:
        """Zero the cache and move its position back to 0."""
        self.latent.zero_()
        self.rope_key.zero_()
        self.cache_position = 0

    def to(self, device: str | torch.device) -> LatentCache:
        """Move the cache to `device` in place; returns self."""
        self.latent = self.latent.to(device)
        self.rope_key = self.rope_key.to(device)
        self.device = device
        return self

    def __repr__(self) -> str:
        """Shapes of the latent and the rope key, dtype, device and position."""
        return (
            f"LatentCache(latent={tuple(self.latent.shape)}, rope_key="
            f"{tuple(self.rope_key.shape)}, dtype={self.latent.dtype}, "
            f"device={self.latent.device}, cache_position={self.cache_position})"
        )
