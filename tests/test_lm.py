"""The one LM surface both families share (lm.py, models.py): one output type, one cache, one set of sizing functions,
scan_impl passed down from the config, and loading either family from its checkpoint.

Each family's numerics (step == forward, the references, transformers parity) are tested in test_mamba.py and
test_jamba.py; here every test runs on both, so that what one family can do the other can too.
"""

import pytest
import torch
from tolerances import assert_close

from minijamba.jamba import PRESETS, JambaConfig, JambaLM
from minijamba.lm import CausalLMOutput, LMCache
from minijamba.mamba import MambaConfig, MambaLM
from minijamba.models import (
    PARTS,
    build_model,
    cache_bytes,
    count_parameters,
    load_pretrained,
    longest_context,
    model_class,
    parameters_by_part,
)
from minijamba.s6 import SelectiveSSM

CONFIGS = {
    "mamba": lambda **kw: MambaConfig(d_model=16, n_layer=3, vocab_size=11, d_state=4, **kw),
    "jamba": lambda **kw: JambaConfig(**{**PRESETS["tiny"], **kw}),  # mamba, mamba + MoE, attention, mamba + MoE
}


def make(family, seed=0, dtype=torch.float64, **fields):
    torch.manual_seed(seed)
    return build_model(CONFIGS[family](**fields), dtype=dtype).eval()


def tokens(model, batch, L, seed):
    return torch.randint(0, model.config.vocab_size, (batch, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(CONFIGS))
def family(request):
    return request.param


def test_build_model_picks_the_family(family):
    model = make(family)
    assert type(model) is {"mamba": MambaLM, "jamba": JambaLM}[family] is model_class(model.config)
    with pytest.raises(ValueError, match="config must be one of"):
        build_model({"d_model": 16})


def test_forward_returns_one_output_type(family):
    model = make(family)
    ids = tokens(model, 2, 7, 0)
    out = model(ids)
    assert type(out) is CausalLMOutput and out.logits.shape == (2, 7, model.config.vocab_size)
    moe_layers = [layer for layer in model.layers if layer.is_moe]
    assert len(out.router_logits) == len(moe_layers)
    assert all(r.shape == (2 * 7, model.config.num_experts) for r in out.router_logits)
    if not moe_layers:  # no experts: no routers and a zero aux loss, so a training loss needs no special case
        assert out.aux_loss.item() == 0.0 and out.aux_loss.shape == ()
    else:
        assert out.aux_loss.item() > 0
    assert model.aux_loss_coef == (0.0 if family == "mamba" else model.config.router_aux_loss_coef)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_cache_whose_bytes_cache_bytes_predicts(family, dtype):
    """new_cache -> LMCache with a state per layer; its nbytes is cache_bytes(config) after a prefill and a step."""
    model = make(family, dtype=dtype)
    cache = model.new_cache(2)
    assert type(cache) is LMCache and len(cache.states) == len(model.layers)
    assert cache.nbytes == cache_bytes(model.config, 2, 0, dtype)
    model(tokens(model, 2, 9, 1), cache)
    assert cache.seqlen == 9 and cache.nbytes == cache_bytes(model.config, 2, 9, dtype)
    model.step(torch.tensor([1, 2]), cache)
    assert cache.seqlen == 10 and cache.nbytes == cache_bytes(model.config, 2, 10, dtype)
    longest = longest_context(model.config, 10**6, batch=2, dtype=dtype)
    assert (longest == float("inf")) == ("attention" not in model.config.layer_types)


def test_counts_match_the_built_model(family):
    model = make(family, tie_embeddings=False) if family == "mamba" else make(family, tie_word_embeddings=False)
    total, active = count_parameters(model.config)
    assert total == sum(p.numel() for p in model.parameters())
    parts = parameters_by_part(model.config)
    assert tuple(parts) == PARTS and sum(parts.values()) == total
    mixers = sum(p.numel() for layer in model.layers if layer.kind == "mamba" for p in layer.mixer.parameters())
    assert parts["mamba"] == mixers
    config = model.config
    per_expert = [sum(p.numel() for p in layer.feed_forward.experts[0].parameters()) for layer in model.layers
                  if layer.is_moe]  # fmt: skip
    assert active == total - sum(n * (config.num_experts - config.num_experts_per_tok) for n in per_expert)
    assert (active < total) == (family == "jamba")


@pytest.mark.parametrize("scan_impl", ["sequential", "parallel"])
def test_scan_impl_is_a_config_field_passed_down(family, scan_impl):
    model = make(family, scan_impl=scan_impl)
    ssms = [m for m in model.modules() if isinstance(m, SelectiveSSM)]
    assert ssms and all(ssm.scan_impl == scan_impl for ssm in ssms)
    with pytest.raises(ValueError, match="scan_impl"):
        make(family, scan_impl="warp-speed")


def test_checkpoints_load_through_one_door(family, tmp_path):
    """models.load_pretrained picks the class from config.json and reproduces the saved logits to the bit; a loaded
    config takes overrides (scan_impl is not stored: it is this machine's choice, not the model's)."""
    model = make(family)
    model.save_pretrained(tmp_path)
    ids = tokens(model, 2, 6, 3)
    loaded = load_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    other_scan = load_pretrained(tmp_path, dtype=torch.float64, scan_impl="sequential").eval()
    assert other_scan.config == CONFIGS[family](scan_impl="sequential")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        # Another scan sums in another order: equal to rounding (the step-vs-forward bound of each family).
        assert_close(other_scan(ids).logits, model(ids).logits, f"{family}_step_float64", "logits, sequential scan")


def test_bad_inputs_name_what_was_expected(family):
    model = make(family)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model([[1, 2]])
    with pytest.raises(ValueError, match="token"):
        model.step(torch.tensor([[1]]), model.new_cache(1))
    with pytest.raises(ValueError, match="LMCache"):
        model.step(torch.tensor([1]), None)
    with pytest.raises(ValueError, match="batch"):
        model(tokens(model, 3, 4, 0), model.new_cache(2))
