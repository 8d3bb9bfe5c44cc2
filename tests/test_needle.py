"""The needle suite (eval/niah.py, eval/tasks/, eval/answers.py, eval/haystack.py) against transparent fake models.

The fakes implement eval.scoring.NeedleModel (answer_hits, generate) and answer from what they can see:
- `Reader` finds which temporal groups hold a needle by comparing the prompt's pixel rows with each needle image
  preprocessed alone, then answers the number of the needle it wants (the asked one, or a distractor), or the time
  of its group as the prompt states it (the `<t seconds>` text, or counted from the sampling rate the question
  gives when the prompt has no timestamps); a passkey it reads from the prompt text.
- `PixelReader` knows nothing of the needle records: it rebuilds every temporal group's image from the pixel rows
  (inverse patchify + normalisation), finds the text frames (mostly white) and reads their numbers by template
  matching against digits rendered in the needle font, the text colour by its ink, and times from the prompt.
- `Fixed` always answers the same string.
So the expected scores (100%, 0%, chance) follow from the prompts alone, not from the code under test.
"""
from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange

from eval.answers import parse_number, parse_time
from eval.haystack import HaystackConfig
from eval.niah import NeedleConfig, run_needle
from model import load_processor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def proc():
    return load_processor(None)


class _Fake:
    """A NeedleModel that answers `self.say(case)`; teacher forcing checks its answer's tokens against the gold."""

    def __init__(self, proc):
        self.proc = proc

    def answer_hits(self, case, answer_ids):
        mine = self.proc.tokenizer.encode(self.say(case, teacher_forced=True))
        return [i < len(mine) and mine[i] == a for i, a in enumerate(answer_ids)]

    def generate(self, case, max_new_tokens):
        return self.say(case, teacher_forced=False)


class Reader(_Fake):
    """Reads the pixels (and the prompt text) to answer; `want`: "target" (the asked needle) or "distractor"."""

    def __init__(self, proc, want="target"):
        super().__init__(proc)
        self.want = want

    def needle_groups(self, case):
        """{group index: needle record} for every needle whose image is found in the prompt's pixel rows."""
        x = case.inputs
        t, h, w = x["video_grid_thw"][0].tolist()
        rows = x["pixel_values_videos"].view(t, h * w, -1)
        side = h * self.proc.video_config.patch_size
        found = {}
        for nd in case.needles:
            ref = self.proc.process_video([nd["image"], nd["image"]], {"resized_height": side, "resized_width": side,
                                                                       "sample_fps": 1.0}).pixel_values
            hits = [g for g in range(t) if torch.allclose(rows[g], ref)]
            assert len(hits) == 1, "a needle image is in exactly one temporal group"
            found[hits[0]] = nd
        return found

    def group_time(self, case, g):
        text = self.proc.decode(case.inputs["input_ids"][0])
        stamps = re.findall(r"<(\d+\.\d) seconds><\|vision_start\|>", text)
        if stamps:
            return float(stamps[g])
        fps = float(re.search(r"sampled at ([\d.]+) frames per second", text).group(1))
        return (2 * g + 0.5) / fps  # the group's two frames are at 2g / fps and (2g + 1) / fps

    def say(self, case, teacher_forced):
        if not case.needles:  # passkey: read the prompt
            return re.search(r"The pass key is (\d+)", self.proc.decode(case.inputs["input_ids"][0])).group(1)
        found = self.needle_groups(case)
        if case.kind == "time":
            (g,) = found
            t = self.group_time(case, g)
            return f"{t:.1f}" if teacher_forced else f"It appears at {t:.1f} seconds."
        if case.kind == "numbers":
            return ", ".join(str(found[g]["value"]) for g in sorted(found))
        wanted = [nd for nd in found.values() if nd["target"] == (self.want == "target")]
        return str(wanted[0]["value"])


