"""MixtureOfExperts against a plain per-token loop; capacity, aux loss, counts, gradients."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch

from torch_block import FeedForward, MixtureOfExperts, TransformerBlock

D_MODEL, D_FF = 16, 32
ATOL = 1e-5


# --------------------------------------------------------------------------- reference
def reference(moe: MixtureOfExperts, x: torch.Tensor, capacity_factor: float | None):
    """The float64 reference MoE of x (..., d_model) with the module's weights (ref.MoEOut)."""
    s = ref.spec(num_experts=moe.num_experts, top_k_experts=moe.top_k)
    x64 = x.detach().double().numpy()
    return ref.moe(x64, ref.torch_weights(moe), "", s, capacity_factor)


def ref_moe(moe: MixtureOfExperts, x: torch.Tensor, capacity_factor: float | None):
    """Output (float64, shape of x) and the set of kept (token, slot) assignments."""
    result = reference(moe, x, capacity_factor)
    return torch.from_numpy(result.out), result.kept


def expert_ref(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """One expert (a FeedForward) applied to x (..., d_model), in float64."""
    x64 = x.detach().double().numpy()
    return torch.from_numpy(ref.feed_forward(x64, ref.torch_weights(ff), "", ref.spec()))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return torch.allclose(a.double(), b.double(), atol=atol, rtol=0)


def make_moe(E=4, k=2, dropout=0.0, factor=1.25, seed=0, **kw) -> MixtureOfExperts:
    torch.manual_seed(seed)
    return MixtureOfExperts(D_MODEL, D_FF, E, k, dropout, factor, **kw)


def rand_x(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D_MODEL, generator=g)


def set_identity_gate(moe: MixtureOfExperts) -> None:
    """Gate = [I_E | 0]: a token's router logits are its first E features."""
    E = moe.num_experts
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, :E] = torch.eye(E)


def tokens_with_logits(logits: list[list[float]], B: int, T: int, seed: int = 2) -> torch.Tensor:
    x = rand_x(B, T, seed).reshape(B * T, D_MODEL)
    x[:, : len(logits[0])] = torch.tensor(logits)
    return x.reshape(B, T, D_MODEL)


# --------------------------------------------------------------------------- API
def test_attributes_buffer_and_defaults():
    moe = MixtureOfExperts(D_MODEL, D_FF)
    assert (moe.d_model, moe.num_experts, moe.top_k) == (D_MODEL, 8, 2)
    assert moe.expert_capacity_factor == 1.25
    assert isinstance(moe.experts, torch.nn.ModuleList) and len(moe.experts) == 8
    assert all(isinstance(e, FeedForward) for e in moe.experts)
    assert moe.experts[0].fc1.weight.shape == (D_FF, D_MODEL)
    assert moe.experts[0].fc2.weight.shape == (D_MODEL, D_FF)
    assert moe.experts[0].dropout.p == pytest.approx(0.1)
    assert moe.gate.weight.shape == (8, D_MODEL) and moe.gate.bias is None
    assert moe.expert_counts.shape == (8,) and torch.count_nonzero(moe.expert_counts) == 0
    assert "expert_counts" in dict(moe.named_buffers())
    out, aux = moe.eval()(rand_x(2, 3))
    assert out.shape == (2, 3, D_MODEL) and aux is None


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(num_experts=0), r"num_experts must be >= 1, got 0"),
        (dict(top_k=0), r"top_k must be in \[1, num_experts=4\], got 0"),
        (dict(top_k=5), r"top_k must be in \[1, num_experts=4\], got 5"),
        (dict(expert_capacity_factor=0.0), r"expert_capacity_factor must be > 0.*got 0\.0"),
        (dict(expert_capacity_factor=-1.5), r"expert_capacity_factor must be > 0.*got -1\.5"),
    ],
)
def test_bad_config_raises(args, match):
    kw = dict(num_experts=4, top_k=2, expert_capacity_factor=1.0)
    kw.update(args)
    with pytest.raises(ValueError, match=match):
        MixtureOfExperts(D_MODEL, D_FF, **kw)


