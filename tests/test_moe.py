"""Tests of the mixture-of-experts MLP: the sparse dispatch against a dense NumPy oracle, HF Jamba parity, capacity,
the router, and the auxiliary losses (HF's load_balancing_loss_func is the oracle for the balancing loss); last,
lesson 06's toy experiment (minijamba.moe_toy) is deterministic and its dispatch picture draws the module's routing.
"""

import math
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from minijamba import reference as ref
from minijamba.moe import (
    MoE,
    Router,
    RouterOutput,
    SwiGLU,
    expert_utilisation,
    load_balancing_loss,
    router_z_loss,
)
from minijamba.moe_toy import ClusterTask, train_moe
from minijamba.plotting import draw_moe_dispatch

try:
    import transformers
    from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock, load_balancing_loss_func
except ImportError:  # the test extra installs it; without it only the HF parity tests skip
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not importable: pip install .[test]")

hidden_size = st.integers(1, 12)
intermediate_size = st.integers(1, 12)
num_experts = st.integers(1, 8)
batch = st.integers(1, 3)
seq_len = st.integers(1, 12)
num_layers = st.integers(1, 4)
normalize_top_k = st.booleans()
seeds = st.integers(0, 2**31 - 1)


def make_moe(seed, hidden, inter, E, k, dtype=torch.float64, **kwargs):
    """A MoE with every weight drawn N(0, 1) (router N(0, 1) too, so routing is decisive and ties have measure 0)."""
    torch.manual_seed(seed)
    moe = MoE(hidden, inter, E, k, **kwargs).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_()
    return moe


