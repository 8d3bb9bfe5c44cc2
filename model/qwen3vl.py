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
from .sparsity import as_sparsity
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

    def set_rope_scaling(self, rope_type: str = "yarn", factor: float = 2.0,
                         original_max_position_embeddings: int | None = 262144, **kw) -> "Qwen3VL":
        """Switch the decoder's rotary scaling (e.g. YaRN for contexts past the native 256K positions); the
        config (and so a KV cache's fingerprint) records it. rope_type "default" turns scaling off."""
        import dataclasses

        rope = dataclasses.replace(self.config.text.rope, rope_type=rope_type, factor=float(factor),
                                   original_max_position_embeddings=original_max_position_embeddings
                                   if rope_type != "default" else None, **kw)
        self.config = self.config.replace(text=dataclasses.replace(self.config.text, rope=rope))
        self.rotary = TextRotary(self.config.text).to(self.lm_head.weight.device)
        self._warned_long = False
        return self

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
            past_key_values.advance(input_ids, position_ids,
                                    None if attention_mask is None else attention_mask[:, -L:])
        logits = None
        if compute_logits:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return Qwen3VLOutput(logits=logits, last_hidden_state=hidden, rope_deltas=rope_deltas,
                             router_logits=router_logits, past_key_values=past_key_values)

    # ------------------------------------------------------------------ long prompts into a KV cache
    def _encode_visual(self, pixel_values, grid_thw, max_patches: int | None):
        """The vision tower on a batch of images or videos, a slice of temporal groups at a time when the batch
        has more than max_patches patch rows (the tower attends within one temporal group, so slicing changes
        nothing but memory). Returns (features (n_tokens, D), DeepStack levels)."""
        tower = self.model.visual
        grids = grid_thw.tolist()
        if max_patches is None or pixel_values.shape[0] <= max_patches:
            return tower(pixel_values.to(self.dtype), grid_thw)
        feats, levels, row = [], [], 0
        for t, h, w in grids:
            per_group = h * w
            step = max(1, max_patches // per_group)
            for g in range(0, t, step):
                k = min(step, t - g)
                px = pixel_values[row:row + k * per_group].to(self.device, self.dtype)
                f, ds = tower(px, torch.tensor([[k, h, w]], device=grid_thw.device))
                feats.append(f), levels.append(ds)
                row += k * per_group
        return torch.cat(feats), [torch.cat(lv) for lv in zip(*levels)]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache, *, chunk_size: int = 8192,
                attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, vision_max_patches: int | None = 65536,
                progress=None, sparsity=None, position_ids: torch.Tensor | None = None) -> Qwen3VLOutput:
        """Prefill a prompt into `cache` in chunks of `chunk_size` tokens; append after what the cache holds.

        The result equals one forward of the whole prompt (the cache holds the same keys and values, the last
        logits are the same): position ids are computed once for all of `input_ids` (model/positions.py) and,
        on a non-empty cache, continue from it (`cache.next_position`), so a question asked after a cached video
        sits where it would in one prompt; each chunk attends to the cache plus itself with bottom-right causal
        alignment (no (Lq, Lk) mask is built); DeepStack features are added at their own positions in every chunk
        (a chunk may cut through an image or a video frame). The vision tower runs once over the visual inputs
        of this call, at most `vision_max_patches` patch rows at a time (whole temporal groups).

        Args:
            input_ids: (B, L) long: the whole prompt, or the tokens after the cached ones.
            cache: model.generation.KVCache with room for L more tokens (`KVCache.for_model`).
            chunk_size: tokens per decoder pass (memory: one chunk's activations).
            attention_mask: (B, L) 0/1 left padding; only on an empty cache.
            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw: the visual inputs of these tokens.
            vision_max_patches: patch rows per vision-tower call (None: all at once).
            progress: optional callable(n_tokens_done) called after every chunk (e.g. a tqdm update).
            sparsity: `attn_sparsity` of the decoder's attention in this prefill (model/sparsity.py): None or
                "none" (dense), a method name ("xattention", "vertical_slash", "window"), a dict of
                SparsityConfig fields or a SparsityConfig. An approximation: the equality above then no longer
                holds. Chunks shorter than its min_queries (decoding steps) and the vision tower stay dense.
            position_ids: (3, B, L) absolute MRoPE positions of these tokens, to use instead of the model's own
                rule (e.g. a rule that needs the video's seconds per temporal group, which this call does not
                take); None: computed as described above.
        Returns:
            Qwen3VLOutput with logits (B, 1, vocab) of the last position, last_hidden_state of the last chunk,
            rope_deltas (B, 1) as a one-shot forward of the whole cached prompt returns them (also
            `cache.rope_deltas`), past_key_values = cache.
        """
        B, L = input_ids.shape
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"prefill: chunk_size must be an int >= 1, got {chunk_size!r}")
        if L == 0:
            raise ValueError("prefill: input_ids is empty")
        if cache.batch != B:
            raise ValueError(f"prefill: the cache holds {cache.batch} sequences, input_ids has {B}")
        if cache.length + L > cache.max_len:
            raise ValueError(f"prefill: {L} tokens do not fit the cache ({cache.length} of {cache.max_len} used); "
                             "allocate a larger max_len")
        cache.check_model(self)
        if bool(((input_ids < 0) | (input_ids >= self.config.text.vocab_size)).any()):
            raise ValueError(f"input_ids outside the vocabulary [0, {self.config.text.vocab_size})")
        if attention_mask is not None:
            if attention_mask.shape != (B, L):
                raise ValueError(f"prefill: attention_mask must be (B, L) = ({B}, {L}), got "
                                 f"{tuple(attention_mask.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None
            elif cache.length > 0:
                raise ValueError("prefill: padding (attention_mask with zeros) is only allowed in the first "
                                 "prefill of an empty cache")
        sparsity = as_sparsity(sparsity)
        if sparsity is not None and attention_mask is not None:
            raise ValueError("prefill: sparsity needs an unpadded batch (attention_mask without zeros)")
        past0 = cache.length
        lm = self.model.language_model
        embeds = lm.embed_tokens(input_ids)

        masks, levels = [], []
        for what, px, grid, token_id, px_name in (
                ("image", pixel_values, image_grid_thw, self.config.image_token_id, "pixel_values"),
                ("video", pixel_values_videos, video_grid_thw, self.config.video_token_id, "pixel_values_videos")):
            m = input_ids == token_id
            if px is None:
                if bool(m.any()):
                    raise ValueError(f"input_ids contain <|{what}_pad|> tokens but no {px_name} were given")
                continue
            if grid is None:
                raise ValueError(f"{px_name} given without {what}_grid_thw")
            feats, ds = self._encode_visual(px, grid, vision_max_patches)
            if int(m.sum()) != feats.shape[0]:
                raise ValueError(f"{what}: input_ids hold {int(m.sum())} <|{what}_pad|> tokens but the {what} grids "
                                 f"give {feats.shape[0]} features (grid_thw {grid.tolist()})")
            embeds = embeds.masked_scatter(m[..., None], feats.to(embeds.dtype))
            masks.append(m), levels.append(ds)
        visual_mask, deepstack = join_levels(masks, levels)
        # flat index of every visual token in the order of visual_mask's True entries (row-major), to cut the
        # DeepStack rows of one chunk out of the whole prompt's
        visual_index = None
        if visual_mask is not None:
            visual_index = (visual_mask.flatten().cumsum(0) - 1).view(B, L)

        if position_ids is not None:
            if tuple(position_ids.shape) != (3, B, L):
                raise ValueError(f"prefill: position_ids must be (3, B, L) = (3, {B}, {L}), got "
                                 f"{tuple(position_ids.shape)}")
            position_ids = position_ids.to(input_ids.device)
        else:
            position_ids, _ = get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                                             config=self.config)
            if past0 > 0:
                position_ids = position_ids + cache.next_position.view(1, B, 1)
        self._warn_long_positions(position_ids)

        hidden = None
        for s in range(0, L, chunk_size):
            e = min(L, s + chunk_size)
            cos, sin = self.rotary(position_ids[:, :, s:e], embeds.dtype)
            key_padding = None
            if attention_mask is not None:  # empty cache: keys are this call's first e tokens
                key_padding = attention_mask[:, :e].bool()
            mask = AttentionMask(causal=True, key_padding=key_padding, sparsity=sparsity)
            backend = None
            if key_padding is not None and not supports(self.config.attn_backend, mask):
                backend = "torch"  # as in forward: padded batches run through SDPA
            vm, ds = None, None
            if visual_mask is not None:
                vm = visual_mask[:, s:e]
                if bool(vm.any()):
                    idx = visual_index[:, s:e][vm]
                    ds = [d[idx] for d in deepstack]
                else:
                    vm = None
            hidden, _ = lm(embeds[:, s:e], cos, sin, mask=mask, cache=cache, backend=backend, visual_mask=vm,
                           deepstack=ds)
            cache.advance(input_ids[:, s:e], position_ids[:, :, s:e],
                          None if attention_mask is None else attention_mask[:, s:e])
            if progress is not None:
                progress(e - s)
        logits = self.lm_head(hidden[:, -1:])
        return Qwen3VLOutput(logits=logits, last_hidden_state=hidden, rope_deltas=cache.rope_deltas,
                             past_key_values=cache)

    def _decode_static(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache,
                       key_length: torch.Tensor) -> torch.Tensor:
        """One decode step with static shapes and no host synchronisation (model/generation.py's StaticDecoder
        captures it in a CUDA graph): tokens (B, 1), position_ids (3, B, 1), the cache in static mode, key_length
        (B,) int32 = valid keys after this token. Returns logits (B, 1, vocab)."""
        lm = self.model.language_model
        embeds = lm.embed_tokens(tokens)
        cos, sin = self.rotary(position_ids, embeds.dtype)
        mask = AttentionMask(causal=True, key_length=key_length)
        hidden, _ = lm(embeds, cos, sin, mask=mask, cache=cache)
        return self.lm_head(hidden)

    def _warn_long_positions(self, position_ids: torch.Tensor):
        """Warn once when positions pass the native context without long-context rope scaling."""
        t = self.config.text
        native = t.rope.original_max_position_embeddings or t.max_position_embeddings
        if t.rope.rope_type == "default" and not getattr(self, "_warned_long", False):
            top = int(position_ids.max())
            if top >= native:
                import warnings

                warnings.warn(f"position ids reach {top}, past the native context of {native} positions, and "
                              "rope scaling is off: quality drops there. Enable YaRN (text_config.rope_scaling "
                              "{'rope_type': 'yarn', 'factor': 2..3, 'original_max_position_embeddings': 262144}; "
                              "scripts/ask_video.py --yarn-factor) as docs/long_context.md explains", stacklevel=3)
                self._warned_long = True

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """Greedy or sampled generation; see model.generation.generate for the arguments."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kw)
