"""A static key/value cache for autoregressive decoding, as an immutable pytree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding

from twin_core.cache_checks import check_cache_batch, check_cache_sizes, check_cache_slots

from .sharding import CACHE_AXES, LATENT_CACHE_AXES, constrain

# XLA options for jitted functions that take a cache and return it updated. By default XLA's
# copy insertion copies every cache buffer that a step both reads and writes (twice per buffer
# per step on CPU, donated or not); region analysis proves the copies unneeded, so the cache is
# updated in place. Each backend reads its own option.
IN_PLACE_CACHE_OPTIONS = {
    "xla_cpu_copy_insertion_use_region_analysis": True,
    "xla_gpu_copy_insertion_use_region_analysis": True,
}


def empty_buffers(
    shapes: tuple[tuple[int, ...], ...], dtype: jnp.dtype, sharding: NamedSharding | None
) -> tuple[jax.Array, ...]:
    """A cache's buffers: zeros of each of `shapes` placed with `sharding` (never whole on one
    device), then its position, a () int32 0 replicated on the sharding's mesh."""
    scalar = None if sharding is None else NamedSharding(sharding.mesh, jax.P())
    buffers = tuple(jnp.zeros(shape, dtype, device=sharding) for shape in shapes)
    return *buffers, jnp.zeros((), jnp.int32, device=scalar)


def known_start(start) -> int | None:
    """A write's position as an int, or None where it is traced; TypeError unless an integer."""
    if isinstance(start, bool) or not jnp.issubdtype(jnp.result_type(start), jnp.integer):
        raise TypeError(f"cache_position must be an integer, got {start!r}")
    if isinstance(start, jax.core.Tracer):
        return None
    return int(start)


def write_buffers(
    buffers: tuple[jax.Array, ...], news: tuple[jax.Array, ...], start: jax.Array | int, axis: int
) -> tuple[jax.Array, ...]:
    """New buffers with each of `news` (B rows, T slots along `axis`) written into the first B
    rows of its buffer at slots [start, start+T), in the buffer's dtype, then the new position.

    Slots past the end are dropped and a negative start writes nothing: nothing is ever wrapped
    or clamped onto other slots. The new position is start+T, or start itself when start < 0.
    """
    B, T = news[0].shape[0], news[0].shape[axis]
    start = jnp.asarray(start, jnp.int32)
    slots = jnp.where(start < 0, buffers[0].shape[axis], start + jnp.arange(T))  # (T,)
    at = (slice(None, B),) + (slice(None),) * (axis - 1) + (slots,)
    write = dict(mode="drop", wrap_negative_indices=False, indices_are_sorted=True)
    written = [b.at[at].set(n.astype(b.dtype), **write) for b, n in zip(buffers, news, strict=True)]
    return *written, jnp.where(start < 0, start, start + T)  # position () int32


def position_text(position: jax.Array) -> int | str:
    """A cache's position for its repr: an int, or "traced" under jit."""
    try:
        return int(position)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return "traced"


