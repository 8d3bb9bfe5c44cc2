"""Fine-grained FP8 checkpoints (model/fp8.py, model/checkpoint.py): the official `*-Instruct-FP8` layout.

The fixtures are written by a hand-written block-loop quantiser here (transformers' arithmetic: scale = 448 / amax,
weight_scale_inv = 1 / scale, partial edge blocks allowed as in DeepSeek-V3's reference code), never by our saver,
and the reference model is built from weights this file dequantises itself. transformers' own Fp8Quantize /
Fp8Dequantize and its FP8 loader (which dequantises on CPU) check the saver from the other side.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import Qwen3VL, load_pretrained, preset, save_pretrained
from model.checkpoint import CheckpointError
from model.config import ConfigError
from model.rope import TextRotary
from model.fp8 import FP8Config, FP8Linear, dequantize_blockwise, quantize_blockwise

F8 = torch.float8_e4m3fn
FMAX = 448.0
BLOCK = (16, 24)  # not square (catches a transposed grid) and 24 does not divide 64 / 128 / 256: partial blocks


# ------------------------------------------------------------------------------ independent reference quantiser
def ref_quantize(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One block at a time: scale = 448 / amax (1 for an all-zero block), q = clamp(w * scale),
    scale_inv = 1 / scale."""
    w = w.float()
    n, k = w.shape
    q = torch.empty(n, k, dtype=F8)
    s = torch.empty(math.ceil(n / bn), math.ceil(k / bk))
    for i in range(0, n, bn):
        for j in range(0, k, bk):
            blk = w[i:i + bn, j:j + bk]
            amax = blk.abs().max()
            scale = FMAX / amax if amax > 0 else torch.tensor(1.0)
            q[i:i + bn, j:j + bk] = (blk * scale).clamp(-FMAX, FMAX).to(F8)
            s[i // bn, j // bk] = 1.0 / scale
    return q, s


def ref_dequantize(q: torch.Tensor, s: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(0, q.shape[0], bn):
        for j in range(0, q.shape[1], bk):
            out[i:i + bn, j:j + bk] = q[i:i + bn, j:j + bk].float() * s[i // bn, j // bk]
    return out


def _linear_weights(model: torch.nn.Module, skip=("lm_head",)) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear and n not in skip]


def _qconfig(block=BLOCK, skip=("lm_head",)) -> dict:
    """A quantization_config as the official FP8 releases write it."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": list(block), "modules_to_not_convert": list(skip)}


def write_official_fp8(model: Qwen3VL, d, block=BLOCK, moe="per_expert", skip=("lm_head",)):
    """Write `model` in the official FP8 layout with the reference quantiser, in two shards, one FP8 weight's scale
    in the other shard. Returns the state dict of real (dequantised) weights the loader must reproduce."""
    bn, bk = block
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    files, real = {}, dict(sd)
    for name in _linear_weights(model, skip):
        q, s = ref_quantize(sd[name], bn, bk)
        files[name], files[name + "_scale_inv"] = q, s
        real[name] = ref_dequantize(q, s, bn, bk)
    for name, t in sd.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            prefix, _, kind = name.rpartition(".")
            deq = torch.empty_like(t)
            for e in range(t.shape[0]):
                if moe == "per_expert":  # nn.Linear [out, in] per expert and projection
                    parts = {"down_proj": t[e].T} if kind == "down_proj" else dict(
                        zip(("gate_proj", "up_proj"), (t[e][:, :t.shape[2] // 2].T, t[e][:, t.shape[2] // 2:].T)))
                    outs = []
                    for proj, w in parts.items():
                        q, s = ref_quantize(w, bn, bk)
                        files[f"{prefix}.{e}.{proj}.weight"], files[f"{prefix}.{e}.{proj}.weight_scale_inv"] = q, s
                        outs.append(ref_dequantize(q, s, bn, bk).T)
                    deq[e] = torch.cat(outs, dim=-1)
                else:  # fused, transformers orientation [E, 2I, H] / [E, H, I], blocks over the stored dims
                    q, s = ref_quantize(t[e].T, bn, bk)
                    files.setdefault(name, torch.empty((t.shape[0], *q.shape), dtype=F8))[e] = q
                    files.setdefault(name + "_scale_inv", torch.empty(t.shape[0], *s.shape))[e] = s
                    deq[e] = ref_dequantize(q, s, bn, bk).T
            real[name] = deq
    if model.config.text.tie_word_embeddings:
        sd.pop("lm_head.weight")
    files.update({k: v for k, v in sd.items() if k not in files and not _expert_fused(k, moe)})
    names = sorted(files)
    a = "model.language_model.layers.0.self_attn.q_proj.weight"
    first = {k for k in names[: len(names) // 2]} - {a + "_scale_inv"} | {a}
    shards = {"model-00001-of-00002.safetensors": {k: files[k].contiguous() for k in first},
              "model-00002-of-00002.safetensors": {k: files[k].contiguous() for k in names if k not in first}}
    for fname, tensors in shards.items():
        save_file(tensors, d / fname, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ts in shards.items() for k in ts}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = model.config.to_hf()
    cfg["quantization_config"] = _qconfig(block, skip)
    (d / "config.json").write_text(json.dumps(cfg))
    return real


def _expert_fused(name: str, moe: str) -> bool:
    return moe == "per_expert" and (name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"))


def small(name: str):
    """The `tiny` / `tiny-moe` preset with a 2048-token vocabulary (special tokens moved inside it): fast on CPU."""
    c = preset(name)
    return c.replace(text=dataclasses.replace(c.text, vocab_size=2048), image_token_id=2000, video_token_id=2001,
                     vision_start_token_id=2002, vision_end_token_id=2003, eos_token_id=2004, pad_token_id=2005)


def _reference(config, real: dict, dtype=torch.float32) -> Qwen3VL:
    m = Qwen3VL(config.replace(quantization=None)).eval()
    m.load_state_dict({k: v.to(dtype) for k, v in real.items()})
    m = m.to(dtype)
    m.rotary = TextRotary(m.config.text)  # load_pretrained keeps the rotary tables in fp32
    return m


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8_dense")
    torch.manual_seed(0)
    m = Qwen3VL(small("tiny")).eval()
    real = write_official_fp8(m, d, skip=("lm_head", "model.visual.merger.linear_fc2"))
    return d, m.config, real


IDS = torch.randint(0, 2000, (2, 13), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_official_fp8_dequantizes_exactly(dense, dtype):
    d, config, real = dense
    model = load_pretrained(d, dtype=dtype, progress=False)
    assert model.config.quantization is None  # the loaded model holds real weights
    got = model.state_dict()
    for name, want in real.items():
        assert got[name].dtype == dtype, name
        torch.testing.assert_close(got[name], want.to(dtype), rtol=0, atol=0, msg=name)
    ref = _reference(config, real, dtype)
    torch.testing.assert_close(_logits(model, IDS), _logits(ref, IDS), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_official_fp8_keep_matches_dequantized_model(dense, dtype):
    d, config, real = dense
    model = load_pretrained(d, dtype=dtype, fp8="keep", progress=False)
    q = model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q, FP8Linear) and q.weight.dtype == F8
    assert type(model.model.visual.merger.linear_fc2) is torch.nn.Linear  # left in bf16 by the checkpoint
    with safe_open(d / "model-00001-of-00002.safetensors", "pt") as f:
        assert torch.equal(q.weight.view(torch.uint8),
                           f.get_tensor("model.language_model.layers.0.self_attn.q_proj.weight").view(torch.uint8))
    assert model.config.quantization.weight_block_size == BLOCK
    # the default backend ("auto") is the torch path off CUDA: the weight is dequantised to the activation dtype
    # (fp32 product, one rounding), then F.linear:
    # the same weights as the dequantise path, so the same logits.
    ref = _reference(config, real, dtype)
    torch.testing.assert_close(_logits(model, IDS), _logits(ref, IDS), rtol=0, atol=0)


@pytest.fixture(scope="module")
def moe_per_expert(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8_moe")
    torch.manual_seed(0)
    m = Qwen3VL(small("tiny-moe")).eval()
    return d, m.config, write_official_fp8(m, d, block=(16, 16), moe="per_expert")


@pytest.mark.parametrize("moe", ["per_expert", "fused_transformers"])
def test_official_fp8_moe_experts(moe_per_expert, tmp_path, moe):
    if moe == "per_expert":
        d, config, real = moe_per_expert
    else:
        torch.manual_seed(0)
        m = Qwen3VL(small("tiny-moe")).eval()
        d, config, real = tmp_path, m.config, write_official_fp8(m, tmp_path, block=(16, 16), moe=moe)
    layout = None if moe == "per_expert" else "transformers"  # tiny-moe has H == 2I: the shapes cannot tell
    model = load_pretrained(d, moe_layout=layout, progress=False)
    got = model.state_dict()
    for name in ("model.language_model.layers.1.mlp.experts.gate_up_proj",
                 "model.language_model.layers.1.mlp.experts.down_proj"):
        torch.testing.assert_close(got[name], real[name], rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, IDS), _logits(_reference(config, real), IDS), rtol=0, atol=0)


def test_missing_expert_piece_is_named(moe_per_expert, tmp_path):
    d = _copy(moe_per_expert[0], tmp_path / "c")
    key = "model.language_model.layers.2.mlp.experts.3.up_proj.weight"
    _edit(d, key, lambda sd: (sd.pop(key), sd.pop(key + "_scale_inv")))
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*layers\.2\.mlp\.experts\.gate_up_proj.*"
                                              r"missing expert tensors \(1\).*layers\.2\.mlp\.experts\.3\.up_proj"):
        load_pretrained(d, progress=False)


# ---------------------------------------------------------------------------------------------- bad input
def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit(d, key, fn):
    """Apply fn to the state dict of the shard holding `key`, and keep the index in step."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    fname = index["weight_map"][key]
    sd = load_file(d / fname)
    fn(sd)
    save_file(sd, d / fname, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != fname} | {k: fname for k in sd}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


K = "model.language_model.layers.1.mlp.down_proj.weight"  # [128, 256]; its scale sits in the same shard


def _to_e5m2(sd):
    sd.pop(K + "_scale_inv")
    sd[K] = sd[K].view(torch.uint8).view(torch.float8_e5m2)


@pytest.mark.parametrize("damage,message", [
    (lambda sd: sd.pop(K + "_scale_inv"),
     r"down_proj\.weight is float8_e4m3fn but its scale tensor .*down_proj\.weight_scale_inv is missing"),
    (lambda sd: sd.__setitem__(K + "_scale_inv", torch.ones(8, 10)),
     r"down_proj\.weight_scale_inv: scale shape \(8, 10\) does not fit weight \(128, 256\) with blocks "
     r"\(16, 24\) \(expected \(8, 11\)\)"),
    (lambda sd: sd.__setitem__(K, sd[K].float()),
     r"down_proj\.weight is torch\.float32, but .*down_proj\.weight_scale_inv exists"),
    (_to_e5m2, r"down_proj\.weight is torch\.float8_e5m2; only float8_e4m3fn"),
], ids=["missing-scale", "scale-shape", "scale-without-fp8-weight", "e5m2-weight"])
def test_bad_fp8_tensors_are_named(dense, tmp_path, damage, message):
    d = _copy(dense[0], tmp_path / "c")
    _edit(d, K, damage)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(d, progress=False)


def test_bf16_scales_are_read(dense, tmp_path):
    """Some official FP8 releases store weight_scale_inv in bf16: the scale is used as stored, widened to fp32."""
    d = _copy(dense[0], tmp_path / "c")
    _edit(d, K, lambda sd: sd.__setitem__(K + "_scale_inv", sd[K + "_scale_inv"].bfloat16()))
    with safe_open(d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][K], "pt") as f:
        q, s = f.get_tensor(K), f.get_tensor(K + "_scale_inv")
    assert s.dtype == torch.bfloat16
    want = ref_dequantize(q, s.float(), *BLOCK)
    torch.testing.assert_close(load_pretrained(d, progress=False).state_dict()[K], want, rtol=0, atol=0)
    keep = load_pretrained(d, fp8="keep", progress=False).get_submodule(K.removesuffix(".weight"))
    assert keep.weight_scale_inv.dtype == torch.float32 and torch.equal(keep.weight_scale_inv, s.float())


def test_fp8_weights_without_quantization_config_are_refused(dense, tmp_path):
    d = _copy(dense[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"FP8 scale tensors .*weight_scale_inv.* no quantization_config"):
        load_pretrained(d, progress=False)


@pytest.mark.parametrize("edit,message", [
    ({"quant_method": "gptq"}, r"quantization_config\.quant_method 'gptq' unsupported"),
    ({"fmt": "e5m2"}, r"fmt 'e5m2' unsupported"),
    ({"activation_scheme": "static"}, r"activation_scheme 'static' unsupported"),
    ({"weight_block_size": [128]}, r"weight_block_size must be two positive ints"),
    ({"weight_block_size": [128, "128"]}, r"weight_block_size must be two positive ints"),
    ({"scale_fmt": "ue8m0"}, r"quantization_config\.scale_fmt 'ue8m0' unsupported"),
    ({"modules_to_not_convert": "lm_head"}, r"modules_to_not_convert must be a list of strings"),
    ({"group_size": 64}, r"quantization_config: unknown field\(s\) \['group_size'\]"),
])
def test_bad_quantization_config_is_named(edit, message):
    from model import Qwen3VLConfig

    d = preset("tiny").to_hf()
    d["quantization_config"] = _qconfig() | edit
    with pytest.raises(ConfigError, match=r"config\.json: .*" + message):
        Qwen3VLConfig.from_hf(d)


def test_transformers_quantization_config_parses_both_ways():
    """transformers' FineGrainedFP8Config.to_dict() (all its keys) parses here, and ours parses there."""
    from transformers import FineGrainedFP8Config

    theirs = FineGrainedFP8Config(weight_block_size=(32, 64), modules_to_not_convert=["lm_head", "model.visual"])
    ours = FP8Config.from_hf(theirs.to_dict())
    assert ours.weight_block_size == (32, 64) and ours.modules_to_not_convert == ("lm_head", "model.visual")
    back = FineGrainedFP8Config.from_dict(ours.to_hf())
    assert tuple(back.weight_block_size) == (32, 64) and back.activation_scheme == "dynamic"
    assert back.modules_to_not_convert == ["lm_head", "model.visual"] and back.quant_method == "fp8"


# ------------------------------------------------------------------------------------ quantise / dequantise
@pytest.mark.parametrize("shape,block", [((256, 128), (128, 128)), ((3, 96, 64), (32, 16)), ((48, 80), (16, 16))],
                         ids=["2d-128", "3d-experts", "rect"])
def test_quantizer_matches_transformers_bitwise(shape, block):
    from types import SimpleNamespace

    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    hf = SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block))
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])  # blocks of very different magnitudes
    w[..., :block[0], :block[1]] = 0  # an all-zero block keeps scale 1
    theirs = Fp8Quantize(hf).convert({"x.weight": w})
    q, s = quantize_blockwise(w, block)
    assert torch.equal(q.view(torch.uint8), theirs["x.weight"].view(torch.uint8))
    assert torch.equal(s, theirs["x.weight_scale_inv"])
    deq = Fp8Dequantize(hf)._dequantize_one(q, s, output_dtype=torch.float32)
    assert torch.equal(dequantize_blockwise(q, s, block), deq)