def randn(seed, *shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def weights_of(moe):
    """The oracle's arguments: router (E, hidden), gate/up (E, inter, hidden), down (E, hidden, inter)."""

    def stack(name):
        return torch.stack([getattr(expert, name).weight.detach() for expert in moe.experts]).numpy()

    return moe.router.weight.detach().numpy(), stack("gate_proj"), stack("up_proj"), stack("down_proj")


# ---------------------------------------------------------------------------------------------------------
# The sparse dispatch against the dense oracle
# ---------------------------------------------------------------------------------------------------------


@given(
    hidden=hidden_size, inter=intermediate_size, E=num_experts, normalize=normalize_top_k, batch=batch, L=seq_len,
    seed=seeds, data=st.data(),
)  # fmt: skip
def test_moe_matches_reference(hidden, inter, E, normalize, batch, L, seed, data):
    k = data.draw(st.integers(1, E), label="top_k")
    moe = make_moe(seed, hidden, inter, E, k, normalize_top_k=normalize)
    x = randn(seed + 1, batch, L, hidden)
    with torch.no_grad():
        out, routing = moe(x)
    expected = ref.moe_ref(x.reshape(-1, hidden).numpy(), *weights_of(moe), top_k=k, normalize_top_k=normalize)
    assert out.shape == x.shape
    assert_close(out.reshape(-1, hidden), expected, "moe_float64", "sparse MoE vs dense moe_ref")
    assert_close(routing.logits, x.reshape(-1, hidden) @ moe.router.weight.T, "moe_float64", "router logits")
    chosen = torch.zeros(batch * L, E, dtype=torch.long).scatter_(1, routing.top_k_index, 1)  # (tokens, E)
    assert torch.equal(routing.tokens_per_expert, chosen.sum(0))
    assert torch.equal(chosen.sum(1), torch.full((batch * L,), k))  # k distinct experts per token
    assert routing.dropped == 0


def test_gradients_reach_the_router_and_every_used_expert():
    moe = make_moe(0, 6, 5, 6, 2)
    x = randn(1, 1, 2, 6)  # 2 tokens, 4 assignments over 6 experts: 2 or more experts get none
    with torch.enable_grad():
        out, routing = moe(x)
        (out * randn(2, 1, 2, 6)).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    used = routing.tokens_per_expert > 0
    for e, expert in enumerate(moe.experts):
        for name, p in expert.named_parameters():
            if used[e]:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"expert {e} {name}"
            else:
                assert p.grad is None, f"unused expert {e} {name} got a gradient"


def test_gradcheck():
    moe = make_moe(3, 3, 4, 4, 2, normalize_top_k=True)
    x = randn(4, 1, 5, 3).requires_grad_()
    params = (moe.router.weight, moe.experts[0].gate_proj.weight)

    def fn(x, *_):
        return moe(x)[0]

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_one_expert_top_1_is_the_dense_swiglu():
    """With one expert its router probability is exactly 1: the MoE is the dense MLP, bit for bit."""
    moe = make_moe(5, 8, 12, 1, 1)
    dense = SwiGLU(8, 12).double()
    dense.load_state_dict(moe.experts[0].state_dict())
    x = randn(6, 3, 7, 8)
    with torch.no_grad():
        out, routing = moe(x)
        assert torch.equal(routing.top_k_weights, torch.ones(21, 1, dtype=torch.float64))
        assert torch.equal(out, dense(x))


@given(
    hidden=hidden_size, inter=intermediate_size, E=num_experts, normalize=normalize_top_k, L=seq_len, seed=seeds,
    data=st.data(),
)  # fmt: skip
def test_expert_permutation_equivariance(hidden, inter, E, normalize, L, seed, data):
    """Relabelling the experts (their weights and their router rows together) changes no output."""
    k = data.draw(st.integers(1, E), label="top_k")
    perm = torch.tensor(data.draw(st.permutations(range(E)), label="perm"))
    moe = make_moe(seed, hidden, inter, E, k, normalize_top_k=normalize)
    permuted = make_moe(seed, hidden, inter, E, k, normalize_top_k=normalize)
    with torch.no_grad():
        permuted.router.weight.copy_(moe.router.weight[perm])
        for new, old in enumerate(perm.tolist()):
            permuted.experts[new].load_state_dict(moe.experts[old].state_dict())
        x = randn(seed + 1, 2, L, hidden)
        out, routing = moe(x)
        out_p, routing_p = permuted(x)
    assert_close(out_p, out, "moe_float64", "permuted experts")
    assert torch.equal(perm[routing_p.top_k_index], routing.top_k_index)  # new label -> old label
    assert torch.equal(routing_p.tokens_per_expert, routing.tokens_per_expert[perm])


def test_state_dict_names_match_hf_jamba():
    """HF Jamba checkpoints store `feed_forward.router.weight` and `feed_forward.experts.{e}.{gate,up,down}_proj`."""
    keys = list(MoE(4, 8, 3, 2, device="meta").state_dict())
    expected = ["router.weight"] + [f"experts.{e}.{p}_proj.weight" for e in range(3) for p in ("gate", "up", "down")]
    assert keys == expected


# ---------------------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------------------


@given(hidden=hidden_size, E=num_experts, L=seq_len, seed=seeds, data=st.data())
def test_router_raw_and_renormalised_weights(hidden, E, L, seed, data):
    k = data.draw(st.integers(1, E), label="top_k")
    raw, renorm = Router(hidden, E, k).double(), Router(hidden, E, k, normalize_top_k=True).double()
    with torch.no_grad():
        renorm.weight.copy_(raw.weight.normal_(generator=torch.Generator().manual_seed(seed)))
        x = randn(seed + 1, L, hidden)
        logits, w_raw, idx = raw(x)
        _, w_norm, idx_n = renorm(x)
    probs = torch.softmax(logits, dim=-1)  # (L, E)
    assert torch.equal(idx, idx_n)
    assert torch.equal(w_raw, probs.gather(1, idx))  # Jamba: the raw probabilities of the chosen experts
    assert (w_raw[:, :-1] >= w_raw[:, 1:]).all()  # most probable first
    assert (w_raw.sum(-1) <= 1 + 1e-12).all()
    assert_close(w_norm.sum(-1), torch.ones(L, dtype=torch.float64), "moe_float64", "renormalised weights sum to 1")
    assert_close(w_norm, w_raw / w_raw.sum(-1, keepdim=True), "moe_float64", "Mixtral = Jamba / Σ top-k")
    if k == E:
        assert_close(w_raw.sum(-1), torch.ones(L, dtype=torch.float64), "moe_float64", "k = E keeps all the mass")


def test_router_ties_do_not_matter():
    """Experts 1 and 2 are exact twins (router row and weights): whichever topk picks, the weights and output agree."""
    moe = make_moe(7, 4, 4, 4, 2)
    with torch.no_grad():
        moe.router.weight[2] = moe.router.weight[1]
        moe.experts[2].load_state_dict(moe.experts[1].state_dict())
        x = randn(8, 1, 40, 4)
        out, routing = moe(x)
    probs = torch.softmax(routing.logits, -1)  # (40, 4)
    assert torch.equal(routing.top_k_weights, probs.sort(-1, descending=True).values[:, :2])  # values, not labels
    expected = ref.moe_ref(x[0].numpy(), *weights_of(moe), top_k=2)
    assert_close(out[0], expected, "moe_float64", "tied experts")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_router_dtypes(dtype):
    """Softmax in at least float32 (HF: float32), weights back in the input's dtype (HF casts them too)."""
    router = Router(8, 5, 2).to(dtype)
    logits, weights, index = router(torch.randn(3, 8, dtype=dtype))
    assert logits.dtype == weights.dtype == dtype and index.dtype == torch.long
    probs = torch.softmax(logits.to(torch.promote_types(dtype, torch.float32)), -1)
    assert torch.equal(weights, probs.gather(1, index).to(dtype))


def test_router_chooses_in_float32():
    """bfloat16 logits 0 and 2⁻¹⁰: their probabilities differ by 2⁻¹² relative, the same number in bfloat16 (8 bits).
    The float32 softmax still sees which is larger, in either order; a bfloat16 softmax would see a tie."""
    for larger in (0, 1):
        router = Router(1, 2, 1).to(torch.bfloat16)
        with torch.no_grad():
            router.weight.zero_()[larger] = 2**-10
        _, weights, index = router(torch.ones(1, 1, dtype=torch.bfloat16))
        assert index.item() == larger


# ---------------------------------------------------------------------------------------------------------
# Hugging Face parity: transformers' JambaSparseMoeBlock with its fused expert weights
# ---------------------------------------------------------------------------------------------------------


@needs_transformers
@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm", "batched_mm"])
@settings(max_examples=10)
@given(
    hidden=st.integers(1, 4).map(lambda n: 4 * n),  # multiples of 4: HF's grouped matmul needs 16-byte strides
    inter=st.integers(1, 4).map(lambda n: 4 * n),
    E=num_experts,
    batch=batch,
    L=seq_len,
    seed=seeds,
    data=st.data(),
)
def test_matches_hf_jamba_sparse_moe_block(experts_implementation, hidden, inter, E, batch, L, seed, data):
    k = data.draw(st.integers(1, E), label="top_k")
    config = transformers.JambaConfig(
        hidden_size=hidden, intermediate_size=inter, num_experts=E, num_experts_per_tok=k,
        experts_implementation=experts_implementation,
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = JambaSparseMoeBlock(config).eval()
    moe = MoE(hidden, inter, E, k)
    with torch.no_grad():
        for p in hf.parameters():  # HF leaves them torch.empty until a model's _init_weights
            p.normal_()
        moe.router.weight.copy_(hf.router.weight)
        for e, expert in enumerate(moe.experts):
            gate, up = hf.experts.gate_up_proj[e].chunk(2, dim=0)  # (inter, hidden) each: gate first
            expert.gate_proj.weight.copy_(gate)
            expert.up_proj.weight.copy_(up)
            expert.down_proj.weight.copy_(hf.experts.down_proj[e])
        x = torch.randn(batch, L, hidden)
        out, routing = moe(x)
        logits, weights, index = hf.router(x.reshape(-1, hidden))
        assert_close(out, hf(x), "hf_parity", "MoE vs JambaSparseMoeBlock")
    assert torch.equal(routing.logits, logits) and torch.equal(routing.top_k_index, index)
    assert torch.equal(routing.top_k_weights, weights)


# ---------------------------------------------------------------------------------------------------------
# Capacity
# ---------------------------------------------------------------------------------------------------------


def _forced_routing_moe(router_weight, top_k, capacity_factor):
    """A MoE over one-hot tokens whose router rows are given: token x = e_j routes by column j of router_weight."""
    E, hidden = router_weight.shape
    moe = make_moe(11, hidden, 4, E, top_k, capacity_factor=capacity_factor)
    with torch.no_grad():
        moe.router.weight.copy_(router_weight)
    return moe


def test_capacity_all_tokens_to_one_expert():
    """8 tokens all choose expert 0 (top-1); capacity ceil(1 · 8 · 1 / 4) = 2 keeps tokens 0 and 1, drops 6."""
    moe = _forced_routing_moe(torch.tensor([[9.0], [0.0], [0.0], [0.0]], dtype=torch.float64), 1, 1.0)
    x = torch.ones(1, 8, 1, dtype=torch.float64)
    with torch.no_grad():
        out, routing = moe(x)
        kept = moe.experts[0](x[0, :2]) * routing.top_k_weights[:2]  # (2, 1)
    assert moe.capacity(8) == 2
    assert routing.dropped == 6 and routing.tokens_per_expert.tolist() == [8, 0, 0, 0]
    assert torch.equal(out[0, :2], kept)
    assert torch.equal(out[0, 2:], torch.zeros(6, 1, dtype=torch.float64))  # dropped: exactly nothing


def test_capacity_first_choices_before_second_choices():
    """Tokens 0, 1 choose (1, 0), tokens 2, 3 choose (0, 2). Expert 0 gets 4 assignments, capacity 2: the first
    choices of the later tokens 2, 3 win over the second choices of tokens 0, 1."""
    router_weight = torch.tensor([[2.0, 3.0], [3.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)  # (E, hidden)
    moe = _forced_routing_moe(router_weight, 2, 1.0)
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)  # (1, 4, 2)
    with torch.no_grad():
        out, routing = moe(x)
        w = routing.top_k_weights
        assert routing.top_k_index.tolist() == [[1, 0], [1, 0], [0, 2], [0, 2]]
        expected_a = moe.experts[1](x[0, :2]) * w[:2, :1]  # tokens 0, 1 keep only their first choice
        expected_b = moe.experts[0](x[0, 2:]) * w[2:, :1] + moe.experts[2](x[0, 2:]) * w[2:, 1:]
    assert moe.capacity(4) == 2 and routing.dropped == 2
    assert_close(out[0], torch.cat([expected_a, expected_b]), "moe_float64", "slot-major capacity priority")


def _kept_assignments(top_k_index, E, capacity):
    """The capacity rule written as a loop over (slot, token) in priority order — obviously correct, slow."""
    T, k = top_k_index.shape
    kept, used = torch.zeros(T, E), [0] * E  # kept: (tokens, E)
    for slot in range(k):
        for t in range(T):
            e = int(top_k_index[t, slot])
            if used[e] < capacity:
                used[e] += 1
                kept[t, e] = 1
    return kept


@given(
    hidden=hidden_size, E=num_experts, L=seq_len, batch=batch, seed=seeds,
    capacity_factor=st.floats(0.1, 3.0), data=st.data(),
)  # fmt: skip
def test_capacity_matches_a_loop_over_assignments(hidden, E, L, batch, seed, capacity_factor, data):
    k = data.draw(st.integers(1, E), label="top_k")
    moe = make_moe(seed, hidden, 3, E, k, capacity_factor=capacity_factor)
    x = randn(seed + 1, batch, L, hidden)
    T = batch * L
    with torch.no_grad():
        out, routing = moe(x)
    capacity = math.ceil(capacity_factor * T * k / E)
    assert moe.capacity(T) == capacity
    kept = _kept_assignments(routing.top_k_index, E, capacity).double()  # (tokens, E)
    assert routing.dropped == T * k - int(kept.sum())
    assert routing.dropped == int((routing.tokens_per_expert - capacity).clamp(min=0).sum())
    # The oracle with every expert run on every token, weighted by g_e where the assignment was kept.
    tokens = x.reshape(T, hidden)
    probs = torch.softmax(routing.logits, -1)
    with torch.no_grad():
        every = torch.stack([expert(tokens) for expert in moe.experts], dim=1)  # (tokens, E, hidden)
    expected = torch.einsum("te,teh->th", probs * kept, every)
    assert_close(out.reshape(T, hidden), expected, "moe_float64", "capacity vs loop")


@given(hidden=hidden_size, E=num_experts, L=seq_len, seed=seeds, data=st.data())
def test_large_capacity_is_no_capacity(hidden, E, L, seed, data):
    """capacity >= tokens means no expert can overflow (a token picks an expert at most once): nothing changes."""
    k = data.draw(st.integers(1, E), label="top_k")
    unlimited = make_moe(seed, hidden, 3, E, k)
    limited = make_moe(seed, hidden, 3, E, k, capacity_factor=E / k)
    x = randn(seed + 1, 2, L, hidden)
    with torch.no_grad():
        (out_u, r_u), (out_l, r_l) = unlimited(x), limited(x)
    assert limited.capacity(2 * L) >= 2 * L and r_l.dropped == 0
    assert torch.equal(out_u, out_l) and torch.equal(r_u.tokens_per_expert, r_l.tokens_per_expert)


# ---------------------------------------------------------------------------------------------------------
# The load-balancing loss
# ---------------------------------------------------------------------------------------------------------


@given(E=num_experts, tokens=st.integers(1, 50), num_layers=num_layers, data=st.data())
def test_load_balancing_loss_is_top_k_for_a_uniform_router(E, tokens, num_layers, data):
    """Every P_e = 1/n and Σ_e f_e = K, whatever the ties pick: loss = n · K / n = K."""
    k = data.draw(st.integers(1, E), label="top_k")
    logits = [torch.zeros(tokens, E) for _ in range(num_layers)]  # a zero router weight: all logits equal
    assert abs(float(load_balancing_loss(logits, E, k)) - k) <= 1e-6 * k


@given(E=st.integers(2, 16), tokens=st.integers(1, 50), data=st.data())
def test_load_balancing_loss_tends_to_num_experts_at_collapse(E, tokens, data):
    """Every token sent to experts 0..K-1 with all the probability: f = 1 there, Σ P = 1 there, loss -> n."""
    k = data.draw(st.integers(1, E - 1), label="top_k")
    logits = torch.zeros(tokens, E)
    logits[:, :k] = 30.0  # the other experts keep probability about e^-30 each
    assert abs(float(load_balancing_loss(logits, E, k)) - E) <= 1e-6 * E
    spread = torch.zeros(tokens, E)
    spread[:, :k] = 3.0  # still collapsed, but less sure: the loss is n · (mass on the K experts) < n
    mass = k * math.exp(3) / (k * math.exp(3) + E - k)
    assert abs(float(load_balancing_loss(spread, E, k)) - E * mass) <= 1e-5 * E


def test_load_balancing_loss_pools_layers_rather_than_averaging_them():
    """Layer 1 sends everything to expert 0, layer 2 to expert 1 (top-1 of 2). Each alone is collapsed (loss 2);
    pooled, each expert has half the assignments and half the probability: 2 · (½·½ + ½·½) = 1."""
    one = torch.tensor([[30.0, 0.0]] * 4)
    two = torch.tensor([[0.0, 30.0]] * 4)
    assert abs(float(load_balancing_loss(one, 2, 1)) - 2) < 1e-6
    assert abs(float(load_balancing_loss([one, two], 2, 1)) - 1) < 1e-6


@given(E=num_experts, batch=batch, L=seq_len, num_layers=num_layers, masked=st.booleans(), seed=seeds, data=st.data())
def test_load_balancing_loss_matches_reference(E, batch, L, num_layers, masked, seed, data):
    k = data.draw(st.integers(1, E), label="top_k")
    logits = [randn(seed + i, batch * L, E) for i in range(num_layers)]
    mask = None
    if masked:
        mask = torch.rand(batch, L, generator=torch.Generator().manual_seed(seed)) < 0.7
        mask[0, 0] = True  # at least one real token
    ours = load_balancing_loss(logits, E, k, attention_mask=mask)
    expected = ref.load_balancing_loss_ref([t.numpy() for t in logits], E, k, None if mask is None else mask.numpy())
    assert_close(ours, expected, "moe_float64", "load balancing vs reference")
    if masked:  # padding counts nowhere: the same as dropping its rows
        rows = mask.reshape(-1)
        assert_close(load_balancing_loss([t[rows] for t in logits], E, k), ours, "moe_float64", "mask = drop rows")


@needs_transformers
@settings(max_examples=25)
@given(E=num_experts, batch=batch, L=seq_len, num_layers=num_layers, masked=st.booleans(), seed=seeds, data=st.data())
def test_load_balancing_loss_matches_hf(E, batch, L, num_layers, masked, seed, data):
    k = data.draw(st.integers(1, E), label="top_k")
    logits = tuple(randn(seed + i, batch * L, E, dtype=torch.float32) for i in range(num_layers))
    mask = None
    if masked:
        mask = (torch.rand(batch, L, generator=torch.Generator().manual_seed(seed)) < 0.7).long()
        mask[0, 0] = 1
    expected = load_balancing_loss_func(logits, E, k, attention_mask=mask)
    assert_close(load_balancing_loss(logits, E, k, attention_mask=mask), expected, "aux_loss_float32", "vs HF")


def test_load_balancing_loss_gradient_pushes_probability_off_the_busy_expert():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0]], requires_grad=True)
    with torch.enable_grad():
        load_balancing_loss(logits, 3, 1).backward()
    assert (logits.grad[:, 0] > 0).all()  # descending lowers expert 0's logit: it holds every assignment


