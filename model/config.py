"""Model configuration: frozen dataclasses for Qwen3-VL (dense and MoE), built from official `config.json` files.

One function (`Qwen3VLConfig.from_hf`) reads both the transformers 4.57 form (`rope_scaling` + `rope_theta`) and the
5.x form (`rope_parameters`), rejects unknown or inconsistent fields, and `to_hf` writes the official 4.57-style
layout back (which transformers 5 and vLLM both read). Presets mirror the released `config.json` files
(Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct, Qwen3-VL-{30B-A3B,235B-A22B}-Instruct; the Qwen3-VL model cards).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fp8 import FP8Config
from .moe import MoEConfig
from .rope import ROTARY_LAYOUTS, SECTION

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
TEMPORAL_IDS = ("timestamps", "absolute_time", "none")  # model/positions.py: how a video's T ids advance
SPATIAL_IDS = ("grid", "diagonal")                       # model/positions.py: where H / W ids of a visual run sit
ATTN_BACKENDS = ("torch", "triton", "flex")  # model/attention.py


class ConfigError(ValueError):
    """A config we cannot represent faithfully: a config.json, a preset override, or a training config
    (`train/config.py`: unknown key, wrong type or bad value, named by its key path)."""


def _what(v) -> str:
    return f"{type(v).__name__} {v!r}"[:80]


def _check_int_list(value, name: str) -> tuple[int, ...]:
    """A JSON list (or tuple) of ints -> tuple; anything else (strings, floats, bools inside) is a ConfigError."""
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ConfigError(f"{name} must be a list of ints, got {_what(value)}")
    return tuple(value)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_fields(obj, prefix: str, at_least_one: tuple[str, ...] = (), positive: tuple[str, ...] = (),
                  non_negative: tuple[str, ...] = ()):
    """Every field holds its annotated type, and the named fields their range; ConfigError naming `prefix.field`.

    JSON has no int / float / bool distinction that Python's duck typing respects (`bool("false")` is True,
    `"128" * 2` is a string), so nothing is coerced: a bool is not an int, a string is not a number; an int in a
    float field is widened to float, and floats must be finite.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        v, name = getattr(obj, f.name), f"{prefix}{f.name}"
        t = hints[f.name]
        args = typing.get_args(t)
        if type(None) in args:
            if v is None:
                continue
            t = next(a for a in args if a is not type(None))
        if t is bool and not isinstance(v, bool):
            raise ConfigError(f"{name} must be a bool (true / false), got {_what(v)}")
        if t is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{name} must be an int, got {_what(v)}")
        if t is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{name} must be a number, got {_what(v)}")
            if not math.isfinite(v):
                raise ConfigError(f"{name} must be finite, got {v!r}")
            object.__setattr__(obj, f.name, float(v))
        if t is str and not isinstance(v, str):
            raise ConfigError(f"{name} must be a string, got {_what(v)}")
        if typing.get_origin(t) is tuple:
            object.__setattr__(obj, f.name, _check_int_list(v, name))
    for names, ok, expected in ((at_least_one, lambda v: v >= 1, ">= 1"), (positive, lambda v: v > 0, "> 0"),
                                (non_negative, lambda v: v >= 0, ">= 0")):
        for n in names:
            v = getattr(obj, n)
            if v is not None and not ok(v):
                raise ConfigError(f"{prefix}{n} must be {expected}, got {v!r}")


