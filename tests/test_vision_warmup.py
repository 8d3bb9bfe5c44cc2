"""The vision warm-up stage (train/vision_warmup.py): patch-column features in reading order, CTC best-path
decoding, the stage trains only the vision tower and its loss falls, and the trainer runs it on fresh starts only;
kind=grounding: per-patch labels of hand-made scenes, in the processor's patch order, its loss falls, and its
settings and missing layouts are refused with errors naming the field or the line."""
import numpy as np
import pytest
import torch

from model.build import build_model
from model.processing import preprocess_image
from train.config import ConfigError
from train.data import ChatEncoder, SFTDataset
from train.trainer import train
from train.grounding_data import ITEM_CLASSES
from train.vision_warmup import CTCHead, column_features, layout_targets, patch_labels, vision_warmup

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
    assert "vision warm-up" not in capsys.readouterr().out
    assert res["vision_warmup"]["history"] == first["vision_warmup"]["history"]  # carried by the checkpoint


def test_a_run_cut_before_its_first_step_keeps_the_warm_up(data, tmp_path, capsys, monkeypatch):
    """The warmed-up tower is saved as a step-0 checkpoint: a run that dies in its first training step resumes
    from it, with the same tower weights and without a second warm-up."""
    import train.trainer as trainer

    over = {"steps": 2, "save_every": 2, "vision_warmup": {"steps": 3, "batch_size": 4, "log_every": 1}}
    real_step = trainer.train_step
    seen = {}

    def dies(model, *a, **k):
        seen["first"] = params_snapshot(model.model.visual)
        raise RuntimeError("killed")

    monkeypatch.setattr(trainer, "train_step", dies)
    with pytest.raises(RuntimeError, match="killed"):
        train(small_config(data, tmp_path, train=over))
    assert capsys.readouterr().out.count("vision warm-up") == 3

    def records(model, *a, **k):
        seen.setdefault("resumed", params_snapshot(model.model.visual))
        return real_step(model, *a, **k)

    monkeypatch.setattr(trainer, "train_step", records)
    res = train(small_config(data, tmp_path, train=over))
    out = capsys.readouterr().out
    assert "vision warm-up" not in out and "at step 0" in out
    assert [h["step"] for h in res["history"]] == [1, 2] and len(res["vision_warmup"]["history"]) == 3
    for name, p in seen["first"].items():
        torch.testing.assert_close(seen["resumed"][name], p, rtol=0, atol=0, msg=name)


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


# ----------------------------------------------------------------------------------------------- kind=grounding
def _item(cls, box):
    return {"class": cls, "box_px": list(box)}


def test_patch_labels_of_a_hand_made_scene():
    """64 x 64 image on a 4 x 4 patch grid: patch centres at 8, 24, 40, 56 px on both axes."""
    items = [_item("red square", (0, 0, 30, 30)),        # centres x, y in {8, 24}: the top-left 2 x 2 patches
             _item("green triangle", (20, 20, 40, 40)),  # drawn later, on top: takes the centre (24, 24) only
             _item("7", (36, 44, 60, 62)),               # x in {40, 56}, y = 56: two patches of the bottom row
             _item("blue circle", (20, 36, 23, 39))]     # holds no centre: the patch of its centre (21.5, 37.5)
    labels, boxes = patch_labels(items, (64, 64), (4, 4))
    S, T, D, C = (ITEM_CLASSES.index(n) for n in ("red square", "green triangle", "7", "blue circle"))
    assert ITEM_CLASSES[0] == "background" and len(set((S, T, D, C))) == 4 and min(S, T, D, C) > 0
    expected = torch.tensor([[S, S, 0, 0],
                             [S, T, 0, 0],
                             [0, C, 0, 0],
                             [0, 0, D, D]])
    assert torch.equal(labels, expected), labels
    torch.testing.assert_close(boxes[0, 1], torch.tensor([0, 0, 30 / 64, 30 / 64]))
    torch.testing.assert_close(boxes[1, 1], torch.tensor([20 / 64, 20 / 64, 40 / 64, 40 / 64]))
    torch.testing.assert_close(boxes[3, 3], torch.tensor([36 / 64, 44 / 64, 60 / 64, 62 / 64]))
    assert not boxes[labels == 0].any()


def test_patch_labels_scale_each_axis_by_the_grid():
    """96 x 64 image on 2 rows x 3 columns of patches: centres at x = 16, 48, 80 and y = 16, 48."""
    labels, boxes = patch_labels([_item("3", (40, 0, 96, 30))], (96, 64), (2, 3))
    three = ITEM_CLASSES.index("3")
    assert torch.equal(labels, torch.tensor([[0, three, three],
                                             [0, 0, 0]]))
    torch.testing.assert_close(boxes[0, 2], torch.tensor([40 / 96, 0, 1, 30 / 64]))
    with pytest.raises(ValueError, match="unknown item class 'purple square'"):
        patch_labels([_item("purple square", (0, 0, 9, 9))], (96, 64), (2, 3))