@pytest.mark.parametrize("shape", [(40, 56), (16, 24), (1, 100)], ids=["partial-both", "one-block", "row"])
def test_partial_blocks_match_the_reference(shape):
    w = torch.randn(shape)
    q, s = quantize_blockwise(w, BLOCK)
    rq, rs = ref_quantize(w, *BLOCK)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    assert torch.equal(dequantize_blockwise(rq, rs, BLOCK), ref_dequantize(rq, rs, *BLOCK))
    assert (dequantize_blockwise(q, s, BLOCK) - w).abs().max() <= w.abs().max() / 16  # e4m3: 3 mantissa bits


# ---------------------------------------------------------------------------------------------- saving
def test_save_fp8_round_trip_and_layout(tmp_path):
    torch.manual_seed(0)
    m = Qwen3VL(small("tiny")).eval()
    save_pretrained(m, tmp_path, fp8=FP8Config((16, 16)), max_shard_size="40MB")
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [16, 16], "modules_to_not_convert": ["lm_head"]}
    files = {}
    for f in tmp_path.glob("*.safetensors"):
        files.update(load_file(f))
    sd = m.state_dict()
    real = dict(sd)
    for name in _linear_weights(m):
        rq, rs = ref_quantize(sd[name], 16, 16)
        assert torch.equal(files[name].view(torch.uint8), rq.view(torch.uint8)), name
        assert torch.equal(files[name + "_scale_inv"], rs), name
        real[name] = ref_dequantize(rq, rs, 16, 16)
    assert m.config.text.tie_word_embeddings and "lm_head.weight" not in files  # tied: written once, unquantised
    assert files["model.language_model.embed_tokens.weight"].dtype == torch.float32
    loaded = load_pretrained(tmp_path, progress=False)
    torch.testing.assert_close(_logits(loaded, IDS), _logits(_reference(m.config, real), IDS), rtol=0, atol=0)