# ---------------------------------------------------------------------------------------------------------
# z-loss, utilisation, arguments
# ---------------------------------------------------------------------------------------------------------


def test_router_z_loss_by_hand():
    """logsumexp(0, 0) = ln 2, logsumexp(ln 3, 0) = ln 4 = 2 ln 2, logsumexp(ln 7, 0) = ln 8 = 3 ln 2."""
    one = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], dtype=torch.float64)
    two = torch.tensor([[math.log(7), 0.0]], dtype=torch.float64)
    ln2sq = math.log(2) ** 2
    assert abs(float(router_z_loss(one)) - ln2sq * (1 + 4) / 2) < 1e-14
    assert abs(float(router_z_loss([one, two])) - ln2sq * (1 + 4 + 9) / 3) < 1e-14  # the mean over all 3 rows


def test_expert_utilisation_by_hand():
    index = torch.tensor([[0, 1], [0, 2], [0, 1]])  # 6 assignments over 4 experts: 3, 2, 1, 0
    u = expert_utilisation(index, 4)
    assert u.counts.tolist() == [3, 2, 1, 0]
    assert np.allclose(u.fractions.numpy(), [1 / 2, 1 / 3, 1 / 6, 0])
    assert math.isclose(u.entropy, -(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6))
    assert math.isclose(expert_utilisation(torch.arange(8).reshape(4, 2), 8).entropy, math.log(8))  # balanced
    assert expert_utilisation(torch.tensor([[3, 1]] * 5), 8).entropy == pytest.approx(math.log(2))  # collapsed
    routing = RouterOutput(torch.zeros(3, 4), index, torch.ones(3, 2), u.counts, 0)
    assert expert_utilisation(routing, 4).counts.tolist() == [3, 2, 1, 0]


