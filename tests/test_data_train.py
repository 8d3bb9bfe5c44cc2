"""Training data pipeline (train/data.py, train/ocr_data.py): formats, broken lines, exact lengths, packing,
seeded length-grouped batching and resumable streams, and the synthetic OCR generator."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from model import load_processor, preset
from model.positions import get_rope_index
from train.config import DataConfig, OCRGenConfig
from train.data import (BatchStream, ChatEncoder, DataError, PackedBatchSampler, SFTDataset, pack_samples,
                        to_messages)
from train.loss import IGNORE_INDEX
from eval.metrics import character_error_rate
from train.ocr_data import generate_ocr_dataset

CFG = preset("tiny")
DATA = DataConfig(image_min_pixels=32 * 32, image_max_pixels=64 * 32 * 32, video_min_pixels=4 * 32 * 32,
                  video_max_pixels=64 * 32 * 32, video_max_frames=6)


@pytest.fixture(scope="module")
def encoder():
    return ChatEncoder(load_processor(None), CFG, DATA)


def _image(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _video(path, n=9, w=80, h=48):
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(n):
            for pkt in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                                                           format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    _image(d / "a.png", 70, 45, 0)      # awkward, non-square sizes
    _image(d / "b.png", 33, 131, 1)
    return d


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_llava_and_messages_give_identical_samples(encoder, media):
    msgs = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "\nWhat is "},
                                     {"type": "image", "image": "b.png"}, {"type": "text", "text": " here?"}]},
        {"role": "assistant", "content": "Two pictures."},
        {"role": "user", "content": "And colours?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Random."}]}]}
    llava = {"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is <image> here?"}, {"from": "gpt", "value": "Two pictures."},
        {"from": "human", "value": "And colours?"}, {"from": "gpt", "value": "Random."}]}
    a = encoder.encode(to_messages(msgs), str(media))
    b = encoder.encode(to_messages(llava), str(media))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.pixel_values, b.pixel_values) and a.image_grid_thw.tolist() == b.image_grid_thw.tolist()
    tok = encoder.tok
    # labels: both assistant answers + <|im_end|> + "\n", nothing from the user turns
    assert tok.decode(a.labels[a.labels != IGNORE_INDEX]) == "Two pictures.<|im_end|>\nRandom.<|im_end|>\n"
    # per-sample position ids are get_rope_index on the sample alone
    pos, _ = get_rope_index(a.input_ids[None], a.image_grid_thw, None, config=CFG)
    assert torch.equal(a.position_ids, pos[:, 0])


def test_lengths_are_exact_without_decoding(encoder, media, tmp_path):
    _video(media / "v.mp4")
    recs = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "x"}]},
                      {"role": "assistant", "content": "y"}]},
        {"image": "b.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "1 2 3"}]},
        {"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>Describe."},
                                             {"from": "gpt", "value": "noise"}]},
    ]
    _write(tmp_path / "d.jsonl", recs)
    ds = SFTDataset(str(tmp_path / "d.jsonl"), encoder, root=str(media))
    assert len(ds) == 3 and not ds.broken
    for i in range(3):
        e = ds[i]
        assert e.input_ids.numel() == ds.lengths[i]
    v = ds[2]
    assert v.video_grid_thw is not None and v.pixel_values_videos.shape[0] == int(v.video_grid_thw.prod())
    assert "seconds>" in encoder.tok.decode(v.input_ids)


def test_broken_lines_are_reported_with_line_numbers(encoder, media, tmp_path):
    good = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                         {"role": "assistant", "content": "ok"}]}
    lines = [good, "{not json", {"messages": [{"role": "robot", "content": "x"}]},
             {"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]},
                           {"role": "assistant", "content": "x"}]},
             {"messages": [{"role": "user", "content": "only a question"}]},
             {"image": ["a.png"], "conversations": [{"from": "human", "value": "<image><image>"},
                                                    {"from": "gpt", "value": "x"}]},
             good]
    _write(tmp_path / "d.jsonl", lines)
    ds = SFTDataset(str(tmp_path / "d.jsonl"), encoder, root=str(media), on_error="skip")
    assert len(ds) == 2
    assert [ln for ln, _ in ds.broken] == [2, 3, 4, 5, 6]
    reasons = dict(ds.broken)
    assert "robot" in reasons[3] and "missing.png" in reasons[4] and "assistant" in reasons[5]
    with pytest.raises(DataError, match=r"d\.jsonl:2: "):
        SFTDataset(str(tmp_path / "d.jsonl"), encoder, root=str(media), on_error="raise")
    _write(tmp_path / "long.jsonl", [good])
    with pytest.raises(DataError, match="max_seq_len"):
        SFTDataset(str(tmp_path / "long.jsonl"), encoder, root=str(media), max_seq_len=5, on_error="raise")


def test_pack_samples_keeps_samples_apart(encoder, media, tmp_path):
    recs = [{"messages": [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]},
                          {"role": "assistant", "content": a}]}
            for im, q, a in (("a.png", "q1", "answer one"), ("b.png", "second?", "2"), ("a.png", "", "three 3 3"))]
    _write(tmp_path / "d.jsonl", recs)
    ds = SFTDataset(str(tmp_path / "d.jsonl"), encoder, root=str(media))
    samples = [ds[i] for i in range(3)]
    b = pack_samples(samples + [None])
    lens = [s.input_ids.numel() for s in samples]
    assert b["n_dropped"] == 1 and b["cu_seqlens"].tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert b["cu_seqlens"].dtype == torch.int32 and b["input_ids"].shape == (1, sum(lens))
    # model's packed position ids (restart per document) == per-sample ids concatenated
    pos, _ = get_rope_index(b["input_ids"], b["image_grid_thw"], None, config=CFG, cu_seqlens=b["cu_seqlens"])
    assert torch.equal(pos, b["position_ids"])
    # targets shifted inside each sample; the last token of every sample predicts nothing
    for s, (lo, hi) in zip(samples, zip(b["cu_seqlens"][:-1].tolist(), b["cu_seqlens"][1:].tolist())):
        assert torch.equal(b["labels"][0, lo:hi - 1], s.labels[1:]) and b["labels"][0, hi - 1] == IGNORE_INDEX
    assert b["pixel_values"].shape[0] == sum(s.pixel_values.shape[0] for s in samples)


def test_sampler_budget_coverage_determinism():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (257,), generator=g).tolist()
    s = PackedBatchSampler(lengths, 300, seed=3, group_size=4)
    e0, e0b, e1 = s.batches(0), s.batches(0), s.batches(1)
    assert e0 == e0b and e0 != e1
    for batches in (e0, e1):
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(257))
        assert all(sum(lengths[i] for i in b) <= 300 for b in batches)
    # length grouping (first-fit decreasing over a window) packs tighter than greedy in random order
    plain = PackedBatchSampler(lengths, 300, seed=3, length_grouping=False).batches(0)
    grouped = PackedBatchSampler(lengths, 300, seed=3, group_size=64).batches(0)
    assert len(grouped) < len(plain)
    assert PackedBatchSampler(lengths, 300, seed=4, group_size=4).batches(0) != e0
    with pytest.raises(DataError, match="exceed the token budget"):
        PackedBatchSampler([10, 400], 300)
    assert all(len(b) <= 3 for b in PackedBatchSampler(lengths, 300, max_samples=3).batches(0))


class _Toy(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from train.data import Encoded

        ids = torch.full((3 + i % 4,), i)
        return Encoded(ids, ids.clone(), torch.zeros(3, ids.numel(), dtype=torch.long), index=i)


@pytest.mark.parametrize("workers", [0, 2], ids=["inline", "2-workers"])
def test_batch_stream_resumes_exactly_and_splits_ranks(workers):
    ds = _Toy(40)
    sampler = PackedBatchSampler([3 + i % 4 for i in range(40)], 12, seed=1)
    full = BatchStream(ds, sampler, grad_accum=2, num_workers=workers)
    seq = [next(full)["indices"].tolist() for _ in range(30)]  # crosses an epoch boundary
    first = BatchStream(ds, sampler, grad_accum=2)
    for _ in range(7):
        next(first)
    resumed = BatchStream(ds, sampler, grad_accum=2, num_workers=workers, **first.position)
    assert [next(resumed)["indices"].tolist() for _ in range(23)] == seq[7:]
    # two ranks together see what one rank sees, interleaved
    r0 = BatchStream(ds, sampler, rank=0, world=2, grad_accum=1)
    r1 = BatchStream(ds, sampler, rank=1, world=2, grad_accum=1)
    inter = [x for _ in range(5) for x in (next(r0)["indices"].tolist(), next(r1)["indices"].tolist())]
    assert inter == seq[:10]


def test_ocr_generator_is_seeded(tmp_path):
    cfg = OCRGenConfig(n_train=6, n_val=3, seed=5, charset="mixed", min_len=3, max_len=12)
    p1 = generate_ocr_dataset(cfg, out_dir=str(tmp_path / "a"))
    p2 = generate_ocr_dataset(cfg, out_dir=str(tmp_path / "b"))
    p3 = generate_ocr_dataset(OCRGenConfig(n_train=6, n_val=3, seed=6, charset="mixed", min_len=3, max_len=12),
                              out_dir=str(tmp_path / "c"))
    t1 = open(p1["train"]).read()
    assert t1 == open(p2["train"]).read() and t1 != open(p3["train"]).read()
    assert open(p1["val"]).read() != t1
    for i in range(6):
        a = tmp_path / "a" / "images" / f"train_{i:06d}.png"
        assert a.read_bytes() == (tmp_path / "b" / "images" / f"train_{i:06d}.png").read_bytes()
    rec = json.loads(t1.splitlines()[0])
    im = Image.open(tmp_path / "a" / rec["messages"][0]["content"][0]["image"])
    assert im.size == (cfg.width, cfg.height) and np.asarray(im).std() > 5  # something was drawn
    # reuse: same config -> files untouched
    mtime = os.path.getmtime(p1["train"])
    generate_ocr_dataset(cfg, out_dir=str(tmp_path / "a"))
    assert os.path.getmtime(p1["train"]) == mtime


def test_character_error_rate():
    assert character_error_rate(["abc", "12"], ["abd", "123"]) == pytest.approx(2 / 6)
    assert character_error_rate(["kitten"], ["sitting"]) == pytest.approx(3 / 7)
    assert character_error_rate([""], ["abc"]) == 1.0
    with pytest.raises(ValueError):
        character_error_rate(["a"], [])


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels (grayscale) and whose data is one empty IDAT."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def _frameless_mp4(path):
    """An mp4 whose moov header lists 9 frames, cut right after it: no frame data at all."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 80, 48, "yuv420p"
        for _ in range(9):
            for pkt in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8),
                                                           format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    data = path.read_bytes()
    path.write_bytes(data[:data.find(b"mdat") + 4])