def test_save_leaves_indivisible_weights_unquantised_and_lists_them(tmp_path):
    torch.manual_seed(0)
    m = Qwen3VL(small("tiny")).eval()
    save_pretrained(m, tmp_path, fp8=FP8Config((48, 64), modules_to_not_convert=("lm_head", "model.visual.merger")))
    files = load_file(tmp_path / "model.safetensors")
    listed = set(json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    for name in _linear_weights(m):
        mod = name.removesuffix(".weight")
        n, k = m.get_parameter(name).shape
        quantised = n % 48 == 0 and k % 64 == 0 and not mod.startswith("model.visual.merger.")
        assert (files[name].dtype == F8) == quantised, name
        assert ((name + "_scale_inv") in files) == quantised, name
        # like transformers' Fp8Quantize, indivisible weights stay as they are; they are listed so that transformers
        # keeps them nn.Linear (modules under the user's own patterns are already covered)
        assert (mod in listed) == (not quantised and not mod.startswith("model.visual.merger.")), name
    assert {"lm_head", "model.visual.merger"} <= listed
    assert any(files[n].dtype == F8 for n in files)  # qkv (192 x 64) and the like
    load_pretrained(tmp_path, progress=False)


def test_keep_model_saves_back_the_same_files(dense, tmp_path):
    d, config, real = dense
    model = load_pretrained(d, fp8="keep", progress=False)
    save_pretrained(model, tmp_path)
    ours = load_file(tmp_path / "model.safetensors")
    theirs = {}
    for f in d.glob("*.safetensors"):
        theirs.update(load_file(f))
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k].view(torch.uint8), v.view(torch.uint8)), k
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == _qconfig(skip=("lm_head", "model.visual.merger.linear_fc2"))
    with pytest.raises(ValueError, match=r"fp8=False, but the model holds FP8Linear weights"):
        save_pretrained(model, tmp_path / "plain", fp8=False)