@struct.dataclass
class KVCache:
    """Keys and values of shape (max_batch_size, n_heads, max_seq_len, head_dim) and a position.

    The layout is torch_block's, so a cache converts between frameworks without a transpose.
    Writing T tokens at position p fills slots [p, p+T) and returns a new cache at p+T; the old
    one is never mutated. A write that does not fit raises ValueError where the position is
    concrete; at a traced position it keeps only the slots inside [0, max_seq_len) and leaves a
    cache whose `overflowed` is True (see `write`).
    """

    k_cache: jax.Array  # (B, H, S, D)
    v_cache: jax.Array  # (B, H, S, D)
    position: jax.Array  # () int32

    @classmethod
    def create(
        cls,
        max_batch_size: int,
        max_seq_len: int,
        n_heads: int,
        head_dim: int,
        dtype: jnp.dtype = jnp.float32,
        sharding: NamedSharding | None = None,
    ) -> KVCache:
        """An empty cache at position 0; with `sharding`, keys and values are created placed
        with it (never whole on one device) and the position is replicated on its mesh."""
        check_cache_sizes(
            "KVCache",
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            n_heads=n_heads,
            head_dim=head_dim,
        )
        shape = (max_batch_size, n_heads, max_seq_len, head_dim)
        return cls(*empty_buffers((shape, shape), dtype, sharding))

    def __repr__(self) -> str:
        """Shape (B, H, S, D) of keys and of values, dtype and position ("traced" under jit)."""
        shape = getattr(self.k_cache, "shape", None)
        shape = tuple(shape) if shape is not None else None
        dtype = getattr(self.k_cache, "dtype", None)
        return f"KVCache(shape={shape}, dtype={dtype}, position={position_text(self.position)})"

    @property
    def max_batch_size(self) -> int:
        return self.k_cache.shape[0]

    @property
    def n_heads(self) -> int:
        return self.k_cache.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_cache.shape[3]

    @property
    def overflowed(self) -> jax.Array:
        """True once a write fell outside [0, max_seq_len) (its tokens were dropped, not wrapped).

        A write past the end leaves position > max_seq_len; one at a negative position leaves
        the position negative. Either sticks: later writes at the cache's position drop too.
        """
        return (self.position < 0) | (self.position > self.max_seq_len)

    def check_write(self, batch_size: int, n_heads: int, head_dim: int, start, length: int):
        """Raise ValueError unless writing `length` tokens at `start` fits, where start is known."""
        check_cache_batch(batch_size, self.max_batch_size)
        if (n_heads, head_dim) != (self.n_heads, self.head_dim):
            raise ValueError(
                f"cache holds n_heads={self.n_heads}, head_dim={self.head_dim}; "
                f"got n_heads={n_heads}, head_dim={head_dim}"
            )
        if length > self.max_seq_len:
            raise ValueError(
                f"writing {length} tokens needs {length} slots; "
                f"the cache has max_seq_len={self.max_seq_len}"
            )
        start = known_start(start)
        if start is not None:
            check_cache_slots(start, length, self.max_seq_len)

    def write(self, k: jax.Array, v: jax.Array, start: jax.Array | int) -> KVCache:
        """A new cache with k, v (B, H, T, D) written at slots [start, start+T).

        A concrete `start` that does not fit raises ValueError. A traced one past the end writes
        only the slots before max_seq_len, and a negative one writes nothing: nothing is ever
        wrapped or clamped onto other slots. The new position is start+T, or start itself when
        start < 0, so `overflowed` reports both.
        """
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(
                f"k and v must both be (B, H, T, D); got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        B, H, T, D = k.shape
        self.check_write(B, H, D, start, T)
        written = write_buffers((self.k_cache, self.v_cache), (k, v), start, axis=2)
        return KVCache(*written).constrained()

    def constrained(self) -> KVCache:
        """This cache with its keys and values constrained to their place on the mesh that
        `jax_block.sharding.use_mesh` set (batch over data, kv heads over tensor), so that a
        jitted step returns it where it came from and updates it in place; else itself."""
        axes = CACHE_AXES if self.k_cache.ndim == 4 else ("layers", *CACHE_AXES)  # scanned
        return self.replace(
            k_cache=constrain(self.k_cache, axes), v_cache=constrain(self.v_cache, axes)
        )


@struct.dataclass
class LatentCache:
    """The cache of a multi-head latent attention layer: per token the normalised latent
    (max_batch_size, max_seq_len, kv_lora_rank) and the one rotated rope key shared by all
    heads (max_batch_size, max_seq_len, rope_dim), and a position; never expanded keys or
    values. Writes as KVCache's: a new cache, a traced write past the end keeps the slots
    inside and sets `overflowed`.
    """

    latent: jax.Array  # (B, S, R)
    rope_key: jax.Array  # (B, S, Dr)
    position: jax.Array  # () int32

    @classmethod
    def create(
        cls,
        max_batch_size: int,
        max_seq_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: jnp.dtype = jnp.float32,
        sharding: NamedSharding | None = None,
    ) -> LatentCache:
        """An empty cache at position 0; with `sharding`, created placed with it and the
        position replicated on its mesh."""
        check_cache_sizes(
            "LatentCache",
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            kv_lora_rank=kv_lora_rank,
            rope_dim=rope_dim,
        )
        B, S = max_batch_size, max_seq_len
        return cls(*empty_buffers(((B, S, kv_lora_rank), (B, S, rope_dim)), dtype, sharding))

    def __repr__(self) -> str:
        """Shapes of the latent and the rope key, dtype and position ("traced" under jit)."""
        return (
            f"LatentCache(latent={tuple(self.latent.shape)}, rope_key="
            f"{tuple(self.rope_key.shape)}, dtype={self.latent.dtype}, "
            f"position={position_text(self.position)})"
        )

    @property
    def max_batch_size(self) -> int:
        return self.latent.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.latent.shape[1]

    @property
    def overflowed(self) -> jax.Array:
        """True once a write fell outside [0, max_seq_len) (as KVCache's)."""
        return (self.position < 0) | (self.position > self.max_seq_len)

    def check_write(self, batch_size: int, rank: int, rope_dim: int, start, length: int):
        """Raise ValueError unless writing `length` tokens at `start` fits, where start is known."""
        check_cache_batch(batch_size, self.max_batch_size)
        if (rank, rope_dim) != (self.latent.shape[2], self.rope_key.shape[2]):
            raise ValueError(
                f"cache holds kv_lora_rank={self.latent.shape[2]}, rope_dim="
                f"{self.rope_key.shape[2]}; got {rank}, {rope_dim}"
            )
        start = known_start(start)
        if start is not None and (start < 0 or start + length > self.max_seq_len):
            raise ValueError(
                f"writing {length} tokens at position {start} needs slots [{start}, "
                f"{start + length}); the cache has max_seq_len={self.max_seq_len}"
            )

    def write(self, latent: jax.Array, rope_key: jax.Array, start: jax.Array | int) -> LatentCache:
        """A new cache with latent (B, T, R) and rope_key (B, T, Dr) at slots [start, start+T)."""
        B, T, R = latent.shape
        self.check_write(B, R, rope_key.shape[-1], start, T)
        written = write_buffers((self.latent, self.rope_key), (latent, rope_key), start, axis=1)
        return LatentCache(*written).constrained()

    def constrained(self) -> LatentCache:
        """This cache with its batch on the mesh's data axis (`use_mesh`), the latent and the
        rope key on no axis; else itself."""
        axes = LATENT_CACHE_AXES if self.latent.ndim == 3 else ("layers", *LATENT_CACHE_AXES)
        return self.replace(
            latent=constrain(self.latent, axes), rope_key=constrain(self.rope_key, axes)
        )
