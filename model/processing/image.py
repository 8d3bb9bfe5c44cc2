"""Image preprocessing for Qwen3-VL: load to RGB uint8, bicubic resize to the planned size, patchify.

Follows transformers 5's `Qwen2VLImageProcessor` (torchvision backend), which the Qwen3-VL processor uses for images:
RGB uint8 (C, H, W) -> size and grid from `geometry.plan_image` (smart_resize to multiples of patch*merge = 32 within
the pixel budget) -> torchvision-style bicubic resize with antialias on the uint8 tensor (`F.interpolate(...,
mode="bicubic", antialias=True)`, native uint8 kernel on CPU, float + clamp + round elsewhere) -> `patchify.patchify`
(normalise, frame repeated to the temporal patch (2), rows of (C, t, 16, 16) in merge-block order).
The pixel budgets come from the checkpoint's preprocessor_config.json (`config.VisionPreprocessConfig`).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .config import OFFICIAL_IMAGE_CONFIG, VisionPreprocessConfig
from .geometry import plan_image
from .media import local_path
from .patchify import patchify


def _pil_to_rgb(img, name: str) -> np.ndarray:
    """PIL image -> (H, W, 3) uint8, compositing transparency onto white (as transformers / qwen-vl-utils do).

    16-bit grayscale (PIL modes I;16*, and I, PIL's 32-bit integer mode that 16-bit files also open as) is scaled
    by 255 / 65535 and rounded; PIL's convert("RGB") would clip it at 255, turning most of any image white.
    """
    from PIL import Image

    try:
        img.load()
        if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
            wide = np.asarray(img).astype(np.int64).clip(0, 65535)
            gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535), integer arithmetic
            return np.repeat(gray[..., None], 3, axis=-1)
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            img = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
        else:
            img = img.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot decode image {name}: {e}") from e
    return np.asarray(img)


def load_image(image, name: str | None = None) -> torch.Tensor:
    """Load one image to an RGB (3, H, W) uint8 tensor (float input in [0, 1] gives float32 on the 0..255 scale).

    Args:
        image: path (str / PathLike, optional `file://` prefix), PIL image, numpy array or tensor,
            (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}.
        name: how to call the image in error messages.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = name or (str(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__)
    if isinstance(image, (str, os.PathLike)):
        path = local_path(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                # Upright as transformers' loader returns it (EXIF orientation applied for files).
                arr = _pil_to_rgb(ImageOps.exif_transpose(img), path)
        except UnidentifiedImageError as e:
            raise ValueError(f"cannot decode image {path}: not a recognised image file") from e
        except OSError as e:  # truncated / corrupt data behind a valid header
            raise ValueError(f"cannot decode image {path}: {e}") from e
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, Image.Image):
        return torch.from_numpy(_pil_to_rgb(image, name).copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"unsupported image type {type(image).__name__} for {name}: use a path, PIL image, array or tensor")
    x = image.detach().cpu()
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"image {name} must be (H, W), (H, W, C) or (C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.permute(2, 0, 1)  # channels-last -> channels-first
    if x.shape[0] not in (1, 3, 4):
        raise ValueError(f"image {name} needs 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise TypeError(f"image {name}: integer images must be uint8, got {x.dtype}")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"image {name}: float images must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        x = x.float() * 255.0
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 4:  # alpha-composite onto white
        a = x[3:].float() / 255.0
        rgb = x[:3].float() * a + 255.0 * (1 - a)
        x = rgb.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else rgb
    return x.contiguous()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_METADATA_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")


def _png_metadata_after_pixels(path: str) -> bool:
    """Whether a PNG holds a metadata chunk (EXIF, text, XMP) after its first pixel-data chunk. Walks the chunk
    list, seeking over each chunk's data: nothing is read or decompressed but 8 bytes per chunk."""
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return True  # not what PIL called PNG: let PIL decide
        seen_pixels = False
        while True:
            head = f.read(8)
            if len(head) < 8:
                return False
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"IEND":
                return False
            if kind in (b"IDAT", b"fdAT"):
                seen_pixels = True
            elif seen_pixels and kind in _PNG_METADATA_CHUNKS:
                return True
            f.seek(length + 4, os.SEEK_CUR)  # data + CRC


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file after EXIF orientation, read from its header (no pixel decoding).

    PIL's PNG `getexif()` decodes the whole image to reach metadata that may follow the pixel data (150 ms for an
    A4 page); here the chunk list is walked instead, and the image is only loaded in the rare file that keeps its
    metadata after the pixels, so that the orientation always equals what `load_image`'s exif_transpose applies.
    """
    from PIL import Image

    path = local_path(path)
    with Image.open(path) as img:
        w, h = img.size
        if img.format == "PNG" and not _png_metadata_after_pixels(path):
            exif = Image.Image.getexif(img)  # everything is in img.info already: the base class reads only that
        else:
            exif = img.getexif()
        orientation = exif.get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # 5-8 swap the axes


def resize(frames: torch.Tensor, height: int, width: int, uint8_kernel: bool = True) -> torch.Tensor:
    """Bicubic resize with antialias, numerically as torchvision's resize on tensors.

    Args:
        frames: (..., C, H, W) uint8 or float.
        uint8_kernel: for uint8 input, torch's native uint8 kernel on CPU, as torchvision.transforms.v2 (and so
            transformers 5) uses; False: fp32 interpolate, clamp, round, as torchvision.transforms.functional (v1,
            used by qwen-vl-utils). The two differ by up to ~12 levels on strong downscales.
    Returns:
        (..., C, height, width), same dtype.
    """
    *lead, c, h, w = frames.shape
    if (h, w) == (height, width):
        return frames
    x = frames.reshape(-1, c, h, w)
    if x.dtype == torch.uint8 and uint8_kernel and x.device.type == "cpu":
        y = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    elif x.dtype == torch.uint8:  # fp32, then clamp + round (v1 always; v2 off CPU, where no uint8 kernel exists)
        x = x.contiguous().float()  # contiguous: the fp32 antialias kernel is ~2x faster, same result
        y = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        y = y.clamp_(0, 255).round_().to(torch.uint8)
    else:
        y = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return y.reshape(*lead, c, height, width)


def preprocess_image(image, config: VisionPreprocessConfig = OFFICIAL_IMAGE_CONFIG, name: str | None = None,
                     size: tuple[int, int] | None = None, options: dict | None = None):
    """One image -> (pixel_values (N, 1536) fp32, grid_thw (1, gh, gw)).

    Args:
        image: path, PIL image, array or tensor (see `load_image`).
        config: pixel budget and normalisation (the checkpoint's preprocessor_config.json).
        size: explicit (height, width) (qwen-vl-utils' resized_height / resized_width), rounded to the factor;
            the pixel budget is not applied.
        options: the message item's image keys (see `geometry.plan_image`).
    """
    x = load_image(image, name)
    if size is not None:
        options = {**(options or {}), "resized_height": size[0], "resized_width": size[1]}
    try:
        plan = plan_image(*x.shape[-2:], config, options)
    except ValueError as e:
        raise ValueError(f"image {name or ''}: {e}") from e
    return patchify(resize(x[None], *plan.size), config)