def unpatchify(rows: torch.Tensor, grid: list[int], cfg) -> np.ndarray:
    """(t * h * w, 3 * tp * p * p) normalised rows -> (t, tp, H, W, 3) uint8 frames: the inverse of the layout and
    normalisation model/processing/patchify.py documents (rows: group, merge block row-major, the m x m patches of a
    block; each row (C, tp, p, p); value (x - 255 mean) / (255 std))."""
    t, h, w = grid
    m, p, tp = cfg.merge_size, cfg.patch_size, cfg.temporal_patch_size
    x = rearrange(rows.float(), "(t bh bw m1 m2) (c tp ph pw) -> t tp (bh m1 ph) (bw m2 pw) c",
                  t=t, bh=h // m, bw=w // m, m1=m, m2=m, c=3, tp=tp, ph=p, pw=p)
    x = x * (torch.tensor(cfg.image_std) * 255) + torch.tensor(cfg.image_mean) * 255
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def _ink(img: np.ndarray) -> np.ndarray:
    """How far each pixel is from white, in [0, 1]: dark and saturated text alike (1 - min(R, G, B) / 255)."""
    return 1.0 - img.min(-1) / 255.0


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of True in a 1-D mask."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]))


def _crop(ink: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(ink > 0.3)
    return ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


@functools.lru_cache
def digit_templates(px: int) -> dict[str, np.ndarray]:
    """Ink maps of the digits 0-9 drawn alone in the needle font (DejaVuSans-Bold, eval/haystack.py) at px pixels."""
    from PIL import Image, ImageDraw

    from eval.haystack import _font

    out = {}
    for d in "0123456789":
        img = Image.new("RGB", (2 * px, 2 * px), "white")
        ImageDraw.Draw(img).text((px // 2, px // 2), d, fill="black", font=_font(px))
        out[d] = _crop(_ink(np.array(img)))
    return out


def _glyph_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared difference of two ink maps, the best over +-1 pixel shifts on a common canvas."""
    H, W = max(a.shape[0], b.shape[0]) + 2, max(a.shape[1], b.shape[1]) + 2
    A = np.zeros((H, W))
    A[1:1 + a.shape[0], 1:1 + a.shape[1]] = a
    best = np.inf
    for dy in range(H - b.shape[0] + 1):
        for dx in range(W - b.shape[1] + 1):
            B = np.zeros((H, W))
            B[dy:dy + b.shape[0], dx:dx + b.shape[1]] = b
            best = min(best, float(((A - B) ** 2).mean()))
    return best


def read_number(img: np.ndarray) -> int | None:
    """The number written as the last word of a text frame's last line, read glyph by glyph by template matching
    (None when that word is not all digits). Text is drawn at side // 9 pixels (eval/haystack.py `text_frame`);
    glyphs are the column runs of ink in the line, words split where a gap is wider than a quarter em."""
    ink = _ink(img)
    lines = _runs((ink > 0.5).any(1))
    if not lines:
        return None
    band = ink[max(0, lines[-1][0] - 2):lines[-1][1] + 2]
    glyphs = _runs((band > 0.3).any(0))
    px = max(6, img.shape[0] // 9)
    start = max([i for i in range(1, len(glyphs)) if glyphs[i][0] - glyphs[i - 1][1] > px / 4], default=0)
    templates = digit_templates(px)
    digits = ""
    for x0, x1 in glyphs[start:]:
        g = _crop(band[:, x0:x1])
        scores = {d: _glyph_distance(g, t) for d, t in templates.items()}
        d = min(scores, key=scores.get)
        if scores[d] > 0.05:  # not a digit (a letter, or noise)
            return None
        digits += d
    return int(digits)


class PixelReader(Reader):
    """Answers from the prompt alone, knowing nothing of `case.needles`: each temporal group's image is rebuilt from
    the pixel rows; the needle frames are the mostly-white ones (the haystack is coloured fields); numbers are read
    by template matching; the asked colour ("written in red") is matched to each frame's mean ink colour; times
    come from the group index and the prompt's `<t seconds>` text (or the sampling rate the question states)."""

    def text_frames(self, case) -> dict[int, np.ndarray]:
        """{group: (H, W, 3) uint8 image} of the groups that show a white text frame (both frames the same)."""
        if getattr(self, "_seen", (None,))[0] is not case:  # both scoring modes ask about the same case
            x = case.full_inputs()  # a streamed case's chunks, concatenated
            frames = unpatchify(x["pixel_values_videos"], x["video_grid_thw"][0].tolist(), self.proc.video_config)
            self._seen = case, {g: f[0] for g, f in enumerate(frames)
                                if (f[0].min(-1) > 235).mean() > 0.5 and (f[0] == f[1]).all()}
        return self._seen[1]

    def say(self, case, teacher_forced):
        from PIL import ImageColor

        text = self.proc.decode(case.inputs["input_ids"][0])
        if "pixel_values_videos" not in case.inputs and case.stream is None:  # passkey: read the prompt
            return re.search(r"The pass key is (\d+)", text).group(1)
        found = self.text_frames(case)
        if "At what time" in text:
            (g,) = found
            t = self.group_time(case, g)
            return f"{t:.1f}" if teacher_forced else f"It appears at {t:.1f} seconds."
        numbers = {g: read_number(img) for g, img in found.items()}
        if "List all" in text:
            return ", ".join(str(numbers[g]) for g in sorted(numbers))
        colour = re.search(r"written in (\w+)\?", text)
        if colour:
            asked = np.array(ImageColor.getrgb(colour.group(1)), dtype=float)
            dist = {g: np.abs(img[_ink(img) > 0.8].reshape(-1, 3).mean(0) - asked).max() for g, img in found.items()}
            wanted = [g for g in found if (dist[g] < 60) == (self.want == "target")]
        else:
            wanted = list(found)
        return str(numbers[wanted[0]])


class Fixed(_Fake):
    def __init__(self, proc, text):
        super().__init__(proc)
        self.text = text

    def say(self, case, teacher_forced):
        return self.text


def small(task, tmp_path, **kw):
    kw.setdefault("haystack", HaystackConfig(frame_size=32))
    return NeedleConfig(task=task, out_dir=str(tmp_path), **kw)


# ----------------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("text, seconds", [
    ("72", 72.0), ("72 s", 72.0), ("4354.5 seconds", 4354.5), ("1:12:34", 4354.0), ("0:45", 45.0),
    ("at 1h 2m", 3720.0), ("1 minute and 5 seconds", 65.0), ("2 min 30 sec", 150.0),
    ("The frame appears at 12.5 seconds.", 12.5), ("3 seconds, i.e. 3 s", 3.0), ("at 1:05:07.5", 3907.5),
    ("1h2m3s", 3723.0), ("12.5s", 12.5), ("00:01:12", 72.0), ("at 1:05 (65 seconds)", 65.0), ("5 minutes", 300.0),
    ("1:05 or 2:10", None), ("about 40", 40.0), ("1 hour and 2 minutes, or 2 hours", None),
    ("either 12 or 40", None), ("12 s or 40 s", None), ("no idea", None), ("", None), ("1:75", None)],
    ids=lambda v: repr(v))
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text, number", [
    ("4821", 4821), ("The number is 4821.", 4821), ("4,821", 4821), ("4821 ... yes, 4821", 4821), ("-3", -3),
    ("12.5", 12.5), ("4821 or 4822", None), ("none", None), ("abc123", None), ("version 2.0.1", None)],
    ids=lambda v: repr(v))
