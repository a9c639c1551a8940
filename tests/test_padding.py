"""Tests of batched prompts with left padding (`attention_mask`, 1 = token, 0 = pad) in both language models.

The property: a left-padded batch is each prompt run alone. At every real position the logits equal the unpadded
run's (float64, row "padding_float64"), every layer's cache holds what the unpadded run's holds (Mamba states
equal, attention keys and values equal after the pads), greedy generation gives each prompt's own continuation,
and so do a chunked prefill and step() after a padded prefill. The masked attention is tied to the NumPy reference
on each row's unpadded keys, and both LMs to transformers' MambaForCausalLM / JambaForCausalLM given the same mask.
Pad positions hold random token ids: nothing may depend on them.
"""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_jamba import hf_jamba, small
from test_jamba import make_model as make_jamba
from test_mamba import hf_mamba
from test_mamba import make_model as make_mamba
from tolerances import assert_close

from minijamba import reference as ref
from minijamba.attention import apply_rope, attention_written_out, sdpa_attention
from minijamba.jamba import PRESETS, JambaLM
from minijamba.mamba import MambaLM
from minijamba.models import cache_bytes

try:
    import transformers
except ImportError:  # the test extra installs it; without it only the HF parity tests skip
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not importable: pip install .[test]")

prompt_lengths = st.lists(st.integers(1, 8), min_size=1, max_size=3)  # one prompt per row of the batch
new_tokens = st.integers(1, 4)
mamba_shapes = st.fixed_dictionaries(
    # d_conv above a prompt's length included; in_proj's bias: u, not in_proj's input, is what is zeroed at pads
    {"d_conv": st.integers(1, 4), "inner_norms": st.booleans(), "bias": st.booleans()}
)
seeds = st.integers(0, 2**31 - 1)

# Mamba (every layer a Mamba block); Jamba's tiny preset, [mamba, mamba+MoE, attention, mamba+MoE]; the same with RoPE;
# the same with the written-out attention in place of SDPA.
KINDS = ["mamba", "jamba", "jamba-rope", "jamba-written-out"]


@pytest.fixture(autouse=True)
def _inference():
    with torch.no_grad():
        yield


def build(kind, seed, mamba_shape=None):
    """A float64 model with perturbed weights. mamba_shape: the Mamba model's d_conv, inner_norms and bias
    (None: d_conv 4, every option on); the Jamba ones are PRESETS["tiny"]."""
    if kind == "mamba":
        shape = mamba_shape or dict(d_conv=4, inner_norms=True, bias=True)
        return make_mamba(seed, d_model=8, d_state=4, n_layer=2, vocab_size=11, **shape).eval()
    model = make_jamba(seed, **PRESETS["tiny"] | {"rope": kind == "jamba-rope"})
    for layer in model.layers:
        if layer.kind == "attention":
            layer.self_attn.use_sdpa = kind != "jamba-written-out"
    return model


def left_padded(prompts, vocab_size, seed):
    """Prompts (1-D tensors) -> (ids, attention_mask) of shape (batch, longest), pads of random ids on the left."""
    L = max(len(p) for p in prompts)
    junk = torch.randint(0, vocab_size, (len(prompts), L), generator=torch.Generator().manual_seed(seed + 1))
    ids, mask = junk.clone(), torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p) :], mask[b, L - len(p) :] = p, 1
    return ids, mask


def make_prompts(lengths, vocab_size, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g) for n in lengths]


def held_mask(cache):
    """The cache's (batch, seqlen) mask, all True where it holds no padding (None)."""
    if cache.attention_mask is None:
        return torch.ones(cache.states[0][0].shape[0], cache.seqlen, dtype=torch.bool)
    return cache.attention_mask


def assert_cache_row_is_unpadded(model, cache, b, pads, alone, what):
    """Row b of a padded cache == the unpadded prompt's cache: Mamba states, and attention (k, v) after the pads."""
    for i, (layer, state, expected) in enumerate(zip(model.layers, cache.states, alone.states, strict=True)):
        for name, t, e in zip(("first", "second"), state, expected, strict=True):
            ours = t[b : b + 1, :, pads:] if layer.kind == "attention" else t[b : b + 1]
            assert_close(ours, e, "padding_float64", f"{what}: layer {i} ({layer.kind}) {name} state, row {b}")