# --------------------------------------------------------------------------- routing and output
@pytest.mark.parametrize("E, k", [(4, 1), (4, 2), (3, 3), (1, 1), (6, 2)])
def test_eval_is_dropless_and_matches_loop_reference(E, k):
    moe = make_moe(E, k, factor=0.25, seed=E * 10 + k).eval()
    x = rand_x(2, 5, seed=3)
    out, _ = moe(x)
    want, kept = ref_moe(moe, x, capacity_factor=None)
    assert len(kept) == 10 * k
    assert close(out, want)


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25, None])
def test_training_with_capacity_matches_loop_reference(factor):
    moe = make_moe(4, 2, dropout=0.0, factor=factor, seed=4).train()
    x = rand_x(3, 4, seed=5)
    out, _ = moe(x)
    want, kept = ref_moe(moe, x, capacity_factor=factor)
    if factor == 0.5:
        assert len(kept) < 24  # this case really drops something
    assert close(out, want)


def test_ties_go_to_the_lower_expert_index():
    moe = make_moe(4, 2).eval()
    with torch.no_grad():
        moe.gate.weight.zero_()  # every probability is 1/4: experts 0 and 1, weight 1/2 each
    x = rand_x(1, 3, seed=6)
    out, _ = moe(x)
    expected = 0.5 * expert_ref(moe.experts[0], x) + 0.5 * expert_ref(moe.experts[1], x)
    assert close(out, expected)

    # partial tie: logits [1, 2, 2, 0] -> experts 1 and 2; with k=1 -> expert 1 alone
    set_identity_gate(moe)
    x = tokens_with_logits([[1.0, 2.0, 2.0, 0.0]], 1, 1)
    out, _ = moe(x)
    assert close(out, 0.5 * expert_ref(moe.experts[1], x) + 0.5 * expert_ref(moe.experts[2], x))
    moe1 = make_moe(4, 1).eval()
    set_identity_gate(moe1)
    out, _ = moe1(x)
    assert close(out, expert_ref(moe1.experts[1], x))


# Hand-built router: 6 tokens (batch 2 x 3, row-major), E=4, k=2. First choice logit 2, second 1.
#   token:   0      1      2      3      4      5
#   choice: (0,1)  (0,2)  (0,1)  (1,0)  (1,3)  (2,0)
# Slot-major queues: expert 0 <- t0 t1 t2 (first) t3 t5 (second); expert 1 <- t3 t4, t0 t2;
#                    expert 2 <- t5, t1; expert 3 <- t4.
HAND_CHOICES = [(0, 1), (0, 2), (0, 1), (1, 0), (1, 3), (2, 0)]
# (token, expert) pairs dropped, worked out by hand from the queues above:
HAND_DROPPED = {
    0.5: {(2, 0), (3, 0), (5, 0), (0, 1), (2, 1)},  # C = ceil(0.5 * 6 * 2 / 4) = 2
    1.0: {(3, 0), (5, 0), (2, 1)},  # C = ceil(1.0 * 6 * 2 / 4) = 3
    2.0: set(),  # C = 6
}


def hand_logits() -> list[list[float]]:
    rows = []
    for first, second in HAND_CHOICES:
        row = [0.0] * 4
        row[first], row[second] = 2.0, 1.0
        rows.append(row)
    return rows


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_capacity_drops_the_assignments_known_in_advance(factor):
    moe = make_moe(4, 2, dropout=0.0, factor=factor, seed=7)
    set_identity_gate(moe)
    x = tokens_with_logits(hand_logits(), 2, 3)
    w_first = math.e / (math.e + 1.0)  # e^2 / (e^2 + e^1), renormalised over the top 2
    w_second = 1.0 / (math.e + 1.0)
    tokens = x.reshape(6, D_MODEL)
    expected = torch.zeros(6, D_MODEL, dtype=torch.float64)
    for n, (first, second) in enumerate(HAND_CHOICES):
        for e, w in ((first, w_first), (second, w_second)):
            if (n, e) not in HAND_DROPPED[factor]:
                expected[n] += w * expert_ref(moe.experts[e], tokens[n])

    out, _ = moe.train()(x)
    assert close(out.reshape(6, D_MODEL), expected)
    if factor == 0.5:
        assert torch.count_nonzero(out[0, 2]) == 0  # token 2 lost both choices
    # the same module in eval mode drops nothing
    out_eval, _ = moe.eval()(x)
    full = torch.stack(
        [
            w_first * expert_ref(moe.experts[a], tokens[n])
            + w_second * expert_ref(moe.experts[b], tokens[n])
            for n, (a, b) in enumerate(HAND_CHOICES)
        ]
    )
    assert close(out_eval.reshape(6, D_MODEL), full)