def test_parse_number(text, number):
    assert parse_number(text) == number


# ----------------------------------------------------------------------------------------------- fake models
def assert_every_cell_right(res, task):
    """Every cell 100% in both scoring modes; temporal: MAE 0; multi_needle: every needle recalled."""
    for cell in res["cells"]:
        for mode in ("teacher_forced", "generate"):
            assert cell[mode]["accuracy"] == 1.0, (cell["length"], cell["depth"], mode, cell["trials"])
        if task == "temporal":
            assert cell["generate"]["mae"] == 0.0
        if task == "multi_needle":
            assert cell["generate"]["recall"] == [1.0, 1.0, 1.0] == cell["teacher_forced"]["recall"]
    assert res["mean_accuracy"] == 1.0


@pytest.mark.parametrize("task, timestamps", [("vniah", True), ("vniah_d", True), ("temporal", True),
                                              ("temporal", False), ("multi_needle", True), ("passkey", True)],
                         ids=["vniah", "vniah_d", "temporal", "temporal-no-timestamps", "multi_needle", "passkey"])
def test_reader_scores_100_percent(proc, tmp_path, task, timestamps):
    lengths = (120, 240) if task == "passkey" else (8, 14)
    cfg = small(task, tmp_path, lengths=lengths, depths=(0.0, 0.4, 1.0), trials=2, timestamps=timestamps)
    res = run_needle(Reader(proc), proc, cfg)
    assert_every_cell_right(res, task)


@pytest.mark.parametrize("task, timestamps, stream", [
    ("vniah", True, False), ("vniah_d", True, False), ("temporal", True, False), ("temporal", False, False),
    ("multi_needle", True, False), ("multi_needle", True, True)],
    ids=["vniah", "vniah_d", "temporal", "temporal-no-timestamps", "multi_needle", "multi_needle-streamed"])
def test_pixel_reader_scores_100_percent(proc, tmp_path, task, timestamps, stream):
    """The oracle that reads the numbers, colours and times from the prompt alone (not the needle records) gets
    every cell right; streamed cells (needle.stream, their pixels made chunk by chunk) carry the same needles."""
    cfg = small(task, tmp_path, lengths=(8, 12), depths=(0.0, 0.5, 1.0), timestamps=timestamps,
                haystack=HaystackConfig(frame_size=128), chunk_size=64 if stream else 0)
    reader = PixelReader(proc)
    res = run_needle(reader, proc, cfg)
    assert_every_cell_right(res, task)


def test_pixel_reader_reads_distractors_on_vniah_d(proc, tmp_path):
    """Asked for a number written in another colour than the question's, the pixel reader scores 0%; it finds
    the 1 + 2 text frames the task inserted, and reads a number on each."""
    cfg = small("vniah_d", tmp_path, lengths=(10,), depths=(0.0, 1.0), haystack=HaystackConfig(frame_size=128))
    reader = PixelReader(proc, want="distractor")
    res = run_needle(reader, proc, cfg)
    assert all(c[m]["accuracy"] == 0.0 for c in res["cells"] for m in ("teacher_forced", "generate"))
    from eval.tasks.vniah_d import vniah_d_case

    case = vniah_d_case(proc, 10, 0.5, np.random.default_rng(5), cfg)
    found = reader.text_frames(case)
    assert sorted(found) == sorted(nd["group"] for nd in case.needles)
    assert {g: read_number(img) for g, img in found.items()} == {nd["group"]: nd["value"] for nd in case.needles}


