"""Index a long video once, ask it many questions: the long-video engine.

`VideoIndex.build` streams a video file into a KV cache (model/processing/stream.py decodes and patchifies a chunk
of temporal groups at a time; `Qwen3VL.prefill` encodes each chunk with the vision tower and prefills it into the
cache in `chunk_size`-token passes), so host memory is bounded by one chunk and GPU memory by the weights, the
cache and one chunk's activations. The prompt is the official chat layout with the video first in the user turn:
    <|im_start|>user\n  [<t seconds><|vision_start|><|video_pad|>...<|vision_end|>] x groups  QUESTION<|im_end|>\n
    <|im_start|>assistant\n
The cache holds everything up to the end of the video (the prefix); `ask` truncates the cache back to the prefix,
prefills the question tokens after it (positions continue from the cache) and decodes. `save` / `load` keep the
index on disk (model/generation.py's KVCache format plus `video.json`: the video, its sampling and timestamps).

scripts/ask_video.py is the command line; docs/long_context.md the guide and the measured numbers.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model.generation import KVCache
from model.processing.stream import VideoStream

INDEX_FILE = "video.json"


@dataclass
class Answer:
    """One answer: its text and token ids, and how long it took after the cached video (question prefill + decoding)."""

    question: str
    text: str
    token_ids: list[int]
    question_tokens: int
    seconds: float  # question prefill + decoding, from the cached video
    new_tokens: int


@dataclass
class IndexInfo:
    """What the cache holds: the video and how it was sampled (saved as video.json beside the cache)."""

    video: str
    video_bytes: int
    options: dict
    grid_thw: list[int]
    timestamps: list[float]
    prefix_len: int
    num_frames: int
    ingest_s: float = 0.0
    stats: dict = field(default_factory=dict)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class VideoIndex:
    """A video prefilled into a KV cache, ready for questions."""

    def __init__(self, model, processor, cache: KVCache, info: IndexInfo):
        self.model, self.processor, self.cache, self.info = model, processor, cache, info

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model, processor, video: str | os.PathLike, *, options: dict | None = None,
              max_context: int = 262144, room: int = 1024, cache_dtype: torch.dtype | None = None,
              chunk_size: int = 8192, groups_per_chunk: int = 32, progress: bool = True) -> "VideoIndex":
        """Stream `video` into a new cache of max_context tokens.

        Args:
            options: the video's sampling keys (fps, max_frames, total_pixels, ...; model/processing/geometry.py).
            max_context: cache length (the video must leave `room` tokens for questions and answers).
            cache_dtype: KV storage (default the model's dtype; torch.float8_e4m3fn halves the cache).
            chunk_size: tokens per decoder pass; groups_per_chunk: temporal groups decoded and encoded at a time.
        """
        stream = VideoStream(processor, video, options, groups_per_chunk=groups_per_chunk)
        prefix_ids = stream.prompt_parts()[0].tolist()
        total = len(prefix_ids) + stream.num_tokens
        if total + room > max_context:
            raise ValueError(f"video {video}: {total} prompt tokens + {room} for questions do not fit max_context "
                             f"{max_context}; lower fps or the pixel budget (options total_pixels / max_pixels), "
                             "or raise max_context")
        device = model.device
        cache = KVCache.for_model(model, 1, max_context, cache_dtype)
        t0 = time.perf_counter()
        model.prefill(torch.tensor([prefix_ids], device=device), cache, chunk_size=chunk_size)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="tok", unit_scale=True, desc="ingest", dynamic_ncols=True)
            bar.update(len(prefix_ids))
        frames = 0
        for chunk in stream:
            ids = chunk.input_ids.to(device)[None]
            model.prefill(ids, cache, chunk_size=chunk_size, pixel_values_videos=chunk.pixel_values.to(device),
                          video_grid_thw=torch.tensor([list(chunk.grid_thw)], device=device),
                          progress=bar.update if bar is not None else None)
            frames += len(chunk.frame_indices)
            if bar is not None:
                el = time.perf_counter() - t0
                bar.set_postfix(frames_s=f"{frames / el:.1f}", t=f"{chunk.timestamps[-1]:.0f}s")
        _sync(device)
        ingest_s = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        if cache.length != total:
            raise RuntimeError(f"ingest wrote {cache.length} tokens, the plan said {total}")
        info = IndexInfo(video=str(video), video_bytes=os.path.getsize(video), options=dict(options or {}),
                         grid_thw=list(stream.grid_thw), timestamps=list(stream.timestamps), prefix_len=total,
                         num_frames=frames, ingest_s=ingest_s,
                         stats={"tokens_per_s": total / ingest_s, "frames_per_s": frames / ingest_s})
        return cls(model, processor, cache, info)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike):
        """The cache's prefix (KVCache.save, written atomically) and video.json."""
        path = Path(path)
        self.cache.truncate(self.info.prefix_len).save(path)
        tmp = path / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self.info), indent=1) + "\n")
        os.replace(tmp, path / INDEX_FILE)
        return path

    @classmethod
    def load(cls, model, processor, path: str | os.PathLike, *, room: int = 1024, video=None) -> "VideoIndex":
        """Load a saved index onto the model's device with `room` free tokens for questions. A cache from a model
        with another configuration, or (when `video` is given) from another video file, is refused."""
        path = Path(path)
        f = path / INDEX_FILE
        if not f.is_file():
            raise FileNotFoundError(f"{path} holds no video index ({INDEX_FILE} missing)")
        info = IndexInfo(**json.loads(f.read_text()))
        if video is not None and (Path(video).name != Path(info.video).name
                                  or os.path.getsize(video) != info.video_bytes):
            raise ValueError(f"the index at {path} was built from {info.video} ({info.video_bytes} bytes), not "
                             f"{video}; use another --cache directory or delete this one")
        cache = KVCache.load(path, model.device, max_len=info.prefix_len + room, model=model)
        if cache.length != info.prefix_len:
            raise ValueError(f"{path}: the cache holds {cache.length} tokens, video.json says {info.prefix_len}")
        return cls(model, processor, cache, info)

    # ------------------------------------------------------------------ questions
    def ask(self, question: str, *, max_new_tokens: int = 64, chunk_size: int = 8192, **generate_kw) -> Answer:
        """Answer one question about the video (greedy unless generate_kw says otherwise)."""
        # the prompt's tail after the video (model/processing/stream.py's prompt_parts suffix): layout
        # "transformers5" closes an outer <|vision_end|> around the groups first
        outer = "<|vision_end|>" if self.processor.video_layout == "transformers5" else ""
        ids = self.processor.tokenizer.encode(outer + question + "<|im_end|>\n<|im_start|>assistant\n")
        self.cache.truncate(self.info.prefix_len)
        if self.cache.max_len - self.info.prefix_len < len(ids) + max_new_tokens:
            raise ValueError(f"the question ({len(ids)} tokens) + {max_new_tokens} new tokens do not fit the "
                             f"{self.cache.max_len - self.info.prefix_len} free tokens of the cache")
        device = self.model.device
        q = torch.tensor([ids], device=device)
        t0 = time.perf_counter()
        seq = self.model.generate(q, past_key_values=self.cache, max_new_tokens=max_new_tokens,
                                  prefill_chunk_size=chunk_size, **generate_kw)
        _sync(device)
        new = seq[0, len(ids):].tolist()
        return Answer(question, self.processor.decode(new, skip_special_tokens=True), new, len(ids),
                      time.perf_counter() - t0, len(new))

    def timestamps_summary(self) -> str:
        ts = self.info.timestamps
        step = ts[1] - ts[0] if len(ts) > 1 else 0.0
        return (f"{len(ts)} temporal groups, timestamps <{ts[0]:.1f} seconds> ... <{ts[-1]:.1f} seconds> "
                f"(every {step:.1f} s), {self.info.prefix_len} prompt tokens")
