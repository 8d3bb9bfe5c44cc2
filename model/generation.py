"""Autoregressive generation for Qwen3-VL: a preallocated KV cache, logits processing (temperature, top-k, top-p)
and the decode loop (greedy or sampling, stop tokens, left-padded batches, MRoPE decode positions from rope deltas).

The decode loop follows the usual HF semantics: a sequence that has emitted a stop token keeps emitting the pad
token; generation ends when every sequence has stopped or max_new_tokens is reached.
"""
from __future__ import annotations

import torch

from .positions import decode_position_ids


class KVCache:
    """Per-layer K/V buffers of shape (B, max_len, Hkv, hd), filled left to right; `length` tokens are valid."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored (same for every layer once a forward pass completes)
        self._pending = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v (B, L, Hkv, hd) for `layer`; return the valid prefix including them."""
        L = k.shape[1]
        end = self.length + L
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        self._pending = L
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self):
        """Commit the tokens written by the last forward pass."""
        self.length += self._pending
        self._pending = 0


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering: (B, V) fp32 logits -> filtered logits."""
    logits = logits.float()
    if temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (always keep the first)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, stop_token_ids=None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, **vision_inputs) -> torch.Tensor:
    """Generate up to max_new_tokens after a (left-padded) prompt.

    Args:
        model: Qwen3VL. input_ids: (B, L) long. attention_mask: (B, L) 0/1 (left padding) or None.
        stop_token_ids: ids that end a sequence; default (config.eos_token_id, config.pad_token_id), as the
            official generation_config.json. pad_token_id: what a stopped sequence emits; default config.pad_token_id.
        vision_inputs: pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw.
    Returns: (B, L + n_new) long token ids (n_new <= max_new_tokens).
    """
    cfg = model.config
    if stop_token_ids is None:
        stop_token_ids = (cfg.eos_token_id, cfg.pad_token_id)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id
    B, L = input_ids.shape
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding: the last prompt position of every row must be a real token")
    tcfg = model.config.text
    p = next(model.parameters())
    cache = KVCache(tcfg.num_hidden_layers, B, L + max_new_tokens, tcfg.num_key_value_heads, tcfg.head_dim,
                    p.dtype, input_ids.device)
    stop = torch.tensor(list(stop_token_ids), device=input_ids.device)
    out = model(input_ids, attention_mask=attention_mask, past_key_values=cache, logits_to_keep=1, **vision_inputs)
    rope_deltas = out.rope_deltas
    mask = attention_mask
    tokens = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        if do_sample:
            probs = process_logits(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        tokens.append(nxt[:, None])
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = decode_position_ids(cache.length, rope_deltas)  # (3, B, 1)
        out = model(nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=1)
    return torch.cat(tokens, dim=1)
