"""Tests of causal GQA self-attention: the NumPy reference, SDPA's mask alignment, the (k, v) cache, RoPE, HF parity.

The ladder: causal_attention_ref (NumPy float64) == attention_written_out == sdpa_attention, for GQA heads and for
queries that continue a cache (Lq < Lk), where SDPA's own causal mask would be wrong. Then the layer: its forward ==
the reference on its own projections, prefill + step == forward at every split, chunked prefill == one forward.
"""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from minijamba import reference as ref
from minijamba.attention import CausalSelfAttention, apply_rope, attention_written_out, sdpa_attention

try:
    import transformers
    from transformers.models.jamba.modeling_jamba import JambaAttention
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
except ImportError:  # the test extra installs it; without it only the HF parity tests skip
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not importable: pip install .[test]")

batch = st.integers(1, 3)
kv_heads = st.integers(1, 3)
group = st.integers(1, 3)  # query heads per kv head: heads = kv_heads · group
head_dim = st.integers(1, 8)
half_head_dim = st.integers(1, 4)  # head_dim = 2 · half_head_dim where RoPE may be on
q_len = st.integers(1, 6)
past_len = st.integers(0, 6)
seq_len = st.integers(1, 10)
rope = st.booleans()
rope_theta = st.sampled_from([10.0, 10000.0])  # 10: every channel pair turns visibly within a few positions
use_sdpa = st.booleans()
seeds = st.integers(0, 2**31 - 1)

TOL = {torch.float64: "attention_float64", torch.float32: "attention_float32"}