def test_hand_router_matches_loop_reference_too():
    # cross-check the hand-derived drop list against the generic loop reference
    moe = make_moe(4, 2, dropout=0.0, factor=0.5, seed=7)
    set_identity_gate(moe)
    x = tokens_with_logits(hand_logits(), 2, 3)
    _, kept = ref_moe(moe, x, 0.5)
    dropped = {(n, HAND_CHOICES[n][s]) for n in range(6) for s in range(2) if (n, s) not in kept}
    assert dropped == HAND_DROPPED[0.5]


def test_capacity_factor_none_in_training_is_dropless():
    moe = make_moe(4, 2, dropout=0.0, factor=None, seed=7).train()
    set_identity_gate(moe)
    x = tokens_with_logits(hand_logits(), 2, 3)
    out, _ = moe(x)
    assert close(out, ref_moe(moe, x, None)[0])


# --------------------------------------------------------------------------- aux loss
def test_aux_loss_known_f_and_P_top1():
    # E=2, k=1; probs per token: [.75,.25], [.75,.25], [.25,.75], [.5,.5] (tie -> expert 0)
    # f = [3/4, 1/4]; P = [2.25/4, 1.75/4]; aux = 2 * (.75 * .5625 + .25 * .4375) = 1.0625
    moe = make_moe(2, 1).eval()
    set_identity_gate(moe)
    logits = [[math.log(3), 0.0], [math.log(3), 0.0], [0.0, math.log(3)], [0.0, 0.0]]
    x = tokens_with_logits(logits, 1, 4)
    _, aux = moe(x, return_aux_loss=True)
    assert aux.dim() == 0 and aux.dtype == torch.float32
    assert aux.item() == pytest.approx(1.0625, abs=1e-6)


def test_aux_loss_known_f_and_P_top2_and_z_loss():
    # E=4, k=2. token 0 probs [.4,.3,.2,.1] -> experts 0,1; token 1 [.1,.4,.3,.2] -> experts 1,2
    # counts [1,2,1,0] -> f = [.25,.5,.25,0]; P = [.25,.35,.25,.15]
    # aux = 4 * (.0625 + .175 + .0625) = 1.2
    moe = make_moe(4, 2).eval()
    set_identity_gate(moe)
    p0, p1 = [0.4, 0.3, 0.2, 0.1], [0.1, 0.4, 0.3, 0.2]
    # shift the logits by 1 and 2: logsumexp = 1 and 2, z = mean(1, 4) = 2.5
    logits = [[math.log(p) + 1.0 for p in p0], [math.log(p) + 2.0 for p in p1]]
    x = tokens_with_logits(logits, 2, 1)
    _, aux = moe(x, return_aux_loss=True)
    assert aux.item() == pytest.approx(1.2, abs=1e-6)

    coef = 0.1
    moe_z = make_moe(4, 2, router_z_loss_coef=coef).eval()
    moe_z.load_state_dict(moe.state_dict())
    out_z, aux_z = moe_z(x, return_aux_loss=True)
    assert aux_z.item() == pytest.approx(1.2 + coef * 2.5, abs=1e-5)
    assert torch.equal(out_z, moe(x)[0])  # the z-loss changes the loss only


def test_z_loss_matches_mean_logsumexp_squared_on_random_input():
    coef = 0.01
    moe = make_moe(4, 2, seed=8).eval()
    moe_z = make_moe(4, 2, seed=8, router_z_loss_coef=coef).eval()
    x = rand_x(2, 5, seed=9)
    logits = x.reshape(-1, D_MODEL).double() @ moe.gate.weight.detach().double().T
    lse = torch.log(torch.exp(logits).sum(dim=-1))
    z = (lse**2).mean().item()
    assert z > 0.1
    aux = moe(x, return_aux_loss=True)[1].item()
    aux_z = moe_z(x, return_aux_loss=True)[1].item()
    assert aux_z - aux == pytest.approx(coef * z, abs=1e-6)


def test_aux_loss_counts_assignments_before_dropping():
    # the hand-built router in training with C = 2: f uses all 12 assignments, dropped or not
    moe = make_moe(4, 2, dropout=0.0, factor=0.5, seed=7).train()
    set_identity_gate(moe)
    x = tokens_with_logits(hand_logits(), 2, 3)
    probs = reference(moe, x, None).probs  # (6, 4)
    counts = [0, 0, 0, 0]
    for a, b in HAND_CHOICES:
        counts[a] += 1
        counts[b] += 1
    assert counts == [5, 4, 2, 1]
    f = [c / 12 for c in counts]
    P = [sum(p[e] for p in probs) / 6 for e in range(4)]
    expected = 4 * sum(fe * pe for fe, pe in zip(f, P, strict=True))
    _, aux = moe(x, return_aux_loss=True)
    assert aux.item() == pytest.approx(expected, abs=1e-6)