def test_save_moe_per_expert_round_trip(tmp_path):
    torch.manual_seed(0)
    m = Qwen3VL(small("tiny-moe")).eval()
    save_pretrained(m, tmp_path, fp8=FP8Config((16, 16)))
    files = load_file(tmp_path / "model.safetensors")
    gu = m.state_dict()["model.language_model.layers.0.mlp.experts.gate_up_proj"]  # [E, H, 2I]
    I = gu.shape[2] // 2
    rq, rs = ref_quantize(gu[2][:, I:].T, 16, 16)  # expert 2's up_proj as an nn.Linear weight [I, H]
    key = "model.language_model.layers.0.mlp.experts.2.up_proj.weight"
    assert torch.equal(files[key].view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(files[key + "_scale_inv"], rs)
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" not in files
    assert files["model.language_model.layers.0.mlp.gate.weight"].dtype == torch.float32  # the router stays
    listed = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert "model.language_model.layers.0.mlp.gate" in listed
    loaded = load_pretrained(tmp_path, progress=False).state_dict()
    torch.testing.assert_close(loaded["model.language_model.layers.0.mlp.experts.gate_up_proj"][2][:, I:],
                               ref_dequantize(rq, rs, 16, 16).T, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- transformers reads ours
def _installed(dist: str) -> bool:
    """An installed distribution of that name (not a folder of this checkout that happens to share it)."""
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_transformers_loads_our_fp8_checkpoint(tmp_path):
    """transformers' FP8 quantizer, told to dequantise (`FineGrainedFP8Config(dequantize=True)`, what it does by
    itself on a CPU-only machine: its Fp8Dequantize), must find every tensor where the official layout puts it.
    Asked explicitly so that the test means the same on a CUDA machine, where it would otherwise keep FP8 and
    fetch its matmul kernel from the Hub (the test below)."""
    import transformers

    torch.manual_seed(0)
    save_pretrained(Qwen3VL(small("tiny")).eval(), tmp_path, fp8=FP8Config((16, 16)))
    ours = load_pretrained(tmp_path, progress=False)
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, device_map="cpu",
        quantization_config=transformers.FineGrainedFP8Config(weight_block_size=(16, 16), dequantize=True)).eval()
    with torch.no_grad():
        theirs = hf(input_ids=IDS).logits
    torch.testing.assert_close(theirs, _logits(ours, IDS), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="transformers' FP8 matmul needs CUDA with compute capability >= 8.9")
@pytest.mark.skipif(not _installed("kernels"),
                    reason="transformers' FP8 matmul comes from the Hub through the `kernels` package (not installed; "
                           "find_spec would find this repository's own kernels/ instead)")
def test_transformers_fp8_linear_on_cuda_runs_our_checkpoint(tmp_path):
    """transformers keeps our weights in FP8 (FP8Linear, FP8 activations): logits within FP8 error of ours."""
    import transformers

    torch.manual_seed(0)
    save_pretrained(Qwen3VL(small("tiny")).eval(), tmp_path, fp8=FP8Config((16, 16)), dtype=torch.bfloat16)
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                                      device_map="cuda").eval()
    assert type(hf.model.language_model.layers[0].self_attn.q_proj).__name__ == "FP8Linear"
    ours = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda", progress=False)
    with torch.no_grad():
        a, b = hf(input_ids=IDS.cuda()).logits.float(), ours(IDS.cuda()).logits.float()
    # transformers also quantises the activations to FP8 per 1 x 128 group: ~2^-4 relative error per matmul
    assert (a - b).abs().max() <= 0.1 * b.abs().max()


