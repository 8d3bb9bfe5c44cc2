"""Config parsing (v4 rope_scaling and v5 rope_parameters, YaRN, bad fields), strict checkpoint loading errors,
packed sequences, and rotary scaling against transformers' rope functions."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import Qwen3VL, Qwen3VLConfig, load_pretrained, preset, save_pretrained
from model.checkpoint import CheckpointError
from model.config import PRESETS, ConfigError

V4_CONFIG_4B = {  # the layout of Qwen/Qwen3-VL-4B-Instruct's config.json (transformers 4.57 era)
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
                    "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
                      "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 2560, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}


def test_v4_config_parses_to_the_4b_preset():
    assert Qwen3VLConfig.from_hf(V4_CONFIG_4B) == preset("4b")


def test_v5_transformers_config_round_trip():
    import transformers

    from tests.hf_reference import hf_tiny_config

    d = hf_tiny_config(72).to_dict()
    c = Qwen3VLConfig.from_hf(d)
    assert c.vision.head_dim == 72 and c.text.rope.layout == "interleaved" and c.text.rope.mrope_section == (6, 5, 5)
    # our written config is read back by us and by transformers to the same model
    assert Qwen3VLConfig.from_hf(c.to_hf()) == c
    hf = transformers.Qwen3VLConfig(**c.to_hf())
    assert hf.vision_config.deepstack_visual_indexes == [1, 3]
    assert hf.text_config.rope_parameters["mrope_section"] == [6, 5, 5]


def test_yarn_1m_context_config():
    d = json.loads(json.dumps(V4_CONFIG_4B))
    d["text_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 262144,
                                        "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    d["text_config"]["max_position_embeddings"] = 1000000
    r = Qwen3VLConfig.from_hf(d).text.rope
    assert (r.rope_type, r.factor, r.original_max_position_embeddings, r.layout) == ("yarn", 3.0, 262144, "interleaved")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["text_config"].__setitem__("sliding_windw", 4), "sliding_windw"),
    (lambda d: d.__setitem__("vision_tower_lr", 1), "vision_tower_lr"),
    (lambda d: d["text_config"]["rope_scaling"].__setitem__("mrope_section", [24, 20, 21]), "mrope_section"),
    (lambda d: d["text_config"].__setitem__("tie_word_embeddings", False), "tie_word_embeddings"),
    (lambda d: d["vision_config"].__setitem__("out_hidden_size", 2048), "out_hidden_size"),
    (lambda d: d["text_config"].__setitem__("num_key_value_heads", 7), "num_key_value_heads"),
    (lambda d: d.__setitem__("model_type", "llava"), "model_type"),
])
def test_bad_config_fields_raise_clear_errors(mutate, message):
    d = json.loads(json.dumps(V4_CONFIG_4B))
    mutate(d)
    with pytest.raises(ConfigError, match=message):
        Qwen3VLConfig.from_hf(d)


def test_presets_build_and_parameter_counts():
    assert {"tiny", "tiny-moe", "2b", "4b", "8b", "32b", "30b-a3b", "235b-a22b"} <= set(PRESETS)
    # Count parameters on the meta device and compare with the sizes in the official model names and cards.
    for name, billions in [("2b", 2.13), ("4b", 4.44), ("8b", 8.77), ("32b", 33.4), ("30b-a3b", 31.1)]:
        with torch.device("meta"):
            m = Qwen3VL(preset(name), init_weights=False)
        n = sum(p.numel() for p in m.parameters()) / 1e9
        assert abs(n - billions) / billions < 0.01, (name, n)


# ------------------------------------------------------------------------------------------ strict loading
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ours")
    torch.manual_seed(0)
    save_pretrained(Qwen3VL(preset("tiny")), d, max_shard_size="30MB")
    return d


def _copy(ckpt, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(ckpt, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    return dst, index


def _edit_shard(d, index, key, fn):
    fname = index["weight_map"][key]
    sd = load_file(d / fname)
    fn(sd)
    save_file(sd, d / fname, metadata={"format": "pt"})


def test_missing_key_is_named(ckpt, tmp_path):
    d, index = _copy(ckpt, tmp_path)
    key = "model.language_model.layers.1.self_attn.k_norm.weight"
    _edit_shard(d, index, key, lambda sd: sd.pop(key))
    del index["weight_map"][key]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing keys.*layers\.1\.self_attn\.k_norm\.weight"):
        load_pretrained(d)


def test_extra_key_is_named(ckpt, tmp_path):
    d, index = _copy(ckpt, tmp_path)
    key = "model.language_model.norm.weight"
    _edit_shard(d, index, key, lambda sd: sd.__setitem__("model.language_model.norm.bias", torch.randn(128)))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*norm\.bias"):
        load_pretrained(d)


def test_wrong_shape_is_named(ckpt, tmp_path):
    d, index = _copy(ckpt, tmp_path)
    key = "model.visual.blocks.2.attn.qkv.weight"
    _edit_shard(d, index, key, lambda sd: sd.__setitem__(key, torch.randn(192, 65)))
    with pytest.raises(CheckpointError, match=r"blocks\.2\.attn\.qkv\.weight: file \(192, 65\), model \(192, 64\)"):
        load_pretrained(d)


def test_truncated_shard_is_named(ckpt, tmp_path):
    d, index = _copy(ckpt, tmp_path)
    shard = d / sorted(set(index["weight_map"].values()))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load_pretrained(d)


def test_missing_shard_file_is_named(ckpt, tmp_path):
    d, index = _copy(ckpt, tmp_path)
    shard = sorted(set(index["weight_map"].values()))[0]
    (d / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        load_pretrained(d)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_shard_outside_the_directory_is_refused(ckpt, tmp_path, where):
    """An index may only name files inside its checkpoint directory, even when the named file is a valid shard."""
    d, index = _copy(ckpt, tmp_path)
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(d / shard, outside)
    name = {"parent": "../elsewhere.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}[where]
    if where == "symlink":
        (d / name).symlink_to(outside)
    index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"resolves outside"):
        load_pretrained(d)


# ------------------------------------------------------------------------------------------ packing, rope
def test_packed_sequences_equal_separate_forwards():
    torch.manual_seed(0)
    m = Qwen3VL(preset("tiny")).eval()
    from tests.hf_reference import Sample, batch

    rng = torch.Generator().manual_seed(1)
    samples = [Sample(rng).text(5).image(4, 4).text(3), Sample(rng).text(9), Sample(rng).text(2).image(4, 6).text(2)]
    with torch.no_grad():
        singles = [m(**batch([s])).logits[0] for s in samples]
        packed_ids = torch.cat([batch([s])["input_ids"] for s in samples], dim=1)
        lens = torch.tensor([len(s.ids) for s in samples])
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).int()
        px = torch.cat([p for s in samples for p in s.img_px])
        grid = torch.tensor([g for s in samples for g in s.img_grid])
        packed = m(packed_ids, pixel_values=px, image_grid_thw=grid, cu_seqlens=cu).logits[0]
    torch.testing.assert_close(packed, torch.cat(singles), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 256},
    {"rope_type": "linear", "factor": 2.0},
], ids=["yarn", "linear"])
def test_scaled_rope_matches_transformers(rope):
    import transformers
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from model.rope import TextRotary

    params = {"rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True, **rope}
    hf_cfg = transformers.Qwen3VLTextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                            max_position_embeddings=768, rope_parameters=params)
    ref = Qwen3VLTextRotaryEmbedding(hf_cfg)
    ours_cfg = Qwen3VLConfig.from_hf({"text_config": hf_cfg.to_dict(), "vision_config": {"out_hidden_size": 64}})
    pos = torch.randint(0, 700, (3, 2, 19))
    x = torch.randn(2, 19, 64)
    rc, rs = ref(x, pos)
    oc, os_ = TextRotary(ours_cfg.text)(pos, torch.float32)
    torch.testing.assert_close(oc, rc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(os_, rs, rtol=1e-6, atol=1e-6)


def _rewrite_header(path, edit):
    """Edit a safetensors file's JSON header in place (the tensor bytes after it are kept as they are)."""
    import struct

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit({k: v for k, v in header.items() if k != "__metadata__"})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("damage", ["overlap", "negative", "past-end", "short", "dtype"])
def test_tampered_safetensors_header_is_refused(ckpt, tmp_path, damage):
    """Offsets that alias another tensor, lie outside the data or do not match the shape are refused, not loaded."""
    d, index = _copy(ckpt, tmp_path)
    shard = d / sorted(set(index["weight_map"].values()))[0]

    def edit(h):
        names = sorted(h, key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        if damage == "overlap":        # b's bytes start inside a's: two tensors alias the same memory
            b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]
        elif damage == "negative":
            a["data_offsets"] = [-8, a["data_offsets"][1]]
        elif damage == "past-end":
            b["data_offsets"] = [b["data_offsets"][0], b["data_offsets"][1] + 10**9]
        elif damage == "short":        # fewer bytes than the shape needs
            a["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][1] - 4]
        else:
            a["dtype"] = "F64"

    _rewrite_header(shard, edit)
    with pytest.raises(CheckpointError, match=shard.name):
        load_pretrained(d)


@pytest.mark.parametrize("bad", [["model-00001-of-00002.safetensors"], None, 3, "/etc/passwd", "../../etc/passwd"])
def test_malformed_shard_index_entries_are_refused(ckpt, tmp_path, bad):
    d, index = _copy(ckpt, tmp_path)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = bad
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_pretrained(d)


def _set(*path_and_value):
    *path, key, value = path_and_value

    def mutate(d):
        for p in path:
            d = d[p]
        d[key] = value
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_set("tie_word_embeddings", "false"), r"tie_word_embeddings must be a bool \(true / false\), got str 'false'"),
    (_set("text_config", "tie_word_embeddings", 0), r"text_config.tie_word_embeddings must be a bool \(true / false\), got int"),
    (_set("text_config", "rms_norm_eps", -1), r"text_config.rms_norm_eps must be > 0, got -1"),
    (_set("text_config", "rms_norm_eps", "1e-6"), r"text_config.rms_norm_eps must be a number, got str"),
    (_set("text_config", "hidden_size", "128"), r"text_config.hidden_size must be an int, got str '128'"),
    (_set("text_config", "num_hidden_layers", 0), r"text_config.num_hidden_layers must be >= 1, got 0"),
    (_set("text_config", "vocab_size", 1.5e5), r"text_config.vocab_size must be an int, got float"),
    (_set("text_config", "attention_bias", "no"), r"text_config.attention_bias must be a bool"),
    (_set("text_config", "rope_theta", "5e6"), r"rope_theta must be a number, got str"),
    (_set("text_config", "rope_theta", -1.0), r"rope.theta must be > 0"),
    (_set("text_config", "rope_scaling", "mrope_section", [24, 20, "20"]), r"mrope_section must be a list of ints"),
    (_set("vision_config", "depth", True), r"vision_config.depth must be an int, got bool"),
    (_set("vision_config", "patch_size", -16), r"vision_config.patch_size must be >= 1"),
    (_set("vision_config", "deepstack_visual_indexes", ["5", 11, 17]), r"deepstack_visual_indexes must be a list of ints"),
    (_set("image_token_id", "151655"), r"image_token_id must be an int, got str"),
    (_set("text_config", "max_position_embeddings", float("nan")), r"max_position_embeddings must be an int"),
    (_set("vision_config", "initializer_range", float("inf")), r"vision_config.initializer_range must be finite"),
], ids=["tie-str", "tie-int", "rms-eps-negative", "rms-eps-str", "hidden-size-str", "layers-0", "vocab-float", "attention-bias-str", "rope-theta-str", "rope-theta-negative", "mrope-section-str", "vision-depth-bool", "patch-size-negative", "deepstack-str", "image-token-str", "max-positions-nan", "initializer-inf"])
def test_config_json_types_and_ranges_are_checked(mutate, message):
    d = json.loads(json.dumps(V4_CONFIG_4B))
    mutate(d)
    with pytest.raises(ConfigError, match=message):
        Qwen3VLConfig.from_hf(d)


@pytest.mark.parametrize("field, value, message", [
    ("num_experts", "8", r"num_experts must be an int"), ("num_experts_per_tok", 2.5, r"num_experts_per_tok must be an int"),
    ("router_aux_loss_coef", "0.1", r"router_aux_loss_coef must be a number")], ids=["experts-str", "top-k-float", "aux-coef-str"])
def test_moe_config_json_types_are_checked(field, value, message):
    d = json.loads(json.dumps(V4_CONFIG_4B))
    d["model_type"] = "qwen3_vl_moe"
    d["text_config"].update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, tie_word_embeddings=False)
    d["tie_word_embeddings"] = False
    Qwen3VLConfig.from_hf(d)  # valid as it is
    d["text_config"][field] = value
    with pytest.raises(ConfigError, match=message):
        Qwen3VLConfig.from_hf(d)
