"""The official mamba_ssm checkpoint layout (state-spaces/mamba-130m and friends): MambaLM reads and writes it.

Every checkpoint here is written by the test itself, in the official names and shapes taken from mamba_ssm's source
(mixer_seq_simple.py's MambaLMHeadModel, mamba_simple.py's Mamba, config_mamba.py's MambaConfig), never from our
name tables, so a wrong table fails. The HF layout of the same weights is written by hand too: both must load to the
same model, with equal logits.
"""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from minijamba.checkpoint import CheckpointError
from minijamba.mamba import MambaConfig, MambaLM
from minijamba.models import load_pretrained


@pytest.fixture(autouse=True)
def _inference():
    with torch.no_grad():
        yield


def official_state_dict(d_model, n_layer, vocab_size, ssm_cfg, pad_vocab_size_multiple=8, tie=True, seed=0):
    """Random weights under MambaLMHeadModel.state_dict()'s names and shapes, in its order.

    Mamba registers A_log and D itself and in_proj, conv1d, x_proj, dt_proj, out_proj as submodules, so its state_dict
    lists A_log, D first; a Block holds `norm` then `mixer`. lm_head.weight is there even when tied: the very tensor
    of the embedding, as tie_weights() makes it.
    """
    g = torch.Generator().manual_seed(seed)
    d_state, d_conv, expand = ssm_cfg.get("d_state", 16), ssm_cfg.get("d_conv", 4), ssm_cfg.get("expand", 2)
    d_inner = expand * d_model
    dt_rank = ssm_cfg.get("dt_rank", "auto")
    dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
    vocab = math.ceil(vocab_size / pad_vocab_size_multiple) * pad_vocab_size_multiple
    shapes = {"backbone.embedding.weight": (vocab, d_model)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (d_model,)
        shapes[p + "mixer.A_log"] = (d_inner, d_state)
        shapes[p + "mixer.D"] = (d_inner,)
        shapes[p + "mixer.in_proj.weight"] = (2 * d_inner, d_model)
        if ssm_cfg.get("bias", False):
            shapes[p + "mixer.in_proj.bias"] = (2 * d_inner,)
        shapes[p + "mixer.conv1d.weight"] = (d_inner, 1, d_conv)
        if ssm_cfg.get("conv_bias", True):
            shapes[p + "mixer.conv1d.bias"] = (d_inner,)
        shapes[p + "mixer.x_proj.weight"] = (dt_rank + 2 * d_state, d_inner)
        shapes[p + "mixer.dt_proj.weight"] = (d_inner, dt_rank)
        shapes[p + "mixer.dt_proj.bias"] = (d_inner,)
        shapes[p + "mixer.out_proj.weight"] = (d_model, d_inner)
        if ssm_cfg.get("bias", False):
            shapes[p + "mixer.out_proj.bias"] = (d_model,)
    shapes["backbone.norm_f.weight"] = (d_model,)
    tensors = {name: 0.3 * torch.randn(shape, generator=g) for name, shape in shapes.items()}
    head = tensors["backbone.embedding.weight"] if tie else 0.3 * torch.randn(vocab, d_model, generator=g)
    tensors["lm_head.weight"] = head
    return tensors


# MambaLMHeadModel(MambaConfig(n_layer=2)).state_dict().keys(), from mixer_seq_simple.py: the key set, spelled out.
OFFICIAL_KEYS_2_LAYERS = [
    "backbone.embedding.weight",
    *(
        f"backbone.layers.{i}.{name}"
        for i in range(2)
        for name in (
            "norm.weight",
            "mixer.A_log",
            "mixer.D",
            "mixer.in_proj.weight",
            "mixer.conv1d.weight",
            "mixer.conv1d.bias",
            "mixer.x_proj.weight",
            "mixer.dt_proj.weight",
            "mixer.dt_proj.bias",
            "mixer.out_proj.weight",
        )
    ),
    "backbone.norm_f.weight",
    "lm_head.weight",
]


def write_official(path, tensors, config_json, weights="pytorch_model.bin"):
    """An official checkpoint folder: config.json, and the state_dict through torch.save (or safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_json))
    if weights == "pytorch_model.bin":
        torch.save(tensors, path / weights)
    else:  # safetensors stores no shared tensors: a tied head is written as an equal copy
        save_file({k: v.clone() for k, v in tensors.items()}, path / weights)
    return path


def write_hf(path, tensors, d_model, n_layer, vocab_size, ssm_cfg, tie):
    """The same weights in HF MambaForCausalLM's layout: `embeddings`, a tied head not stored, HF config names."""
    path.mkdir(parents=True, exist_ok=True)
    hf = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in tensors.items()}
    if tie:
        del hf["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in hf.items()}, path / "model.safetensors")
    expand = ssm_cfg.get("expand", 2)
    config = {
        "model_type": "mamba",
        "hidden_size": d_model,
        "num_hidden_layers": n_layer,
        "vocab_size": vocab_size,
        "state_size": ssm_cfg.get("d_state", 16),
        "conv_kernel": ssm_cfg.get("d_conv", 4),
        "expand": expand,
        "intermediate_size": expand * d_model,
        "time_step_rank": ssm_cfg.get("dt_rank", "auto"),
        "use_conv_bias": ssm_cfg.get("conv_bias", True),
        "use_bias": ssm_cfg.get("bias", False),
        "layer_norm_epsilon": 1e-5,
        "residual_in_fp32": True,
        "tie_word_embeddings": tie,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def official_config(d_model=16, n_layer=2, vocab_size=45, ssm_cfg=None, **more):
    """config.json as state-spaces/mamba-130m has it (the older fields); `more` adds the newer ones."""
    return {
        "d_model": d_model,
        "n_layer": n_layer,
        "vocab_size": vocab_size,
        "ssm_cfg": {} if ssm_cfg is None else ssm_cfg,
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        **more,
    }


def raw(path):
    return torch.load(path / "pytorch_model.bin", weights_only=True)


# ---------------------------------------------------------------------------------------------------------
# Loading: the same weights as the HF layout, the padded vocabulary, the layout reported
# ---------------------------------------------------------------------------------------------------------


def test_synthetic_checkpoint_has_the_official_keys():
    tensors = official_state_dict(16, 2, 45, {})
    assert sorted(tensors) == sorted(OFFICIAL_KEYS_2_LAYERS)
    assert tensors["backbone.embedding.weight"].shape == (48, 16)  # 45 padded up to a multiple of 8


@settings(max_examples=12)
@given(
    d_model=st.integers(4, 20),
    n_layer=st.integers(1, 3),
    vocab_size=st.integers(2, 40),
    multiple=st.sampled_from([1, 8, 16]),
    ssm_cfg=st.fixed_dictionaries(
        {},
        optional={
            "d_state": st.integers(1, 6),
            "d_conv": st.integers(1, 4),
            "expand": st.integers(1, 3),
            "dt_rank": st.one_of(st.just("auto"), st.integers(1, 4)),
            "conv_bias": st.booleans(),
            "bias": st.booleans(),
        },
    ),
    tie=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_official_layout_loads_like_the_hf_layout(
    tmp_path_factory, d_model, n_layer, vocab_size, multiple, ssm_cfg, tie, seed
):
    tensors = official_state_dict(d_model, n_layer, vocab_size, ssm_cfg, multiple, tie, seed)
    config_json = official_config(d_model, n_layer, vocab_size, ssm_cfg, pad_vocab_size_multiple=multiple)
    config_json.update(d_intermediate=0, attn_layer_idx=[], attn_cfg={}, tie_embeddings=tie)  # the newer fields
    official = MambaLM.from_pretrained(write_official(tmp_path_factory.mktemp("official"), tensors, config_json))
    padded = tensors["lm_head.weight"].shape[0]
    hf_dir = write_hf(tmp_path_factory.mktemp("hf"), tensors, d_model, n_layer, padded, ssm_cfg, tie)
    hf = MambaLM.from_pretrained(hf_dir)
    assert (official.checkpoint_layout, hf.checkpoint_layout) == ("mamba_ssm", "hf")
    assert official.config == hf.config and official.config.vocab_size == padded
    assert (official.lm_head.weight is official.embed_tokens.weight) == tie
    ids = torch.randint(0, padded, (2, 9), generator=torch.Generator().manual_seed(seed))
    a, b = official(ids).logits, hf(ids).logits
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_vocabulary_padding_and_config_fields_from_ssm_cfg():
    ssm_cfg = {"d_state": 5, "d_conv": 3, "expand": 3, "dt_rank": 7, "dt_min": 0.002, "dt_max": 0.2}
    ssm_cfg.update(dt_init_floor=2e-4, conv_bias=False, bias=True, dt_init="constant", dt_scale=2.0, layer="Mamba1")
    config = MambaConfig.from_mamba_ssm(
        official_config(24, 3, 50277, ssm_cfg, residual_in_fp32=False, tie_embeddings=False, norm_epsilon=1e-6)
    )
    expected = MambaConfig(
        d_model=24, n_layer=3, vocab_size=50280, d_state=5, d_conv=3, expand=3, dt_rank=7, dt_min=0.002, dt_max=0.2,
        dt_init_floor=2e-4, conv_bias=False, bias=True, norm_eps=1e-6, residual_in_fp32=False, tie_embeddings=False,
    )  # fmt: skip
    assert config == expected
    # ssm_cfg {} and absent fields: mamba_simple.py's and config_mamba.py's defaults; dt_rank "auto" is ceil(d_model/16)
    config = MambaConfig.from_mamba_ssm({"d_model": 40, "n_layer": 1, "vocab_size": 45})
    assert (config.d_state, config.d_conv, config.expand, config.dt_rank, config.vocab_size) == (16, 4, 2, 3, 48)
    assert (config.dt_min, config.dt_max, config.dt_init_floor) == (1e-3, 0.1, 1e-4)
    assert config.conv_bias and not config.bias
    assert config.tie_embeddings and config.residual_in_fp32 and config.norm_eps == 1e-5 and not config.inner_norms
    for multiple, padded in ((1, 50277), (8, 50280), (16, 50288), (50277, 50277)):
        config_json = official_config(vocab_size=50277, pad_vocab_size_multiple=multiple)
        assert MambaConfig.from_mamba_ssm(config_json).vocab_size == padded
    assert MambaConfig.is_mamba_ssm(official_config()) and not MambaConfig.is_mamba_ssm(MambaConfig().to_hf())


def test_layout_is_reported(tmp_path):
    assert MambaLM(MambaConfig()).checkpoint_layout is None  # built, not loaded
    official = write_official(tmp_path / "official", official_state_dict(16, 2, 45, {}), official_config())
    assert load_pretrained(official).checkpoint_layout == "mamba_ssm"  # models.py: no model_type means Mamba
    MambaLM(MambaConfig(d_model=16)).save_pretrained(tmp_path / "hf")
    assert MambaLM.from_pretrained(tmp_path / "hf").checkpoint_layout == "hf"


def test_safetensors_weights_load(tmp_path):
    tensors = official_state_dict(16, 2, 45, {}, tie=True)
    from_bin = MambaLM.from_pretrained(write_official(tmp_path / "bin", tensors, official_config()))
    from_st = MambaLM.from_pretrained(write_official(tmp_path / "st", tensors, official_config(), "model.safetensors"))
    ids = torch.arange(45)[None]
    assert from_st.checkpoint_layout == "mamba_ssm" and torch.equal(from_st(ids).logits, from_bin(ids).logits)


# ---------------------------------------------------------------------------------------------------------
# Writing: save_pretrained(layout="mamba_ssm"), round trips
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_official_ours_official_is_byte_identical(tmp_path, tie):
    tensors = official_state_dict(16, 2, 45, {}, tie=tie)
    src = write_official(tmp_path / "src", tensors, official_config(tie_embeddings=tie))
    model = MambaLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "out", layout="mamba_ssm")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "pytorch_model.bin"]
    written, original = raw(tmp_path / "out"), raw(src)
    assert sorted(written) == sorted(OFFICIAL_KEYS_2_LAYERS)
    for name, t in original.items():
        assert written[name].dtype == t.dtype and written[name].shape == t.shape, name
        assert torch.equal(written[name].view(torch.uint8), t.view(torch.uint8)), name  # the bytes, not only values
    head, embedding = written["lm_head.weight"], written["backbone.embedding.weight"]
    assert (head.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()) == tie  # a tied head once
    config_json = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_json["vocab_size"] == 48 and config_json["pad_vocab_size_multiple"] == 1
    assert config_json["ssm_cfg"]["dt_rank"] == 1 and config_json["tie_embeddings"] == tie
    assert (config_json["d_intermediate"], config_json["attn_layer_idx"], config_json["attn_cfg"]) == (0, [], {})
    assert MambaConfig.from_mamba_ssm(config_json) == model.config


def test_round_trip_ours_official_ours(tmp_path):
    torch.manual_seed(0)
    config = MambaConfig(d_model=12, n_layer=3, vocab_size=11, d_state=3, d_conv=2, bias=True, tie_embeddings=False)
    model = MambaLM(config)
    model.save_pretrained(tmp_path, layout="mamba_ssm")
    model.save_pretrained(tmp_path, layout="mamba_ssm")  # over an existing checkpoint
    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.checkpoint_layout == "mamba_ssm" and loaded.config == config
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    loaded.save_pretrained(tmp_path / "hf")  # and on to the HF layout
    ids = torch.arange(11)[None]
    assert torch.equal(MambaLM.from_pretrained(tmp_path / "hf")(ids).logits, model(ids).logits)


def test_save_refusals(tmp_path):
    model = MambaLM(MambaConfig(d_model=8, vocab_size=5, inner_norms=True))
    with pytest.raises(ValueError, match="layout must be one of \\['hf', 'mamba_ssm'\\]"):
        model.save_pretrained(tmp_path, layout="official")
    with pytest.raises(ValueError, match="inner_norms=True"):
        model.save_pretrained(tmp_path, layout="mamba_ssm")
    with pytest.raises(ValueError, match="norm_eps=1e-06"):
        MambaLM(MambaConfig(d_model=8, vocab_size=5, norm_eps=1e-6)).save_pretrained(tmp_path, layout="mamba_ssm")
    assert not tmp_path.joinpath("config.json").exists()  # nothing was written
    MambaLM(MambaConfig(d_model=8, vocab_size=5)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="already holds model.safetensors"):
        MambaLM(MambaConfig(d_model=8, vocab_size=5)).save_pretrained(tmp_path, layout="mamba_ssm")


# ---------------------------------------------------------------------------------------------------------
# What MambaLM cannot load is refused, with the layout in the message
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ssm_cfg": {"layer": "Mamba2"}}, "ssm_cfg.layer 'Mamba2'"),
        ({"attn_layer_idx": [1], "attn_cfg": {"num_heads": 2}}, r"attention layers \(attn_layer_idx \[1\]\)"),
        ({"d_intermediate": 64}, r"gated MLP in every block \(d_intermediate 64\)"),
        ({"rms_norm": False}, "LayerNorms"),
        ({"ssm_cfg": {"headdim": 8}}, r"unknown ssm_cfg keys \['headdim'\]"),
        ({"bidirectional": True}, r"unknown keys \['bidirectional'\]"),
        ({"ssm_cfg": []}, "ssm_cfg must be an object"),
        ({"pad_vocab_size_multiple": 0}, "pad_vocab_size_multiple must be a positive integer"),
        ({"d_model": 0}, "d_model must be a positive integer"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, message):
    path = write_official(tmp_path, official_state_dict(16, 2, 45, {}), {**official_config(), **change})
    with pytest.raises(CheckpointError, match=message) as info:
        MambaLM.from_pretrained(path)
    assert "(mamba_ssm layout)" in str(info.value)


def test_missing_fields_are_refused():
    with pytest.raises(CheckpointError, match=r"missing keys \['d_model', 'vocab_size'\]"):
        MambaConfig.from_mamba_ssm({"n_layer": 2, "ssm_cfg": {}})


def test_wrong_keys_and_shapes_name_the_layout(tmp_path):
    tensors = official_state_dict(16, 2, 45, {}, pad_vocab_size_multiple=1)  # an unpadded embedding: 45 rows
    with pytest.raises(CheckpointError, match=r"backbone.embedding.weight: checkpoint \(45, 16\), model \(48, 16\)"):
        MambaLM.from_pretrained(write_official(tmp_path / "unpadded", tensors, official_config()))
    tensors = official_state_dict(16, 2, 45, {})
    tensors["backbone.embeddings.weight"] = tensors.pop("backbone.embedding.weight")  # HF's name, official config
    with pytest.raises(CheckpointError) as info:
        MambaLM.from_pretrained(write_official(tmp_path / "mixed", tensors, official_config()))
    message = str(info.value)
    assert "(mamba_ssm layout) does not match the model" in message
    assert "missing keys (1): backbone.embedding.weight" in message
    assert "unexpected keys (1): backbone.embeddings.weight" in message


def test_tied_head_that_differs_is_refused(tmp_path):
    tensors = official_state_dict(16, 2, 45, {}, tie=True)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="ties the LM head.*lm_head.weight differs from backbone.embedding"):
        MambaLM.from_pretrained(write_official(tmp_path, tensors, official_config()))


class Payload:
    """Unpickling this calls open(marker, "w"): any code could run in its place."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_unrun(tmp_path):
    tensors = official_state_dict(16, 2, 45, {})
    tensors["backbone.norm_f.weight"] = Payload(tmp_path / "ran")
    path = write_official(tmp_path / "ckpt", tensors, official_config())
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        MambaLM.from_pretrained(path)
    assert not (tmp_path / "ran").exists(), "the payload ran"
    torch.load(path / "pytorch_model.bin", weights_only=False)  # the payload is live: a plain unpickling runs it
    assert (tmp_path / "ran").exists()
