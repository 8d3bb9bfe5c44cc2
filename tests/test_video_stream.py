"""Streaming video ingest (model/processing/stream.py) against the one-shot processor (model/processing/processor.py).

Reference: the processor's own output for the same file and options -- pixel rows, grid, timestamps and the ids of
the expanded video placeholder -- itself tested against transformers 5 and qwen-vl-utils in tests/test_video.py and
tests/test_processing.py. Tolerance: exact (0); a chunk patchifies the same resized uint8 frames with the same fp32
normalisation, so any difference is a wrong frame, order or grouping.
Videos are synthetic (fresh random texture each run, tests/test_video.py's `write_video`), 100x70 so that every
frame is resized (to 96x64), >= 300 frames, sampled to odd and even frame counts.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from model import load_processor
from model.processing import Qwen3VLProcessor, Tokenizer, VideoStream
from tests.test_video import write_video

VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
# (options, rule): 31 sampled frames (odd: the last group repeats its frame), 310 (every frame), qwen-vl-utils' even
# count at fps 2, a fixed odd count.
CASES = {
    "fps2.5-31frames": ({"fps": 2.5}, "transformers"),
    "fps25-310frames": ({"fps": 25.0}, "transformers"),
    "qvu-fps2": ({"fps": 2.0}, "qwen-vl-utils"),
    "nframes45": ({"nframes": 45}, "transformers"),
}


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("stream") / "long.mp4", 100, 70, 25, 12.4, "libx264")  # 310 frames


@pytest.fixture(scope="module")
def procs():
    proc = load_processor(None)
    return {rule: Qwen3VLProcessor(proc.tokenizer, video_rule=rule) for rule in ("transformers", "qwen-vl-utils")}


@pytest.fixture(scope="module")
def one_shot(procs, video):
    """Per case: the processor's VideoFeatures and the ids of its expanded video placeholder (computed once)."""
    cache = {}

    def get(case):
        if case not in cache:
            opts, rule = CASES[case]
            p = procs[rule]
            feats = p.process_video(video, opts)
            ids = p.tokenizer.encode(p.expand_text(VIDEO_PLACEHOLDER, [], [feats]))
            cache[case] = feats, torch.tensor(ids)
        return cache[case]

    return get


