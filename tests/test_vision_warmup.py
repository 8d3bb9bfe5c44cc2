"""The vision warm-up stage (train/vision_warmup.py): patch-column features in reading order, CTC best-path
decoding, the stage trains only the vision tower and its loss falls, and the trainer runs it on fresh starts only."""
import numpy as np
import pytest
import torch

from model.build import build_model
from model.processing import preprocess_image
from train.config import ConfigError
from train.data import ChatEncoder, SFTDataset
from train.trainer import train
from train.vision_warmup import CTCHead, column_features, vision_warmup

from .test_train_common import params_snapshot, small_config

pytestmark = pytest.mark.usefixtures("single_thread")


def test_column_features_follow_the_processors_patch_order():
    """Through the real image processor (merge-block patch order): an image whose brightness rises left to right
    gives strictly rising column means, and one that rises top to bottom gives equal column means."""
    h, w = 64, 192
    ramp_x = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1))
    ramp_y = np.tile(np.linspace(0, 255, h, dtype=np.float32)[:, None], (1, w))
    for ramp, rising in ((ramp_x, True), (ramp_y, False)):
        img = np.repeat(ramp[..., None], 3, axis=2).astype(np.uint8)
        pixels, grid = preprocess_image(img, size=(h, w))
        cols = column_features(pixels, torch.tensor([grid]), merge=2)[0].mean(-1)   # (w / 16,)
        assert cols.shape == (w // 16,)
        steps = cols[1:] - cols[:-1]
        if rising:
            assert bool((steps > 0.05).all()), cols
        else:
            torch.testing.assert_close(cols, cols.mean().expand_as(cols), atol=1e-4, rtol=0)


def test_column_features_average_frames_and_rows():
    """Merge-block order written out by explicit loops over (t, block row, block col, row in block, col in
    block); each column's feature must be the mean over frames and rows of that column."""
    t, h, w, m, d = 2, 4, 6, 2, 3
    raster = torch.randn(t, h, w, d)
    rows = [raster[ti, bh * m + mh, bw * m + mw] for ti in range(t) for bh in range(h // m)
            for bw in range(w // m) for mh in range(m) for mw in range(m)]
    got = column_features(torch.stack(rows), torch.tensor([[t, h, w]]), m)[0]
    torch.testing.assert_close(got, raster.mean(dim=(0, 1)))


def test_ctc_best_path_decoding():
    head = CTCHead(4, "0123456789")
    # columns: blank, 3, 3, blank, 3, 7, 7, blank -> "337" (repeats collapse only without a blank between)
    ids = [0, 4, 4, 0, 4, 8, 8, 0]
    logits = torch.full((len(ids), 11), -5.0)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = 5.0
    assert head.greedy(logits) == "337"
    assert head.targets("3a7") == [4, 8]  # characters outside the charset are skipped


def test_warmup_trains_only_the_vision_tower_and_its_loss_falls(data, tmp_path):
    cfg = small_config(data, tmp_path, train={"vision_warmup": {"steps": 40, "batch_size": 16, "lr": 3e-3}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    from model import load_processor

    ds = SFTDataset(data["train"], ChatEncoder(load_processor(None), model.config, cfg.data), max_seq_len=64)
    before = params_snapshot(model)
    res = vision_warmup(model, ds, cfg.train.vision_warmup, torch.device("cpu"), log=lambda *_: None)
    hist = res["history"]
    assert len(hist) == 40
    assert np.mean(hist[-5:]) < 0.8 * np.mean(hist[:5]), hist
    after = params_snapshot(model)
    for n, p in after.items():
        tower = n.startswith("model.visual.") and not n.startswith(("model.visual.merger.",
                                                                    "model.visual.deepstack_merger_list."))
        changed = not torch.equal(p, before[n])
        if tower and n.endswith(("blocks.1.mlp.linear_fc2.weight", "patch_embed.proj.weight")):
            assert changed, n
        if not tower:
            assert not changed, f"{n} is outside the vision tower but changed in the warm-up"


def test_trainer_warms_up_on_a_fresh_start_only(data, tmp_path, capsys):
    over = {"steps": 4, "save_every": 2, "vision_warmup": {"steps": 3, "batch_size": 4, "log_every": 1}}
    first = train(small_config(data, tmp_path, train={**over, "stop_after_steps": 2}))
    assert capsys.readouterr().out.count("vision warm-up") == 3
    assert len(first["vision_warmup"]["history"]) == 3  # also in result.json
    res = train(small_config(data, tmp_path, train=over))          # resumes at step 2: no second warm-up
    assert [h["step"] for h in res["history"]] == [3, 4]
    assert "vision warm-up" not in capsys.readouterr().out and res["vision_warmup"] is None


def test_warmup_with_a_frozen_tower_is_refused(data, tmp_path):
    cfg = small_config(data, tmp_path, train={"vision_warmup": {"steps": 3}, "freeze": {"vision": True}})
    with pytest.raises(ConfigError, match="vision tower is frozen"):
        train(cfg)


def test_warmup_on_text_only_samples_names_the_problem(tmp_path):
    import json

    path = tmp_path / "text.jsonl"
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say a number."}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "42"}]}]}
    path.write_text("\n".join(json.dumps(rec) for _ in range(4)) + "\n")
    cfg = small_config({"train": str(path), "val": str(path)}, tmp_path / "run",
                       train={"vision_warmup": {"steps": 2, "batch_size": 2}})
    with pytest.raises(ValueError, match="exactly one image.*text.jsonl"):
        train(cfg)


def test_forward_features_are_what_the_merger_reads():
    """VisionTower.forward_features (the warm-up's input) is the last block's output that forward merges."""
    from model import Qwen3VL, preset
    from tests.hf_reference import Sample, batch

    torch.manual_seed(0)
    tower = Qwen3VL(preset("tiny")).model.visual
    b = batch([Sample(torch.Generator().manual_seed(3)).text(2).image(4, 6).image(6, 4).text(2)])
    with torch.no_grad():
        feats = tower.forward_features(b["pixel_values"], b["image_grid_thw"])
        merged, levels = tower(b["pixel_values"], b["image_grid_thw"])
    assert feats.shape == (b["pixel_values"].shape[0], tower.cfg.hidden_size)
    torch.testing.assert_close(tower.merger(feats), merged, rtol=0, atol=0)
    assert len(levels) == len(tower.cfg.deepstack_visual_indexes)
