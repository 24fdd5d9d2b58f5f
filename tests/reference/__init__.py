"""One float64 NumPy reference of the model for every test (docs/design.md restated).

Nothing here imports torch_block, jax_block, parity or twin_core, so a test comparing a twin
with it can fail. `model` holds the arithmetic (norms, rope, attention with masks, window and
grouped-query heads, feed-forward, MoE routing and capacity, block, LM, greedy loop), reading
weights by torch's state_dict names; `weights` holds the random draws and the renamers that
bring a torch module or a Flax tree to those names.
"""

from reference.model import (
    DEFAULTS,
    MoEOut,
    Routing,
    activation,
    allowed_keys,
    attention,
    block,
    default_inv_freq,
    feed_forward,
    greedy,
    inv_freq,
    join,
    keys_values,
    kv_head,
    layer_norm,
    layer_spec,
    linear,
    llama3_inv_freq,
    lm,
    moe,
    norm,
    qk_normed,
    real_positions,
    rms_norm,
    rotate,
    route,
    spec,
)
from reference.weights import (
    flax_weights,
    random_array,
    random_params,
    randomize_torch,
    to_f64,
    torch_weights,
)

__all__ = [
    "DEFAULTS",
    "MoEOut",
    "Routing",
    "activation",
    "allowed_keys",
    "attention",
    "block",
    "default_inv_freq",
    "feed_forward",
    "flax_weights",
    "greedy",
    "inv_freq",
    "join",
    "keys_values",
    "kv_head",
    "layer_norm",
    "layer_spec",
    "linear",
    "llama3_inv_freq",
    "lm",
    "moe",
    "norm",
    "qk_normed",
    "random_array",
    "random_params",
    "randomize_torch",
    "real_positions",
    "rms_norm",
    "rotate",
    "route",
    "spec",
    "to_f64",
    "torch_weights",
]
