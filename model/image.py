"""Image preprocessing for Qwen3-VL: load, smart_resize, bicubic resize, normalise, patchify into (N, 1536) rows.

Follows transformers 5's `Qwen2VLImageProcessor` (torchvision backend), which the Qwen3-VL processor uses for images:
RGB uint8 (C, H, W) -> smart_resize to multiples of patch*merge = 32 within the pixel budget -> torchvision-style
bicubic resize with antialias on the uint8 tensor (`F.interpolate(..., mode="bicubic", antialias=True)`, native
uint8 kernel on CPU, float + clamp + round elsewhere) -> (x - 255*mean) / (255*std) in fp32 -> frames duplicated to
the temporal patch (2) -> rows laid out (C, t, 16, 16) in merge-block order (SPEC.md section 1).
The pixel budgets come from the checkpoint's preprocessor_config.json (official: 65536 .. 16777216 pixels).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """Pixel budgets and normalisation of one modality (images or videos), as in preprocessor_config.json.

    Args:
        min_pixels / max_pixels: `size.shortest_edge` / `size.longest_edge` (for video: over all frames).
        patch_size, temporal_patch_size, merge_size: vision tower geometry (16, 2, 2).
        image_mean, image_std: per-channel, on the [0, 1] scale.
    """

    min_pixels: int
    max_pixels: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @property
    def factor(self) -> int:
        """Side lengths are rounded to multiples of this (patch * merge = 32)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict, default: "VisionPreprocessConfig") -> "VisionPreprocessConfig":
        """Read a preprocessor_config.json / video_preprocessor_config.json dict (`size` or legacy min/max_pixels)."""
        size = d.get("size") or {}
        return cls(
            min_pixels=int(size.get("shortest_edge", d.get("min_pixels", default.min_pixels))),
            max_pixels=int(size.get("longest_edge", d.get("max_pixels", default.max_pixels))),
            patch_size=int(d.get("patch_size", default.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", default.temporal_patch_size)),
            merge_size=int(d.get("merge_size", default.merge_size)),
            image_mean=tuple(d.get("image_mean", default.image_mean)),
            image_std=tuple(d.get("image_std", default.image_std)),
        )


# Official Qwen3-VL preprocessor_config.json / video_preprocessor_config.json values (SPEC.md section 5).
OFFICIAL_IMAGE_CONFIG = VisionPreprocessConfig(min_pixels=65536, max_pixels=16777216)
OFFICIAL_VIDEO_CONFIG = VisionPreprocessConfig(min_pixels=4096, max_pixels=25165824)


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536, max_pixels: int = 16777216):
    """Target (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept (HF rule).

    Args:
        height, width: source size in pixels.
    Returns:
        (resized_height, resized_width) ints.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width):.1f} "
            f"({height}x{width})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pil_to_rgb(img, name: str) -> np.ndarray:
    """PIL image -> (H, W, 3) uint8, compositing transparency onto white (as transformers / qwen-vl-utils do)."""
    from PIL import Image

    try:
        img.load()
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
        path = str(image)
        path = path[len("file://") :] if path.startswith("file://") else path
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


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file after EXIF orientation, read from its header (no pixel decoding)."""
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
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


def normalize(frames: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - 255*mean) / (255*std) in fp32, the fused rescale+normalise of transformers' torchvision backend.

    Args:
        frames: (..., C, H, W) uint8 or float on the 0..255 scale.
    """
    m = torch.tensor(mean, dtype=torch.float32, device=frames.device) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=frames.device) * 255.0
    return frames.to(torch.float32).sub_(m[:, None, None]).div_(s[:, None, None])


def patchify(frames: torch.Tensor, patch_size: int = 16, temporal_patch_size: int = 2, merge_size: int = 2):
    """Cut normalised frames into vision-tower rows (SPEC.md section 1).

    Args:
        frames: (T, C, H, W) float; T is padded to a multiple of temporal_patch_size by repeating the last frame;
            H, W multiples of patch_size * merge_size.
    Returns:
        pixel_values (grid_t * grid_h * grid_w, C * tp * p * p) and grid_thw (grid_t, grid_h, grid_w).
    """
    t, c, h, w = frames.shape
    if pad := -t % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    p, m, tp = patch_size, merge_size, temporal_patch_size
    gt, gh, gw = t // tp, h // p, w // p
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch*merge = {p * m}")
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # (gt, gh/m, gw/m, m, m, C, tp, p, p): temporal group, merge block (row-major), position in block; row = (C, t, p, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def preprocess_image(image, config: VisionPreprocessConfig = OFFICIAL_IMAGE_CONFIG, name: str | None = None,
                     size: tuple[int, int] | None = None):
    """One image -> (pixel_values (N, 1536) fp32, grid_thw (1, gh, gw)).

    Args:
        image: path, PIL image, array or tensor (see `load_image`).
        config: pixel budget and normalisation (the checkpoint's preprocessor_config.json).
        size: explicit (height, width) (qwen-vl-utils' resized_height / resized_width), rounded to the factor;
            the pixel budget is not applied.
    """
    x = load_image(image, name)
    h, w = size if size is not None else x.shape[-2:]
    try:
        if size is not None:
            rh, rw = smart_resize(h, w, config.factor, 1, 1 << 62)
        else:
            rh, rw = smart_resize(h, w, config.factor, config.min_pixels, config.max_pixels)
    except ValueError as e:
        raise ValueError(f"image {name or ''}: {e}") from e
    x = normalize(resize(x, rh, rw), config.image_mean, config.image_std)
    # An image is a one-frame video: the frame is duplicated to fill the temporal patch.
    return patchify(x[None].expand(config.temporal_patch_size, -1, -1, -1), config.patch_size,
                    config.temporal_patch_size, config.merge_size)
