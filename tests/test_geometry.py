"""The geometry planner, patchify, `file://` paths and the preprocessor config files (model/processing/).

- The planner (model/processing/geometry.py) must agree with what the processor actually produces: plans made from
  image headers / container metadata alone against the grids, frame indices, sizes, timestamps and token counts of
  real preprocessing, for awkward sizes (tiny, odd, extreme aspect ratio) and per-item options.
- patchify is checked against a hand-written loop over rows (exact: the same fp32 (x - m) / s per element) and
  inverted back to the frames.
- Config files written by the processor load back through `load_processor` and through transformers'
  Auto*Processor with the same geometry and the same pixels.
Random inputs come from generators seeded with the fixed SEED below.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from model.processing import (OFFICIAL_IMAGE_CONFIG, OFFICIAL_VIDEO_CONFIG, Qwen3VLProcessor, VisionPreprocessConfig,
                              load_processor, local_path, patchify, plan_image, plan_video, preprocess_video,
                              probe_video)
from tests.test_video import write_video

SEED = 1234
IMAGE_SIZES = [(5, 7), (31, 33), (123, 457), (300, 41), (17, 1500), (257, 255), (1000, 999)]  # (h, w)
IMAGE_OPTIONS = [{}, {"min_pixels": 2048, "max_pixels": 30000}, {"min_pixels": 1024, "max_pixels": 4096},
                 {"resized_height": 70, "resized_width": 200}]
# (width, height, fps, seconds, codec): tiny (below one factor), odd sizes, a long thin one.
VIDEOS = {"20x12-tiny": (20, 12, 10, 1.0, "mpeg4"), "75x51-odd": (75, 51, 25, 1.3, "mpeg4"),
          "250x36-thin": (250, 36, 30, 2.1, "mpeg4"), "98x62-x264": (98, 62, 30, 2.5, "libx264")}
VIDEO_OPTIONS = [{}, {"fps": 3.3}, {"nframes": 5}, {"video_start": 0.2, "video_end": 0.9},
                 {"min_pixels": 1024, "max_pixels": 20000}, {"cap_pixels_per_frame": True, "max_video_tokens": 8},
                 {"resized_height": 40, "resized_width": 70}]


def _png(path, h, w, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def proc():
    return load_processor(None)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("geometry_videos")
    return {name: write_video(d / f"{name}.mp4", *spec) for name, spec in VIDEOS.items()}


@pytest.mark.parametrize("opts", IMAGE_OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("hw", IMAGE_SIZES, ids=[f"{h}x{w}" for h, w in IMAGE_SIZES])
def test_image_plan_matches_preprocessing(proc, tmp_path, hw, opts):
    path = _png(tmp_path / "img.png", *hw, SEED)
    plan = proc.plan_image(path, opts)  # header only
    assert plan == plan_image(*hw, proc.image_config, opts)
    pixels, grid = proc.process_image(path, opts)
    assert tuple(grid) == plan.grid_thw
    assert plan.grid_thw == (1, plan.size[0] // 16, plan.size[1] // 16)
    assert pixels.shape == (int(np.prod(plan.grid_thw)), 1536)


VIDEO_CASES = [(rule, o) for rule in ("transformers", "qwen-vl-utils") for o in VIDEO_OPTIONS
               if rule == "transformers" or "cap_pixels_per_frame" not in o]  # the cap is a transformers option


@pytest.mark.parametrize("rule,opts", VIDEO_CASES, ids=[f"{r}-{','.join(o) or 'default'}" for r, o in VIDEO_CASES])
@pytest.mark.parametrize("name", list(VIDEOS))
def test_video_plan_matches_preprocessing(videos, name, opts, rule):
    meta = probe_video(videos[name])
    plan = plan_video(meta, OFFICIAL_VIDEO_CONFIG, rule=rule, options=opts)
    feats = preprocess_video(videos[name], OFFICIAL_VIDEO_CONFIG, rule=rule, options=opts)
    assert feats.frame_indices == plan.frame_indices
    assert feats.frame_size == plan.size
    assert feats.grid_thw == plan.grid_thw
    assert feats.timestamps == plan.timestamps
    assert feats.pixel_values.shape == (int(np.prod(plan.grid_thw)), 1536)


@pytest.mark.parametrize("layout", ["release", "transformers5"])
@pytest.mark.parametrize("rule", ["transformers", "qwen-vl-utils"])
def test_count_tokens_equals_encoded_length(proc, videos, tmp_path, rule, layout):
    """count_tokens (headers / metadata only) == len(input_ids) of real preprocessing, media of every kind."""
    p = Qwen3VLProcessor(proc.tokenizer, video_rule=rule, video_layout=layout, max_frames=8)
    rng = np.random.default_rng(SEED)
    frames = [rng.integers(0, 256, (45, 70, 3), dtype=np.uint8) for _ in range(3)]
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "image", "image": _png(tmp_path / "a.png", 17, 1500, 1)}, {"type": "text", "text": "and"},
                {"type": "image", "image": rng.integers(0, 256, (31, 33, 3), dtype=np.uint8), "min_pixels": 1024,
                 "max_pixels": 4096},
                {"type": "video", "video": videos["75x51-odd"], "fps": 3.3},
                {"type": "video", "video": videos["20x12-tiny"]},
                {"type": "video", "video": frames, "timestamps": [0.0, 0.7, 1.1]}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "Noise."}]
    for gen in (False, True):
        ids = p.process_conversation(conv, add_generation_prompt=gen)["input_ids"]
        assert p.count_tokens(conv, add_generation_prompt=gen) == ids.numel()


# --- patchify -----------------------------------------------------------------------------------------------------
def _reference_rows(frames, cfg):
    """Hand-written row order: temporal group, merge block (row-major), patch in block (row-major); row (C, t, p, p)."""
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    t, c, h, w = frames.shape
    frames = torch.cat([frames, frames[-1:].repeat(-t % tp, 1, 1, 1)])
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)[:, None, None, None] * 255.0
    std = torch.tensor(cfg.image_std, dtype=torch.float32)[:, None, None, None] * 255.0
    rows = []
    for g in range(frames.shape[0] // tp):
        for bh in range(h // (p * m)):
            for bw in range(w // (p * m)):
                for i in range(m):
                    for j in range(m):
                        y, x = (bh * m + i) * p, (bw * m + j) * p
                        block = frames[g * tp:(g + 1) * tp, :, y:y + p, x:x + p].permute(1, 0, 2, 3).float()
                        rows.append(((block - mean) / std).reshape(-1))
    return torch.stack(rows)


def _unpatchify(rows, grid, cfg, channels=3):
    """Inverse of the hand-written order: rows back to (T, C, H, W) frames."""
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gt, gh, gw = grid
    out = torch.empty(gt * tp, channels, gh * p, gw * p)
    r = 0
    for g in range(gt):
        for bh in range(gh // m):
            for bw in range(gw // m):
                for i in range(m):
                    for j in range(m):
                        y, x = (bh * m + i) * p, (bw * m + j) * p
                        out[g * tp:(g + 1) * tp, :, y:y + p, x:x + p] = rows[r].view(channels, tp, p, p).transpose(0, 1)
                        r += 1
    return out


CONFIGS = {"official": OFFICIAL_VIDEO_CONFIG,
           "p14-m2-t2-imagenet": VisionPreprocessConfig(1, 1 << 30, 14, 2, 2, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
           "p8-m1-t3": VisionPreprocessConfig(1, 1 << 30, 8, 3, 1)}


@pytest.mark.parametrize("n_frames", [1, 2, 5])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_patchify_matches_hand_written_reference_and_inverts(cfg_name, n_frames):
    cfg = CONFIGS[cfg_name]
    g = torch.Generator().manual_seed(SEED)
    h, w = 3 * cfg.factor, 2 * cfg.factor
    frames = torch.randint(0, 256, (n_frames, 3, h, w), generator=g, dtype=torch.uint8)
    rows, grid = patchify(frames, cfg)
    assert grid == (-(-n_frames // cfg.temporal_patch_size), h // cfg.patch_size, w // cfg.patch_size)
    ref = _reference_rows(frames, cfg)
    torch.testing.assert_close(rows, ref, rtol=0, atol=0)
    # Chunking is memory only; float input on the 0..255 scale gives the same rows.
    torch.testing.assert_close(patchify(frames, cfg, groups_per_chunk=1)[0], rows, rtol=0, atol=0)
    torch.testing.assert_close(patchify(frames.float(), cfg)[0], rows, rtol=0, atol=0)
    # Round trip: the rows hold every (padded) frame pixel once, normalised.
    back = _unpatchify(rows, grid, cfg)
    mean = torch.tensor(cfg.image_mean)[:, None, None] * 255.0
    std = torch.tensor(cfg.image_std)[:, None, None] * 255.0
    restored = (back * std + mean).round().to(torch.uint8)
    padded = torch.cat([frames, frames[-1:].repeat(-n_frames % cfg.temporal_patch_size, 1, 1, 1)])
    assert torch.equal(restored, padded)


def test_patchify_refuses_sizes_off_the_grid():
    with pytest.raises(ValueError, match="not a multiple of patch\\*merge = 32"):
        patchify(torch.zeros(2, 3, 48, 64, dtype=torch.uint8), OFFICIAL_IMAGE_CONFIG)


# --- file:// ------------------------------------------------------------------------------------------------------
def test_file_scheme_is_stripped_everywhere(proc, videos, tmp_path):
    from train.data import _resolve

    path = _png(tmp_path / "f.png", 40, 90, 2)
    assert local_path("file://" + path) == path and local_path(path) == path
    assert local_path(tmp_path / "f.png") == path  # PathLike
    assert local_path("files/x.png") == "files/x.png"  # only the scheme prefix is special
    img = proc(messages=[[{"role": "user", "content": [{"type": "image", "image": path}]}]])
    uri = proc(messages=[[{"role": "user", "content": [{"type": "image", "image": "file://" + path}]}]])
    assert all(torch.equal(img[k], uri[k]) for k in img)
    assert proc.plan_image("file://" + path) == proc.plan_image(path)
    vid = proc.process_video(videos["75x51-odd"])
    vid_uri = proc.process_video("file://" + videos["75x51-odd"])
    assert torch.equal(vid.pixel_values, vid_uri.pixel_values) and vid.timestamps == vid_uri.timestamps
    assert proc.plan_video("file://" + videos["75x51-odd"]).grid_thw == vid.grid_thw
    # Dataset paths: file:// absolute paths stay absolute (when paths outside the root are allowed), relative
    # ones join the dataset root.
    assert _resolve("/data", "file://" + path, allow_outside_root=True) == path
    with pytest.raises(ValueError, match="outside the dataset root"):
        _resolve("/data", "file://" + path)
    assert _resolve("/data", "file://imgs/a.png") == os.path.join("/data", "imgs/a.png")
    assert _resolve("/data", "imgs/a.png") == os.path.join("/data", "imgs/a.png")


# --- preprocessor config files ------------------------------------------------------------------------------------
def _checkpoint_dir(tmp_path):
    from model.processing.tokenizer import default_tokenizer_json_path

    (tmp_path / "tokenizer.json").write_text(default_tokenizer_json_path().read_text())
    return tmp_path


def test_written_configs_round_trip(proc, tmp_path):
    ckpt = _checkpoint_dir(tmp_path)
    image_cfg = VisionPreprocessConfig(3136, 40000, 16, 2, 2, (0.48, 0.45, 0.4), (0.26, 0.26, 0.27))
    video_cfg = VisionPreprocessConfig(2048, 300000, 16, 2, 2, (0.48, 0.45, 0.4), (0.26, 0.26, 0.27))
    # A copied source config with a key we do not own, and a legacy budget key that `size` replaces.
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor",
                                                               "max_pixels": 5}))
    p = Qwen3VLProcessor(proc.tokenizer, image_cfg, video_cfg, fps=1.5, min_frames=2, max_frames=12)
    p.save_preprocessor_configs(ckpt)
    q = load_processor(ckpt)
    assert (q.image_config, q.video_config) == (image_cfg, video_cfg)
    assert (q.fps, q.min_frames, q.max_frames) == (1.5, 2, 12)
    written = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert written["processor_class"] == "Qwen3VLProcessor" and "max_pixels" not in written
    # transformers reads the same files with the same geometry: same grid and pixels for an awkward image.
    from transformers import AutoImageProcessor, AutoVideoProcessor

    img = np.random.default_rng(SEED).integers(0, 256, (301, 517, 3), dtype=np.uint8)
    ref = AutoImageProcessor.from_pretrained(ckpt)(images=[img], return_tensors="pt")
    pixels, grid = q.process_image(img)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(pixels, ref["pixel_values"], rtol=0, atol=0)
    vp = AutoVideoProcessor.from_pretrained(ckpt)
    assert (vp.size.shortest_edge, vp.size.longest_edge) == (2048, 300000)
    assert (vp.fps, vp.min_frames, vp.max_frames, vp.patch_size, vp.merge_size) == (1.5, 2, 12, 16, 2)


def test_nested_processor_config_is_updated(proc, tmp_path):
    """transformers 5 checkpoints may hold processor_config.json, which load_processor reads first."""
    ckpt = _checkpoint_dir(tmp_path)
    nested = {"processor_class": "Qwen3VLProcessor", "image_processor": OFFICIAL_IMAGE_CONFIG.to_dict("image"),
              "video_processor": OFFICIAL_VIDEO_CONFIG.to_dict("video")}
    (ckpt / "processor_config.json").write_text(json.dumps(nested))
    small = VisionPreprocessConfig(1024, 8192)
    Qwen3VLProcessor(proc.tokenizer, small, small, max_frames=6).save_preprocessor_configs(ckpt)
    q = load_processor(ckpt)
    assert (q.image_config, q.video_config, q.max_frames) == (small, small, 6)
    assert json.loads((ckpt / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"


def test_training_export_writes_the_training_budgets(tmp_path):
    """train/export.py: load_processor(dst) preprocesses with the data config's budgets and sampling."""
    from model import preset
    from train.config import DataConfig
    from train.data import ChatEncoder
    from train.export import write_preprocessor_configs

    ckpt = _checkpoint_dir(tmp_path)
    data = DataConfig(image_min_pixels=32 * 32, image_max_pixels=64 * 32 * 32, video_min_pixels=4 * 32 * 32,
                      video_max_pixels=64 * 32 * 32, video_fps=1.0, video_max_frames=3)
    write_preprocessor_configs(data, ckpt)
    exported, trained = load_processor(ckpt), ChatEncoder(load_processor(None), preset("tiny"), data).proc
    assert (exported.image_config, exported.video_config) == (trained.image_config, trained.video_config)
    assert (exported.fps, exported.min_frames, exported.max_frames) == (trained.fps, trained.min_frames,
                                                                       trained.max_frames) == (1.0, 3, 3)