def test_distractor_answers_score_zero_on_vniah_d(proc, tmp_path):
    cfg = small("vniah_d", tmp_path, lengths=(8, 12), depths=(0.0, 0.5, 1.0), trials=2)
    res = run_needle(Reader(proc, want="distractor"), proc, cfg)
    assert all(c[m]["accuracy"] == 0.0 for c in res["cells"] for m in ("teacher_forced", "generate"))
    # and the distractors really are in the prompt: the reader found 1 + 2 needle groups per prompt
    assert all(len(t["needle_frames"]) == 3 for c in res["cells"] for t in c["trials"])


def test_fixed_time_scores_at_chance(proc, tmp_path):
    """8 frames at 1 fps = 4 groups at 0.5, 2.5, 4.5, 6.5 s, 2 s apart (> the 1 s tolerance); one needle per depth
    0, 1/3, 2/3, 1 puts it once in each group, so always answering 2.5 is right in exactly 1 of 4 cells."""
    cfg = small("temporal", tmp_path, lengths=(8,), depths=(0.0, 1 / 3, 2 / 3, 1.0))
    res = run_needle(Fixed(proc, "2.5"), proc, cfg)
    assert [c["trials"][0]["values"][0] for c in res["cells"]] == [0.5, 2.5, 4.5, 6.5]
    for mode in ("teacher_forced", "generate"):
        assert [c[mode]["accuracy"] for c in res["cells"]] == [0.0, 1.0, 0.0, 0.0]
    assert res["mean_accuracy"] == 0.25
    assert [c["generate"]["mae"] for c in res["cells"]] == [2.0, 0.0, 2.0, 4.0]


def test_fixed_number_scores_at_chance_on_vniah(proc, tmp_path):
    """Secret numbers are uniform over 1000..9999: a fixed guess is right with probability 1/9000, here 0 of 12."""
    cfg = small("vniah", tmp_path, lengths=(6,), depths=(0.0, 0.5, 1.0), trials=4)
    res = run_needle(Fixed(proc, "5000"), proc, cfg)
    golds = [t["values"][0] for c in res["cells"] for t in c["trials"]]
    assert len(set(golds)) > 1 and 5000 not in golds and res["mean_accuracy"] == 0.0


# ----------------------------------------------------------------------------------------------- the sweep
class Interrupting(Reader):
    """Stops the sweep (KeyboardInterrupt) at its `stop_at`-th prompt."""

    def __init__(self, proc, stop_at):
        super().__init__(proc)
        self.calls, self.stop_at = 0, stop_at

    def answer_hits(self, case, answer_ids):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().answer_hits(case, answer_ids)


def _strip(res):
    return [{k: v for k, v in c.items() if k not in ("seconds", "memory_bytes")} for c in res["cells"]]


def test_resumed_sweep_equals_uninterrupted(proc, tmp_path):
    whole = run_needle(Reader(proc), proc, small("multi_needle", tmp_path / "a", lengths=(8, 10),
                                                 depths=(0.0, 1.0), trials=2))
    cfg = small("multi_needle", tmp_path / "b", lengths=(8, 10), depths=(0.0, 1.0), trials=2)
    with pytest.raises(KeyboardInterrupt):
        run_needle(Interrupting(proc, stop_at=6), proc, cfg)  # cells 1 and 2 done, stopped in cell 3
    saved = json.loads((tmp_path / "b" / "multi_needle.json").read_text())
    assert len(saved["cells"]) == 2
    counting = Interrupting(proc, stop_at=-1)
    resumed = run_needle(counting, proc, cfg)
    assert counting.calls == 4  # only cells 3 and 4 ran again
    assert _strip(resumed) == _strip(whole)
    assert resumed["accuracy"] == whole["accuracy"] and resumed["tokens"] == whole["tokens"]
    # another configuration in the same folder starts afresh instead of mixing cells
    other = run_needle(Reader(proc), proc, small("multi_needle", tmp_path / "b", lengths=(8, 10),
                                                 depths=(0.0, 1.0), trials=1))
    assert all(len(c["trials"]) == 1 for c in other["cells"])
    # ... and so does another model (what `python -m eval` passes as run_info)
    calls = Interrupting(proc, stop_at=-1)
    run_needle(calls, proc, small("multi_needle", tmp_path / "b", lengths=(8, 10), depths=(0.0, 1.0), trials=1),
               run_info={"model": {"preset": "2b"}})
    assert calls.calls == 4


class OOMAbove(Reader):
    def __init__(self, proc, max_tokens):
        super().__init__(proc)
        self.max_tokens = max_tokens

    def answer_hits(self, case, answer_ids):
        if case.inputs["input_ids"].shape[1] > self.max_tokens:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return super().answer_hits(case, answer_ids)