def test_every_bad_line_is_a_skipped_data_error(encoder, media, tmp_path):
    _png_header_only(media / "bomb.png", 40000, 40000)          # 1.6 G pixels: PIL's decompression-bomb limit
    _frameless_mp4(media / "frameless.mp4")
    good = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                         {"role": "assistant", "content": "ok"}]}

    def user(item):
        return {"messages": [{"role": "user", "content": [item]}, {"role": "assistant", "content": "x"}]}

    lines = [good,
             user({"type": "image", "image": None}),                                   # 2: null media path
             user({"type": "image", "image": 7}),                                      # 3: non-string path
             user({"type": "video", "video": {"path": "v.mp4"}}),                      # 4
             {"messages": ["just a string", {"role": "assistant", "content": "x"}]},   # 5: message is a string
             {"conversations": ["human: hi", {"from": "gpt", "value": "x"}]},          # 6: turn is a string
             {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},  # 7
             user({"type": "image", "image": "bomb.png"}),                             # 8: decompression bomb
             user({"type": "video", "video": "frameless.mp4"}),                        # 9: frames listed, none held
             user({"type": "text", "text": None}),                                     # 10
             {"messages": {"role": "user"}},                                           # 11
             [1, 2],                                                                   # 12: not an object
             good]
    _write(tmp_path / "d.jsonl", lines)
    ds = SFTDataset(str(tmp_path / "d.jsonl"), encoder, root=str(media), on_error="skip")
    assert len(ds) == 2
    assert [ln for ln, _ in ds.broken] == list(range(2, 13)), ds.broken
    reasons = dict(ds.broken)
    assert "image must be a non-empty path string" in reasons[2] and "int" in reasons[3]
    assert "message 0 must be an object" in reasons[5] and "turn 0 must be an object" in reasons[6]
    assert "DecompressionBombError" in reasons[8] and "frameless.mp4" in reasons[9] and "0x0" in reasons[9]
    for lineno in range(2, 13):
        _write(tmp_path / "one.jsonl", [good, lines[lineno - 1]])
        with pytest.raises(DataError, match=rf"one\.jsonl:2: "):
            SFTDataset(str(tmp_path / "one.jsonl"), encoder, root=str(media), on_error="raise")


