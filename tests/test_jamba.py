"""Tests of the Jamba hybrid: the layout rule, the hybrid cache (step == forward), cache bytes, parameter counts,
and parity with transformers' JambaForCausalLM through checkpoints in both directions.

The attention layer and the MoE block are tested against their NumPy references in test_attention.py and
test_moe.py, the Mamba mixer in test_mamba.py; here they are wired together, so the checks are about the wiring.
"""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tolerances import assert_close

from minijamba.checkpoint import CheckpointError
from minijamba.jamba import PRESETS, JambaConfig, JambaLM, layout_fields
from minijamba.lm import LMCache
from minijamba.mamba import MambaMixer
from minijamba.models import PARTS, cache_bytes, count_parameters, longest_context, parameters_by_part
from minijamba.moe import load_balancing_loss

try:
    import transformers
except ImportError:  # the test extra installs it; without it only the HF parity tests skip
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not importable: pip install .[test]")

seeds = st.integers(0, 2**31 - 1)
batch = st.integers(1, 3)
seq_len = st.integers(1, 24)


@st.composite
def layouts(draw, max_layers=5):
    """Layer count, attention and expert periods/offsets, experts and top-k: any legal Jamba layout."""
    attn_period, expert_period = draw(st.integers(1, 4), label="attn_period"), draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 4), label="num_experts")
    return dict(
        num_hidden_layers=draw(st.integers(1, max_layers), label="layers"),
        attn_layer_period=attn_period,
        attn_layer_offset=draw(st.integers(0, attn_period - 1), label="attn_offset"),
        expert_layer_period=expert_period,
        expert_layer_offset=draw(st.integers(0, expert_period - 1), label="expert_offset"),
        num_experts=num_experts,
        num_experts_per_tok=draw(st.integers(1, num_experts), label="top_k"),
    )


@st.composite
def heads(draw):
    """(num_attention_heads, num_key_value_heads) with kv heads dividing the heads: MHA, GQA and MQA."""
    kv = draw(st.integers(1, 3), label="kv_heads")
    return kv * draw(st.integers(1, 3), label="group"), kv


