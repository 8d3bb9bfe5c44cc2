"""Qwen3-VL processor: chat template -> vision placeholders expanded -> token ids, pixel rows, grids, labels.

The counterpart of transformers' `Qwen3VLProcessor` (+ qwen-vl-utils' `process_vision_info`) without transformers:
- a conversation (transformers / qwen-vl-utils message format) is rendered with the checkpoint's chat template
  (or the built-in equivalent, model/processing/chat_template.py), each image / video item becoming one placeholder;
- images: model/processing/image.py; videos: model/processing/video.py (frame sampling rule "transformers" or
  "qwen-vl-utils"); both sized by the one planner, model/processing/geometry.py;
- placeholders become pad runs (and per-group `<t seconds>` timestamps for videos) by model/processing/prompt.py, in
  layout "release" (default) or "transformers5";
- labels (training): -100 everywhere except assistant turns, where the content tokens, the closing <|im_end|> and
  the newline after it are trained, exactly as qwen-vl-finetune's `preprocess_qwen_visual` masks them;
- batching: left or right padding with <|endoftext|>, attention_mask, labels padded with -100;
- `count_tokens`: the exact length of a conversation from image headers and video metadata, without decoding pixels;
- `save_preprocessor_configs`: writes preprocessor_config.json / video_preprocessor_config.json from the config
  objects, so that `load_processor` (and transformers' processors) read back the same geometry and budgets;
- `parse_response`: a generated turn read back into content, reasoning, tool calls and grounding boxes / points
  (model/processing/responses.py), `grounding_to_pixels` / `draw_grounding` for the original image.

Batch keys match `Qwen3VL.forward`: input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
video_grid_thw (+ labels when asked, + mm_token_type_ids when asked).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import IGNORE_INDEX
from .chat_template import builtin_template
from .config import (DEFAULT_FPS, DEFAULT_MAX_FRAMES, DEFAULT_MIN_FRAMES, OFFICIAL_IMAGE_CONFIG,
                     OFFICIAL_VIDEO_CONFIG, RULES, VisionPreprocessConfig)
from .geometry import plan_frame_list, plan_image
from .image import image_size, load_image, preprocess_image
from .media import item_kind, item_options, local_path, media_source
from .prompt import IMAGE_PAD, LAYOUTS, VIDEO_PAD, VISION_END, VISION_START, expand_placeholders
from .responses import draw_grounding, grounding_to_pixels, parse_response
from .tokenizer import Tokenizer
from .video import VideoFeatures, plan_video_file, preprocess_video

IMAGE_CONFIG_FILE, VIDEO_CONFIG_FILE = "preprocessor_config.json", "video_preprocessor_config.json"
NESTED_CONFIG_FILE = "processor_config.json"  # transformers 5: {"image_processor": {...}, "video_processor": {...}}


def _reraise_with_prefix(e: Exception, prefix: str):
    """Raise `e` again with "prefix: " in front of its message (same type when it can be rebuilt from a string)."""
    try:
        new = type(e)(f"{prefix}: {e}")
    except Exception:
        raise e
    raise new from e


class Qwen3VLProcessor:
    """Tokenizer + image/video preprocessing + prompt expansion + batching for Qwen3-VL.

    Args:
        tokenizer: `model.processing.tokenizer.Tokenizer`.
        image_config, video_config: pixel budgets / normalisation (preprocessor_config.json,
            video_preprocessor_config.json).
        video_rule: frame sampling and sizing, "transformers" (default) or "qwen-vl-utils".
        video_layout: "release" (default; transformers 4.57 / vLLM) or "transformers5".
        fps, min_frames, max_frames: video sampling defaults (a message item's own keys override them).
    """

    def __init__(self, tokenizer: Tokenizer, image_config: VisionPreprocessConfig = OFFICIAL_IMAGE_CONFIG,
                 video_config: VisionPreprocessConfig = OFFICIAL_VIDEO_CONFIG, *, video_rule: str = "transformers",
                 video_layout: str = "release", fps: float = DEFAULT_FPS, min_frames: int = DEFAULT_MIN_FRAMES,
                 max_frames: int = DEFAULT_MAX_FRAMES):
        if video_rule not in RULES:
            raise ValueError(f"video_rule must be one of {RULES}, got {video_rule!r}")
        if video_layout not in LAYOUTS:
            raise ValueError(f"video_layout must be one of {LAYOUTS}, got {video_layout!r}")
        self.tokenizer = tokenizer
        self.image_config, self.video_config = image_config, video_config
        self.video_rule, self.video_layout = video_rule, video_layout
        self.fps, self.min_frames, self.max_frames = fps, min_frames, max_frames
        t = tokenizer.token_to_id
        self.image_token_id, self.video_token_id = t(IMAGE_PAD), t(VIDEO_PAD)
        self.vision_start_token_id, self.vision_end_token_id = t(VISION_START), t(VISION_END)
        self.im_start_id, self.im_end_id = t("<|im_start|>"), t("<|im_end|>")
        self.pad_token_id, self.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self._assistant_id = tokenizer.encode("assistant")
        if len(self._assistant_id) != 1:
            raise ValueError("the tokenizer does not encode 'assistant' as one token; labels cannot find the turns")
        self._assistant_id = self._assistant_id[0]
        # Thinking templates open the reasoning in the generation prompt: generated text then starts inside it.
        # (A custom template that cannot render a lone user turn is taken as not thinking.)
        try:
            probe = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], add_generation_prompt=True)
        except Exception:
            probe = ""
        self.thinking = probe.endswith("<think>\n")

    # --- media -----------------------------------------------------------------------------------------------------
    def process_image(self, image, options: dict | None = None, name: str | None = None):
        """One image -> (pixel_values (N, 1536) fp32, grid_thw (1, gh, gw)).

        Args:
            options: the message item's min_pixels / max_pixels (override the budget) or resized_height +
                resized_width (explicit size, rounded to multiples of 32).
        """
        return preprocess_image(image, self.image_config, name=name, options=options)

    def process_video(self, video, options: dict | None = None) -> VideoFeatures:
        """One video (path or frame list) -> VideoFeatures; options: the message item's video keys."""
        return preprocess_video(video, self.video_config, rule=self.video_rule, fps=self.fps,
                                min_frames=self.min_frames, max_frames=self.max_frames, options=options)

    # --- geometry without pixels ----------------------------------------------------------------------------------
    def plan_image(self, image, options: dict | None = None):
        """Geometry (`geometry.ImagePlan`) of one image; a path is read from its header only."""
        if isinstance(image, (str, os.PathLike)):
            h, w = image_size(image)
        else:
            h, w = load_image(image).shape[-2:]
        return plan_image(h, w, self.image_config, options)

    def plan_video(self, video, options: dict | None = None):
        """Geometry (`geometry.VideoPlan`) of one video; a path is read from its container metadata only."""
        o = options or {}
        if isinstance(video, (str, os.PathLike)):
            return plan_video_file(local_path(video), self.video_config, rule=self.video_rule, fps=self.fps,
                                   min_frames=self.min_frames, max_frames=self.max_frames, options=o)[1]
        first = load_image(video[0])
        return plan_frame_list(len(video), *first.shape[-2:], self.video_config, rule=self.video_rule, options=o)

    def count_tokens(self, conversation: list[dict], *, add_generation_prompt: bool = False,
                     **template_kwargs) -> int:
        """Exact token count of `process_conversation(conversation)`'s input_ids, without decoding any pixel."""
        images, videos = [], []
        for where, kind, src, opts in self._media_items(conversation):
            if kind == "image":
                images.append(self._with_context(where, self.plan_image, src, opts).grid_thw)
            else:
                videos.append(self._with_context(where, self.plan_video, src, opts))
        text = self.tokenizer.render_chat(list(conversation), add_generation_prompt=add_generation_prompt,
                                          **template_kwargs)
        return len(self.tokenizer.encode_chat(self.expand_text(text, images, videos, where="conversation")))

    # --- text ------------------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render one conversation to its prompt string (placeholders not yet expanded)."""
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, **kwargs)

    def expand_text(self, text: str, images: list, videos: list, where: str = "text") -> str:
        """Replace image / video placeholders in `text` by their pad runs (and timestamps), checking counts.

        Args:
            images: image_grid_thw rows (t, h, w) in placeholder order; videos: VideoFeatures or VideoPlans in order.
        """
        return expand_placeholders(text, images, videos, image_merge_size=self.image_config.merge_size,
                                   video_merge_size=self.video_config.merge_size, layout=self.video_layout,
                                   where=where)

    def labels_for(self, input_ids: list[int]) -> list[int]:
        """Assistant-only labels: each `<|im_start|>assistant\\n` turn's content, its <|im_end|> and the token after.

        Follows qwen-vl-finetune: from two tokens after the "assistant" role token up to and including the token
        after the closing <|im_end|> (the "\\n"); an unterminated turn (generation prompt) is not trained.
        """
        ids = input_ids
        labels = [IGNORE_INDEX] * len(ids)
        n = len(ids)
        pos = 0
        while pos < n:
            if ids[pos] == self.im_start_id and pos + 1 < n and ids[pos + 1] == self._assistant_id:
                start = pos + 3
                end = start
                while end < n and ids[end] != self.im_end_id:
                    end += 1
                if end < n:
                    stop = min(end + 2, n)
                    labels[start:stop] = ids[start:stop]
                    pos = end
            pos += 1
        for i, t in enumerate(ids):  # vision pads are never targets, whatever the template put where
            if t in (self.image_token_id, self.video_token_id):
                labels[i] = IGNORE_INDEX
        return labels

    # --- one sample ------------------------------------------------------------------------------------------------
    def process_conversation(self, conversation: list[dict], *, add_generation_prompt: bool = False,
                             return_labels: bool = True, **template_kwargs) -> dict:
        """One conversation -> unpadded tensors for the training data pipeline.

        Args:
            conversation: list of {"role", "content"}; content a string or a list of text / image / video items.
            add_generation_prompt: end with `<|im_start|>assistant\\n`.
            return_labels: also return `labels` (assistant-only, -100 elsewhere).
            template_kwargs: extra chat-template variables (tools, add_vision_id, ...).
        Returns:
            dict with input_ids (L,) long, [labels (L,) long], and when present pixel_values (N, 1536) fp32,
            image_grid_thw (n_img, 3) long, pixel_values_videos (M, 1536) fp32, video_grid_thw (n_vid, 3) long,
            video_timestamps (list of per-group seconds per video).
        """
        images, videos = [], []
        for where, kind, src, opts in self._media_items(conversation):
            if kind == "image":
                images.append(self._with_context(where, self.process_image, src, opts,
                                                 name=src if isinstance(src, str) else where))
            else:
                videos.append(self._with_context(where, self.process_video, src, opts))
        # message text is escaped, so only the template makes control tokens (tokenizer.py: "text is text")
        text = self.tokenizer.render_chat(list(conversation), add_generation_prompt=add_generation_prompt,
                                          **template_kwargs)
        return self._finish(text, images, videos, return_labels, where="conversation", chat=True)

    def process_text(self, text: str, images=(), videos=(), *, video_options: dict | None = None,
                     return_labels: bool = False) -> dict:
        """One prompt string that already holds placeholders (like transformers' `processor(text=...)`) + its media.

        Args:
            text: prompt with `<|vision_start|><|image_pad|><|vision_end|>` / `...<|video_pad|>...` placeholders.
            images: paths / PIL / arrays in placeholder order; videos: paths or frame lists in order.
            video_options: item keys applied to every video (fps, min_frames, ...).
        """
        imgs = [self._with_context(f"image {i}", self.process_image, im, None,
                                   name=im if isinstance(im, str) else f"image {i}") for i, im in enumerate(images)]
        vids = [self._with_context(f"video {i}", self.process_video, v, video_options) for i, v in enumerate(videos)]
        return self._finish(text, imgs, vids, return_labels, where="text")

    @staticmethod
    def _media_items(conversation: list[dict]):
        """(where, kind, source, options) of every image / video item, in order; checks the message structure."""
        if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
            raise TypeError("a conversation must be a list of {'role': ..., 'content': ...} dicts")
        for mi, msg in enumerate(conversation):
            if "role" not in msg or "content" not in msg:
                raise ValueError(f"message {mi} needs 'role' and 'content', got keys {sorted(msg)}")
            if isinstance(msg["content"], str):
                continue
            for ii, item in enumerate(msg["content"]):
                kind = item_kind(item)
                if kind is not None:
                    where = f"message {mi} ({msg['role']}), item {ii}"
                    yield where, kind, media_source(item, kind, where), item_options(item, kind)

    @staticmethod
    def _with_context(where, fn, *args, **kwargs):
        """Run a media step, prefixing value errors with the message / item they came from."""
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, OSError) as e:
            _reraise_with_prefix(e, where)

    def _finish(self, text, images, videos, return_labels, where, chat: bool = False) -> dict:
        """Expand placeholders, tokenize (a `render_chat` prompt when `chat`), attach media tensors (and labels)."""
        text = self.expand_text(text, [g for _, g in images], videos, where=where)
        ids = self.tokenizer.encode_chat(text) if chat else self.tokenizer.encode(text)
        out = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if return_labels:
            out["labels"] = torch.tensor(self.labels_for(ids), dtype=torch.long)
        if images:
            # one image (the common case) is handed over as is: a copy of its ~6 MB rows per sample adds up
            out["pixel_values"] = images[0][0] if len(images) == 1 else torch.cat([pv for pv, _ in images])
            out["image_grid_thw"] = torch.tensor([list(g) for _, g in images], dtype=torch.long)
        if videos:
            out["pixel_values_videos"] = torch.cat([v.pixel_values for v in videos])
            out["video_grid_thw"] = torch.tensor([list(v.grid_thw) for v in videos], dtype=torch.long)
            out["video_timestamps"] = [v.timestamps for v in videos]
        return out

    # --- batches ---------------------------------------------------------------------------------------------------
    def collate(self, samples: list[dict], padding_side: str = "left", return_mm_token_type_ids: bool = False) -> dict:
        """Pad per-sample dicts into a batch (B, L) and concatenate their media in sample order.

        Args:
            samples: outputs of `process_conversation` / `process_text`.
            padding_side: "left" (generation) or "right" (training).
        Returns:
            input_ids, attention_mask (B, L) long, [labels (B, L)], media tensors concatenated over the batch,
            [mm_token_type_ids (B, L): 0 text, 1 image pad, 2 video pad].
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not samples:
            raise ValueError("empty batch")
        L = max(len(s["input_ids"]) for s in samples)
        B = len(samples)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        with_labels = all("labels" in s for s in samples)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long) if with_labels else None
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            sl = slice(L - n, L) if padding_side == "left" else slice(0, n)
            input_ids[b, sl] = s["input_ids"]
            attention_mask[b, sl] = 1
            if with_labels:
                labels[b, sl] = s["labels"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            batch["labels"] = labels
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [s[key] for s in samples if key in s]
            if parts:
                batch[key] = torch.cat(parts)
        if return_mm_token_type_ids:
            batch["mm_token_type_ids"] = ((input_ids == self.image_token_id).long()
                                          + 2 * (input_ids == self.video_token_id).long())
        return batch

    def __call__(self, messages=None, *, text=None, images=None, videos=None, add_generation_prompt: bool = True,
                 return_labels: bool = False, padding_side: str = "left", return_mm_token_type_ids: bool = False,
                 video_options: dict | None = None, **template_kwargs) -> dict:
        """Batch of conversations (or of prompt strings + media) -> padded model inputs.

        Args:
            messages: one conversation or a list of conversations (transformers / qwen-vl-utils format).
            text, images, videos: instead of messages, prompt string(s) with placeholders and the flat lists of
                media they reference, in order across the batch (transformers' `processor(text=..., images=...)`).
            add_generation_prompt: end each conversation with `<|im_start|>assistant\\n` (messages only).
            return_labels: add `labels` (assistant-only mask, -100 padding).
            padding_side: "left" or "right".
        Returns:
            dict: input_ids, attention_mask (B, L) long; pixel_values (N, 1536) fp32, image_grid_thw (n, 3) long;
            pixel_values_videos, video_grid_thw; labels; mm_token_type_ids -- media keys only when present.
        """
        if (messages is None) == (text is None):
            raise ValueError("pass either messages=[conversation, ...] or text=... (with images / videos)")
        samples = []
        if messages is not None:
            convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
            for i, conv in enumerate(convs):
                try:
                    samples.append(self.process_conversation(conv, add_generation_prompt=add_generation_prompt,
                                                             return_labels=return_labels, **template_kwargs))
                except (ValueError, TypeError, OSError) as e:
                    _reraise_with_prefix(e, f"conversation {i}")
        else:
            texts = [text] if isinstance(text, str) else list(text)
            images, videos = list(images or []), list(videos or [])
            for i, t in enumerate(texts):
                ni, nv = t.count(IMAGE_PAD), t.count(VIDEO_PAD)
                if ni > len(images) or nv > len(videos):
                    raise ValueError(f"text {i} references {ni} images and {nv} videos but only {len(images)} images "
                                     f"and {len(videos)} videos are left")
                samples.append(self.process_text(t, images[:ni], videos[:nv], video_options=video_options,
                                                 return_labels=return_labels))
                images, videos = images[ni:], videos[nv:]
            if images or videos:
                raise ValueError(f"{len(images)} images and {len(videos)} videos were given but no placeholder uses them")
        batch = self.collate(samples, padding_side, return_mm_token_type_ids)
        return batch

    # --- files ---------------------------------------------------------------------------------------------------
    def preprocessor_configs(self) -> dict[str, dict]:
        """{file name: dict} of preprocessor_config.json and video_preprocessor_config.json for this processor."""
        video = {**self.video_config.to_dict("video"), "fps": self.fps, "min_frames": self.min_frames,
                 "max_frames": self.max_frames}
        return {IMAGE_CONFIG_FILE: self.image_config.to_dict("image"), VIDEO_CONFIG_FILE: video}

    def save_preprocessor_configs(self, dst: str | os.PathLike):
        """Write this processor's budgets, geometry and video sampling to `dst`, so `load_processor(dst)` (and
        transformers' processors) preprocess as this processor does.

        Keys already in dst's files that these configs do not set are kept; a transformers 5 processor_config.json
        in dst (which load_processor reads first) gets the same sections.
        """
        dst = Path(dst)
        files = self.preprocessor_configs()
        for name, d in files.items():
            old = _read_json(dst / name)
            old.pop("min_pixels", None), old.pop("max_pixels", None)  # legacy budget keys: `size` replaces them
            _write_json(dst / name, {**old, **d})
        nested = _read_json(dst / NESTED_CONFIG_FILE)
        sections = {"image_processor": files[IMAGE_CONFIG_FILE], "video_processor": files[VIDEO_CONFIG_FILE]}
        if any(key in nested for key in sections):
            for key, d in sections.items():
                if key in nested:
                    old = {k: v for k, v in nested[key].items() if k not in ("min_pixels", "max_pixels")}
                    nested[key] = {**old, **d}
            _write_json(dst / NESTED_CONFIG_FILE, nested)

    # --- answers ---------------------------------------------------------------------------------------------------
    def parse_response(self, text: str, *, strict: bool = False) -> dict:
        """One generated turn (decoded text) -> {"content", "reasoning", "tool_calls", "boxes", "points", "errors"}.

        Grounding coordinates stay as written (0..1000, relative to the image); `grounding_to_pixels` maps them.
        With a Thinking template (`self.thinking`) a turn without `</think>` is reasoning cut short. `strict=True`
        raises ValueError on any unreadable tool call or grounding object instead of listing it under "errors".
        See model/processing/responses.py.
        """
        return parse_response(text, thinking_prompt=self.thinking, strict=strict)

    def grounding_to_pixels(self, parsed: dict, image) -> dict:
        """`parse_response` boxes / points in pixels (floats) of the original `image` (path: header only; PIL, array,
        tensor; or its (height, width)). Qwen3-VL's coordinates are relative to the whole image, so the processor's
        resize does not enter: x_pixel = x / 1000 * width."""
        if isinstance(image, (tuple, list)) and len(image) == 2:
            h, w = image
        elif isinstance(image, (str, os.PathLike)):
            h, w = image_size(image)
        else:
            h, w = load_image(image).shape[-2:]
        return grounding_to_pixels(parsed, int(w), int(h))

    def draw_grounding(self, image, parsed: dict, path=None):
        """Draw `parse_response`'s boxes and points on `image` (PIL image or path); saved to `path` if given."""
        return draw_grounding(image, parsed, path)

    # --- decoding --------------------------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of one id sequence."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a batch of id sequences."""
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _write_json(path: Path, d: dict):
    """Atomic write (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(d, indent=2), encoding="utf-8")
    tmp.replace(path)


def _vision_config(d: dict, default: VisionPreprocessConfig, what: str) -> VisionPreprocessConfig:
    try:
        return VisionPreprocessConfig.from_dict(d, default)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e


def load_processor(path: str | os.PathLike | None = None, *, thinking: bool | None = None,
                   **kwargs) -> Qwen3VLProcessor:
    """Processor for a checkpoint directory (tokenizer + preprocessor configs), or the embedded default (None).

    Args:
        path: directory with tokenizer.json, tokenizer_config.json, preprocessor_config.json,
            video_preprocessor_config.json (or transformers 5's nested processor_config.json); None: the embedded
            Qwen3-VL tokenizer and the official preprocessing values.
        thinking: chat template. None: the checkpoint's own (a Thinking checkpoint ships the Thinking one), else the
            built-in Instruct one; True: the official Thinking template (chat_template_thinking.jinja); False: the
            built-in Instruct one. An explicit True / False replaces the checkpoint's template.
        kwargs: Qwen3VLProcessor options (video_rule, video_layout, fps, min_frames, max_frames).
    """
    tokenizer = Tokenizer.from_pretrained(path, None if thinking is None else builtin_template(thinking))
    image_cfg, video_cfg = OFFICIAL_IMAGE_CONFIG, OFFICIAL_VIDEO_CONFIG
    if path is not None:
        ckpt = Path(path)
        nested = _read_json(ckpt / NESTED_CONFIG_FILE)
        img = nested.get("image_processor") or _read_json(ckpt / IMAGE_CONFIG_FILE)
        vid = nested.get("video_processor") or _read_json(ckpt / VIDEO_CONFIG_FILE)
        if img:
            image_cfg = _vision_config(img, OFFICIAL_IMAGE_CONFIG, "image processor config")
        if vid:
            video_cfg = _vision_config(vid, OFFICIAL_VIDEO_CONFIG, "video processor config")
            for key in ("fps", "min_frames", "max_frames"):
                if vid.get(key) is not None:
                    kwargs.setdefault(key, vid[key])
    return Qwen3VLProcessor(tokenizer, image_cfg, video_cfg, **kwargs)
