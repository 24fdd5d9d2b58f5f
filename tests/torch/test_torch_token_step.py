"""torch_block.token_step, the step of generate, against the float64 NumPy reference of
tests/reference/: the logits of every new token for every family (MoE included), on
left-padded prompts, eagerly (cache read up to the slot) and in the static form that
torch.compile takes (whole cache, masked), without compiling it."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from family_configs import LMS

from torch_block import TransformerLM
from torch_block.token_step import step_inputs, token_step

ATOL = 1e-5  # docs/design.md section 7: float32, unit-scale outputs
LENGTH, PADS, STEPS = 6, (0, 3), 5  # prompts, row b left-padded by PADS[b]; new tokens fed


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_lm(name: str) -> TransformerLM:
    """The LM with every parameter redrawn at unit scale; eval mode."""
    torch.manual_seed(0)
    lm = TransformerLM(**LMS[name])
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for key, parameter in lm.named_parameters():
            parameter.copy_(torch.from_numpy(ref.random_array(key, tuple(parameter.shape), rng)))
    return lm.eval()


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("name", LMS)
def test_step_logits_equal_the_reference(name, static):
    lm = make_lm(name)
    B, V = len(PADS), LMS[name]["vocab_size"]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (B, LENGTH + STEPS), generator=generator)
    mask = torch.ones(B, LENGTH + STEPS, dtype=torch.long)
    for b, n in enumerate(PADS):
        mask[b, :n] = 0
    ids = ids.masked_fill(mask == 0, 0)
    cache = lm.create_kv_cache(B, LENGTH + STEPS + 3)  # room past the last slot: masked
    key_valid = torch.cat([mask.bool(), torch.ones(B, 3, dtype=torch.bool)], dim=1)
    weights, s = ref.torch_weights(lm), ref.spec(**LMS[name])
    with torch.inference_mode():
        lm(ids[:, :LENGTH], mask[:, :LENGTH], kv_cache=cache)
        inputs = step_inputs(lm, cache, key_valid)
        for slot in range(LENGTH, LENGTH + STEPS):
            pos = torch.tensor(slot)
            logits = token_step(inputs, ids[:, slot], pos, None if static else slot)
            want, _ = ref.lm(ids[:, : slot + 1].numpy(), weights, s, mask[:, : slot + 1].numpy())
            assert np.max(np.abs(logits.double().numpy() - want[:, -1])) <= ATOL, slot
    # the caches hold the keys the model's own forward writes
    full = lm.create_kv_cache(B, LENGTH + STEPS)
    with torch.inference_mode():
        lm(ids, mask, kv_cache=full)
    for written, expected in zip(cache, full, strict=True):
        for got, want in ((written.k_cache, expected.k_cache), (written.v_cache, expected.v_cache)):
            real = mask.bool()[:, None, :, None].expand_as(want)
            assert torch.allclose(got[:, :, : LENGTH + STEPS][real], want[real], atol=ATOL)
