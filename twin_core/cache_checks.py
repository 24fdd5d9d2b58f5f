"""Framework-free checks of both twins' caches: their sizes and where a write may go."""

from __future__ import annotations


def check_cache_sizes(cache: str, **sizes: int) -> None:
    """Raise ValueError unless every size of the cache named `cache` is a positive int."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{cache}: {name} must be a positive int, got {value!r}")


def check_cache_batch(batch_size: int, max_batch_size: int) -> None:
    """Raise ValueError unless a write of `batch_size` rows fits a cache of `max_batch_size`."""
    if batch_size > max_batch_size:
        raise ValueError(
            f"batch size {batch_size} exceeds the cache's max_batch_size {max_batch_size}"
        )


def check_cache_slots(start: int, length: int, max_seq_len: int) -> None:
    """Raise TypeError unless `start` is an int, ValueError unless slots [start, start +
    length) lie inside a cache of `max_seq_len`."""
    if isinstance(start, bool) or not isinstance(start, int):
        raise TypeError(f"cache_position must be an int, got {type(start).__name__}")
    if start < 0:
        raise ValueError(f"cache_position must be >= 0, got {start}")
    if start + length > max_seq_len:
        raise ValueError(
            f"writing {length} tokens at position {start} needs {start + length} slots; "
            f"the cache has max_seq_len={max_seq_len}"
        )