# ---------------------------------------------------------------------------------------------------------
# The property: a padded batch is each prompt alone
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10)
@given(mamba_shape=mamba_shapes, lengths=prompt_lengths, seed=seeds, n_new=new_tokens)
def test_padded_batch_is_each_prompt_alone(kind, mamba_shape, lengths, seed, n_new):
    """Logits at real positions, the cache after the prompt, and greedy generations equal each prompt's own."""
    model = build(kind, seed, mamba_shape)
    vocab = model.config.vocab_size
    prompts = make_prompts(lengths, vocab, seed)
    ids, mask = left_padded(prompts, vocab, seed)
    L = ids.shape[1]
    cache = model.new_cache(len(prompts))
    logits = model(ids, cache, attention_mask=mask).logits  # (batch, L, vocab)
    assert torch.isfinite(logits).all(), "pad positions must not produce NaN either"
    assert torch.equal(held_mask(cache), mask.bool()) and cache.seqlen == L
    generated = model.generate(ids, n_new, temperature=0, attention_mask=mask)  # (batch, L + n_new)
    assert torch.equal(generated[:, :L], ids), "the output keeps the padded prompt"
    for b, prompt in enumerate(prompts):
        pads = L - len(prompt)
        alone = model.new_cache(1)
        expected = model(prompt[None], alone).logits
        assert_close(logits[b : b + 1, pads:], expected, "padding_float64", f"row {b} ({pads} pads) vs alone")
        assert_cache_row_is_unpadded(model, cache, b, pads, alone, "padded prefill")
        own = model.generate(prompt[None], n_new, temperature=0)[0, len(prompt) :]
        assert torch.equal(generated[b, L:], own), f"row {b}: {generated[b, L:]} vs alone {own}"


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10)
@given(mamba_shape=mamba_shapes, lengths=prompt_lengths, seed=seeds, n_steps=new_tokens, data=st.data())
def test_chunked_prefill_and_steps_after_padding(kind, mamba_shape, lengths, seed, n_steps, data):
    """Two forward calls on one cache, each with its slice of the mask (a short row may be all pads in the first),
    then step() per token: the logits are each prompt's own, and the cache masks the pads at every step."""
    model = build(kind, seed, mamba_shape)
    vocab = model.config.vocab_size
    prompts = make_prompts(lengths, vocab, seed)
    ids, mask = left_padded(prompts, vocab, seed)
    L, batch = ids.shape[1], len(prompts)
    cut = data.draw(st.integers(1, L), label="cut")
    later = torch.randint(0, vocab, (batch, n_steps), generator=torch.Generator().manual_seed(seed + 2))
    cache = model.new_cache(batch)
    parts = [model(ids[:, :cut], cache, attention_mask=mask[:, :cut]).logits]
    if cut < L:
        parts.append(model(ids[:, cut:], cache, attention_mask=mask[:, cut:]).logits)
    assert cache.nbytes == cache_bytes(model.config, batch, L, torch.float64), "nbytes counts the layer states only"
    parts += [model.step(later[:, t], cache)[:, None] for t in range(n_steps)]
    logits = torch.cat(parts, dim=1)  # (batch, L + n_steps, vocab)
    assert torch.equal(held_mask(cache)[:, :L], mask.bool()) and bool(held_mask(cache)[:, L:].all())
    for b, prompt in enumerate(prompts):
        pads = L - len(prompt)
        expected = model(torch.cat([prompt, later[b]])[None]).logits
        assert_close(logits[b : b + 1, pads:], expected, "padding_float64", f"row {b}: chunks at {cut}, steps")


@pytest.mark.parametrize("kind", KINDS)
def test_a_mask_of_ones_changes_nothing(kind):
    """An all-ones mask is no mask, bit for bit, and leaves no padding in the cache."""
    model = build(kind, 0)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2)
    for mask in (torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)):
        assert torch.equal(model(ids, attention_mask=mask).logits, model(ids).logits)
    model(ids, cache, attention_mask=torch.ones_like(ids))
    assert cache.pads is None and cache.attention_mask is None