def test_bad_arguments_are_named():
    cases = [
        (lambda: SwiGLU(0, 4), "hidden_size"),
        (lambda: SwiGLU(4, 2.5), "intermediate_size"),
        (lambda: Router(4, 0, 1), "num_experts"),
        (lambda: Router(4, 3, 4), "top_k"),
        (lambda: Router(4, 3, 0), "top_k"),
        (lambda: MoE(4, 8, 3, True), "top_k"),
        (lambda: MoE(4, 8, 3, 2, capacity_factor=0), "capacity_factor"),
        (lambda: MoE(4, 8, 3, 2, capacity_factor="1"), "capacity_factor"),
        (lambda: load_balancing_loss(torch.zeros(5, 3), 4, 2), "router_logits"),
        (lambda: load_balancing_loss([], 4, 2), "router_logits"),
        (lambda: load_balancing_loss(torch.zeros(5, 3), 3, 4), "top_k"),
        (lambda: load_balancing_loss(torch.zeros(6, 3), 3, 2, attention_mask=torch.ones(2, 2)), "attention_mask"),
        (lambda: router_z_loss(torch.zeros(5)), "router_logits"),
        (lambda: expert_utilisation(torch.tensor([0, 4]), 4), "num_experts"),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()


def test_toy_experiment_is_deterministic():
    """Lesson 06's experiment: same seed, same run; the log has one row per step and shares that sum to 1."""
    task = ClusterTask.make(clusters=3, dim=4, seed=1)
    x, y, cluster = task.sample(10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (10, 4) and cluster.shape == (10,)
    assert torch.allclose(y, torch.einsum("nij,nj->ni", task.maps[cluster], x))
    runs = [train_moe(task, num_experts=4, top_k=2, aux_coef=0.1, steps=3, batch=16, intermediate=8) for _ in range(2)]
    (moe, log), (moe_again, log_again) = runs
    assert log.fractions.shape == (3, 4) and log.entropy.shape == log.task_loss.shape == log.aux_loss.shape == (3,)
    assert torch.allclose(log.fractions.sum(-1), torch.ones(3, dtype=log.fractions.dtype))
    for a, b in zip(log, log_again, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(moe.parameters(), moe_again.parameters(), strict=True):
        assert torch.equal(a, b)


@settings(max_examples=5)  # each example draws a figure
@given(E=st.integers(1, 6), L=st.integers(1, 8), seed=seeds, data=st.data())
def test_dispatch_picture_draws_the_module_routing(E, L, seed, data):
    """Lesson 06's Figure 1: each expert's box counts the rows MoE routed to it, each token's sum names its experts."""
    k = data.draw(st.integers(1, E), label="top_k")
    moe = make_moe(seed, 3, 2, E, k)
    with torch.no_grad():
        _, routing = moe(randn(seed + 1, L, 3))
    fig = draw_moe_dispatch(torch.softmax(routing.logits, -1), routing.top_k_index, routing.top_k_weights, "test")
    texts = [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    for e, count in enumerate(routing.tokens_per_expert.tolist()):
        assert f"expert {e}\n{count} {'row' if count == 1 else 'rows'}" in texts
    for t in range(L):
        label = next(text for text in texts if text.startswith(f"out$_{t}$ ="))
        assert [int(e) for e in re.findall(r"E(\d+)", label)] == routing.top_k_index[t].tolist()
