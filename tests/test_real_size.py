"""The machinery of `python -m benchmarks.real_size` on its tiny shape, in this process: the
checkpoint transformers saves, each framework's phase, the row and its targets."""

from __future__ import annotations

import pytest
import torch
import transformers

from benchmarks import real_size


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cache = tmp_path_factory.mktemp("real_size")
    return cache, real_size.run_rows([("tiny", "float32")], cache, 4, 1, isolated=False)


def test_rows_agree_with_transformers(result):
    _, measured = result
    rows = {row["framework"]: row for row in measured.rows}
    assert set(rows) == {"transformers", "torch", "jax"}
    for framework in ("torch", "jax"):  # float32: the same greedy tokens as transformers'
        assert rows[framework]["same tokens b1"] == 1.0
        assert rows[framework]["same tokens b8"] == 1.0
        assert rows[framework]["tok/s b1"] > 0 and rows[framework]["load s"] > 0
    assert rows["transformers"]["b1 x tf"] == 1.0
    names = [t.name for t in measured.targets]
    assert "real_size: tiny, float32: JAX / transformers tokens/s, batch 1" in names
    assert "real_size: tiny, float32: torch from_hf peak RSS / checkpoint bytes" in names


def test_checkpoint_and_step_bytes(result):
    cache, _ = result
    folder = real_size.folder_of(cache, "tiny", "float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    params = dict(model.named_parameters())
    total = sum(p.numel() * 4 for p in params.values())
    embedding = params["model.embed_tokens.weight"].numel() * 4  # untied: only indexed
    assert real_size.weight_bytes(folder) > total
    assert real_size.step_bytes(folder) == total - embedding
    norm = model.model.norm.weight  # widened, so that greedy is not decided by ties
    torch.testing.assert_close(norm, torch.full_like(norm, real_size.WIDEN))


def test_parse_rows():
    assert real_size.parse_rows("llama-3.2-1b", None) == [
        ("llama-3.2-1b", "float32"),
        ("llama-3.2-1b", "bfloat16"),
    ]
    assert real_size.parse_rows("qwen2-0.5b", "bfloat16") == [("qwen2-0.5b", "bfloat16")]
    with pytest.raises(ValueError, match="expected names among"):
        real_size.parse_rows("gpt5", None)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        real_size.parse_rows("tiny", "float16")
