"""Streaming video ingest: a long video as chunks of temporal groups, host memory bounded by a chunk.

`preprocess_video` (model/processing/video.py) holds every sampled frame and every fp32 pixel row of a video at once,
~25 GB at 1M tokens. `VideoStream` plans the video once from its container metadata with the processor's
`plan_video` (same sampling rule, fps, frame budget and size options, hence the same frames, size, grid and
timestamps as the one-shot processor), then decodes it in one sequential pass (`video_decode.iter_frames`) and
yields `VideoChunk`s of `groups_per_chunk` temporal groups: their prompt ids, pixel rows and grid. Host memory is
about two chunks (the one the caller holds and the one being built) plus the few frames the resize pool works
ahead, whatever the length of the video.

Concatenated over the chunks, ids, rows, grids and timestamps equal the one-shot processor's for the same video and
options (tests/test_video_stream.py). A chunk can also go through the model on its own: the vision tower attends
within one temporal group (model/vision.py, cu_seqlens per group), and MRoPE treats each group as its own (1, h, w)
grid after its `<t seconds>` text (model/positions.py), so chunk grids (k, h, w) give the same features and
positions as the whole grid.

Prompt ("ask many" layout: one user turn, the video first, the question after it): `prompt_parts` gives the ids
before and after the video, so prefix + all chunk ids + suffix == the processor's input_ids for that conversation;
the suffix alone (`question_ids`) asks another question after a cached prefix + video. Both layouts of
model/processing/prompt.py work: chunk ids are the same, and in "transformers5" the outer `<|vision_start|>` ends the
prefix and the outer `<|vision_end|>` starts the suffix.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .image import resize
from .media import local_path
from .patchify import patchify
from .prompt import VIDEO_PAD, VISION_END, VISION_START, timestamp_text
from .video import iter_frame_list, uses_uint8_kernel
from .video_decode import iter_frames

if TYPE_CHECKING:
    from .processor import Qwen3VLProcessor


@dataclass
class VideoChunk:
    """`k` consecutive temporal groups of a video, ready for the model.

    Args:
        input_ids: (L,) long, per group `<t seconds><|vision_start|>` + `<|video_pad|>` x (h * w / merge**2) +
            `<|vision_end|>` (model/processing/prompt.py).
        pixel_values: (k * h * w, 1536) fp32 rows of these groups (model/processing/patchify.py).
        grid_thw: (k, h, w) in patches; timestamps: seconds per group (len k);
        first_group: index of the chunk's first group in the video; frame_indices: the sampled source frames it
            holds (an odd last frame is repeated in the rows, not listed twice).
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    timestamps: list[float]
    first_group: int
    frame_indices: list[int]