def test_out_of_memory_cell_is_recorded_not_raised(proc, tmp_path):
    cfg = small("vniah", tmp_path, lengths=(6, 20), depths=(0.0, 1.0))
    res = run_needle(OOMAbove(proc, max_tokens=80), proc, cfg)
    assert [c["status"] for c in res["cells"]] == ["ok", "ok", "oom", "oom"]
    assert res["accuracy"] == [[1.0, 1.0], [None, None]] and res["mean_accuracy"] == 1.0
    assert "out of memory" in res["cells"][2]["error"]
    assert res["cells"][2]["tokens"] > 80 and res["cells"][2]["frames"] == 20  # the failed prompt's size is kept
    md = (tmp_path / "vniah.md").read_text()
    assert md.count("| oom |") == 2 and (tmp_path / "vniah.png").stat().st_size > 1000


def test_cell_record_fields(proc, tmp_path):
    res = run_needle(Reader(proc), proc, small("temporal", tmp_path, lengths=(6,), depths=(0.5,)))
    cell = res["cells"][0]
    assert {"accuracy", "mae", "unparsed"} <= set(cell["generate"]) and cell["teacher_forced"]["accuracy"] == 1.0
    assert cell["frames"] == 6 and cell["tokens"] == res["tokens"][0][0] > 6
    assert cell["seconds"] > 0 and cell["memory_bytes"] > 0 and cell["scoring"] == ["teacher_forced", "generate"]


def test_lengths_in_tokens(proc, tmp_path):
    """needle.length_unit=tokens: a video cell is sized to the asked prompt tokens within half a temporal group
    (a 32 px frame is raised to the 64 px floor: 4 pads + vision start / end + 6-8 timestamp tokens per group),
    also where the timestamp text has grown to three digits."""
    cfg = small("vniah", tmp_path, lengths=(150, 1500), depths=(0.5,), length_unit="tokens", scoring=("generate",))
    res = run_needle(Reader(proc), proc, cfg)
    (t1,), (t2,) = res["tokens"]
    assert abs(t1 - 150) <= 7 and abs(t2 - 1500) <= 7, (t1, t2)
    assert res["frames"][1][0] > 200 and res["length_unit"] == "tokens"


def test_timestamps_ablation_drops_only_the_timestamp_text(proc):
    from eval.tasks.temporal import temporal_case

    cfg = NeedleConfig(task="temporal", haystack=HaystackConfig(frame_size=32))
    with_t = temporal_case(proc, 8, 0.5, np.random.default_rng(3), cfg)
    cfg.timestamps = False
    without = temporal_case(proc, 8, 0.5, np.random.default_rng(3), cfg)
    a, b = proc.decode(with_t.inputs["input_ids"][0]), proc.decode(without.inputs["input_ids"][0])
    assert a.count(" seconds><|vision_start|>") == 4 and "seconds><|vision_start|>" not in b
    assert re.sub(r"<\d+\.\d seconds>", "", a) == b and with_t.values == without.values


# ----------------------------------------------------------------------------------------------- haystacks
def test_video_file_haystack_has_the_processors_timestamps(proc, tmp_path):
    """An mp4 written with PyAV at 4 fps, sampled at 1 fps: the prompt's `<t seconds>` equal the processor's own
    timestamps for that file and sampling, and the needle replaces one whole group of decoded frames."""
    import av

    path = tmp_path / "talk.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(48):  # 12 s
            for pkt in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    from eval.tasks.temporal import temporal_case

    cfg = NeedleConfig(task="temporal", haystack=HaystackConfig(video=str(path), fps=1.0, frame_size=32))
    case = temporal_case(proc, 10, 0.5, np.random.default_rng(0), cfg)
    ref = proc.process_video(str(path), {"fps": 1.0, "max_frames": 1 << 30, "resized_height": 32,
                                         "resized_width": 32})
    text = proc.decode(case.inputs["input_ids"][0])
    stamps = [float(t) for t in re.findall(r"<(\d+\.\d) seconds>", text)]
    assert stamps == [round(t, 1) for t in ref.timestamps[:5]] and case.inputs["video_timestamps"][0] == \
        ref.timestamps[:5]
    g = case.needles[0]["group"]
    assert case.values == [ref.timestamps[g]]
    rows = case.inputs["pixel_values_videos"].view(5, -1, ref.pixel_values.shape[1])
    other = [k for k in range(5) if k != g]
    assert torch.allclose(rows[other], ref.pixel_values.view(-1, rows.shape[1], rows.shape[2])[other], atol=0.05)
    with pytest.raises(ValueError, match="the cell needs 40"):
        temporal_case(proc, 40, 0.5, np.random.default_rng(0), cfg)