# ---------------------------------------------------------------------------------------------------------
# The masked attention against the NumPy reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attend", [attention_written_out, sdpa_attention])
@settings(max_examples=30)
@given(
    pads=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    past=st.integers(0, 3),
    Lq=st.integers(1, 4),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 2),
    seed=seeds,
)
def test_masked_attention_is_the_reference_on_each_rows_tokens(attend, pads, past, Lq, kv_heads, group, seed):
    """Row b with p left pads: its real queries read what causal_attention_ref gives on its keys after the pads;
    a query with no key to read (a pad with only pads before it) gets exactly 0."""
    Lk = past + Lq
    pads = [min(p, Lk - 1) for p in pads]  # every row keeps a token
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(len(pads), kv_heads * group, Lq, 4, dtype=torch.float64, generator=g)
    k, v = torch.randn(2, len(pads), kv_heads, Lk, 4, dtype=torch.float64, generator=g)
    key_mask = torch.arange(Lk)[None, :] >= torch.tensor(pads)[:, None]  # (batch, Lk)
    out = attend(q, k, v, key_mask=key_mask)  # (batch, heads, Lq, 4)
    assert torch.isfinite(out).all()
    for b, p in enumerate(pads):
        first = max(p - past, 0)  # the first real query
        expected = ref.causal_attention_ref(q[b : b + 1, :, first:], k[b : b + 1, :, p:], v[b : b + 1, :, p:])
        assert_close(out[b : b + 1, :, first:], expected, "attention_float64", f"row {b}, {p} pads")
        assert torch.equal(out[b, :, :first], torch.zeros_like(out[b, :, :first])), "pad queries read nothing"


@settings(max_examples=30)
@given(batch=st.integers(1, 3), Lq=st.integers(1, 4), past=st.integers(0, 3), seed=seeds)
def test_sdpa_and_written_out_agree_on_any_key_mask(batch, Lq, past, seed):
    """Not only left padding: any key mask, rows with no visible key included (0 from both)."""
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(batch, 4, Lq, 3, dtype=torch.float64, generator=g)
    k, v = torch.randn(2, batch, 2, past + Lq, 3, dtype=torch.float64, generator=g)
    key_mask = torch.rand(batch, past + Lq, generator=g) < 0.6
    expected = attention_written_out(q, k, v, key_mask=key_mask)
    assert_close(sdpa_attention(q, k, v, key_mask=key_mask), expected, "attention_float64", "SDPA vs written out")


