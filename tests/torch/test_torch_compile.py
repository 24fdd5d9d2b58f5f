"""generate(..., compile=True): the decode step under torch.compile gives the greedy tokens of
eager generate and of the float64 reference, compiled once for every position and every later
call of the same shape. One compilation per test session (a tiny Mistral-like LM: GQA, rope,
RMSNorm, SwiGLU, sliding window; left-padded prompts)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from family_configs import LMS

import torch_block
from torch_block import TransformerLM

NAME = "mistral"
BATCH, LENGTH, PADS = 3, 9, (0, 2, 5)  # every call here: one shape, so one compilation
NEW_TOKENS = 10


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def prompts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (BATCH, LENGTH), row b left-padded by PADS[b] pad tokens 0."""
    ids = torch.randint(1, LMS[NAME]["vocab_size"], (BATCH, LENGTH),
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    for b, n in enumerate(PADS):
        mask[b, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module")
def compiled():
    """(lm, graphs compiled by the first compiled call, its tokens): compiled once."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = TransformerLM(**LMS[NAME])
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, parameter in lm.named_parameters():
            parameter.copy_(torch.from_numpy(ref.random_array(name, tuple(parameter.shape), rng)))
    ids, mask = prompts(seed=1)
    start = compiled_graphs()
    tokens = torch_block.generate(lm, ids, mask, max_new_tokens=NEW_TOKENS, compile=True)
    yield lm, compiled_graphs() - start, tokens
    torch.set_num_threads(before)


def test_compiled_greedy_tokens_are_eager_and_reference_tokens(compiled):
    lm, _, tokens = compiled
    ids, mask = prompts(seed=1)
    eager = torch_block.generate(lm, ids, mask, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(tokens.numpy(), eager.numpy())
    np.testing.assert_array_equal(
        tokens.numpy(),
        ref.greedy(
            ids.numpy(), ref.torch_weights(lm), ref.spec(**LMS[NAME]), mask.numpy(), NEW_TOKENS
        ),
    )


def test_one_compilation_serves_every_position_and_later_calls(compiled):
    lm, first_call_graphs, _ = compiled
    assert first_call_graphs == 1  # NEW_TOKENS - 1 steps, at as many positions
    ids, mask = prompts(seed=2)
    start = compiled_graphs()
    # other prompts, fewer new tokens (the same cache length, rounded up), an EOS
    eager = torch_block.generate(lm, ids, mask, max_new_tokens=NEW_TOKENS - 3)
    again = torch_block.generate(lm, ids, mask, max_new_tokens=NEW_TOKENS - 3, compile=True)
    eos = int(eager[0, 2])
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=7)
    with_eos, steps = torch_block.generate(lm, ids, mask, compile=True, return_num_steps=True, **kw)
    eager_eos, eager_steps = torch_block.generate(lm, ids, mask, return_num_steps=True, **kw)
    assert compiled_graphs() == start
    np.testing.assert_array_equal(again.numpy(), eager.numpy())
    np.testing.assert_array_equal(with_eos.numpy(), eager_eos.numpy())
    assert steps == eager_steps and (with_eos[0, 3:] == 7).all()


def test_compile_must_be_a_bool(compiled):
    lm, _, _ = compiled
    ids, mask = prompts(seed=1)
    start = compiled_graphs()
    with pytest.raises(TypeError, match="compile must be a bool, got str"):
        torch_block.generate(lm, ids, mask, max_new_tokens=2, compile="yes")
    assert compiled_graphs() == start