def test_frames_dir_haystack(proc, tmp_path):
    from PIL import Image

    from eval.haystack import haystack

    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"f{i}.png")
    frames, times = haystack(5, HaystackConfig(frames_dir=str(tmp_path), fps=2.0, frame_size=16),
                             np.random.default_rng(0))
    assert [int(f.mean()) for f in frames] == [0, 40, 80, 0, 40] and times == [0, 0.5, 1.0, 1.5, 2.0]


# ----------------------------------------------------------------------------------------------- real model paths
def test_chunked_prefill_scores_like_one_forward(proc):
    """needle.chunk_size > 0 (prefill into a KV cache, then teacher forcing / generate on it) gives the same
    per-token hits and the same greedy answer as one forward, on a tiny random Qwen3VL."""
    from eval.scoring import Qwen3VLNeedleModel
    from eval.tasks.vniah import vniah_case
    from model.build import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(preset="tiny")).eval()
    case = vniah_case(proc, 6, 0.5, np.random.default_rng(0), NeedleConfig(haystack=HaystackConfig(frame_size=32)))
    one, chunked = Qwen3VLNeedleModel(model, proc.tokenizer), Qwen3VLNeedleModel(model, proc.tokenizer, 7)
    # a gold answer the model partly predicts: its own greedy continuation with one token changed
    x = case.inputs
    greedy = model.generate(x["input_ids"], max_new_tokens=4, pixel_values_videos=x["pixel_values_videos"],
                            video_grid_thw=x["video_grid_thw"])[0, x["input_ids"].shape[1]:].tolist()
    assert len(greedy) == 4
    gold = greedy[:2] + [13] + greedy[3:]
    hits = one.answer_hits(case, gold)
    prefills = []
    chunked._prefill = lambda *a, _f=chunked._prefill: prefills.append(a[1].shape[1]) or _f(*a)
    assert hits == chunked.answer_hits(case, gold) and hits[:2] == [True, True] and hits[2] is False
    answer = one.generate(case, 6)
    assert chunked.generate(case, 6) == answer
    # both modes, in either order and repeated, share one prefill of the prompt minus its last token
    assert chunked.answer_hits(case, gold) == hits and chunked.generate(case, 6) == answer
    assert prefills == [case.inputs["input_ids"].shape[1] - 1]
    other = vniah_case(proc, 6, 0.0, np.random.default_rng(1), NeedleConfig(haystack=HaystackConfig(frame_size=32)))
    assert chunked.generate(other, 6) == one.generate(other, 6) and len(prefills) == 2  # a new case: a new prefill


@pytest.mark.parametrize("task, timestamps, layout", [("multi_needle", True, "release"),
                                                       ("temporal", False, "release"),
                                                       ("vniah_d", True, "transformers5")],
                         ids=["multi_needle", "temporal-no-timestamps", "vniah_d-transformers5"])
def test_streamed_case_equals_one_shot(proc, task, timestamps, layout):
    """needle.stream: the case holds no pixel, yet its ids, grid, timestamps and gold equal the one-shot case's,
    and its chunks' pixel rows, concatenated, equal the processor's rows bit for bit."""
    from eval.tasks import get_task

    p = proc if layout == "release" else load_processor(None, video_layout=layout)
    make = get_task(task).make_case
    kw = dict(task=task, haystack=HaystackConfig(frame_size=32), timestamps=timestamps)
    one = make(p, 14, 0.5, np.random.default_rng(7), NeedleConfig(**kw))
    streamed = make(p, 14, 0.5, np.random.default_rng(7), NeedleConfig(chunk_size=16, **kw))
    assert one.stream is None and streamed.stream is not None and "pixel_values_videos" not in streamed.inputs
    for k in ("input_ids", "attention_mask", "video_grid_thw"):
        assert torch.equal(one.inputs[k], streamed.inputs[k]), k
    assert one.inputs["video_timestamps"] == streamed.inputs["video_timestamps"]
    assert (one.answer, one.values) == (streamed.answer, streamed.values)
    streamed.stream.groups_per_chunk = 3
    assert len(list(streamed.stream)) == 3  # 7 groups in chunks of 3
    assert torch.equal(streamed.full_inputs()["pixel_values_videos"], one.inputs["pixel_values_videos"])


def test_streamed_haystack_is_made_chunk_by_chunk(proc):
    """A streamed haystack makes its frames as the chunks need them: planning reads frame 0 only, the first chunk
    of 4 groups the first 8 frames (the old frame-list path stacked all 40 at once)."""
    from eval.haystack import HaystackFrames, text_frame
    from model.processing.stream import VideoStream

    cfg = HaystackConfig(frame_size=32)
    frames = HaystackFrames(40, cfg, np.random.default_rng(0))
    needle = frames.insert(10, text_frame("THE SECRET NUMBER IS 1234", 32))
    made = []
    make = frames._frame
    frames._frame = lambda i: made.append(i) or make(i)
    stream = VideoStream(proc, frames, {"timestamps": frames.times, "resized_height": 32, "resized_width": 32},
                         groups_per_chunk=4)
    assert made == [0]
    chunks = iter(stream)
    next(chunks)
    assert made == [0] + list(range(8))
    next(chunks)
    assert made[-1] == 15 and 10 not in made and 11 not in made  # the needle pair is shown, not drawn
    assert (frames[10] == needle).all() and not (frames[12] == needle).all()