def test_rope_positions_per_row():
    """(batch, L) positions turn each row by its own angles: row b equals apply_rope with row b's (L,) positions."""
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    rows = torch.cat([apply_rope(x[b : b + 1], positions[b], 10.0) for b in range(3)])
    assert torch.equal(apply_rope(x, positions, 10.0), rows)
    with pytest.raises(ValueError, match="key_mask"):
        attention_written_out(x, x, x, key_mask=torch.ones(3, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers given the same attention_mask
# ---------------------------------------------------------------------------------------------------------


def assert_real_logits_match(ours, theirs, mask, what):
    for b in range(mask.shape[0]):
        real = mask[b].bool()
        assert_close(ours[b, real], theirs[b, real], "hf_parity", f"{what}, row {b}")


@needs_transformers
@settings(max_examples=4)
@example(d_conv=4, n_layer=2, lengths=[6, 2, 4], seed=0)  # shorter than d_conv, and longer
@given(d_conv=st.integers(1, 4), n_layer=st.integers(1, 2), lengths=prompt_lengths, seed=seeds)
def test_mamba_matches_transformers_with_padding(tmp_path_factory, d_conv, n_layer, lengths, seed):
    """MambaForCausalLM(ids, attention_mask): logits at real positions and greedy generate, equal.

    use_bias False (HF's default): HF 5.x zeroes the pads before in_proj, so an in_proj bias would reach its conv."""
    hf = hf_mamba(
        seed, vocab_size=12, hidden_size=8, state_size=4, conv_kernel=d_conv, expand=2, num_hidden_layers=n_layer
    )
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    model = MambaLM.from_pretrained(path).eval()
    ids, mask = left_padded(make_prompts(lengths, 12, seed), 12, seed)
    ours, theirs = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    assert_real_logits_match(ours, theirs, mask, "logits")
    ours = model.generate(ids, 5, temperature=0, attention_mask=mask)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, theirs), f"greedy generations differ:\nours   {ours}\ntheirs {theirs}"


JAMBA_LAYOUT = dict(
    num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
    num_experts=4, num_experts_per_tok=2,
)  # fmt: skip  # tiny's layout: [mamba, mamba+MoE, attention, mamba+MoE]


@needs_transformers
@settings(max_examples=4)
@example(head_pair=(4, 2), lengths=[6, 2, 4], seed=0)
@given(head_pair=st.sampled_from([(2, 1), (4, 2), (2, 2)]), lengths=prompt_lengths, seed=seeds)
def test_jamba_matches_transformers_with_padding(tmp_path_factory, head_pair, lengths, seed):
    """JambaForCausalLM(ids, attention_mask): logits at real positions, the aux loss (pads left out) and greedy
    generate, equal. Sizes are multiples of 4 (test_jamba.py: HF's CPU expert matmuls need aligned strides)."""
    hf = hf_jamba(seed, **small(JAMBA_LAYOUT, head_pair))
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    model = JambaLM.from_pretrained(path).eval()
    ids, mask = left_padded(make_prompts(lengths, 11, seed), 11, seed)
    ours, theirs = model(ids, attention_mask=mask), hf(ids, attention_mask=mask, output_router_logits=True)
    assert_real_logits_match(ours.logits, theirs.logits, mask, "logits")
    assert_close(ours.aux_loss, theirs.aux_loss, "hf_parity", "aux loss with attention_mask")
    mine = model.generate(ids, 5, temperature=0, attention_mask=mask)
    hfs = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(mine, hfs), f"greedy generations differ:\nours   {mine}\ntheirs {hfs}"


# ---------------------------------------------------------------------------------------------------------
# Bad masks
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mamba", "jamba"])
@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(2, 3, dtype=torch.long), "shape"),
        (torch.ones(2, 4), "bool or integer"),
        ([[1, 1, 1, 1], [0, 1, 1, 1]], "bool or integer"),
        (torch.tensor([[1, 1, 1, 1], [0, 2, 1, 1]]), "only 0"),
        (torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), "left padding.*rows \\[0\\]"),  # right padding
        (torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1]]), "left padding.*rows \\[1\\]"),  # a pad after a token
        (torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), "rows of zeros.*rows \\[1\\]"),
    ],
)
def test_bad_masks_are_refused(kind, mask, match):
    model = build(kind, 0)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=f"attention_mask.*{match}"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=f"attention_mask.*{match}"):
        model.generate(ids, 2, temperature=0, attention_mask=mask)


@pytest.mark.parametrize("kind", ["mamba", "jamba"])
def test_masks_must_continue_the_cache_as_left_padding(kind):
    model = build(kind, 0)
    ids = torch.zeros(2, 3, dtype=torch.long)
    pads_only = torch.tensor([[0, 0, 0], [1, 1, 1]])
    cache = model.new_cache(2)
    model(ids, cache, attention_mask=pads_only)  # a chunk may leave a short row all pads...
    with pytest.raises(ValueError, match="attention_mask has rows of zeros.*rows \\[0\\]"):
        model.prefill(ids, model.new_cache(2), attention_mask=pads_only)  # ...a prefill must not
    with pytest.raises(ValueError, match="attention_mask must be left padding.*rows \\[1\\]"):
        model(ids, cache, attention_mask=torch.tensor([[0, 1, 1], [0, 1, 1]]))  # row 1 has a cached token
    model(ids, cache, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert cache.pads.tolist() == [4, 0]
    unpadded = model.new_cache(2)
    model(ids, unpadded)
    with pytest.raises(ValueError, match="attention_mask must be left padding.*rows \\[0\\]"):
        model(ids, unpadded, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
