"""The training loop (train/trainer.py) on CPU: loss falls, packed == unpacked, freezing, LoRA, MoE aux loss,
exact resume, and checkpoint integrity (train/checkpoint.py)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from model import load_pretrained
from model.build import build_model
from train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, verify_checkpoint
from train.data import ChatEncoder, SFTDataset, pack_samples
from train.loss import IGNORE_INDEX
from train.optim import build_optimizer, lr_at
from train.step import forward_losses
from train.trainer import train

from .test_train_common import chatty_model, params_snapshot, small_config

pytestmark = pytest.mark.usefixtures("single_thread")


def _losses(res):
    return [h["loss"] for h in res["history"]]


def test_loss_falls_over_30_steps(data, tmp_path):
    cfg = small_config(data, tmp_path, train={"steps": 30, "export": True, "eval_samples": 2,
                                              "eval_max_new_tokens": 4}, optim={"lr": 1e-2})
    res = train(cfg)
    ls = _losses(res)
    assert len(ls) == 30
    first, last = sum(ls[:3]) / 3, sum(ls[-3:]) / 3
    assert first > 10.0                      # ~ln(151936) = 11.9 at init
    assert last < 5.0, ls                    # learned at least the answer format (~2.3 = uniform over digits)
    assert res["evals"][-1]["val_loss"] < 5.0 and res["evals"][-1]["cer"] is not None
    # the export loads with strict load_pretrained (and its processor) and gives the trained model's outputs
    from model import load_processor

    exported = load_processor(res["final_dir"])
    assert exported.tokenizer.encode("12") == [16, 17]
    # ... and preprocesses images with the training budgets, so inference sees what training saw
    from train.data import SFTDataset as _DS

    train_ds = _DS(data["train"], ChatEncoder(load_processor(None), res["model"].config, cfg.data))
    rec = json.loads(open(data["train"]).readline())
    conv = [dict(m, content=[dict(c, image=str(Path(data["train"]).parent / c["image"])) if c.get("type") == "image"
                             else c for c in m["content"]]) for m in rec["messages"]]
    assert torch.equal(exported(messages=[conv])["image_grid_thw"], train_ds[0].image_grid_thw)
    m = load_pretrained(res["final_dir"])
    ids = torch.randint(0, 151000, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, res["model"].eval()(ids).logits, rtol=0, atol=0)


def test_packed_batch_equals_unpacked_samples(data, tmp_path):
    from model import load_processor

    cfg = small_config(data, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ds = SFTDataset(data["train"], ChatEncoder(load_processor(None), model.config, cfg.data))
    samples = [ds[i] for i in (0, 5, 9, 17)]

    def run(batch):
        model.zero_grad(set_to_none=True)
        losses, _ = forward_losses(model, batch, chunk_size=16)
        losses.sum().backward()
        return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = pack_samples(samples)
    lp, gp = run(packed)
    doc = packed["doc_index"][(packed["labels"][0] != IGNORE_INDEX)]
    g_sum = None
    for k, s in enumerate(samples):
        ls, gs = run(pack_samples([s]))
        # fp32; the only difference is batch composition in the matmuls: 2e-5 relative
        torch.testing.assert_close(lp[doc == k], ls, rtol=2e-5, atol=2e-5)
        g_sum = gs if g_sum is None else {n: g_sum[n] + gs[n] for n in gs}
    for n in gp:
        torch.testing.assert_close(gp[n], g_sum[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert sum(float(g.abs().sum()) for g in gp.values()) > 0


def test_frozen_groups_stay_bit_identical(data, tmp_path):
    cfg = small_config(data, tmp_path, train={"steps": 3, "freeze": {"vision": True, "deepstack": True}})
    torch.manual_seed(cfg.train.seed)
    init = params_snapshot(build_model(cfg.model))
    after = params_snapshot(train(cfg)["model"])
    for n, p in after.items():
        frozen = n.startswith("model.visual.") and not n.startswith("model.visual.merger.")
        same = torch.equal(p, init[n])
        assert same == frozen, f"{n}: frozen={frozen} but unchanged={same}"


def test_lora_run_trains_only_adapters_and_exports_merged(data, tmp_path):
    cfg = small_config(data, tmp_path, train={"steps": 3, "mode": "lora", "export": True,
                                              "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}},
                       optim={"module_lr": {"lora": 5e-3}})
    torch.manual_seed(cfg.train.seed)
    init = params_snapshot(build_model(cfg.model))
    res = train(cfg)
    assert os.path.isfile(os.path.join(cfg.train.out_dir, "adapter", "adapter_model.safetensors"))
    merged = load_pretrained(res["final_dir"])
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, init[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed), changed


def test_moe_model_adds_aux_loss(data, tmp_path):
    cfg = small_config(data, tmp_path, model={"preset": "tiny-moe", "text": {"moe": {"num_experts": 4}}},
                       train={"steps": 2, "aux_loss_coef": 0.01})
    res = train(cfg)
    aux = [h["aux_loss"] for h in res["history"]]
    assert all(a > 0.5 for a in aux), aux  # Switch loss is ~1 for balanced routing, never ~0
    gate = res["model"].model.language_model.layers[0].mlp.gate.weight
    torch.manual_seed(cfg.train.seed)
    assert not torch.equal(gate, build_model(cfg.model).model.language_model.layers[0].mlp.gate.weight)


def test_resume_reproduces_uninterrupted_run(data, tmp_path):
    over = {"steps": 6, "grad_accum": 2, "save_every": 2}
    full = train(small_config(data, tmp_path / "a", train=over))
    part = train(small_config(data, tmp_path / "b", train={**over, "stop_after_steps": 3}))
    assert len(part["history"]) == 3 and part["final_dir"] is None
    rest = train(small_config(data, tmp_path / "b", train=over))      # resume=auto picks up step 3
    assert [h["step"] for h in rest["history"]] == [4, 5, 6]
    assert _losses(part) + _losses(rest) == _losses(full)              # bit-exact, not approximately
    pa, pb = params_snapshot(full["model"]), params_snapshot(rest["model"])
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_corrupt_or_partial_checkpoints_are_detected(data, tmp_path):
    cfg = small_config(data, tmp_path, train={"steps": 2, "save_every": 1, "keep_last": 3})
    res = train(cfg)
    root = tmp_path / "checkpoints"
    good = latest_checkpoint(root)
    assert good.name == "step-00000002"
    verify_checkpoint(good)
    model = res["model"]
    opt = build_optimizer(model, cfg.optim)

    def broken(name, damage):
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        return d

    def truncate(d):
        p = d / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-100])

    def flip(d):
        p = d / "optim.safetensors"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))

    with pytest.raises(CheckpointError, match="model.safetensors has .* bytes.*truncated"):
        load_checkpoint(broken("trunc", truncate), model, opt)
    with pytest.raises(CheckpointError, match="optim.safetensors fails its sha256"):
        load_checkpoint(broken("flip", flip), model, opt)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(broken("nomanifest", lambda d: (d / "manifest.json").unlink()), model, opt)
    with pytest.raises(CheckpointError, match="state.json is missing"):
        load_checkpoint(broken("missing", lambda d: (d / "state.json").unlink()), model, opt)
    # a crash mid-save leaves a hidden temp folder; `latest` still names the last complete checkpoint
    crashed = root / ".tmp-step-00000003"
    shutil.copytree(good, crashed)
    (crashed / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(root) == good
    load_checkpoint(good, model, opt)


def test_lr_schedule_warmup_then_cosine():
    from train.config import OptimConfig

    c = OptimConfig(warmup_steps=4, min_lr_ratio=0.1)
    got = [lr_at(s, 20, c) for s in range(20)]
    assert got[:4] == [0.25, 0.5, 0.75, 1.0]
    assert got[4] == pytest.approx(1.0) and got[-1] > 0.1 and lr_at(20, 20, c) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(got[3:], got[4:]))


def test_batched_generation_matches_one_by_one(data, tmp_path):
    """CER generations are batched with left padding; prompts of different lengths must give the same answers."""
    import json

    from model import load_processor
    from eval.generate import generate_batch

    recs = [json.loads(line) for line in open(data["val"])][:3]
    recs[1]["messages"][0]["content"][1]["text"] = "Read every digit in this picture, please, slowly."
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = small_config(data, tmp_path, train={"eval_max_new_tokens": 6})
    model = chatty_model(cfg)
    tok = load_processor(None).tokenizer
    ds = SFTDataset(str(path), ChatEncoder(load_processor(None), model.config, cfg.data),
                    root=os.path.dirname(data["val"]))
    prompts = [ds.prompt(i) for i in range(3)]
    assert len({p.input_ids.numel() for p in prompts}) == 2  # really padded
    n_new = cfg.train.eval_max_new_tokens
    batched = generate_batch(model, prompts, tok, n_new, "cpu", return_ids=True)
    single = [generate_batch(model, [p], tok, n_new, "cpu", return_ids=True)[0] for p in prompts]
    assert batched == single and len({tuple(b) for b in batched}) > 1


def test_training_trajectory_matches_transformers(data, tmp_path):
    """Independent check of the whole training step: the same random weights saved by us and loaded into
    transformers' Qwen3VLForConditionalGeneration, the same samples, the same AdamW settings. Our step (packed
    row, cu_seqlens, chunked CE, train.trainer.build_optimizer) and transformers' (one sample per call, CE on
    its logits) give the same loss at every step, so the model, its gradients and the optimizer agree."""
    from transformers import Qwen3VLForConditionalGeneration

    from model import load_processor
    from model.checkpoint import save_pretrained

    cfg = small_config(data, tmp_path)
    torch.manual_seed(0)
    ours = build_model(cfg.model)
    save_pretrained(ours, tmp_path / "init")
    ref = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "init", dtype=torch.float32,
                                                          attn_implementation="sdpa").train()
    ds = SFTDataset(data["train"], ChatEncoder(load_processor(None), ours.config, cfg.data))
    opt_ours = build_optimizer(ours, cfg.optim)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                weight_decay=cfg.optim.weight_decay)
    image_pad = ours.config.image_token_id
    history = []
    for step in range(4):
        samples = [ds[i] for i in range(3 * step, 3 * step + 3)]
        packed = pack_samples(samples)
        losses, _ = forward_losses(ours, packed, chunk_size=16)
        loss_ours = losses.mean()
        opt_ours.zero_grad(set_to_none=True)
        loss_ours.backward()
        opt_ours.step()
        total, count = 0.0, 0
        for s in samples:
            ids = s.input_ids[None]
            logits = ref(input_ids=ids, pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                         mm_token_type_ids=(ids == image_pad).int()).logits[0, :-1]
            tgt = s.labels[1:]
            total = total + torch.nn.functional.cross_entropy(logits, tgt, ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((tgt != IGNORE_INDEX).sum())
        loss_ref = total / count
        opt_ref.zero_grad(set_to_none=True)
        loss_ref.backward()
        opt_ref.step()
        torch.testing.assert_close(loss_ours.detach(), loss_ref.detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"step {step}: {m}")
        history.append(float(loss_ours))
    assert history[-1] < history[0] - 0.5, history  # the weights moved, so later steps test the updates too


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_and_checkpointed_runs_match_eager(data, tmp_path, backend):
    """train.compile (inductor, each block) and activation checkpointing of the decoder only (checkpoint_vision
    false) change speed and memory, not the losses. Packed batches change length from step to step, so the blocks
    recompile with dynamic shapes; with the Triton backend the attention custom ops sit inside those graphs."""
    model = {"top": {"attn_backend": backend}}
    base = _losses(train(small_config(data, tmp_path / "eager", model=model, train={"steps": 3})))
    fast = _losses(train(small_config(data, tmp_path / "fast", model=model, train={
        "steps": 3, "compile": True, "activation_checkpointing": True, "checkpoint_vision": False})))
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(base), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, -1])
def test_loss_chunk_size_must_be_positive(data, tmp_path, chunk):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="train.loss_chunk_size"):
        small_config(data, tmp_path, train={"loss_chunk_size": chunk})


def _nan_at_step(monkeypatch, bad_steps: set[int]):
    """Make the loss of the given optimizer steps (1-based) NaN, as an overflow or a bad sample would."""
    import train.step as step_mod

    real, calls = step_mod.forward_losses, {"n": 0}

    def forward(model, batch, chunk, precision="fp32"):
        losses, out = real(model, batch, chunk, precision)
        if model.training:
            calls["n"] += 1
            if calls["n"] in bad_steps:
                losses = losses * float("nan")
        return losses, out

    monkeypatch.setattr(step_mod, "forward_losses", forward)


def test_nonfinite_loss_stops_training_before_anything_is_saved(data, tmp_path, monkeypatch):
    from train.step import NonFiniteError

    _nan_at_step(monkeypatch, {3})
    cfg = small_config(data, tmp_path, train={"steps": 4, "save_every": 1, "export": True})
    with pytest.raises(NonFiniteError, match="step 3"):
        train(cfg)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000002"   # the last good one
    assert not (tmp_path / "final").exists()


def test_nonfinite_step_is_skipped_when_configured(data, tmp_path, monkeypatch):
    _nan_at_step(monkeypatch, {2})
    cfg = small_config(data, tmp_path, train={"steps": 3, "export": True, "on_nonfinite": "skip"})
    res = train(cfg)
    assert [h.get("skipped", False) for h in res["history"]] == [False, True, False]
    m = load_pretrained(res["final_dir"])
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_a_batch_whose_samples_all_fail_to_load_is_dropped(data, tmp_path, monkeypatch):
    import train.data as data_mod

    failing = {"on": True}
    real_encode, real_pack = ChatEncoder.encode, data_mod.pack_samples

    def encode(self, messages, root, **kw):
        if failing["on"] and not kw.get("prompt_only"):
            raise OSError("unreadable media")                 # every sample of the first micro-batch
        return real_encode(self, messages, root, **kw)

    def pack(samples):
        out = real_pack(samples)
        failing["on"] = False
        return out

    monkeypatch.setattr(ChatEncoder, "encode", encode)
    monkeypatch.setattr(data_mod, "pack_samples", pack)
    res = train(small_config(data, tmp_path, train={"steps": 2}))
    assert [h["step"] for h in res["history"]] == [1, 2]
    assert res["dropped_batches"] == 1


def test_resume_is_bit_exact_with_random_layers(data, tmp_path):
    """LoRA dropout draws from the global RNG every step: a resumed run must draw the same masks."""
    over = {"steps": 4, "save_every": 2, "mode": "lora", "lora": {"dropout": 0.1, "r": 4}}
    full = train(small_config(data, tmp_path / "a", train=over))
    part = train(small_config(data, tmp_path / "b", train={**over, "stop_after_steps": 2}))
    rest = train(small_config(data, tmp_path / "b", train=over))
    assert [h["step"] for h in rest["history"]] == [3, 4]
    assert _losses(part) + _losses(rest) == _losses(full)
    pa, pb = params_snapshot(full["model"]), params_snapshot(rest["model"])
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_resume_falls_back_past_a_corrupted_latest_checkpoint(data, tmp_path):
    over = {"steps": 3, "save_every": 1, "keep_last": 3}
    first = train(small_config(data, tmp_path, train=over))
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root).name == "step-00000003"
    p = root / "step-00000003" / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))
    again = train(small_config(data, tmp_path, train=over))            # resume=auto: step 3 fails its check
    assert [h["step"] for h in again["history"]] == [3]
    assert _losses(again) == _losses(first)[2:]
    verify_checkpoint(root / "step-00000003")                          # rewritten by the resumed run
    with pytest.raises(CheckpointError, match="state.json"):           # a checkpoint named explicitly: no fallback
        (root / "step-00000002" / "state.json").write_text("{}")
        train(small_config(data, tmp_path, train={**over, "resume": str(root / "step-00000002")}))
