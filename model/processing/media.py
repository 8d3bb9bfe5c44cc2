"""Media references: which content items are images / videos, where their data is, and local file paths.

A conversation item is an image when it has `type: "image"` or an `image` / `image_url` key, a video when it has
`type: "video"` or a `video` key (the tests the chat template uses). Paths may carry a `file://` prefix, as in
qwen-vl-utils' message format; `local_path` is the one place that strips it.
"""
from __future__ import annotations

import os

FILE_SCHEME = "file://"
# Image item keys that change its preprocessing (qwen-vl-utils' names).
IMAGE_OPTION_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


def local_path(src: str | os.PathLike) -> str:
    """A media path as a plain file path: `file:///a/b.png` -> `/a/b.png`; other paths unchanged."""
    path = os.fspath(src)
    return path[len(FILE_SCHEME):] if path.startswith(FILE_SCHEME) else path


def item_kind(item) -> str | None:
    """'image', 'video', or None for a content item (same tests as the chat template)."""
    if not isinstance(item, dict):
        return None
    if item.get("type") == "image" or "image" in item or "image_url" in item:
        return "image"
    if item.get("type") == "video" or "video" in item:
        return "video"
    return None


def media_source(item: dict, kind: str, where: str):
    """The media object of an image / video item (path, data or frame list); error naming the message if missing."""
    if kind == "image":
        src = item.get("image", item.get("image_url"))
        if isinstance(src, dict):
            src = src.get("url")
    else:
        src = item.get("video")
    if src is None or (isinstance(src, (str, list, tuple)) and len(src) == 0):
        raise ValueError(f"{where}: {kind} item has no {kind} (expected a '{kind}' field with a path or data)")
    return src


def item_options(item: dict, kind: str) -> dict:
    """The preprocessing options an item carries: image budget / size keys, or every video key but the source."""
    if kind == "image":
        return {k: item[k] for k in IMAGE_OPTION_KEYS if k in item}
    return {k: v for k, v in item.items() if k not in ("type", "video")}