# The label of positions the loss skips (PyTorch's cross_entropy default): written by the processor's labels and
# padding, read by train/loss.py and train/data.py. Here because every side imports the config cheaply.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP-2-style vision tower (`model.visual`)."""

    depth: int = 24                      # ViT blocks (2B/4B: 24; 8B and larger: 27)
    hidden_size: int = 1024              # 1152 from 8B on (head_dim 72)
    intermediate_size: int = 4096
    num_heads: int = 16
    out_hidden_size: int = 2048          # = the LLM hidden size: the mergers project into it
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)  # blocks tapped by the DeepStack mergers (0-based)
    patch_size: int = 16
    temporal_patch_size: int = 2         # frames per patch (an image is its one frame twice)
    spatial_merge_size: int = 2          # 2x2 patches -> one LLM token
    in_channels: int = 3
    num_position_embeddings: int = 2304  # a 48 x 48 learned table, bilinearly resampled to each grid
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0          # 2-D rotary of the tower
    initializer_range: float = 0.02

    def __post_init__(self):
        _check_fields(self, "vision_config.", at_least_one=(
            "depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
            "temporal_patch_size", "spatial_merge_size", "in_channels", "num_position_embeddings"),
            positive=("rope_theta",), non_negative=("initializer_range",))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision_config.hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim {self.head_dim} must be a multiple of 4 (2-D rotary)")
        side = int(round(self.num_position_embeddings**0.5))
        if side * side != self.num_position_embeddings:
            raise ConfigError(f"vision_config.num_position_embeddings {self.num_position_embeddings} is not a square")
        for i in self.deepstack_visual_indexes:
            if not 0 <= i < self.depth:
                raise ConfigError(f"deepstack_visual_indexes {self.deepstack_visual_indexes} out of range for depth {self.depth}")
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} unsupported (Qwen3-VL uses gelu_pytorch_tanh)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel row: C * t * p * p (1536 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def num_grid_per_side(self) -> int:
        return int(round(self.num_position_embeddings**0.5))


@dataclass(frozen=True)
class RopeConfig:
    """Text rotary embedding: layout of the 3 MRoPE axes over the frequencies, and context scaling.

    layout: a name in model.rope.ROTARY_LAYOUTS: "interleaved" (Qwen3-VL: THWTHW...), "chunked" (Qwen2.5-VL:
    [T..][H..][W..]), "videorope" (VideoRoPE: HWHW..HW then T on the lowest frequencies), "1d" (plain RoPE on the
    temporal/text axis only; an ablation), or one registered there.
    rope_type: "default", "linear", "dynamic" (NTK) or "yarn".
    The position-id rule of videos (model/positions.py), for position-encoding ablations; the defaults are Qwen3-VL:
    temporal_ids: "timestamps" (Qwen3-VL: every temporal group its own run after its `<t seconds>` text),
        "absolute_time" (Qwen2.5-VL: a video is one run, T id = start + int(g * second_per_grid_t *
        tokens_per_second)), "none" (Qwen2-VL / VideoRoPE: one run, T id = start + int(g * temporal_stride)).
    tokens_per_second: absolute_time's T ids per second of video (Qwen2.5-VL's vision_config.tokens_per_second).
    temporal_stride: VideoRoPE's adjustable temporal spacing delta (temporal_ids="none" only).
    spatial_ids: "grid" (H, W = start + row, col) or "diagonal" (VideoRoPE: H, W = T + row - (h'-1)//2,
        T + col - (w'-1)//2, centred on the run's T id; the next text starts at the last T id + 1).
    """

    theta: float = 5_000_000.0
    layout: str = "interleaved"
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    temporal_ids: str = "timestamps"
    tokens_per_second: float = 2.0
    temporal_stride: float = 1.0
    spatial_ids: str = "grid"

    def __post_init__(self):
        _check_fields(self, "text_config.rope.", at_least_one=("original_max_position_embeddings",),
                      positive=("theta", "tokens_per_second", "temporal_stride"))
        if self.temporal_ids not in TEMPORAL_IDS:
            raise ConfigError(f"text_config.rope.temporal_ids {self.temporal_ids!r} not in {TEMPORAL_IDS}")
        if self.spatial_ids not in SPATIAL_IDS:
            raise ConfigError(f"text_config.rope.spatial_ids {self.spatial_ids!r} not in {SPATIAL_IDS}")
        if self.temporal_stride != 1.0 and self.temporal_ids != "none":
            raise ConfigError(f"text_config.rope.temporal_stride {self.temporal_stride} needs temporal_ids 'none' "
                              f"(got {self.temporal_ids!r}): the other rules space frames by text or by seconds")
        if any(s < 0 for s in self.mrope_section):
            raise ConfigError(f"mrope_section entries must be >= 0, got {self.mrope_section}")
        if self.layout not in ROTARY_LAYOUTS:
            raise ConfigError(f"rope layout {self.layout!r} not in {tuple(ROTARY_LAYOUTS)}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type {self.rope_type!r} not in {ROPE_TYPES}")
        if len(self.mrope_section) != 3:
            raise ConfigError(f"mrope_section must have 3 entries (T, H, W), got {self.mrope_section}")
        if self.rope_type == "yarn" and self.original_max_position_embeddings is None:
            raise ConfigError("yarn rope scaling needs original_max_position_embeddings")
        if self.rope_type != "default" and self.factor <= 0:
            raise ConfigError(f"rope factor must be positive, got {self.factor}")


@dataclass(frozen=True)
class TextConfig:
    """The Qwen3 language model (`model.language_model`), dense or with MoE blocks (`moe` set)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig | None = None

    def __post_init__(self):
        _check_fields(self, "text_config.", at_least_one=(
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings"),
            positive=("rms_norm_eps",), non_negative=("initializer_range",))
        if not isinstance(self.rope, RopeConfig):
            raise ConfigError(f"text_config.rope must be a RopeConfig, got {_what(self.rope)}")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ConfigError(f"text_config.moe must be a MoEConfig or None, got {_what(self.moe)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config.num_attention_heads {self.num_attention_heads} not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"text_config.head_dim {self.head_dim} must be even")
        if ROTARY_LAYOUTS[self.rope.layout].uses_section and 2 * sum(self.rope.mrope_section) != self.head_dim:
            raise ConfigError(
                f"mrope_section {self.rope.mrope_section} sums to {sum(self.rope.mrope_section)}, "
                f"but head_dim {self.head_dim} has {self.head_dim // 2} frequencies")
        if self.hidden_act != "silu":
            raise ConfigError(f"text_config.hidden_act {self.hidden_act!r} unsupported (Qwen3 uses silu)")


@dataclass(frozen=True)
class Qwen3VLConfig:
    """The whole model: vision tower + text decoder + special token ids + runtime backend choice."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int = 151645     # <|im_end|>: ends an assistant turn (generation stops here)
    pad_token_id: int = 151643     # <|endoftext|>: padding, and the second stop token of generation_config.json
    attn_backend: str = "torch"
    # Fine-grained FP8 weights (model/fp8.py): the checkpoint's `quantization_config`; None for bf16 / fp32 weights.
    quantization: FP8Config | None = None

    def __post_init__(self):
        _check_fields(self, "")
        if self.quantization is not None and not isinstance(self.quantization, FP8Config):
            raise ConfigError(f"quantization must be an FP8Config or None, got {_what(self.quantization)}")
        for name, cls in (("vision", VisionConfig), ("text", TextConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}, got {_what(getattr(self, name))}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ConfigError(f"attn_backend {self.attn_backend!r} not in {ATTN_BACKENDS}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size {self.vision.out_hidden_size} != text hidden_size {self.text.hidden_size}")
        if len(self.vision.deepstack_visual_indexes) > self.text.num_hidden_layers:
            raise ConfigError("more DeepStack levels than decoder layers")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                     "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise ConfigError(f"{name} {getattr(self, name)} outside the vocabulary ({self.text.vocab_size})")

    @property
    def is_moe(self) -> bool:
        return self.text.moe is not None

    @property
    def model_type(self) -> str:
        return "qwen3_vl_moe" if self.is_moe else "qwen3_vl"

    def replace(self, **kw) -> "Qwen3VLConfig":
        """dataclasses.replace with a short name (configs are frozen)."""
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ official config.json <-> dataclasses
    @classmethod
    def from_hf(cls, d: dict[str, Any], *, source: str = "config.json") -> "Qwen3VLConfig":
        """Build from an official (or transformers-written) config dict; unknown or inconsistent fields raise."""
        return _from_hf(d, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen3VLConfig":
        """Read `config.json` (a file, or a checkpoint directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return _from_hf(d, str(path))

    def to_hf(self) -> dict[str, Any]:
        """The official config.json layout (transformers 4.57 style, read by transformers 5 and vLLM)."""
        return _to_hf(self)


# ---------------------------------------------------------------------------------------------- parsing
# Keys that transformers writes for bookkeeping and that do not change the model.
_GENERIC_KEYS = {
    "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "bos_token_id", "eos_token_id", "pad_token_id", "model_type",
    "attention_dropout", "initializer_range", "is_encoder_decoder", "chunk_size_feed_forward", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "add_cross_attention", "tie_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "_name_or_path", "name_or_path", "pruned_heads", "torchscript",
    "tf_legacy_loss", "use_bfloat16", "return_dict_in_generate", "output_scores", "_attn_implementation_autoset",
    "layer_types", "use_sliding_window", "sliding_window", "max_window_layers",
    "base_config_key", "dense_config", "keys_to_ignore_at_inference", "partial_rotary_factor",
}
_VISION_KEYS = {f.name for f in dataclasses.fields(VisionConfig)} - {"rope_theta"} | {"rope_parameters", "num_attention_heads", "num_hidden_layers"}
_TEXT_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "attention_bias", "hidden_act", "rope_scaling", "rope_theta", "rope_parameters",
    # MoE
    "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
    "router_aux_loss_coef", "norm_topk_prob", "shared_expert_intermediate_size", "output_router_logits",
}
_TOP_KEYS = {"text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
             "vision_end_token_id", "tie_word_embeddings", "attn_backend", "quantization_config"}
# rope_parameters keys besides the layout's own (those come from model.rope.ROTARY_LAYOUTS, see _layout_from_hf)
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate", "partial_rotary_factor"}
# our position-id rule (RopeConfig), written only when it is not Qwen3-VL's (transformers does not read them)
_POSITION_RULE_KEYS = ("temporal_ids", "tokens_per_second", "temporal_stride", "spatial_ids")


def _check_keys(d: dict, allowed: set[str], where: str):
    unknown = sorted(set(d) - allowed - _GENERIC_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; refusing to guess what they mean")


def _layout_keys() -> set[str]:
    """Every rope_parameters key that some registered rotary layout uses in its config.json spelling."""
    return {k for lay in ROTARY_LAYOUTS.values() for sp in lay.hf_spellings for k in sp}


def _layout_from_hf(rp: dict, where: str) -> str:
    """The registered layout whose config.json spelling matches rp's layout keys exactly (SECTION: any value)."""
    keys = _layout_keys()
    given = {k: v for k, v in rp.items() if k in keys and v is not None}  # null counts as absent
    found = [lay.name for lay in ROTARY_LAYOUTS.values() for sp in lay.hf_spellings
             if set(sp) == set(given) and all(v is SECTION or given[k] == v for k, v in sp.items())]
    if len(found) != 1:
        raise ConfigError(f"{where}: rope layout fields {given} match {'no' if not found else 'several'} registered "
                          f"rotary layout(s) {found or tuple(ROTARY_LAYOUTS)}")
    return found[0]


def _layout_to_hf(r: RopeConfig) -> dict[str, Any]:
    """The layout's config.json fields: its first registered spelling, with the mrope_section filled in."""
    spelling = ROTARY_LAYOUTS[r.layout].hf_spellings[0]
    return {k: list(r.mrope_section) if v is SECTION else v for k, v in spelling.items()}


def _rope_from_hf(t: dict, where: str) -> RopeConfig:
    rp = t.get("rope_parameters")
    rs = t.get("rope_scaling")
    if rp is not None and rs is not None and rp != rs:
        raise ConfigError(f"{where}: both rope_parameters and rope_scaling given and they differ")
    rp = dict(rp if rp is not None else (rs or {}))
    _check_keys(rp, _ROPE_KEYS | set(_POSITION_RULE_KEYS) | _layout_keys(), f"{where}.rope_parameters")
    theta = rp.get("rope_theta", t.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{where}: no rope_theta (neither top-level nor in rope_parameters)")
    for src, key in ((rp, "rope_theta"), (t, "rope_theta")):
        if key in src and (isinstance(src[key], bool) or not isinstance(src[key], (int, float))):
            raise ConfigError(f"{where}: rope_theta must be a number, got {_what(src[key])}")
    if "rope_theta" in rp and "rope_theta" in t and float(rp["rope_theta"]) != float(t["rope_theta"]):
        raise ConfigError(f"{where}: rope_theta {t['rope_theta']} disagrees with rope_parameters {rp['rope_theta']}")
    if rp.get("partial_rotary_factor", 1.0) != 1.0 or t.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor != 1 is not part of Qwen3-VL")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    kw = dict(theta=theta, layout=_layout_from_hf(rp, where), rope_type=rope_type)
    if rp.get("mrope_section") is not None:
        kw["mrope_section"] = _check_int_list(rp["mrope_section"], "mrope_section")
    for k in ("factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate",
              "original_max_position_embeddings", *_POSITION_RULE_KEYS):
        if rp.get(k) is not None:
            kw[k] = rp[k]
    if rope_type == "yarn" and "original_max_position_embeddings" not in kw:
        kw["original_max_position_embeddings"] = t.get("max_position_embeddings")
    return RopeConfig(**kw)


def _from_hf(d: dict, where: str) -> Qwen3VLConfig:
    """`_parse_hf` with every error a ConfigError that names the file."""
    try:
        if not isinstance(d, dict) or not all(isinstance(d.get(k, {}), dict) for k in ("text_config", "vision_config")):
            raise ConfigError("the config and its text_config / vision_config must be JSON objects")
        return _parse_hf(d, where)
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None
    except (ValueError, TypeError) as e:  # MoEConfig's own checks
        raise ConfigError(f"{where}: {e}") from None


def _parse_hf(d: dict, where: str) -> Qwen3VLConfig:
    mt = d.get("model_type", "qwen3_vl")
    if mt not in ("qwen3_vl", "qwen3_vl_moe"):
        raise ConfigError(f"{where}: model_type {mt!r} is not a Qwen3-VL model")
    _check_keys(d, _TOP_KEYS, where)
    if "text_config" not in d or "vision_config" not in d:
        raise ConfigError(f"{where}: needs both text_config and vision_config")
    t, v = dict(d["text_config"]), dict(d["vision_config"])
    _check_keys(t, _TEXT_KEYS, f"{where}: text_config")
    _check_keys(v, _VISION_KEYS, f"{where}: vision_config")

    # vision
    vkw = {k: v[k] for k in _VISION_KEYS & set(v) if k not in ("rope_parameters", "num_attention_heads", "num_hidden_layers")}
    if "num_attention_heads" in v:
        vkw.setdefault("num_heads", v["num_attention_heads"])
    if "num_hidden_layers" in v:
        vkw.setdefault("depth", v["num_hidden_layers"])
    vrp = v.get("rope_parameters") or {}
    if "rope_theta" in vrp:
        vkw["rope_theta"] = vrp["rope_theta"]
    if "deepstack_visual_indexes" in vkw:
        vkw["deepstack_visual_indexes"] = _check_int_list(vkw["deepstack_visual_indexes"],
                                                          "vision_config.deepstack_visual_indexes")
    vision = VisionConfig(**vkw)

    # text
    tie_top, tie_text = d.get("tie_word_embeddings"), t.get("tie_word_embeddings")
    for name, value in (("tie_word_embeddings", tie_top), ("text_config.tie_word_embeddings", tie_text)):
        if value is not None and not isinstance(value, bool):  # bool("false") is True: a trained lm_head dropped
            raise ConfigError(f"{where}: {name} must be a bool (true / false), got {_what(value)}")
    if tie_top is not None and tie_text is not None and tie_top != tie_text:
        raise ConfigError(f"{where}: tie_word_embeddings is {tie_top} at top level but {tie_text} in text_config")
    tie = tie_top if tie_top is not None else (tie_text if tie_text is not None else False)
    tkw = {k: t[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                             "max_position_embeddings", "attention_bias", "hidden_act") if t.get(k) is not None}
    if t.get("shared_expert_intermediate_size"):
        raise ConfigError(f"{where}: shared experts are not part of Qwen3-VL-MoE")
    moe = None
    if "num_local_experts" in t:  # transformers 5 spelling of num_experts
        if "num_experts" in t and t["num_experts"] != t["num_local_experts"]:
            raise ConfigError(f"{where}: num_experts {t['num_experts']} != num_local_experts {t['num_local_experts']}")
        t["num_experts"] = t.pop("num_local_experts")
    if mt == "qwen3_vl_moe" or t.get("num_experts"):
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if k not in t:
                raise ConfigError(f"{where}: MoE text_config lacks {k}")
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            if k in t and (isinstance(t[k], bool) or not isinstance(t[k], int)):
                raise ConfigError(f"{where}: text_config.{k} must be an int, got {_what(t[k])}")
        coef = t.get("router_aux_loss_coef", 0.001)
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
            raise ConfigError(f"{where}: text_config.router_aux_loss_coef must be a number, got {_what(coef)}")
        moe = MoEConfig(num_experts=t["num_experts"], num_experts_per_tok=t["num_experts_per_tok"],
                        moe_intermediate_size=t["moe_intermediate_size"],
                        decoder_sparse_step=t.get("decoder_sparse_step", 1),
                        mlp_only_layers=_check_int_list(t.get("mlp_only_layers") or (), "text_config.mlp_only_layers"),
                        router_aux_loss_coef=float(coef))
    text = TextConfig(**tkw, tie_word_embeddings=tie, rope=_rope_from_hf(t, f"{where}: text_config"), moe=moe)
    kw = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                            "attn_backend") if k in d}
    # eos / pad live in text_config (official files) or at the top level (some exports); eos may be a list
    for name, fallback in (("eos_token_id", None), ("pad_token_id", "bos_token_id")):
        for src in (t, d):
            value = src.get(name, src.get(fallback) if fallback else None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                kw.setdefault(name, value)
    if d.get("quantization_config") is not None:
        kw["quantization"] = FP8Config.from_hf(d["quantization_config"], "quantization_config")
    return Qwen3VLConfig(vision=vision, text=text, **kw)


def _to_hf(c: Qwen3VLConfig) -> dict[str, Any]:
    t, v, r = c.text, c.vision, c.text.rope
    rope: dict[str, Any] = {"rope_type": r.rope_type, **_layout_to_hf(r)}
    if r.rope_type != "default":
        rope["factor"] = r.factor
    if r.rope_type == "yarn":
        rope.update(original_max_position_embeddings=r.original_max_position_embeddings, beta_fast=r.beta_fast,
                    beta_slow=r.beta_slow, truncate=r.truncate)
        for k in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(r, k) is not None:
                rope[k] = getattr(r, k)
    default = RopeConfig()
    rope.update({k: getattr(r, k) for k in _POSITION_RULE_KEYS if getattr(r, k) != getattr(default, k)})
    text = {
        "model_type": "qwen3_vl_moe_text" if c.is_moe else "qwen3_vl_text",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
        "attention_bias": t.attention_bias, "attention_dropout": 0.0, "hidden_act": t.hidden_act,
        "initializer_range": t.initializer_range, "rope_theta": r.theta, "rope_scaling": rope,
        "bos_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "use_cache": True, "dtype": "bfloat16",
    }
    if c.is_moe:
        m = t.moe
        text.update(num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                    moe_intermediate_size=m.moe_intermediate_size, decoder_sparse_step=m.decoder_sparse_step,
                    mlp_only_layers=list(m.mlp_only_layers), router_aux_loss_coef=m.router_aux_loss_coef,
                    norm_topk_prob=True)
    vision = {
        "model_type": c.model_type, "depth": v.depth, "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size,
        "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
        "in_channels": v.in_channels, "num_position_embeddings": v.num_position_embeddings,
        "hidden_act": v.hidden_act, "initializer_range": v.initializer_range,
    }
    arch = "Qwen3VLMoeForConditionalGeneration" if c.is_moe else "Qwen3VLForConditionalGeneration"
    quant = {} if c.quantization is None else {"quantization_config": c.quantization.to_hf()}
    return {
        "architectures": [arch], "model_type": c.model_type, "text_config": text, "vision_config": vision,
        "image_token_id": c.image_token_id, "video_token_id": c.video_token_id,
        "vision_start_token_id": c.vision_start_token_id, "vision_end_token_id": c.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings, **quant,
    }


# ---------------------------------------------------------------------------------------------- presets
_VISION_SMALL = VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                             deepstack_visual_indexes=(5, 11, 17))            # 2B / 4B
_VISION_LARGE = VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                             deepstack_visual_indexes=(8, 16, 24))            # 8B / 32B / MoE (head_dim 72)


def _sized(vision: VisionConfig, **text) -> Qwen3VLConfig:
    t = TextConfig(**text)
    return Qwen3VLConfig(vision=dataclasses.replace(vision, out_hidden_size=t.hidden_size), text=t)


def _presets() -> dict[str, Qwen3VLConfig]:
    return {
        # Qwen/Qwen3-VL-2B-Instruct config.json
        "2b": _sized(_VISION_SMALL, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
        # Qwen/Qwen3-VL-4B-Instruct
        "4b": _sized(_VISION_SMALL, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
        # Qwen/Qwen3-VL-8B-Instruct
        "8b": _sized(_VISION_LARGE, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
        # Qwen/Qwen3-VL-32B-Instruct
        "32b": _sized(_VISION_LARGE, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
        # Qwen/Qwen3-VL-30B-A3B-Instruct
        "30b-a3b": _sized(_VISION_LARGE, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                          moe=MoEConfig(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768)),
        # Qwen/Qwen3-VL-235B-A22B-Instruct (tie_word_embeddings unverified: no config.json seen)
        "235b-a22b": _sized(_VISION_LARGE, hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
                            num_attention_heads=64, num_key_value_heads=4, tie_word_embeddings=False,
                            moe=MoEConfig(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536)),
        # Tiny shapes for tests and CPU demos: same structure (DeepStack, GQA, interleaved MRoPE), real vocabulary.
        "tiny": Qwen3VLConfig(
            vision=VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                                deepstack_visual_indexes=(0, 2)),
            text=TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, rope=RopeConfig(mrope_section=(6, 5, 5)),
                            tie_word_embeddings=True)),
        "tiny-moe": Qwen3VLConfig(
            vision=VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                                deepstack_visual_indexes=(0, 2)),
            text=TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, rope=RopeConfig(mrope_section=(6, 5, 5)),
                            tie_word_embeddings=False,
                            moe=MoEConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64))),
    }


PRESETS = tuple(_presets())


def preset(name: str, **overrides) -> Qwen3VLConfig:
    """A named preset (`tiny`, `tiny-moe`, `2b`, `4b`, `8b`, `32b`, `30b-a3b`, `235b-a22b`), optionally replaced."""
    table = _presets()
    key = name.lower().replace("_", "-")
    if key not in table:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(table)}")
    return dataclasses.replace(table[key], **overrides) if overrides else table[key]