@pytest.fixture(autouse=True)
def _inference():
    """No autograd unless a test asks for it (conftest sets 1 thread)."""
    with torch.no_grad():
        yield


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def make_qkv(batch, heads, kv_heads, Lq, Lk, head_dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(batch, heads, Lq, head_dim, dtype=dtype, generator=g)  # scores O(1-10): a peaked softmax
    k, v = torch.randn(2, batch, kv_heads, Lk, head_dim, dtype=dtype, generator=g)
    return q, k, v


def make_layer(seed, hidden_size, num_heads, num_kv_heads, dtype=torch.float64, **kwargs):
    """A layer with N(0, 0.5²) weights, larger than nn.Linear's init so the softmax is peaked and the mask matters."""
    torch.manual_seed(seed)
    layer = CausalSelfAttention(hidden_size, num_heads, num_kv_heads, dtype=dtype, **kwargs)
    for p in layer.parameters():
        p.normal_(0, 0.5)
    return layer


def _np(t):
    return t.detach().numpy()


# ---------------------------------------------------------------------------------------------------------
# The attention functions: NumPy reference == written out == SDPA
# ---------------------------------------------------------------------------------------------------------


@example(batch=1, kv_heads=2, group=2, head_dim=3, Lq=3, past=2, scale=None, seed=0)  # GQA continuing a cache
@given(
    batch=batch, kv_heads=kv_heads, group=group, head_dim=head_dim, Lq=q_len, past=past_len,
    scale=st.one_of(st.none(), st.floats(0.1, 2.0)), seed=seeds,
)  # fmt: skip
def test_written_out_matches_reference(batch, kv_heads, group, head_dim, Lq, past, scale, seed):
    q, k, v = make_qkv(batch, kv_heads * group, kv_heads, Lq, past + Lq, head_dim, seed)
    expected = ref.causal_attention_ref(_np(q), _np(k), _np(v), scale)
    assert_close(attention_written_out(q, k, v, scale), expected, "attention_float64", "written out vs reference")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@example(batch=2, kv_heads=1, group=3, head_dim=4, Lq=4, past=0, seed=1)  # Lq == Lk: SDPA's is_causal
@example(batch=1, kv_heads=2, group=2, head_dim=4, Lq=1, past=5, seed=2)  # one new token after a cache
@example(batch=1, kv_heads=3, group=1, head_dim=2, Lq=3, past=4, seed=3)  # a prefill after a cache: our mask
@given(batch=batch, kv_heads=kv_heads, group=group, head_dim=head_dim, Lq=q_len, past=past_len, seed=seeds)
def test_sdpa_matches_written_out(dtype, batch, kv_heads, group, head_dim, Lq, past, seed):
    q, k, v = make_qkv(batch, kv_heads * group, kv_heads, Lq, past + Lq, head_dim, seed, dtype)
    assert_close(sdpa_attention(q, k, v), attention_written_out(q, k, v), TOL[dtype], f"SDPA vs written out, {dtype}")


def test_gradients():
    """gradcheck in float64 on a tiny GQA prefill that continues a cache, for both attention functions."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 4, 2, 3, 5, 3, seed=0))
    with torch.enable_grad():
        for attend in (attention_written_out, sdpa_attention):
            assert torch.autograd.gradcheck(attend, (q, k, v)), attend.__name__


def test_reference_rejects_bad_shapes():
    q, k, v = (_np(t) for t in make_qkv(2, 4, 2, 3, 5, 3, seed=0))
    for args, name in (
        ((q[0], k, v), "q must"),
        ((q[:, :, :0], k, v), "q must"),
        ((q, k[:1], v), "k must"),
        ((q, k[..., :2], v), "k must"),
        ((q, k[:, :, :2], v), "Lk >= Lq"),
        ((q[:, :3], k, v), "kv heads"),
        ((q, k, v[:, :, :4]), "v must"),
    ):
        with pytest.raises(ValueError, match=name):
            ref.causal_attention_ref(*args)


# ---------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------


def layer_ref(layer, hidden):
    """The layer in float64 NumPy from its own weights: project, split heads, (RoPE), causal_attention_ref, o_proj."""
    h = _np(hidden)
    batch, L, _ = h.shape

    def heads(linear, n):
        return (h @ _np(linear.weight).T).reshape(batch, L, n, layer.head_dim).transpose(0, 2, 1, 3)  # (b, n, L, hd)

    q = heads(layer.q_proj, layer.num_heads)
    k, v = heads(layer.k_proj, layer.num_kv_heads), heads(layer.v_proj, layer.num_kv_heads)
    if layer.rope:
        q, k = ref.rope_ref(q, np.arange(L), layer.rope_theta), ref.rope_ref(k, np.arange(L), layer.rope_theta)
    y = ref.causal_attention_ref(q, k, v)  # (batch, heads, L, head_dim)
    return y.transpose(0, 2, 1, 3).reshape(batch, L, -1) @ _np(layer.o_proj.weight).T  # (batch, L, hidden_size)


@given(
    batch=batch, kv_heads=kv_heads, group=group, half_head_dim=half_head_dim, L=seq_len, rope=rope,
    rope_theta=rope_theta, use_sdpa=use_sdpa, seed=seeds,
)  # fmt: skip
def test_layer_matches_reference(batch, kv_heads, group, half_head_dim, L, rope, rope_theta, use_sdpa, seed):
    heads = kv_heads * group
    hidden_size = heads * 2 * half_head_dim
    layer = make_layer(seed, hidden_size, heads, kv_heads, rope=rope, rope_theta=rope_theta)
    layer.use_sdpa = use_sdpa
    hidden = randn(batch, L, hidden_size, seed=seed)
    out, (k, v) = layer(hidden)
    assert_close(out, layer_ref(layer, hidden), "attention_float64", "layer vs NumPy reference")
    assert k.shape == v.shape == (batch, kv_heads, L, 2 * half_head_dim)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(
    batch=batch, kv_heads=kv_heads, group=group, half_head_dim=half_head_dim, L=seq_len, rope=rope,
    use_sdpa=use_sdpa, seed=seeds, data=st.data(),
)  # fmt: skip
def test_step_matches_forward(dtype, batch, kv_heads, group, half_head_dim, L, rope, use_sdpa, seed, data):
    """forward(h) == forward(h[:, :k]) then step() for every later token: outputs and the final (k, v)."""
    k = data.draw(st.integers(0, L), label="k")
    heads = kv_heads * group
    hidden_size = heads * 2 * half_head_dim
    layer = make_layer(seed, hidden_size, heads, kv_heads, dtype, rope=rope, rope_theta=10.0)
    layer.use_sdpa = use_sdpa
    hidden = randn(batch, L, hidden_size, seed=seed, dtype=dtype)
    out, (k_all, v_all) = layer(hidden)

    parts, state = [], layer.empty_state(batch)
    if k:
        prefix, state = layer(hidden[:, :k])
        parts.append(prefix)
    for t in range(k, L):
        out_t, state = layer.step(hidden[:, t], state)
        parts.append(out_t[:, None])
    assert_close(torch.cat(parts, dim=1), out, TOL[dtype], f"prefill {k} + step vs forward")
    assert_close(state[0], k_all, TOL[dtype], "k cache")
    assert_close(state[1], v_all, TOL[dtype], "v cache")


@given(
    batch=batch, kv_heads=kv_heads, group=group, half_head_dim=half_head_dim, L=seq_len, rope=rope,
    use_sdpa=use_sdpa, seed=seeds, data=st.data(),
)  # fmt: skip
def test_chunked_prefill_matches_forward(batch, kv_heads, group, half_head_dim, L, rope, use_sdpa, seed, data):
    """forward over consecutive chunks, passing the state along, == one forward: Lq < Lk for every later chunk."""
    cuts = sorted(data.draw(st.lists(st.integers(1, L), max_size=3), label="cuts"))
    heads = kv_heads * group
    hidden_size = heads * 2 * half_head_dim
    layer = make_layer(seed, hidden_size, heads, kv_heads, rope=rope, rope_theta=10.0)
    layer.use_sdpa = use_sdpa
    hidden = randn(batch, L, hidden_size, seed=seed)
    out, (k_all, v_all) = layer(hidden)
    parts, state = [], None
    for t0, t1 in zip([0, *cuts], [*cuts, L], strict=True):
        if t1 > t0:
            part, state = layer(hidden[:, t0:t1], state)
            parts.append(part)
    assert_close(torch.cat(parts, dim=1), out, "attention_float64", f"chunks at {cuts} vs whole")
    assert_close(state[0], k_all, "attention_float64", "k cache")
    assert_close(state[1], v_all, "attention_float64", "v cache")


def test_state_holds_exactly_the_tokens_seen():
    """The cache is 2 · batch · kv_heads · T · head_dim numbers after T tokens: it grows with the context."""
    layer = make_layer(0, 12, 4, 2, torch.float32)
    k, v = layer.empty_state(3)
    assert k.shape == v.shape == (3, 2, 0, 3) and k.dtype == torch.float32 and k.device == layer.q_proj.weight.device
    _, state = layer(randn(3, 5, 12, seed=0, dtype=torch.float32))
    for _ in range(4):
        _, state = layer.step(randn(3, 12, seed=1, dtype=torch.float32), state)
    assert state[0].shape == state[1].shape == (3, 2, 9, 3)
    assert sum(t.nbytes for t in state) == 2 * 3 * 2 * 9 * 3 * 4


def test_every_parameter_gets_a_gradient():
    layer = make_layer(0, 8, 4, 2, torch.float32, rope=True)
    with torch.enable_grad():
        out, _ = layer(randn(2, 5, 8, seed=0, dtype=torch.float32))
        out.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


# ---------------------------------------------------------------------------------------------------------
# Grouped-query attention is multi-head attention with shared key/value heads
# ---------------------------------------------------------------------------------------------------------


def multi_head_by_hand(layer, hidden):
    """Vaswani et al. §3.2.2 literally: head i = softmax(x Wq_i (x Wk_i)ᵀ / sqrt(d_k) + mask) x Wv_i, concat, Wo."""
    L, d = hidden.shape[1], layer.head_dim
    future = torch.ones(L, L, dtype=torch.bool).triu(1)  # (L, L): key after query
    heads = []
    for i in range(layer.num_heads):
        rows = slice(i * d, (i + 1) * d)
        q, k, v = (hidden @ p.weight[rows].T for p in (layer.q_proj, layer.k_proj, layer.v_proj))  # (batch, L, d)
        scores = (q @ k.transpose(1, 2) / d**0.5).masked_fill(future, float("-inf"))  # (batch, L, L)
        heads.append(torch.softmax(scores, dim=-1) @ v)
    return layer.o_proj(torch.cat(heads, dim=-1))  # (batch, L, hidden_size)


@given(use_sdpa=use_sdpa, batch=batch, heads=st.integers(1, 4), head_dim=head_dim, L=seq_len, seed=seeds)
def test_gqa_with_all_heads_is_multi_head_attention(use_sdpa, batch, heads, head_dim, L, seed):
    layer = make_layer(seed, heads * head_dim, heads, heads)
    layer.use_sdpa = use_sdpa
    hidden = randn(batch, L, heads * head_dim, seed=seed)
    assert_close(layer(hidden)[0], multi_head_by_hand(layer, hidden), "attention_float64", "GQA(h, h) vs MHA")


@example(use_sdpa=True, batch=1, kv_heads=2, group=2, head_dim=2, L=4, rope=False, seed=0)
@example(use_sdpa=False, batch=1, kv_heads=2, group=2, head_dim=2, L=4, rope=False, seed=0)
@given(
    use_sdpa=use_sdpa, batch=batch, kv_heads=kv_heads, group=st.integers(2, 3), head_dim=st.sampled_from([2, 4]),
    L=seq_len, rope=rope, seed=seeds,
)  # fmt: skip
def test_gqa_is_mha_with_repeated_kv_weights(use_sdpa, batch, kv_heads, group, head_dim, L, rope, seed):
    """Query head j reads kv head j // group: GQA == MHA whose k/v weights are each kv head's, repeated group times."""
    heads = kv_heads * group
    gqa = make_layer(seed, heads * head_dim, heads, kv_heads, rope=rope)
    mha = CausalSelfAttention(heads * head_dim, heads, rope=rope, dtype=torch.float64)
    mha.q_proj.weight.copy_(gqa.q_proj.weight)
    mha.o_proj.weight.copy_(gqa.o_proj.weight)
    for ours, theirs in ((mha.k_proj, gqa.k_proj), (mha.v_proj, gqa.v_proj)):
        per_head = theirs.weight.view(kv_heads, head_dim, -1)  # (kv_heads, head_dim, hidden_size)
        ours.weight.copy_(per_head.repeat_interleave(group, dim=0).flatten(0, 1))  # (heads · head_dim, hidden_size)
    gqa.use_sdpa = mha.use_sdpa = use_sdpa
    hidden = randn(batch, L, heads * head_dim, seed=seed)
    assert_close(gqa(hidden)[0], mha(hidden)[0], "attention_float64", "GQA vs MHA with repeated kv weights")


# ---------------------------------------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------------------------------------


@given(
    batch=batch, kv_heads=kv_heads, group=group, half_head_dim=half_head_dim, past=past_len, L=seq_len, rope=rope,
    use_sdpa=use_sdpa, seed=seeds, data=st.data(),
)  # fmt: skip
def test_future_tokens_never_change_earlier_outputs(
    batch, kv_heads, group, half_head_dim, past, L, rope, use_sdpa, seed, data
):
    """Changing token t (after an optional cache of `past` tokens) leaves outputs 0..t-1 bit for bit the same."""
    t = data.draw(st.integers(0, L - 1), label="t")
    heads = kv_heads * group
    hidden_size = heads * 2 * half_head_dim
    layer = make_layer(seed, hidden_size, heads, kv_heads, rope=rope)
    layer.use_sdpa = use_sdpa
    state = layer(randn(batch, past, hidden_size, seed=seed + 1))[1] if past else None
    hidden = randn(batch, L, hidden_size, seed=seed)
    changed = hidden.clone()
    changed[:, t] += 1 + randn(batch, hidden_size, seed=seed + 2).abs()
    out, out_changed = layer(hidden, state)[0], layer(changed, state)[0]
    assert torch.equal(out[:, :t], out_changed[:, :t]), "an output changed when a later token did"
    assert not torch.equal(out[:, t], out_changed[:, t]), "the changed token's own output must change"


# ---------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------


@given(batch=batch, half_head_dim=half_head_dim, L=seq_len, start=st.integers(0, 10_000), theta=rope_theta, seed=seeds)
def test_rope_matches_reference(batch, half_head_dim, L, start, theta, seed):
    x = randn(batch, 2, L, 2 * half_head_dim, seed=seed)
    positions = torch.arange(start, start + L)
    expected = ref.rope_ref(_np(x), _np(positions), theta)
    assert_close(apply_rope(x, positions, theta), expected, "attention_float64", "RoPE vs reference")


@given(half_head_dim=half_head_dim, p=st.integers(0, 1000), s=st.integers(0, 1000), shift=st.integers(0, 1000),
       seed=seeds)  # fmt: skip
def test_rope_scores_depend_only_on_the_position_difference(half_head_dim, p, s, shift, seed):
    """⟨R_p q, R_s k⟩ == ⟨R_{p+c} q, R_{s+c} k⟩: RoPE turns absolute positions into relative ones; R_0 = identity."""
    q, k = randn(2, 1, 2 * half_head_dim, seed=seed)

    def score(p, s):
        return apply_rope(q, torch.tensor([p]), 10.0) @ apply_rope(k, torch.tensor([s]), 10.0).T  # (1, 1)

    assert_close(score(p + shift, s + shift), score(p, s), "attention_float64", "shifted RoPE score")
    assert torch.equal(apply_rope(q, torch.tensor([0])), q)
    assert_close(apply_rope(q, torch.tensor([p])).norm(), q.norm(), "attention_float64", "RoPE is a rotation")


@needs_transformers
def test_rope_matches_llama():
    """The rotate-half convention and frequencies of HF Llama (whose angles are float32: hence hf_parity)."""
    config = transformers.LlamaConfig(hidden_size=24, num_attention_heads=2, rope_theta=500.0)
    x = randn(2, 3, 7, 12, seed=0)
    positions = torch.arange(40, 47)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions[None])
    theirs, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert_close(apply_rope(x, positions, 500.0), theirs, "hf_parity", "RoPE vs Llama")