def test_layout_targets_follow_the_processors_patch_order():
    """Through the real image processor: a dark box on a white image; the patches labelled as the item are exactly
    the dark patches of pixel_values, in the order the tower reads them."""
    h, w = 64, 96
    img = np.full((h, w, 3), 255, np.uint8)
    img[16:48, 48:80] = 0                                   # patches (rows 1-2, cols 3-4) of 16 px
    pixels, grid = preprocess_image(img, size=(h, w))
    labels, boxes = layout_targets([{"items": [_item("5", (48, 16, 80, 48))], "size": [w, h]}],
                                   torch.tensor([grid]), merge=2)
    dark = pixels.mean(-1) < 0
    assert labels.shape == (h // 16 * w // 16,) and int(dark.sum()) == 4
    assert torch.equal(labels > 0, dark)
    torch.testing.assert_close(boxes[dark], torch.tensor([[0.5, 0.25, 80 / 96, 0.75]]).expand(4, 4))


@pytest.fixture(scope="module")
def grounding_set(tmp_path_factory):
    from train.config import GroundingGenConfig
    from train.grounding_data import generate_grounding_dataset

    cfg = GroundingGenConfig(enabled=True, n_train=32, n_val=2, width=64, height=64, grid=(2, 2), objects=(2, 3),
                             kinds=("attribute", "digit"), clutter=2)
    return generate_grounding_dataset(cfg, out_dir=str(tmp_path_factory.mktemp("grounding")))


def test_grounding_warmup_trains_only_the_tower_and_its_loss_falls(grounding_set, tmp_path):
    cfg = small_config(grounding_set, tmp_path, data={"max_seq_len": 128, "token_budget": 256},
                       train={"vision_warmup": {"kind": "grounding", "steps": 30, "batch_size": 16, "lr": 3e-3}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    from model import load_processor

    ds = SFTDataset(grounding_set["train"], ChatEncoder(load_processor(None), model.config, cfg.data),
                    max_seq_len=128)
    before = params_snapshot(model)
    res = vision_warmup(model, ds, cfg.train.vision_warmup, torch.device("cpu"), log=lambda *_: None)
    hist = res["history"]
    assert res["kind"] == "grounding" and len(hist) == 30
    assert np.mean(hist[-5:]) < 0.7 * np.mean(hist[:5]), hist
    for n, p in params_snapshot(model).items():
        tower = n.startswith("model.visual.") and not n.startswith(("model.visual.merger.",
                                                                    "model.visual.deepstack_merger_list."))
        if tower and n.endswith(("blocks.1.mlp.linear_fc2.weight", "patch_embed.proj.weight")):
            assert not torch.equal(p, before[n]), n
        if not tower:
            assert torch.equal(p, before[n]), f"{n} is outside the vision tower but changed in the warm-up"


def test_grounding_warmup_settings_are_validated():
    from train.config import VisionWarmupConfig

    with pytest.raises(ConfigError, match=r"train.vision_warmup.kind='boxes'.*ctc \| grounding"):
        VisionWarmupConfig(kind="boxes")
    with pytest.raises(ConfigError, match="train.vision_warmup.box_weight"):
        VisionWarmupConfig(kind="grounding", box_weight=-1.0)
    paths = {"train": "t.jsonl", "val": "v.jsonl"}
    with pytest.raises(ConfigError, match="train.vision_warmup.kind='ctc'.*grounding with data.grounding.enabled"):
        small_config(paths, "run", data={"grounding": {"enabled": True}}, train={"vision_warmup": {"steps": 5}})
    with pytest.raises(ConfigError, match="train.vision_warmup.kind='grounding'.*ctc with data.ocr.enabled"):
        small_config(paths, "run", data={"ocr": {"enabled": True}},
                     train={"vision_warmup": {"steps": 5, "kind": "grounding"}})
    # off (steps 0): any pairing is accepted
    small_config(paths, "run", data={"grounding": {"enabled": True}}, train={"vision_warmup": {"steps": 0}})


def test_grounding_warmup_on_records_without_a_layout_names_the_line(data, tmp_path):
    """The OCR set's records carry no meta.items: the error names the file and the first line."""
    cfg = small_config(data, tmp_path, train={"vision_warmup": {"kind": "grounding", "steps": 2, "batch_size": 2}})
    with pytest.raises(ValueError, match=r"meta.items.*train.jsonl:1 has none"):
        train(cfg)