def test_aux_returned_in_eval_and_training_only_when_asked():
    moe = make_moe(4, 2, seed=10)
    x = rand_x(2, 3)
    for mode in (moe.eval, moe.train):
        mode()
        out, aux = moe(x)
        assert aux is None
        out, aux = moe(x, return_aux_loss=True)
        assert isinstance(aux, torch.Tensor) and aux.dim() == 0 and torch.isfinite(aux)
        assert aux.item() >= 0.0


def test_aux_is_one_at_perfect_balance():
    # E=2, k=1, two tokens with mirrored probabilities: f = P = [.5, .5] -> aux = 1
    moe = make_moe(2, 1).eval()
    set_identity_gate(moe)
    x = tokens_with_logits([[1.0, 0.0], [0.0, 1.0]], 1, 2)
    assert moe(x, return_aux_loss=True)[1].item() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- counts, gradients
def test_expert_counts_in_training_only_and_reset():
    moe = make_moe(4, 2, dropout=0.0, factor=0.5, seed=7)
    set_identity_gate(moe)
    x = tokens_with_logits(hand_logits(), 2, 3)
    moe.eval()(x)
    assert torch.count_nonzero(moe.expert_counts) == 0
    moe.train()(x)
    # assignments before dropping: [5, 4, 2, 1]
    assert moe.expert_counts.tolist() == [5.0, 4.0, 2.0, 1.0]
    moe(x)
    assert moe.expert_counts.tolist() == [10.0, 8.0, 4.0, 2.0]
    assert torch.equal(moe.state_dict()["expert_counts"], moe.expert_counts)
    moe.reset_expert_counts()
    assert moe.expert_counts.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_gradient_reaches_gate_and_used_experts_only():
    moe = make_moe(4, 2, dropout=0.0, factor=None, seed=11).train()
    set_identity_gate(moe)
    # every token picks experts 0 and 1 (with different weights); experts 2 and 3 are unused
    logits = [[2.0, 1.0, -5.0, -5.0], [0.5, 1.5, -5.0, -5.0], [1.0, 0.0, -4.0, -6.0]]
    x = tokens_with_logits(logits, 1, 3).requires_grad_(True)
    out, aux = moe(x, return_aux_loss=True)
    (out.square().sum() + aux).backward()
    g = moe.gate.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.isfinite(x.grad).all()
    for e in (0, 1):
        for p in moe.experts[e].parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    for e in (2, 3):
        for p in moe.experts[e].parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_gradient_of_output_reaches_gate_through_weights():
    # without the aux loss, the gate still learns through the renormalised weights
    moe = make_moe(4, 2, seed=12).eval()
    x = rand_x(2, 4, seed=13)
    out, _ = moe(x)
    out.sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_expert_dropout_active_only_in_training():
    moe = make_moe(4, 2, dropout=0.5, factor=None, seed=14)
    x = rand_x(2, 4, seed=15)
    want, _ = ref_moe(moe, x, None)
    assert close(moe.eval()(x)[0], want)
    torch.manual_seed(0)
    assert not close(moe.train()(x)[0], want, atol=1e-3)


# --------------------------------------------------------------------------- through the block
@pytest.mark.parametrize("training", [False, True])
def test_no_nan_through_moe_block_with_fully_masked_rows(training):
    torch.manual_seed(16)
    block = TransformerBlock(D_MODEL, 4, D_FF, dropout=0.0, use_moe=True, num_experts=4)
    block.train(training)
    x = rand_x(2, 5, seed=17).requires_grad_(True)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[0, :, 1, :] = False  # query 1 of row 0 may attend to nothing
    mask[1, :, :, :2] = False  # left padding of 2: with the causal rule queries 0 and 1 are empty
    out, _, aux = block(x, mask=mask, return_aux_loss=True)
    assert torch.isfinite(out).all() and torch.isfinite(aux)
    (out.sum() + aux).backward()
    assert torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    if not training:
        # an empty row's attention is out_proj's bias alone, so h = x + bias there
        h_row = (x[0, 1] + block.attention.out_proj.bias).detach().double()
        normed = ref.norm(h_row.numpy(), ref.torch_weights(block), "norm2", ref.spec())
        ff, _ = ref_moe(block.feed_forward, torch.from_numpy(normed)[None, None], None)
        assert close(out[0, 1], h_row + ff[0, 0])