# ---------------------------------------------------------------------------------------------------------
# Hugging Face parity and bad inputs
# ---------------------------------------------------------------------------------------------------------


@needs_transformers
@settings(max_examples=15)
@given(batch=batch, kv_heads=kv_heads, group=group, head_dim=head_dim, L=seq_len, seed=seeds)
def test_matches_transformers_jamba_attention(batch, kv_heads, group, head_dim, L, seed):
    heads = kv_heads * group
    config = transformers.JambaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    hf = JambaAttention(config, layer_idx=0).eval()
    for p in hf.parameters():
        p.normal_(0, 0.5)
    ours = CausalSelfAttention(heads * head_dim, heads, kv_heads)
    ours.load_state_dict(hf.state_dict())  # the same parameter names, q_proj ... o_proj
    hidden = randn(batch, L, heads * head_dim, seed=seed, dtype=torch.float32)
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]  # (1, 1, L, L): eager attention adds it
    theirs, _ = hf(hidden, attention_mask=mask)
    assert_close(ours(hidden)[0], theirs, "hf_parity", "vs transformers JambaAttention")


def test_bad_inputs_name_the_argument():
    for kwargs, name in (
        ({"hidden_size": 10, "num_heads": 4}, "hidden_size"),
        ({"hidden_size": 12, "num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
        ({"hidden_size": 12, "num_heads": 0}, "num_heads"),
        ({"hidden_size": 12, "num_heads": 4, "rope": True}, "head_dim"),
    ):
        with pytest.raises(ValueError, match=name):
            CausalSelfAttention(**kwargs)
    layer = make_layer(0, 8, 4, 2)
    (k, v), hidden = layer.empty_state(2), randn(2, 3, 8, seed=0)
    for bad_hidden in (randn(2, 3, 7, seed=0), randn(2, 0, 8, seed=0), randn(3, 8, seed=0)):
        with pytest.raises(ValueError, match="hidden"):
            layer(bad_hidden)
    with pytest.raises(ValueError, match="hidden_t"):
        layer.step(hidden, (k, v))
    for bad_state, name in (
        (layer.empty_state(3), "batch=2"),
        ((k[:, :1], v[:, :1]), "kv_heads=2"),
        ((k[..., :1], v), "head_dim=2"),
        ((k, layer(hidden)[1][1]), "one shape"),
        (k, "tuple"),
    ):
        with pytest.raises(ValueError, match=name):
            layer(hidden, bad_state)