@pytest.mark.parametrize("gpc", [1, 3, 1000], ids=["gpc1", "gpc3", "gpc1000"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunks_concatenate_to_the_one_shot_processor(procs, video, one_shot, case, gpc):
    opts, rule = CASES[case]
    ref, ref_ids = one_shot(case)
    stream = VideoStream(procs[rule], video, opts, groups_per_chunk=gpc)
    assert stream.grid_thw == ref.grid_thw and stream.timestamps == ref.timestamps
    assert stream.num_frames == len(ref.frame_indices) and stream.num_groups == ref.grid_thw[0]
    assert stream.num_tokens == len(ref_ids)
    chunks = list(stream)
    t, h, w = ref.grid_thw
    assert len(chunks) == stream.num_chunks == -(-t // gpc)
    assert [c.first_group for c in chunks] == list(range(0, t, gpc))
    for c in chunks:
        k = c.grid_thw[0]
        assert c.grid_thw == (k, h, w) and 1 <= k <= gpc and len(c.timestamps) == k
        assert c.pixel_values.shape == (k * h * w, 1536) and c.pixel_values.dtype == torch.float32
        assert c.input_ids.dtype == torch.long
    assert sum(c.grid_thw[0] for c in chunks) == t
    assert sum((c.timestamps for c in chunks), []) == ref.timestamps
    assert sum((c.frame_indices for c in chunks), []) == ref.frame_indices
    assert torch.equal(torch.cat([c.input_ids for c in chunks]), ref_ids)
    torch.testing.assert_close(torch.cat([c.pixel_values for c in chunks]), ref.pixel_values, rtol=0, atol=0)


def test_frame_list_streams_like_the_processor(procs):
    """A video given as frames (odd count, mixed sizes: later frames are resized to the first one's size)."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (70, 100, 3), dtype=np.uint8) for _ in range(8)]
    frames.append(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    opts = {"sample_fps": 3.0}
    p = procs["transformers"]
    ref = p.process_video(frames, opts)
    chunks = list(VideoStream(p, frames, opts, groups_per_chunk=2))
    assert [c.grid_thw[0] for c in chunks] == [2, 2, 1]
    assert sum((c.timestamps for c in chunks), []) == ref.timestamps
    torch.testing.assert_close(torch.cat([c.pixel_values for c in chunks]), ref.pixel_values, rtol=0, atol=0)


QUESTIONS = [(None, None), ("What happens after the cut? Answer briefly.", None),
             ("Describe the video.\nThen count the objects.", "You are a careful assistant.")]


@pytest.mark.parametrize("layout", ["release", "transformers5"])
def test_prompt_parts_reproduce_the_processor_ids(procs, video, layout):
    """prefix + chunk ids + suffix == processor(messages=...) for the ask-many layout (video first, then question),
    and a second question after the cached prefix + video == the processor's prompt for that question."""
    p = Qwen3VLProcessor(procs["transformers"].tokenizer, video_layout=layout)
    opts = {"fps": 2.5}
    stream = VideoStream(p, video, opts, groups_per_chunk=4)
    chunk_ids = [c.input_ids for c in stream]
    assert torch.equal(torch.cat(chunk_ids), stream.video_ids())
    for question, system in QUESTIONS:
        content = [{"type": "video", "video": video, **opts}] + ([{"type": "text", "text": question}] if question else [])
        conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        ref = p(messages=[conv], add_generation_prompt=True)["input_ids"][0]
        prefix, suffix = stream.prompt_parts(question, system)
        assert torch.equal(torch.cat([prefix, *chunk_ids, suffix]), ref)
        tail = (question or "") + "<|im_end|>\n<|im_start|>assistant\n"
        assert p.decode(suffix) == ("<|vision_end|>" if layout == "transformers5" else "") + tail
        if question:
            assert torch.equal(stream.question_ids(question), suffix)
    # Ask many: the cached part (default prefix + video) is shared, only the question ids change.
    prefix, _ = stream.prompt_parts()
    q2 = "And what colour dominates?"
    ref2 = p(messages=[stream.conversation(q2)], add_generation_prompt=True)["input_ids"][0]
    assert torch.equal(torch.cat([prefix, stream.video_ids(), stream.question_ids(q2)]), ref2)


def test_prompt_parts_refuse_a_bpe_seam(procs, video):
    """A template that puts text right before the video ("Clip: ") merges " <" in BPE: refused, not wrong ids."""
    tok = procs["transformers"].tokenizer
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% for it in m.content %}{% if it.type == 'video' %}"
                "Clip: <|vision_start|><|video_pad|><|vision_end|>{% else %}{{ it.text }}{% endif %}{% endfor %}"
                "<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    p = Qwen3VLProcessor(Tokenizer(tok._tok, chat_template=template))
    stream = VideoStream(p, video, {"fps": 2.5})
    ref = p(messages=[stream.conversation("Why?")], add_generation_prompt=True)["input_ids"][0].tolist()
    naive = tok.encode("<|im_start|>user\nClip: ") + stream.video_ids().tolist() + tok.encode("Why?<|im_end|>\n<|im_start|>assistant\n")
    assert naive != ref  # the seam is real: splitting the text there would change the ids
    with pytest.raises(ValueError, match="merges with"):
        stream.prompt_parts("Why?")


def test_progress_bar_counts_frames(procs, video, capsys):
    stream = VideoStream(procs["transformers"], video, {"fps": 2.5}, groups_per_chunk=5, progress=True)
    for _ in stream:
        pass
    err = capsys.readouterr().err
    assert f"{stream.num_frames}/{stream.num_frames}" in err and "frame/s" in err and "long.mp4" in err


def _hollow(path: Path, codec: str) -> str:
    """A file whose header lists 30 frames but which holds none: written with the index up front, cut after it."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(30):
            for pkt in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"mdat") + 4])
    return str(path)


def test_errors_name_the_file(procs, tmp_path):
    p = procs["transformers"]
    with pytest.raises(FileNotFoundError, match=r"nope/clip\.mp4"):
        VideoStream(p, "/nope/clip.mp4")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="broken.mp4"):
        VideoStream(p, str(bad))
    # The header lists frames, the file holds none. mpeg4 in mp4: no frame size either (the planner divided by it);
    # H.264 in mov: a size, so planning works and the decoder finds nothing.
    sizeless = _hollow(tmp_path / "sizeless.mp4", "mpeg4")
    for make in (lambda: VideoStream(p, sizeless), lambda: p.process_video(sizeless)):
        with pytest.raises(ValueError, match=r"sizeless\.mp4.*no frame size"):
            make()
    empty = _hollow(tmp_path / "empty.mov", "libx264")
    stream = VideoStream(p, empty)
    assert stream.num_frames > 0
    with pytest.raises(ValueError, match=r"empty\.mov holds no frames"):
        list(stream)
    with pytest.raises(ValueError, match="groups_per_chunk"):
        VideoStream(p, empty, groups_per_chunk=0)


MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    from model import load_processor
    from model.processing.stream import VideoStream

    warm, short, long = sys.argv[1:4]
    proc, opts = load_processor(None), {"fps": 25.0}  # every frame sampled

    def peak_mib(run):
        open("/proc/self/clear_refs", "w").write("5")  # reset this process's peak RSS (VmHWM) to its current RSS
        run()
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status["VmHWM"].split()[0]) / 1024

    def stream(path):
        total = 0.0
        for chunk in VideoStream(proc, path, opts, groups_per_chunk=8):
            total += float(chunk.pixel_values[-1].sum())  # use the rows, as a consumer would
        return total

    stream(warm), proc.process_video(warm, opts)  # library loading, thread pools, allocator warm-up
    print(*(peak_mib(run) for run in (lambda: None, lambda: stream(short), lambda: stream(long),
                                      lambda: proc.process_video(short, opts), lambda: proc.process_video(long, opts))))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_stream_peak_memory_does_not_grow_with_length(tmp_path):
    """Peak RSS streaming 600 frames ~ streaming 150 frames, while the one-shot processor's peak grows by ~200 MB.

    224x128 frames (no resize: 600 frames stay inside the 25 MP video budget), every frame sampled: the one-shot
    rows are 600 x 224 x 128 x 3 x 4 B = 206 MB (+ 52 MB of uint8 frames) against 52 MB for 150 frames; a chunk of 8
    groups is 5.5 MB. One fresh subprocess: warm-up (imports, thread pools), then stream 150, stream 600, one-shot
    150, one-shot 600, each step's peak RSS measured from a reset (VmHWM after /proc/self/clear_refs). Not
    ru_maxrss: Linux carries the parent's high-water mark through fork + exec into the child's ru_maxrss, so pytest's
    own RSS (~900 MB after the other tests) hid every number here.
    """
    vids = [write_video(tmp_path / f"{n}.mp4", 224, 128, 25, n / 25, "libx264") for n in (20, 150, 600)]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *vids], env=env, cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    base, s150, s600, o150, o600 = (float(v) for v in out.stdout.split())  # MiB
    print(f"peak RSS MiB: after warm-up {base:.1f}, stream 150 {s150:.1f}, stream 600 {s600:.1f}, "
          f"one-shot 150 {o150:.1f}, one-shot 600 {o600:.1f}")
    assert s600 - s150 < 10, "streaming 600 frames took more memory than streaming 150"
    assert o600 - o150 > 150, "the one-shot path no longer grows: this test would not catch a non-streaming stream"
