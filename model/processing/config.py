"""Preprocessing configuration: pixel budgets, patch geometry, normalisation and video sampling defaults.

One `VisionPreprocessConfig` per modality, read from and written to a checkpoint's preprocessor_config.json
(images) / video_preprocessor_config.json (videos) with transformers' keys (`size.shortest_edge` /
`size.longest_edge` are the min / max pixel budgets), so transformers' `Qwen2VLImageProcessor` /
`Qwen3VLVideoProcessor` read the same geometry from the files this package writes.
"""
from __future__ import annotations

from dataclasses import dataclass

# transformers' Qwen3VLVideoProcessor defaults (also the official video_preprocessor_config.json values).
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768
# Frame sampling / sizing rules (model/processing/video_sampling.py, model/processing/geometry.py).
RULES = ("transformers", "qwen-vl-utils")

# Keys transformers' processors expect beside the geometry; we only implement these values (bicubic, 1/255, RGB).
_FIXED_KEYS = {"resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "do_convert_rgb": True}
_PROCESSOR_TYPES = {"image": {"image_processor_type": "Qwen2VLImageProcessorFast"},
                    "video": {"video_processor_type": "Qwen3VLVideoProcessor"}}


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
        if d.get("resample", 3) != 3:
            raise ValueError(f"only bicubic resampling (resample=3) is implemented, got {d['resample']}")
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

    def to_dict(self, kind: str) -> dict:
        """The transformers-style dict of this config (`kind` "image" or "video" names the processor class).

        `from_dict(to_dict(kind), any_default) == self`.
        """
        return {**_PROCESSOR_TYPES[kind], "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                **_FIXED_KEYS}


# The official Qwen3-VL checkpoints' preprocessor_config.json / video_preprocessor_config.json values.
OFFICIAL_IMAGE_CONFIG = VisionPreprocessConfig(min_pixels=65536, max_pixels=16777216)
OFFICIAL_VIDEO_CONFIG = VisionPreprocessConfig(min_pixels=4096, max_pixels=25165824)
