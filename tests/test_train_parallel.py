"""Activation checkpointing and compile applied from outside the model (train/parallel.py): the model itself keeps
no such switches, parameter names and state_dict keys do not change, gradients equal the plain run's, and exactly
the chosen blocks are recomputed in backward."""
from __future__ import annotations

import pytest
import torch

from model import Qwen3VL, preset
from tests.hf_reference import Sample, batch
from train.parallel import apply_activation_checkpointing, apply_compile


def _model():
    torch.manual_seed(0)
    return Qwen3VL(preset("tiny"))


def _batch():
    b = batch([Sample(torch.Generator().manual_seed(2)).text(4).image(4, 6).text(4)])
    b.pop("attention_mask")
    return b


def _run(m, b):
    """Forward + backward of a fixed loss; returns (logits, grads by name)."""
    m.zero_grad()
    out = m(**b).logits
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _count_calls(m) -> dict[str, list[int]]:
    """Per block name, a one-element counter of its forward calls (a recomputation in backward is a second call)."""
    calls = {}
    blocks = [(f"visual.{i}", blk) for i, blk in enumerate(m.model.visual.blocks)]
    blocks += [(f"text.{i}", layer) for i, layer in enumerate(m.model.language_model.layers)]
    for name, mod in blocks:
        calls[name] = c = [0]
        mod.register_forward_pre_hook(lambda *_, c=c: c.__setitem__(0, c[0] + 1))
    return calls


@pytest.mark.parametrize("every, vision", [(1, True), (2, True), (1, False)], ids=["all", "every2", "text-only"])
def test_checkpointing_from_outside_keeps_names_and_gradients(every, vision):
    b = _batch()
    ref = _model()
    o1, g1 = _run(ref, b)
    m = _model()
    names, keys = [n for n, _ in m.named_parameters()], list(m.state_dict())
    apply_activation_checkpointing(m, every=every, vision=vision)
    assert [n for n, _ in m.named_parameters()] == names and list(m.state_dict()) == keys
    calls = _count_calls(m)
    o2, g2 = _run(m, b)
    n_text = m.config.text.num_hidden_layers
    expected = {f"visual.{i}": 2 if vision else 1 for i in range(m.config.vision.depth)}
    expected |= {f"text.{i}": 2 if i % every == 0 else 1 for i in range(n_text)}
    assert {k: c[0] for k, c in calls.items()} == expected
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    assert g1.keys() == g2.keys()
    for n in g1:  # the recomputed forward is the same computation; backward sums may differ in the last bit
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-6, atol=1e-7, msg=n)
    # no_grad evaluation through the hooked blocks (the trainer validates this way): same logits
    with torch.no_grad():
        torch.testing.assert_close(m(**b).logits, o1, rtol=0, atol=0)


def test_checkpointing_rejects_bad_every():
    with pytest.raises(ValueError, match="every"):
        apply_activation_checkpointing(_model(), every=0)


def test_model_keeps_no_training_switches():
    m = _model()
    assert not any(hasattr(mod, "activation_checkpointing") or hasattr(mod, "checkpoint_every")
                   for mod in m.modules())
    assert not hasattr(m, "set_activation_checkpointing") and not hasattr(m, "compile_blocks")


def test_compile_from_outside_keeps_names_and_logits():
    """backend="eager" keeps this a tracing test (inductor is exercised by tests/test_train_loop.py)."""
    b = _batch()
    ref = _model()
    with torch.no_grad():
        o1 = ref(**b).logits
    m = _model()
    names = [n for n, _ in m.named_parameters()]
    apply_compile(m, backend="eager")
    assert [n for n, _ in m.named_parameters()] == names and list(m.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(**b).logits, o1, rtol=0, atol=0)
