"""The matrix products of one batch-1 decode step alone: every weight matrix that the step reads
whole, once, as a (1, in) x (in, out) product with no model around it. Their time is the floor
under a step's time in each framework (and so bounds the ratio of the two frameworks' steps).
"""

from __future__ import annotations

from .common import block, compare_times

INDEXED = ("position_embedding", "token_embedding")  # tables a step only picks rows from


def torch_matrices(torch_lm) -> list:
    """torch (out, in) weights a step reads whole: every matrix but the indexed tables (a tied
    token embedding is read whole, as the head)."""
    skipped = INDEXED if torch_lm.lm_head is not None else INDEXED[:1]
    return [
        p
        for name, p in torch_lm.named_parameters()
        if p.dim() == 2 and not name.startswith(skipped)
    ]


def product_seconds(torch_lm, steps: int, repeats: int) -> dict[str, float]:
    """Seconds per step of a float32 model's step products alone, {"jax": s, "torch": s}, measured
    alternating: torch's F.linear under inference_mode, and the same products in one jitted
    `lax.fori_loop` of `steps` steps (each step's input depends on the last, so XLA cannot
    hoist the products out of the loop)."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    weights = torch_matrices(torch_lm)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    kernels = [jnp.asarray(w.detach().numpy().T) for w in weights]  # (in, out) float32

    def torch_steps() -> None:
        with torch.inference_mode():
            for _ in range(steps):
                for w in weights:
                    F.linear(inputs[w.shape[1]], w)

    @jax.jit
    def jax_steps(kernels):
        def one_step(_, s):
            for kernel in kernels:  # (in, out)
                x = jnp.full((1, kernel.shape[0]), s, kernel.dtype)  # (1, in)
                s = s + (x @ kernel)[0, 0].astype(jnp.float32) * 1e-9
            return s

        return jax.lax.fori_loop(0, steps, one_step, jnp.float32(0))

    times = compare_times(
        {"jax": lambda: block(jax_steps(kernels)), "torch": torch_steps}, repeats, warmup=1
    )
    return {name: t["median"] / steps for name, t in times.items()}
