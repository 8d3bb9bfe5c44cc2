"""LoRA (train/lora.py): merged == unmerged output, exact unmerge, adapter I/O in PEFT's layout, and PEFT itself
loading our adapter into transformers' Qwen3-VL (the independent reference) with the same outputs as our merge."""
import json

import pytest
import torch

from model import Qwen3VL
from train.lora import (LoRALinear, apply_lora, load_lora_adapter, lora_modules, merge_lora, remove_lora,
                        save_lora_adapter, unmerge_lora)
from model.build import model_config

from .test_train_common import SMALL_MODEL

TARGETS = ("q_proj", "v_proj", "down_proj")


def _model(seed=0):
    from model.build import ModelSpec

    torch.manual_seed(seed)
    return Qwen3VL(model_config(ModelSpec(**{k: v for k, v in SMALL_MODEL.items()}))).eval()


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def _inputs(seed=2, L=37):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151000, (2, L), generator=g)


def test_lora_targets_and_freezing():
    m = _model()
    names = apply_lora(m, r=4, alpha=8.0, target_modules=TARGETS)
    assert len(names) == 2 * 3 and all(".visual." not in n for n in names)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    # the base weight keeps its official name
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in dict(m.named_parameters())
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_lora(_model(), r=4, alpha=8.0, target_modules=("nonexistent_proj",))


def test_lora_merged_equals_unmerged_and_unmerge_restores():
    m = _model()
    base = {n: p.detach().clone() for n, p in m.named_parameters()}
    apply_lora(m, r=4, alpha=8.0, target_modules=TARGETS)
    _randomize_adapters(m)
    ids = _inputs()
    with torch.no_grad():
        unmerged = m(ids).logits
        merge_lora(m)
        merged = m(ids).logits
        assert all(mod.merged for mod in lora_modules(m).values())
        # fp32: merging reassociates (x W^T + s x A^T B^T vs x (W + s B A)^T); 1e-4 absolute on logits ~O(1)
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
        unmerge_lora(m)
        again = m(ids).logits
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)
    for n, p in m.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)
    # the adapter changes the output (so the equalities above are not vacuous)
    plain = _model()
    with torch.no_grad():
        assert (plain(ids).logits - unmerged).abs().max() > 1e-3


def test_adapter_files_roundtrip_in_peft_layout(tmp_path):
    m = _model()
    names = apply_lora(m, r=4, alpha=8.0, target_modules=TARGETS)
    _randomize_adapters(m)
    save_lora_adapter(m, str(tmp_path), base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    m2 = _model()
    load_lora_adapter(m2, str(tmp_path))
    ids = _inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, m(ids).logits, rtol=0, atol=0)
    remove_lora(m2)
    assert not lora_modules(m2) and not any(isinstance(x, LoRALinear) for x in m2.modules())
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, m(ids).logits, rtol=1e-4, atol=1e-4)


def test_peft_loads_our_adapter_into_transformers(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from model import save_pretrained

    m = _model()
    save_pretrained(m, tmp_path / "base")
    apply_lora(m, r=4, alpha=8.0, target_modules=TARGETS)
    _randomize_adapters(m)
    save_lora_adapter(m, str(tmp_path / "adapter"))
    ids = _inputs(4, L=29)
    with torch.no_grad():
        ours = m(ids).logits
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    n_lora = sum(1 for n, _ in hf.named_modules() if n.endswith("lora_A"))
    assert n_lora == 6
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    # fp32, two implementations of the same network: 1e-4 (as the model parity tests)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