def test_stream_option_is_validated():
    from model.config import ConfigError

    assert not NeedleConfig().streams and NeedleConfig(chunk_size=8).streams
    assert not NeedleConfig(chunk_size=8, stream=False).streams
    with pytest.raises(ConfigError, match="needle.stream='yes' is invalid; expected auto | true | false"):
        NeedleConfig(stream="yes")
    with pytest.raises(ConfigError, match="needle.stream=true needs needle.chunk_size > 0"):
        NeedleConfig(stream=True)


def test_streamed_cell_scores_like_one_shot(proc):
    """A streamed case (its video prefilled a chunk of 2 temporal groups at a time, each in 16-token decoder passes)
    gives the one-shot forward's last logits, per-token hits and greedy answer, on a tiny random Qwen3VL."""
    from eval.scoring import Qwen3VLNeedleModel
    from eval.tasks.vniah import vniah_case
    from model.build import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(preset="tiny")).eval()
    hs = HaystackConfig(frame_size=32)
    one = vniah_case(proc, 8, 0.5, np.random.default_rng(1), NeedleConfig(haystack=hs))
    case = vniah_case(proc, 8, 0.5, np.random.default_rng(1), NeedleConfig(haystack=hs, chunk_size=16))
    assert case.stream is not None
    streamed = Qwen3VLNeedleModel(model, proc.tokenizer, 16, groups_per_chunk=2)
    x = one.inputs
    with torch.no_grad():
        ref = model(x["input_ids"], pixel_values_videos=x["pixel_values_videos"], video_grid_thw=x["video_grid_thw"],
                    logits_to_keep=1).logits[0, -1]
        cache, last = streamed._prefill(case, case.inputs["input_ids"], 1)
    assert cache.length == x["input_ids"].shape[1]
    torch.testing.assert_close(last, ref, rtol=1e-5, atol=1e-5)  # fp32; only the summation order differs
    greedy = model.generate(x["input_ids"], max_new_tokens=4, pixel_values_videos=x["pixel_values_videos"],
                            video_grid_thw=x["video_grid_thw"])[0, x["input_ids"].shape[1]:].tolist()
    gold = greedy[:2] + [13] + greedy[3:]  # a gold answer the model partly predicts
    hits = streamed.answer_hits(case, gold)
    assert hits[:2] == [True, True] and hits[2] is False
    assert hits == Qwen3VLNeedleModel(model, proc.tokenizer).answer_hits(one, gold)
    assert streamed.generate(case, 4) == proc.tokenizer.decode(greedy, skip_special_tokens=True).strip()


TASKS = ("vniah", "vniah_d", "temporal", "multi_needle", "passkey")


