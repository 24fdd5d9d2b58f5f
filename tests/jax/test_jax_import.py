"""jax_block imports and runs where importing torch fails, and never imports torch itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BLOCKERS = {
    # a meta path finder that refuses torch and every torch submodule
    "finder": """
        class RefuseTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError(f"importing {name} is refused in this test")
                return None

        sys.meta_path.insert(0, RefuseTorch())
    """,
    # Python's own way to make an import fail
    "sys.modules": """
        sys.modules["torch"] = None
    """,
}

USE_JAX_BLOCK = """
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not block torch")

    import jax
    import jax.numpy as jnp

    import jax_block

    block = jax_block.TransformerBlock.create(
        d_model=8, n_heads=2, d_ff=16, dropout=0.0, use_moe=True, num_experts=2
    )
    x = jnp.ones((1, 3, 8))
    params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)["params"]
    cache = block.create_kv_cache(1, 4)
    y, new_cache, aux = jax.eval_shape(
        lambda p, c: block.apply({"params": p}, x, kv_cache=c, return_aux_loss=True), params, cache
    )
    assert y.shape == (1, 3, 8) and new_cache.position.shape == () and aux.shape == ()
    value = jax_block.KVCache.create(1, 4, 2, 4).write(jnp.ones((1, 2, 1, 4)),
                                                       jnp.ones((1, 2, 1, 4)), 2)
    assert int(value.position) == 3
    torch_modules = sorted(
        name for name, module in sys.modules.items()
        if (name == "torch" or name.startswith("torch.")) and module is not None
    )
    print("torch modules:", torch_modules)
    print("torch in sys.modules:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("blocker", list(BLOCKERS))
def test_import_jax_block_where_torch_cannot_be_imported(blocker):
    code = "import sys\n" + textwrap.dedent(BLOCKERS[blocker]) + textwrap.dedent(USE_JAX_BLOCK)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "torch modules: []" in result.stdout
    if blocker == "finder":  # nothing even tried to leave a torch entry behind
        assert "torch in sys.modules: False" in result.stdout