def make_model(seed, dtype=torch.float64, **config):
    """A JambaLM with every parameter moved off its init (ones, zeros, tiny scales), so no wiring bug can hide."""
    torch.manual_seed(seed)
    model = JambaLM(JambaConfig(**config)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def tokens(batch, L, vocab_size, seed):
    return torch.randint(0, vocab_size, (batch, L), generator=torch.Generator().manual_seed(seed))


def small(layout, head_pair, head_dim=4, **extra):
    heads_, kv = head_pair
    return dict(
        vocab_size=11, hidden_size=heads_ * head_dim, intermediate_size=8, num_attention_heads=heads_,
        num_key_value_heads=kv, mamba_d_state=4, mamba_dt_rank=2, **layout, **extra,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The layout
# ---------------------------------------------------------------------------------------------------------


@given(layout=layouts(max_layers=20))
def test_layout_rule(layout):
    """Layer i is attention iff i % period == offset, MoE iff i % expert period == offset (and > 1 expert)."""
    config = JambaConfig(**layout)
    for i, (kind, moe) in enumerate(zip(config.layer_types, config.moe_layers, strict=True)):
        assert (kind == "attention") == (i % layout["attn_layer_period"] == layout["attn_layer_offset"])
        assert moe == (layout["num_experts"] > 1 and i % layout["expert_layer_period"] == layout["expert_layer_offset"])
    if layout["num_hidden_layers"] <= 5:
        model = JambaLM(config)
        assert [layer.kind for layer in model.layers] == list(config.layer_types)
        assert [hasattr(layer.feed_forward, "router") for layer in model.layers] == list(config.moe_layers)
    if transformers is not None:
        hf = transformers.JambaConfig(**layout)
        assert list(config.layer_types) == hf.layers_block_type
        assert list(config.moe_layers) == [n > 1 for n in hf.layers_num_experts]


def test_jamba_v01_layout():
    """The paper's Figure 1: 4 blocks of 8 layers, attention at position 4 of each, MoE at every odd layer."""
    config = JambaConfig.preset("jamba-v0.1")
    assert [i for i, kind in enumerate(config.layer_types) if kind == "attention"] == [4, 12, 20, 28]
    assert [i for i, moe in enumerate(config.moe_layers) if moe] == list(range(1, 32, 2))


# ---------------------------------------------------------------------------------------------------------
# The hybrid cache: prefill + step == forward
# ---------------------------------------------------------------------------------------------------------


@given(layout=layouts(), head_pair=heads(), rope=st.booleans(), batch=batch, L=seq_len, seed=seeds, data=st.data())
def test_step_matches_forward(layout, head_pair, rope, batch, L, seed, data):
    """forward(ids) == forward(ids[:, :k]) then step() per later token: logits and every layer's cache, any layout."""
    k = data.draw(st.integers(0, L), label="k")
    model = make_model(seed, **small(layout, head_pair, rope=rope))
    ids = tokens(batch, L, 11, seed)
    with torch.no_grad():
        whole = model.new_cache(batch)
        logits = model(ids, whole).logits  # (batch, L, vocab)
        assert torch.equal(logits, model(ids).logits), "a fresh cache must change nothing"
        cache = model.new_cache(batch)
        parts = [model(ids[:, :k], cache).logits] if k else []
        parts += [model.step(ids[:, t], cache)[:, None] for t in range(k, L)]
    assert_close(torch.cat(parts, dim=1), logits, "jamba_step_float64", f"prefill {k} + step vs forward: logits")
    for i, (ours, expected) in enumerate(zip(cache.states, whole.states, strict=True)):
        for name, a, b in zip(("first", "second"), ours, expected, strict=True):
            assert_close(a, b, "jamba_step_float64", f"layer {i} ({model.layers[i].kind}) {name} state tensor")
    assert cache.seqlen == whole.seqlen == L


@given(layout=layouts(), head_pair=heads(), batch=batch, L=seq_len, seed=seeds, data=st.data())
def test_chunked_prefill_matches_forward(layout, head_pair, batch, L, seed, data):
    """forward over consecutive chunks with one cache == one forward (KV caches grow, Mamba states carry)."""
    cuts = sorted(data.draw(st.lists(st.integers(1, L), max_size=3), label="cuts"))
    model = make_model(seed, **small(layout, head_pair))
    ids = tokens(batch, L, 11, seed)
    with torch.no_grad():
        logits = model(ids).logits
        cache, parts = model.new_cache(batch), []
        for t0, t1 in zip([0, *cuts], [*cuts, L], strict=True):
            if t1 > t0:
                parts.append(model(ids[:, t0:t1], cache).logits)
    assert_close(torch.cat(parts, dim=1), logits, "jamba_step_float64", f"chunks at {cuts} vs whole")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(layout=layouts(), head_pair=heads(), batch=batch, L=seq_len, seed=seeds)
@settings(max_examples=20)
def test_cache_bytes_is_what_the_cache_holds(dtype, layout, head_pair, batch, L, seed):
    """cache_bytes(config, batch, T) == LMCache.nbytes after T tokens, prefilled or stepped."""
    config = small(layout, head_pair)
    model = make_model(seed, dtype, **config)
    cache = model.new_cache(batch)
    assert cache.nbytes == cache_bytes(model.config, batch, 0, dtype)
    with torch.no_grad():
        model(tokens(batch, L, 11, seed), cache)
        assert cache.nbytes == cache_bytes(model.config, batch, L, dtype)
        model.step(tokens(batch, 1, 11, seed)[:, 0], cache)
    assert cache.nbytes == cache_bytes(model.config, batch, L + 1, dtype)


def test_kv_cache_at_256k_matches_the_paper():
    """Jamba paper, Table 1: KV cache at 256K tokens, 16-bit — Jamba 4 GB, Mixtral (every layer attention) 32 GB."""
    jamba = JambaConfig.preset("jamba-v0.1")
    all_attention = JambaConfig.preset("jamba-v0.1", attn_layer_period=1, attn_layer_offset=0)
    context, gib = 256 * 1024, 2**30
    assert cache_bytes(all_attention, 1, context, torch.bfloat16) == 32 * gib  # 2 · 32 layers · 8 · 128 · 2^18 · 2
    mamba_states = 28 * 8192 * (4 + 16) * 2  # 28 Mamba layers · d_inner · (d_conv + N) · 2 bytes: 9 MB
    assert cache_bytes(jamba, 1, context, torch.bfloat16) == 4 * gib + mamba_states


# ---------------------------------------------------------------------------------------------------------
# Parameters: total and active
# ---------------------------------------------------------------------------------------------------------


def test_count_parameters_of_jamba_v01():
    """The paper: 52B parameters in all, 12B active per token (within 2%)."""
    total, active = count_parameters(JambaConfig.preset("jamba-v0.1"))
    assert abs(total / 52e9 - 1) < 0.02, total
    assert abs(active / 12e9 - 1) < 0.02, active


@given(layout=layouts(), head_pair=heads(), tie=st.booleans())
@settings(max_examples=20)
def test_count_parameters_matches_a_real_model(layout, head_pair, tie):
    """On the meta device == built for real; active == total minus the experts one token does not use."""
    config = JambaConfig(**small(layout, head_pair, tie_word_embeddings=tie))
    model = JambaLM(config)
    total, active = count_parameters(config)
    assert total == sum(p.numel() for p in model.parameters())
    expert = 3 * config.hidden_size * config.intermediate_size  # gate, up, down
    idle = sum(config.moe_layers) * (config.num_experts - config.num_experts_per_tok) * expert
    assert active == total - idle


@given(layout=layouts(), head_pair=heads(), tie=st.booleans())
@settings(max_examples=20)
def test_parameters_by_part_add_up_and_match_the_layers(layout, head_pair, tie):
    """The parts sum to the total; each part is its layers' count from their shapes (or one built module)."""
    config = JambaConfig(**small(layout, head_pair, tie_word_embeddings=tie))
    parts = parameters_by_part(config)
    total, active = count_parameters(config)
    assert tuple(parts) == PARTS and sum(parts.values()) == total
    d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    n_attention, n_moe = config.layer_types.count("attention"), sum(config.moe_layers)
    mixer = sum(p.numel() for p in MambaMixer(config.mamba_config(), device="meta").parameters())
    assert parts["attention"] == n_attention * (2 * d * d + 2 * d * kv)  # q, o: d·d; k, v: d·kv
    assert parts["mamba"] == (config.num_hidden_layers - n_attention) * mixer
    assert parts["experts"] == n_moe * config.num_experts * 3 * d * config.intermediate_size
    assert parts["routers"] == n_moe * config.num_experts * d
    assert parts["mlp"] == (config.num_hidden_layers - n_moe) * 3 * d * config.intermediate_size
    assert parts["embedding"] == config.vocab_size * d and parts["lm_head"] == (0 if tie else config.vocab_size * d)
    assert parts["norms"] == (2 * config.num_hidden_layers + 1) * d
    idle = parts["experts"] * (config.num_experts - config.num_experts_per_tok) // config.num_experts
    assert active == total - idle


def test_presets_of_the_transformers_have_their_published_sizes():
    """Mixtral-8x7B: 46.7B parameters, 12.9B active; Llama-2-70B: 69.0B (Llama 2's 70B), all dense."""
    mixtral = count_parameters(JambaConfig.preset("mixtral-8x7b"))
    llama = count_parameters(JambaConfig.preset("llama-2-70b"))
    assert round(mixtral.total / 1e9, 1) == 46.7 and round(mixtral.active / 1e9, 1) == 12.9
    assert round(llama.total / 1e9, 1) == 69.0 and llama.active == llama.total
    for name in ("mixtral-8x7b", "llama-2-70b"):
        assert set(JambaConfig.preset(name).layer_types) == {"attention"}


@given(
    layout=layouts(max_layers=8), head_pair=heads(), batch=batch, memory=st.integers(0, 10**6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)  # fmt: skip
def test_longest_context_is_the_last_length_that_fits(layout, head_pair, batch, memory, dtype):
    config = JambaConfig(**small(layout, head_pair))
    fixed = cache_bytes(config, batch, 0, dtype)
    if memory < fixed:
        with pytest.raises(ValueError, match="empty cache"):
            longest_context(config, memory, batch, dtype)
        return
    T = longest_context(config, memory, batch, dtype)
    if "attention" not in config.layer_types:
        assert T == float("inf")
        return
    assert cache_bytes(config, batch, T, dtype) <= memory < cache_bytes(config, batch, T + 1, dtype)


# ---------------------------------------------------------------------------------------------------------
# Training-side behaviour
# ---------------------------------------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient():
    """Through the LM loss plus the aux loss (which is what trains the router to balance)."""
    model = make_model(0, torch.float32, **PRESETS["tiny"] | {"tie_word_embeddings": False})
    ids = tokens(2, 9, 64, 0)
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens(2, 9, 64, 1).flatten())
    (loss + model.config.router_aux_loss_coef * out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_aux_loss_is_the_load_balancing_loss_of_every_moe_layer():
    model = make_model(1, torch.float32, **PRESETS["tiny"])
    out = model(tokens(3, 7, 64, 1))
    assert len(out.router_logits) == sum(model.config.moe_layers) == 2
    assert all(r.shape == (3 * 7, 4) for r in out.router_logits)
    assert torch.equal(out.aux_loss, load_balancing_loss(out.router_logits, 4, 2))
    no_moe = make_model(1, torch.float32, **PRESETS["tiny"] | {"num_experts": 1, "num_experts_per_tok": 1})
    out = no_moe(tokens(3, 7, 64, 1))
    assert out.router_logits == () and out.aux_loss.item() == 0


def test_generate_greedy_is_argmax_of_forward():
    model = make_model(3, **PRESETS["tiny"])
    ids = tokens(2, 5, 64, 3)
    out = model.generate(ids, max_new_tokens=6, temperature=0)
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)
    sampled = model.generate(ids, 8, temperature=1.2, top_k=5, seed=7)
    assert torch.equal(sampled, model.generate(ids, 8, temperature=1.2, top_k=5, seed=7))


def test_bad_inputs():
    model = make_model(0, **PRESETS["tiny"])
    with pytest.raises(ValueError, match="batch"):
        model(tokens(3, 4, 64, 0), model.new_cache(2))
    with pytest.raises(ValueError, match="LMCache"):
        model.step(torch.tensor([1]), None)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 0, dtype=torch.long))
    assert type(model.new_cache(1)) is LMCache


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible by num_attention_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(attn_layer_period=4, attn_layer_offset=4), "attn_layer_offset"),
        (dict(expert_layer_period=2, expert_layer_offset=-1), "expert_layer_offset"),
        (dict(num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_experts=True), "num_experts"),
    ],
)
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        JambaConfig(**bad)