# ----------------------------------------------------------------------------------------- Triton W8A16 kernel
# Tolerances: fp32 ~1e-5 relative (accumulation order only: both sides use the same dequantised fp32 weight);
# fp16 ~2e-3 relative (the output is rounded to fp16; the weight is rounded to fp16 on both sides).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m,n,k,block", [(1, 40, 56, (16, 24)), (19, 64, 128, (32, 32)), (33, 72, 100, (128, 128))],
                         ids=["decode-partial-blocks", "prefill-even", "one-partial-block"])
def test_fp8_linear_kernel_matches_reference(dtype, m, n, k, block):
    from kernels.fp8_linear import fp8_linear, fp8_linear_ref

    q, s = ref_quantize(torch.randn(n, k) * torch.logspace(-2, 1, k), *block)
    x, bias = torch.randn(2, m, k).to(dtype), torch.randn(n)
    y = fp8_linear(x, q, s, block, bias)
    assert y.dtype == dtype and y.shape == (2, m, n)
    # the reference: the weight dequantised in fp32 and rounded to the activation dtype (the kernel's per-element
    # path; its per-tile path, block width a multiple of the K step, scales the fp32 partial product instead,
    # which differs by at most that one rounding: within TOL)
    w = ref_dequantize(q, s, *block).to(dtype)
    torch.testing.assert_close(y.float(), x.float() @ w.float().T + bias, **TOL[dtype])
    if dtype == torch.float32:
        torch.testing.assert_close(y, fp8_linear_ref(x, q, s, block, bias), **TOL[dtype])


