"""The full Qwen3-VL model: vision tower + text decoder + LM head, with DeepStack fusion (model/deepstack.py) and
MRoPE positions.

Module tree (and so state_dict keys) matches the official checkpoints: `model.visual.*`,
`model.language_model.*`, `lm_head.weight` (tied to the embeddings for 2B/4B).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import supports
from .config import Qwen3VLConfig
from .deepstack import join_levels
from .masks import AttentionMask
from .positions import get_rope_index
from .rope import TextRotary
from .text import TextDecoder
from .vision import VisionTower


@dataclass
class Qwen3VLOutput:
    """What a forward pass returns.

    logits: (B, L', vocab) or None (compute_logits=False); L' = L or logits_to_keep.
    last_hidden_state: (B, L, hidden) after the final norm.
    rope_deltas: (B, 1) long (prefill only): decode position = cache length + rope delta.
    router_logits: per MoE layer (B*L, E) fp32; () for dense models.
    """

    logits: torch.Tensor | None
    last_hidden_state: torch.Tensor
    rope_deltas: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] = ()
    past_key_values: object | None = None


class Backbone(nn.Module):
    """Holds the two towers under the official names `visual` and `language_model`."""

    def __init__(self, config: Qwen3VLConfig):
        super().__init__()
        self.visual = VisionTower(config.vision, config.attn_backend)
        self.language_model = TextDecoder(config.text, config.attn_backend)


class Qwen3VL(nn.Module):
    """Qwen3-VL for conditional generation (dense or MoE decoder)."""

    def __init__(self, config: Qwen3VLConfig, init_weights: bool = True):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.rotary = TextRotary(config.text)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        if init_weights:
            self.apply(self._init)

    def _init(self, m: nn.Module):
        std = self.config.text.initializer_range
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif hasattr(m, "gate_up_proj") and isinstance(getattr(m, "gate_up_proj"), nn.Parameter):
            nn.init.normal_(m.gate_up_proj, std=std)
            nn.init.normal_(m.down_proj, std=std)

    def tie_weights(self):
        """Re-tie lm_head to the embeddings (after loading or moving from the meta device)."""
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # ------------------------------------------------------------------ vision features
    def _scatter_visual(self, input_ids, embeds, pixel_values, grid_thw, token_id, what):
        """Run the vision tower and place its tokens at `token_id` positions. Returns (embeds, mask, deepstack)."""
        feats, deepstack = self.model.visual(pixel_values.to(self.dtype), grid_thw)
        mask = input_ids == token_id
        n_tok = int(mask.sum())
        if n_tok != feats.shape[0]:
            raise ValueError(f"{what}: input_ids hold {n_tok} <|{what}_pad|> tokens but the {what} grids give "
                             f"{feats.shape[0]} features (grid_thw {grid_thw.tolist()})")
        embeds = embeds.masked_scatter(mask[..., None], feats.to(embeds.dtype))
        return embeds, mask, deepstack

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                past_key_values=None, compute_logits: bool = True, logits_to_keep: int = 0) -> Qwen3VLOutput:
        """Args:
            input_ids: (B, L) long. attention_mask: (B, L) 0/1, or (B, cache + L) while decoding; left padding.
            pixel_values: (N_img_patches, 1536); image_grid_thw: (n_images, 3).
            pixel_values_videos: (N_vid_patches, 1536); video_grid_thw: (n_videos, 3).
            position_ids: (3, B, L) long; computed from input_ids when None.
            cu_seqlens: (n_docs + 1,) int32, packed batch (B == 1): no attention across documents.
            past_key_values: model.generation.KVCache, filled in place.
            compute_logits: False skips the LM head (e.g. for a chunked loss on last_hidden_state).
            logits_to_keep: if > 0, only the last `logits_to_keep` positions get logits.
        """
        B, L = input_ids.shape
        lm = self.model.language_model
        if bool(((input_ids < 0) | (input_ids >= self.config.text.vocab_size)).any()):  # one host sync
            raise ValueError(f"input_ids outside the vocabulary [0, {self.config.text.vocab_size})")
        if cu_seqlens is not None and (B != 1 or attention_mask is not None or past_key_values is not None):
            raise ValueError("cu_seqlens (packed batch) needs B == 1, no attention_mask and no cache")
        embeds = lm.embed_tokens(input_ids)

        masks, levels = [], []
        for what, px, grid, token_id, px_name in (
                ("image", pixel_values, image_grid_thw, self.config.image_token_id, "pixel_values"),
                ("video", pixel_values_videos, video_grid_thw, self.config.video_token_id, "pixel_values_videos")):
            if px is not None:
                if grid is None:
                    raise ValueError(f"{px_name} given without {what}_grid_thw")
                embeds, m, ds = self._scatter_visual(input_ids, embeds, px, grid, token_id, what)
                masks.append(m), levels.append(ds)
            elif past_key_values is None and bool((input_ids == token_id).any()):
                raise ValueError(f"input_ids contain <|{what}_pad|> tokens but no {px_name} were given")

        visual_mask, deepstack = join_levels(masks, levels)

        rope_deltas = None
        if position_ids is None:
            if past_key_values is not None and past_key_values.length > 0:
                raise ValueError("position_ids are required when decoding with a non-empty cache")
            position_ids, rope_deltas = get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                                                       config=self.config, cu_seqlens=cu_seqlens)
        elif position_ids.shape != (3, B, L):
            raise ValueError(f"position_ids must be (3, B, L) = (3, {B}, {L}), got {tuple(position_ids.shape)}")
        cos, sin = self.rotary(position_ids, embeds.dtype)

        past = past_key_values.length if past_key_values is not None else 0
        key_padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            if attention_mask.shape != (B, past + L):
                raise ValueError(f"attention_mask must be (B, cache + L) = ({B}, {past + L}), got {tuple(attention_mask.shape)}")
            key_padding = attention_mask.bool()  # (B, Lk); padded queries see themselves only (model/masks.py)

        # the longest packed document, once per forward (the Triton kernels size their grid with it; SDPA needs none)
        max_seqlen = None
        if cu_seqlens is not None and self.config.attn_backend == "triton":
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        mask = AttentionMask(causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, key_padding=key_padding)
        backend = None
        if key_padding is not None and not supports(self.config.attn_backend, mask):
            # The Triton kernels have no key padding: padded batches (batched generation) run the decoder through
            # SDPA, chosen here rather than silently inside attend.
            backend = "torch"
        hidden, router_logits = lm(embeds, cos, sin, mask=mask, cache=past_key_values, backend=backend,
                                   visual_mask=visual_mask, deepstack=deepstack)
        if past_key_values is not None:
            past_key_values.advance()
        logits = None
        if compute_logits:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return Qwen3VLOutput(logits=logits, last_hidden_state=hidden, rope_deltas=rope_deltas,
                             router_logits=router_logits, past_key_values=past_key_values)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """Greedy or sampled generation; see model.generation.generate for the arguments."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kw)