def test_eval_command_writes_json_and_heatmap(tmp_path):
    """The issue's command on the tiny preset (CPU), every task in one Hydra multirun (one process):
    DIR/<task>.json with accuracy and tokens, DIR/<task>.png, DIR/<task>.md."""
    cmd = [sys.executable, "-m", "eval", "-m", f"task={','.join(TASKS)}", "model.preset=tiny",
           "needle.length_unit=tokens", "needle.lengths=[160]", "needle.depths=[0.5]", f"needle.out_dir={tmp_path}",
           "device=cpu", f"hydra.sweep.dir={tmp_path / 'hydra'}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    for task in TASKS:
        res = json.loads((tmp_path / f"{task}.json").read_text())
        cell = res["cells"][0]
        assert res["task"] == task and cell["status"] == "ok" and 100 < cell["tokens"] < 260, (task, cell["tokens"])
        assert (cell["frames"] > 0) == (task != "passkey")
        assert set(cell) >= {"teacher_forced", "generate", "frames", "seconds", "memory_bytes"}
        assert (tmp_path / f"{task}.png").stat().st_size > 1000 and (tmp_path / f"{task}.md").is_file()


def test_compare_plots_runs_side_by_side(proc, tmp_path, capsys):
    from eval.compare import main

    run_needle(Reader(proc), proc, small("temporal", tmp_path / "a", lengths=(6,), depths=(0.0, 1.0)))
    run_needle(Fixed(proc, "0.5"), proc, small("temporal", tmp_path / "b", lengths=(6,), depths=(0.0, 1.0)))
    out = tmp_path / "cmp.png"
    main([str(tmp_path / "a" / "temporal.json"), str(tmp_path / "b" / "temporal.json"), "--out", str(out),
          "--mode", "generate"])
    table = capsys.readouterr().out
    assert "| a/temporal | temporal | 2/2 | 100.0% | 100.0% | 0.00 |" in table
    assert "| b/temporal | temporal | 2/2 | 50.0% | 50.0% | 2.00 |" in table
    from PIL import Image

    w, h = Image.open(out).size
    assert w > 1.5 * h and out.stat().st_size > 5000


@pytest.mark.parametrize("protocol, task", [("longva_vniah", "vniah"), ("videorope_vniah_d", "vniah_d"),
                                            ("qwen3vl_1m", "temporal")])
def test_protocol_presets_compose(protocol, task):
    """conf/protocol/<preset>.yaml composes with a task into a typed EvalConfig (unknown keys would fail)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from eval.run import EvalConfig
    from model.build import config_from_dict

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose("eval", overrides=[f"task={task}", f"protocol={protocol}"])
    cfg = config_from_dict(OmegaConf.to_container(c, resolve=True), EvalConfig)
    assert cfg.needle.task == task and cfg.needle.chunk_size == 8192
    if protocol == "qwen3vl_1m":
        assert cfg.needle.lengths[-1] == 1048576 and cfg.needle.length_unit == "tokens"
        assert cfg.needle.stream is True and cfg.needle.streams
        assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 3.0}
    else:
        assert cfg.needle.lengths[-1] == 3000 and cfg.haystack.fps == 1.0 and len(cfg.needle.depths) == 11


def test_teacher_forced_recall_per_needle(proc):
    """multi_needle under teacher forcing: a wrong token inside the second number fails that needle only."""
    from eval.scoring import judge_teacher_forced
    from eval.tasks import Case

    case = Case({}, "4821, 1234, 9876", "numbers", [4821, 1234, 9876])
    ids = proc.tokenizer.encode(case.answer)
    spans, text = [], ""
    for t in ids:
        text += proc.tokenizer.decode([t])
        spans.append(len(text))
    inside = next(i for i, e in enumerate(spans) if e > case.answer.index("1234"))  # first token of "1234"
    hits = [i != inside for i in range(len(ids))]
    r = judge_teacher_forced(case, hits, ids, proc.tokenizer)
    assert r["recall"] == [1.0, 0.0, 1.0] and not r["correct"]
    r = judge_teacher_forced(case, [True] * len(ids), ids, proc.tokenizer)
    assert r["recall"] == [1.0, 1.0, 1.0] and r["correct"]


def test_needle_image_is_shown_above_the_text(tmp_path):
    from PIL import Image

    from eval.haystack import text_frame

    Image.fromarray(np.full((10, 10, 3), (200, 30, 30), np.uint8)).save(tmp_path / "logo.png")
    f = text_frame("THE SECRET NUMBER IS 1234", 64, image=str(tmp_path / "logo.png"))
    assert (f[:32] == (200, 30, 30)).all() and (f[32:] < 100).any() and (f[32:] == 255).mean() > 0.5


@pytest.mark.parametrize("kind, gold, values, said, correct", [
    ("number", "4821", [4821], "The secret number is 4,821.", True),
    ("number", "4821", [4821], "4821 or 1234", False),
    ("time", "12.5", [12.5], "at 0:13", True),          # 0.5 s off, tolerance 1 s
    ("time", "12.5", [12.5], "14 seconds", False),      # 1.5 s off
    ("numbers", "1, 2", [1111, 2222], "2222 and 1111", True),
    ("numbers", "1, 2", [1111, 2222], "1111", False),
    ("text", "hello  world", ["hello  world"], " hello world\n", True),
    ("text", "hello world", ["hello world"], "hello", False)],
    ids=["number", "number-hedged", "time-within", "time-outside", "numbers-any-order", "numbers-missing", "text",
         "text-wrong"])
def test_judge(kind, gold, values, said, correct):
    from eval.scoring import judge
    from eval.tasks import Case

    assert judge(Case({}, gold, kind, values, tolerance=1.0), said)["correct"] is correct


@pytest.mark.parametrize("timestamps", [True, False], ids=["timestamps", "no-timestamps"])
def test_temporal_in_the_transformers5_layout(tmp_path, timestamps):
    """The prompt layout with an outer <|vision_start|> ... <|vision_end|> around the groups: the reader still
    scores 100% with MAE 0, and the ablation removes every timestamp."""
    p5 = load_processor(None, video_layout="transformers5")
    res = run_needle(Reader(p5), p5, small("temporal", tmp_path, lengths=(8,), depths=(0.0, 1.0),
                                           timestamps=timestamps))
    assert res["mean_accuracy"] == 1.0 and all(c["generate"]["mae"] == 0.0 for c in res["cells"])
    from eval.tasks.temporal import temporal_case

    case = temporal_case(p5, 8, 0.5, np.random.default_rng(0), small("temporal", tmp_path, timestamps=timestamps))
    text = p5.decode(case.inputs["input_ids"][0])
    assert text.count(" seconds>") == (4 if timestamps else 0) and text.count("<|vision_start|>") == 5