def test_fp8_linear_kernel_input_gradient():
    from kernels.fp8_linear import fp8_linear, fp8_linear_ref

    q, s = ref_quantize(torch.randn(48, 40), 16, 16)
    x = torch.randn(5, 40, requires_grad=True)
    dy = torch.randn(5, 48)
    (gx,) = torch.autograd.grad(fp8_linear(x, q, s, (16, 16)), x, dy)
    xr = x.detach().clone().requires_grad_()
    (rx,) = torch.autograd.grad(fp8_linear_ref(xr, q, s, (16, 16)), xr, dy)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)


def test_fp8_linear_kernel_rejects_bad_input():
    from kernels.fp8_linear import fp8_linear

    q, s = ref_quantize(torch.randn(32, 32), 16, 16)
    with pytest.raises(ValueError, match=r"weight_scale_inv \(2, 3\) does not fit weight \(32, 32\).*\(2, 2\)"):
        fp8_linear(torch.randn(2, 32), q, torch.ones(2, 3), (16, 16))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(torch.randn(2, 32), q.float(), s, (16, 16))
    with pytest.raises(ValueError, match="x has 31 features"):
        fp8_linear(torch.randn(2, 31), q, s, (16, 16))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the auto backend picks Triton only on CUDA"))])
def test_fp8_auto_backend_dispatches_on_rows_and_device(device, monkeypatch):
    """backend="auto": kernels.fp8_linear for <= FP8_AUTO_TRITON_ROWS rows on CUDA, dequantise + F.linear above it
    and off CUDA (spied: which path ran, and the result equals that backend's own)."""
    import kernels.fp8_linear as kf
    import model.fp8 as mf

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, device=device)
    auto, forced = mf.FP8Linear.from_linear(lin, (16, 16)), {b: mf.FP8Linear.from_linear(lin, (16, 16), b)
                                                              for b in ("torch", "triton")}
    assert auto.backend == "auto"
    calls = []
    real = kf.fp8_linear
    monkeypatch.setattr(kf, "fp8_linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(mf, "FP8_AUTO_TRITON_ROWS", 8)
    dtype = torch.float16 if device == "cuda" else torch.float32
    for rows, want in ((8, "triton" if device == "cuda" else "torch"), (9, "torch")):
        x = torch.randn(rows, 64, device=device, dtype=dtype)
        calls.clear()
        y = auto(x)
        assert bool(calls) == (want == "triton"), (rows, want, calls)
        if want == "torch":
            torch.testing.assert_close(y, forced["torch"](x), rtol=0, atol=0)
        else:
            torch.testing.assert_close(y, forced["triton"](x), rtol=0, atol=0)


def test_keep_fp8_with_triton_backend(dense):
    """load_pretrained(fp8="keep", fp8_backend="triton"): every FP8 linear through the kernel; the logits within
    fp32 accumulation-order error of the dequantised model's."""
    d, config, real = dense
    model = load_pretrained(d, fp8="keep", fp8_backend="triton", progress=False)
    assert model.model.language_model.layers[0].mlp.up_proj.backend == "triton"
    ids = IDS[:1, :6]
    torch.testing.assert_close(_logits(model, ids), _logits(_reference(config, real), ids), rtol=1e-4, atol=1e-4)