class VideoStream:
    """A video planned up front and decoded chunk by chunk: iterate it for `VideoChunk`s.

    Args:
        processor: `Qwen3VLProcessor` (model/processing/processor.py): tokenizer, video config, sampling rule,
            layout and fps / frame defaults.
        video: a file path (optional `file://` prefix), or a list / sequence / (T, H, W, C) / (T, C, H, W) array
            of frames (every frame is used, as in `preprocess_video`; read in order as the chunks need them, so a
            lazy sequence such as eval/haystack.py's `HaystackFrames` is never held whole).
        options: the message item's video keys (fps, nframes, min_frames, max_frames, video_start, video_end,
            min_pixels, max_pixels, total_pixels, resized_height, resized_width, ...), as in `preprocess_video`.
        groups_per_chunk: temporal groups (of temporal_patch_size = 2 frames) per chunk.
        progress: show a tqdm progress bar (frames / s) while iterating.
    """

    def __init__(self, processor: Qwen3VLProcessor, video, options: dict | None = None, *, groups_per_chunk: int = 32,
                 progress: bool = False):
        if not isinstance(groups_per_chunk, int) or groups_per_chunk < 1:
            raise ValueError(f"groups_per_chunk must be a positive int, got {groups_per_chunk!r}")
        self.processor, self.options = processor, dict(options or {})
        self.groups_per_chunk, self.progress = groups_per_chunk, progress
        self.video = video
        self.path = local_path(video) if isinstance(video, (str, os.PathLike)) else None
        self.plan = processor.plan_video(video, self.options)
        cfg = processor.video_config
        self.tokens_per_group = self.grid_thw[1] * self.grid_thw[2] // cfg.merge_size ** 2
        tok = processor.tokenizer
        # `<t seconds>` ids per group: the text sits between special tokens (or after the prompt prefix, which
        # `prompt_parts` checks), so it encodes alone as it does in the whole prompt.
        self._timestamp_ids = tok.encode_batch([timestamp_text(t) for t in self.timestamps])
        self._group_tail = [processor.vision_start_token_id] + [processor.video_token_id] * self.tokens_per_group + [
            processor.vision_end_token_id]

    # --- the plan ---------------------------------------------------------------------------------------------------
    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """(groups, h, w) in patches of the whole video."""
        return self.plan.grid_thw

    @property
    def timestamps(self) -> list[float]:
        """Seconds per temporal group."""
        return self.plan.timestamps

    @property
    def num_groups(self) -> int:
        return self.grid_thw[0]

    @property
    def num_frames(self) -> int:
        """Sampled frames (before an odd count is padded)."""
        return len(self.plan.frame_indices)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_groups // self.groups_per_chunk)

    def __len__(self) -> int:
        return self.num_chunks

    @property
    def num_tokens(self) -> int:
        """Prompt tokens of the whole video: pads, vision start / end and timestamp text of every group."""
        return sum(len(t) for t in self._timestamp_ids) + self.num_groups * len(self._group_tail)

    def video_ids(self, first_group: int = 0, end_group: int | None = None) -> torch.Tensor:
        """(L,) long prompt ids of groups [first_group, end_group) (default: the whole video), without any pixel."""
        end_group = self.num_groups if end_group is None else end_group
        ids = []
        for g in range(first_group, end_group):
            ids += self._timestamp_ids[g]
            ids += self._group_tail
        return torch.tensor(ids, dtype=torch.long)

    # --- the prompt around the video -------------------------------------------------------------------------------
    def conversation(self, question: str | None = None, system: str | None = None) -> list[dict]:
        """The conversation `prompt_parts` reproduces: [system,] user: [this video (+ options), question]."""
        content = [{"type": "video", "video": self.video, **self.options}]
        if question is not None:
            content.append({"type": "text", "text": question})
        conv = [{"role": "system", "content": system}] if system is not None else []
        return conv + [{"role": "user", "content": content}]

    def prompt_parts(self, question: str | None = None, system: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_ids, suffix_ids), (L,) long each: prefix + every chunk's input_ids + suffix equals
        `processor(messages=[self.conversation(question, system)], add_generation_prompt=True)["input_ids"][0]`.

        The suffix is the question text + `<|im_end|>\\n<|im_start|>assistant\\n` (preceded by the outer
        `<|vision_end|>` in layout "transformers5"); it does not depend on `system`.
        """
        p = self.processor
        text = p.apply_chat_template(self.conversation(question, system), add_generation_prompt=True)
        placeholder = VISION_START + VIDEO_PAD + VISION_END if p.video_layout == "release" else VIDEO_PAD
        if text.count(placeholder) != 1 or text.count(VIDEO_PAD) != 1:
            raise ValueError(f"the chat template rendered {text.count(VIDEO_PAD)} video placeholders for one video")
        before, after = text.split(placeholder)
        prefix, suffix = p.tokenizer.encode(before), p.tokenizer.encode(after)
        # Byte-level BPE could merge the end of the prefix text with the first "<" of "<t seconds>" (" <" is one
        # pre-token); then the parts would not concatenate to the processor's ids. The suffix always follows a
        # special token, so this is the only seam to check.
        if p.video_layout == "release" and before:
            first = timestamp_text(self.timestamps[0])
            if p.tokenizer.encode(before + first) != prefix + self._timestamp_ids[0]:
                raise ValueError(f"the prompt text before the video ({before[-20:]!r}) merges with {first!r} in "
                                 f"BPE; the video cannot be tokenized apart from it")
        return torch.tensor(prefix, dtype=torch.long), torch.tensor(suffix, dtype=torch.long)

    def question_ids(self, question: str) -> torch.Tensor:
        """(L,) long ids that ask `question` after a cached prefix + video (the suffix of `prompt_parts`)."""
        return self.prompt_parts(question)[1]

    # --- chunks -----------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[VideoChunk]:
        """Decode the video in one pass and yield its chunks in order (a new pass per iteration)."""
        frames = self._frames()
        bar = tqdm(total=self.num_frames, unit="frame", disable=not self.progress,
                   desc=os.path.basename(self.path) if self.path else "video")
        try:
            for g0 in range(0, self.num_groups, self.groups_per_chunk):
                # No local keeps the chunk: the caller's reference is the only one while the next is built.
                yield self._chunk(g0, min(self.num_groups, g0 + self.groups_per_chunk), frames, bar)
        finally:
            if hasattr(frames, "close"):
                frames.close()  # ends the decoder: closes the container, restores torch's thread count
            bar.close()

    def _frames(self) -> Iterator[torch.Tensor]:
        """Every sampled frame in order, resized: (3, h, w) uint8 (or float for float frame lists)."""
        uint8 = uses_uint8_kernel(self.processor.video_rule)
        if self.path is not None:
            return iter_frames(self.path, self.plan.frame_indices, size=self.plan.size, uint8_kernel=uint8)
        return (resize(f, *self.plan.size, uint8_kernel=uint8) for f in iter_frame_list(self.video))

    def _chunk(self, g0: int, g1: int, frames: Iterator[torch.Tensor], bar) -> VideoChunk:
        """Groups [g0, g1): pull their frames, patchify them (an odd last frame is repeated by `patchify`)."""
        cfg = self.processor.video_config
        tp = cfg.temporal_patch_size
        used = self.plan.frame_indices[g0 * tp: g1 * tp]
        batch = []
        for f in itertools.islice(frames, len(used)):
            batch.append(f)
            bar.update(1)
        if len(batch) != len(used):
            raise ValueError(f"video {self.path or ''}: the decoder stopped after {g0 * tp + len(batch)} of "
                             f"{self.num_frames} sampled frames")
        pixel_values, grid = patchify(torch.stack(batch), cfg)
        return VideoChunk(self.video_ids(g0, g1), pixel_values, grid, self.timestamps[g0:g1], g0, used)
