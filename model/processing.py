"""Qwen3-VL processor: chat template -> vision placeholders expanded -> token ids, pixel rows, grids, labels.

The counterpart of transformers' `Qwen3VLProcessor` (+ qwen-vl-utils' `process_vision_info`) without transformers:
- a conversation (transformers / qwen-vl-utils message format) is rendered with the checkpoint's chat template
  (or the built-in equivalent), each image / video item becoming one placeholder;
- images: `model.image` (smart_resize with the checkpoint budgets, bicubic, normalise, patchify); each
  `<|image_pad|>` becomes grid_h * grid_w / 4 pads;
- videos: `model.video` (frame sampling rule "transformers" or "qwen-vl-utils"); each placeholder becomes, per
  temporal group, `<t seconds><|vision_start|><|video_pad|> x (h'*w')<|vision_end|>`. Layout "release" (release-time
  transformers 4.57 / vLLM, the default) replaces the whole `<|vision_start|><|video_pad|><|vision_end|>` triplet;
  layout "transformers5" replaces only the pad, keeping an outer vision_start ... vision_end (SPEC.md section 5);
- labels (training): -100 everywhere except assistant turns, where the content tokens, the closing <|im_end|> and
  the newline after it are trained, exactly as qwen-vl-finetune's `preprocess_qwen_visual` masks them;
- batching: left or right padding with <|endoftext|>, attention_mask, labels padded with -100.

Batch keys match `Qwen3VL.forward`: input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
video_grid_thw (+ labels when asked, + mm_token_type_ids when asked).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from .image import OFFICIAL_IMAGE_CONFIG, OFFICIAL_VIDEO_CONFIG, VisionPreprocessConfig, preprocess_image
from .tokenizer import Tokenizer
from .video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, DEFAULT_MIN_FRAMES, RULES, VideoFeatures, preprocess_video
from .video import timestamp_text

IGNORE_INDEX = -100
LAYOUTS = ("release", "transformers5")
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
_IMAGE_OPTION_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


def _item_kind(item) -> str | None:
    """'image', 'video', or None for a content item (same tests as the chat template)."""
    if not isinstance(item, dict):
        return None
    if item.get("type") == "image" or "image" in item or "image_url" in item:
        return "image"
    if item.get("type") == "video" or "video" in item:
        return "video"
    return None


def _media_of(item: dict, kind: str, where: str):
    """The media object of an image / video item; error naming the message when it is missing."""
    if kind == "image":
        src = item.get("image", item.get("image_url"))
        if isinstance(src, dict):
            src = src.get("url")
    else:
        src = item.get("video")
    if src is None or (isinstance(src, (str, list, tuple)) and len(src) == 0):
        raise ValueError(f"{where}: {kind} item has no {kind} (expected a '{kind}' field with a path or data)")
    return src


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
        tokenizer: `model.tokenizer.Tokenizer`.
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

    # --- media -----------------------------------------------------------------------------------------------------
    def process_image(self, image, options: dict | None = None, name: str | None = None):
        """One image -> (pixel_values (N, 1536) fp32, grid_thw (1, gh, gw)).

        Args:
            options: the message item's min_pixels / max_pixels (override the budget) or resized_height +
                resized_width (explicit size, rounded to multiples of 32).
        """
        cfg, o = self.image_config, options or {}
        if "min_pixels" in o or "max_pixels" in o:
            cfg = dataclasses.replace(cfg, min_pixels=int(o.get("min_pixels", cfg.min_pixels)),
                                      max_pixels=int(o.get("max_pixels", cfg.max_pixels)))
        size = (int(o["resized_height"]), int(o["resized_width"])) if "resized_height" in o and "resized_width" in o else None
        return preprocess_image(image, cfg, name=name, size=size)

    def process_video(self, video, options: dict | None = None) -> VideoFeatures:
        """One video (path or frame list) -> VideoFeatures; options: the message item's video keys."""
        return preprocess_video(video, self.video_config, rule=self.video_rule, fps=self.fps,
                                min_frames=self.min_frames, max_frames=self.max_frames, options=options)

    def video_prompt(self, feats: VideoFeatures) -> str:
        """The text replacing one video placeholder: per temporal group `<t seconds><|vision_start|>pads<|vision_end|>`."""
        m2 = self.video_config.merge_size ** 2
        per_group = feats.grid_thw[1] * feats.grid_thw[2] // m2
        groups = "".join(timestamp_text(t) + VISION_START + VIDEO_PAD * per_group + VISION_END for t in feats.timestamps)
        return groups

    # --- text ------------------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render one conversation to its prompt string (placeholders not yet expanded)."""
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, **kwargs)

    def expand_text(self, text: str, images: list, videos: list[VideoFeatures], where: str = "text") -> str:
        """Replace image / video placeholders in `text` by their pad runs (and timestamps), checking counts.

        Args:
            images: image_grid_thw rows (t, h, w) in placeholder order; videos: VideoFeatures in order.
        """
        n_img, n_vid = text.count(IMAGE_PAD), text.count(VIDEO_PAD)
        if n_img != len(images) or n_vid != len(videos):
            raise ValueError(
                f"{where}: the prompt has {n_img} image and {n_vid} video placeholders but {len(images)} images and "
                f"{len(videos)} videos were given")
        m2 = self.image_config.merge_size ** 2
        parts = text.split(IMAGE_PAD)
        text = parts[0] + "".join(IMAGE_PAD * (t * h * w // m2) + p for (t, h, w), p in zip(images, parts[1:]))
        if self.video_layout == "release":
            pattern = re.escape(VISION_START + VIDEO_PAD + VISION_END) + "|" + re.escape(VIDEO_PAD)
        else:
            pattern = re.escape(VIDEO_PAD)
        vid_iter = iter(videos)
        parts = re.split(f"({pattern})", text)
        return "".join(self.video_prompt(next(vid_iter)) if i % 2 else p for i, p in enumerate(parts))

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
        if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
            raise TypeError("a conversation must be a list of {'role': ..., 'content': ...} dicts")
        images, videos = [], []
        for mi, msg in enumerate(conversation):
            if "role" not in msg or "content" not in msg:
                raise ValueError(f"message {mi} needs 'role' and 'content', got keys {sorted(msg)}")
            content = msg["content"]
            if isinstance(content, str):
                continue
            for ii, item in enumerate(content):
                kind = _item_kind(item)
                where = f"message {mi} ({msg['role']}), item {ii}"
                if kind == "image":
                    src = _media_of(item, "image", where)
                    opts = {k: item[k] for k in _IMAGE_OPTION_KEYS if k in item}
                    images.append(self._with_context(where, self.process_image, src, opts,
                                                     name=src if isinstance(src, str) else where))
                elif kind == "video":
                    src = _media_of(item, "video", where)
                    opts = {k: v for k, v in item.items() if k not in ("type", "video")}
                    videos.append(self._with_context(where, self.process_video, src, opts))
        text = self.apply_chat_template(list(conversation), add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self._finish(text, images, videos, return_labels, where="conversation")

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
    def _with_context(where, fn, *args, **kwargs):
        """Run a media step, prefixing value errors with the message / item they came from."""
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, OSError) as e:
            _reraise_with_prefix(e, where)

    def _finish(self, text, images, videos, return_labels, where) -> dict:
        """Expand placeholders, tokenize, attach media tensors (and labels)."""
        text = self.expand_text(text, [g for _, g in images], videos, where=where)
        ids = self.tokenizer.encode(text)
        out = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if return_labels:
            out["labels"] = torch.tensor(self.labels_for(ids), dtype=torch.long)
        if images:
            out["pixel_values"] = torch.cat([pv for pv, _ in images])
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

    # --- decoding --------------------------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of one id sequence."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a batch of id sequences."""
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _check_resample(d: dict, what: str):
    if d.get("resample", 3) != 3:
        raise ValueError(f"{what}: only bicubic resampling (resample=3) is implemented, got {d['resample']}")


def load_processor(path: str | os.PathLike | None = None, **kwargs) -> Qwen3VLProcessor:
    """Processor for a checkpoint directory (tokenizer + preprocessor configs), or the embedded default (None).

    Args:
        path: directory with tokenizer.json, tokenizer_config.json, preprocessor_config.json,
            video_preprocessor_config.json (or transformers 5's nested processor_config.json); None: the embedded
            Qwen3-VL tokenizer and the official preprocessing values.
        kwargs: Qwen3VLProcessor options (video_rule, video_layout, fps, min_frames, max_frames).
    """
    tokenizer = Tokenizer.from_pretrained(path)
    image_cfg, video_cfg = OFFICIAL_IMAGE_CONFIG, OFFICIAL_VIDEO_CONFIG
    if path is not None:
        ckpt = Path(path)
        nested = _read_json(ckpt / "processor_config.json")
        img = nested.get("image_processor") or _read_json(ckpt / "preprocessor_config.json")
        vid = nested.get("video_processor") or _read_json(ckpt / "video_preprocessor_config.json")
        if img:
            _check_resample(img, "image processor config")
            image_cfg = VisionPreprocessConfig.from_dict(img, OFFICIAL_IMAGE_CONFIG)
        if vid:
            _check_resample(vid, "video processor config")
            video_cfg = VisionPreprocessConfig.from_dict(vid, OFFICIAL_VIDEO_CONFIG)
            for key in ("fps", "min_frames", "max_frames"):
                if vid.get(key) is not None:
                    kwargs.setdefault(key, vid[key])
    return Qwen3VLProcessor(tokenizer, image_cfg, video_cfg, **kwargs)