def test_config_round_trip_and_presets():
    config = JambaConfig.preset("small-cpu", hidden_size=256)
    assert config.mamba_dt_rank == 16, "'auto' resolves after the override"
    assert JambaConfig.from_hf(config.to_hf()) == config
    assert JambaConfig.from_hf({"model_type": "jamba"}) == JambaConfig.preset("jamba-v0.1")
    with pytest.raises(ValueError, match="unknown preset"):
        JambaConfig.preset("huge")
    with pytest.raises(CheckpointError, match="model_type"):
        JambaConfig.from_hf({"model_type": "mamba"})


# ---------------------------------------------------------------------------------------------------------
# Hugging Face parity: transformers' JambaForCausalLM <-> our checkpoints
# ---------------------------------------------------------------------------------------------------------


ALL_MAMBA = dict(
    num_hidden_layers=2, attn_layer_period=3, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
    num_experts=2, num_experts_per_tok=1,
)  # fmt: skip


def hf_jamba(seed, **config):
    """A transformers JambaForCausalLM with perturbed weights (no eos, so generate never stops early)."""
    torch.manual_seed(seed)
    hf_config = transformers.JambaConfig(eos_token_id=None, pad_token_id=None, bos_token_id=None, **config)
    model = transformers.JambaForCausalLM(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@needs_transformers
@settings(max_examples=8)
@example(layout=ALL_MAMBA, head_pair=(2, 1), tie=False, batch=2, L=5, seed=0)  # what HF's cache cannot hold
@given(
    layout=layouts(max_layers=4), head_pair=heads(), tie=st.booleans(), batch=batch, L=st.integers(1, 12), seed=seeds
)
def test_hf_checkpoint_loads_with_the_same_logits_and_aux_loss(
    tmp_path_factory, layout, head_pair, tie, batch, L, seed
):
    """HF's save_pretrained -> JambaLM.from_pretrained: logits (rtol 1e-4), aux loss and greedy generations equal.

    Sizes are multiples of 4: HF's CPU expert matmuls need 16-byte-aligned strides in float32. transformers 5.23
    cannot compute its aux loss without MoE layers, nor use its cache without attention layers (the cache asks an
    attention layer for the sequence length): its forward runs uncached, the other two comparisons where HF can.
    """
    config = small(layout, head_pair, tie_word_embeddings=tie)
    hf = hf_jamba(seed, **config)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    model = JambaLM.from_pretrained(path).eval()
    ids = tokens(batch, L, 11, seed)
    has_moe, has_attention = any(model.config.moe_layers), "attention" in model.config.layer_types
    with torch.no_grad():
        theirs, ours = hf(ids, output_router_logits=has_moe, use_cache=False), model(ids)
        assert_close(ours.logits, theirs.logits, "hf_parity", "logits vs transformers")
        if has_moe:
            assert_close(ours.aux_loss, theirs.aux_loss, "hf_parity", "aux loss vs transformers")
        if has_attention:
            mine = model.generate(ids, max_new_tokens=5, temperature=0)
            hfs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
            assert torch.equal(mine, hfs), f"greedy generations differ:\nours   {mine}\ntheirs {hfs}"


@needs_transformers
@settings(max_examples=4)
@example(layout=ALL_MAMBA, head_pair=(2, 1), tie=True, seed=0)
@given(layout=layouts(max_layers=4), head_pair=heads(), tie=st.booleans(), seed=seeds)
def test_save_pretrained_loads_in_transformers(tmp_path_factory, layout, head_pair, tie, seed):
    model = make_model(seed, torch.float32, **small(layout, head_pair, tie_word_embeddings=tie))
    path = tmp_path_factory.mktemp("ours")
    model.save_pretrained(path)
    hf = transformers.JambaForCausalLM.from_pretrained(path).eval()
    ids = tokens(2, 9, 11, seed)
    with torch.no_grad():
        theirs = hf(ids, use_cache=False).logits  # transformers 5.23 cannot cache a model without attention
        assert_close(theirs, model(ids).logits, "hf_parity", "transformers on our checkpoint vs ours")


def test_save_load_round_trip_is_exact(tmp_path):
    model = make_model(0, torch.float32, **PRESETS["tiny"])
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    for key in (
        "model.layers.0.mamba.dt_layernorm.weight",
        "model.layers.0.mamba.A_log",
        "model.layers.2.self_attn.k_proj.weight",
        "model.layers.1.feed_forward.router.weight",
        "model.layers.1.feed_forward.experts.3.down_proj.weight",
        "model.layers.0.feed_forward.gate_proj.weight",
        "model.layers.2.pre_ff_layernorm.weight",
        "model.final_layernorm.weight",
        "model.embed_tokens.weight",
    ):
        assert key in keys, key
    assert "lm_head.weight" not in keys, "a tied head is not stored"
    loaded = JambaLM.from_pretrained(tmp_path)
    ids = tokens(2, 6, 64, 0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_save_pretrained_warns_about_fields_hf_lacks(tmp_path):
    model = make_model(0, torch.float32, **PRESETS["tiny"] | {"normalize_top_k": True})
    with pytest.warns(UserWarning, match="normalize_top_k"):
        model.save_pretrained(tmp_path)
    assert JambaLM.from_pretrained(tmp_path).config.normalize_top_k is True


def test_a_mamba_checkpoint_is_refused(tmp_path):
    from minijamba.mamba import MambaConfig, MambaLM

    MambaLM(MambaConfig(d_model=8, vocab_size=5)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model_type"):
        JambaLM.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Named layouts and presets
# ----------------------------------------------------------------------------------------------------------


@given(n_layers=st.integers(1, 40))
def test_named_layouts_give_their_layer_types(n_layers):
    kinds = {
        layout: JambaConfig.with_layout(layout, num_hidden_layers=n_layers).layer_types
        for layout in ("all-mamba", "all-attention", "jamba")
    }
    assert kinds["all-mamba"] == ("mamba",) * n_layers
    assert kinds["all-attention"] == ("attention",) * n_layers
    assert kinds["jamba"] == tuple("attention" if i % 8 == 4 else "mamba" for i in range(n_layers))  # the paper's
    assert set(layout_fields("all-mamba", n_layers)) == {"attn_layer_period", "attn_layer_offset"}


def test_the_jamba_layout_keeps_a_config_s_own_period():
    assert JambaConfig.with_layout("jamba", **PRESETS["tiny"]).layer_types == ("mamba", "mamba", "attention", "mamba")
    assert JambaConfig.preset("tiny", layout="jamba") == JambaConfig.preset("tiny")
    v01 = JambaConfig.preset("jamba-v0.1")
    assert [i for i, kind in enumerate(v01.layer_types) if kind == "attention"] == [4, 12, 20, 28]
    assert JambaConfig.preset("jamba-v0.1", layout="all-attention") == JambaConfig.preset(
        "jamba-v0.1", attn_layer_period=1, attn_layer_offset=0
    )
    assert set(JambaConfig.preset("jamba-v0.1", layout="all-mamba").layer_types) == {"mamba"}


@given(n_layers=st.integers(1, 24), period=st.integers(1, 25), offset_share=st.floats(0, 1, exclude_max=True))
def test_a_per_layer_list_round_trips(n_layers, period, offset_share):
    """Any layout the two fields can store, written as HF's per-layer list, comes back as the same list."""
    offset = int(offset_share * period)
    kinds = JambaConfig(num_hidden_layers=n_layers, attn_layer_period=period, attn_layer_offset=offset).layer_types
    config = JambaConfig.with_layout(list(kinds))
    assert config.layer_types == kinds and config.num_hidden_layers == n_layers
    assert config.attn_layer_offset < config.attn_layer_period <= n_layers + 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: layout_fields(["attention", "mamba", "attention", "attention"], 4), "not periodic"),
        (lambda: layout_fields(["mamba", "attention", "attention"], 3), "not periodic"),
        (lambda: layout_fields(["mamba", "mlp"], 2), "'mamba' and 'attention' only"),
        (lambda: layout_fields(["mamba", "attention"], 3), "lists 2 layers, num_hidden_layers is 3"),
        (lambda: layout_fields("hybrid", 4), "layout must be one of"),
        (lambda: layout_fields("all-mamba", 0), "num_hidden_layers must be a positive integer"),
        (lambda: JambaConfig.with_layout("all-mamba", attn_layer_period=4), "sets attn_layer_period itself"),
        (lambda: JambaConfig.preset("tiny", layout="all-attention", attn_layer_offset=0), "sets attn_layer_offset"),
    ],
)
def test_a_layout_the_fields_cannot_store_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