def test_a_sample_that_fails_at_load_time_is_dropped_and_counted(encoder, media, tmp_path, monkeypatch):
    recs = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                          {"role": "assistant", "content": str(i)}]} for i in range(3)]
    _write(tmp_path / "d.jsonl", recs)
    ds = SFTDataset(str(tmp_path / "d.jsonl"), encoder, root=str(media), on_error="skip")
    real = type(encoder).encode

    def encode(self, messages, root, **kw):
        if messages[-1]["content"][0]["text"] == "1":
            raise ZeroDivisionError("division by zero")     # any failure inside the media code
        return real(self, messages, root, **kw)

    monkeypatch.setattr(type(encoder), "encode", encode)
    assert ds[1] is None and ds[0] is not None
    assert pack_samples([ds[0], ds[1], ds[2]])["n_dropped"] == 1
    strict = SFTDataset(str(tmp_path / "d.jsonl"), encoder, root=str(media), on_error="raise")
    with pytest.raises(DataError, match=r"d\.jsonl:2: ZeroDivisionError"):
        strict[1]


def test_media_outside_the_dataset_root_are_refused_unless_allowed(media, tmp_path):
    import dataclasses
    import shutil

    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    shutil.copy(media / "a.png", root / "a.png")
    shutil.copy(media / "a.png", tmp_path / "secret.png")      # exists, but outside the root
    secret = str(tmp_path / "secret.png")

    def rec(path):
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": path}]},
                             {"role": "assistant", "content": "x"}]}

    outside = ["../secret.png", secret, "file://" + secret, "sub/../../secret.png", "../nothing-here.png",
               str(tmp_path / "nothing-here.png")]
    _write(root / "d.jsonl", [rec("a.png"), rec("sub/../a.png"), rec("file://a.png")] + [rec(p) for p in outside])
    enc = ChatEncoder(load_processor(None), CFG, DATA)
    ds = SFTDataset(str(root / "d.jsonl"), enc, on_error="skip")
    assert len(ds) == 3
    assert [ln for ln, _ in ds.broken] == [4, 5, 6, 7, 8, 9]
    for _, reason in ds.broken:
        assert "outside the dataset root" in reason and "allow_outside_root" in reason, reason
        # whether the file exists is not revealed: the path is refused before anything is looked up
        assert "not found" not in reason and "decode" not in reason
    allowed = ChatEncoder(load_processor(None), CFG, dataclasses.replace(DATA, allow_outside_root=True))
    ds = SFTDataset(str(root / "d.jsonl"), allowed, on_error="skip")
    assert len(ds) == 7 and [ln for ln, _ in ds.broken] == [8, 9]
    assert ds[3].pixel_values is not None
