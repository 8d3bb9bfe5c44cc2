"""Helpers that build tiny random *transformers* Qwen3-VL checkpoints (the numerical oracle) and matching inputs.

transformers is a test-only dependency: nothing under model/ imports it.
"""
from __future__ import annotations

import torch

IMAGE, VIDEO, VSTART, VEND, PAD = 151655, 151656, 151652, 151653, 151643


def hf_tiny_config(vision_head_dim: int = 64, moe: bool = False, tie: bool = False):
    """A small transformers Qwen3VLConfig with DeepStack on (2 levels) and the given vision head_dim."""
    import transformers

    text = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5],
                                 "mrope_interleaved": True},
                tie_word_embeddings=tie)
    vision = dict(depth=4, hidden_size=2 * vision_head_dim, intermediate_size=96, num_heads=2, out_hidden_size=64,
                  deepstack_visual_indexes=[1, 3], patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                  num_position_embeddings=2304)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1)
        return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie)
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie)


def hf_model(config, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cls = (transformers.Qwen3VLMoeForConditionalGeneration if config.model_type == "qwen3_vl_moe"
           else transformers.Qwen3VLForConditionalGeneration)
    m = cls(config).eval()
    # post_init leaves some norms at ones / biases at zeros: randomise every parameter so that a missed
    # weight cannot hide behind an identity.
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0, 0.02 if p.ndim > 1 else 0.1)
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") or "layernorm" in name:
                p.add_(1.0)
    return m


class Sample:
    """Builds one token sequence with images / videos in the release-time layout, and the matching pixels."""

    def __init__(self, rng: torch.Generator):
        self.rng, self.ids, self.img_px, self.img_grid, self.vid_px, self.vid_grid = rng, [], [], [], [], []

    def text(self, n: int):
        self.ids += torch.randint(1000, 50000, (n,), generator=self.rng).tolist()
        return self

    def image(self, h: int, w: int):
        self.ids += [VSTART] + [IMAGE] * (h * w // 4) + [VEND]
        self.img_px.append(torch.randn(h * w, 1536, generator=self.rng))
        self.img_grid.append([1, h, w])
        return self

    def video(self, t: int, h: int, w: int):
        for g in range(t):
            self.text(3)  # stands for the "<t seconds>" timestamp text of this temporal group
            self.ids += [VSTART] + [VIDEO] * (h * w // 4) + [VEND]
        self.vid_px.append(torch.randn(t * h * w, 1536, generator=self.rng))
        self.vid_grid.append([t, h, w])
        return self


def batch(samples: list[Sample]) -> dict:
    """Left-pad the samples into one batch dict (ours and transformers' keys)."""
    L = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(samples), L, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, L - len(s.ids):] = torch.tensor(s.ids)
        mask[i, L - len(s.ids):] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    img = [p for s in samples for p in s.img_px]
    vid = [p for s in samples for p in s.vid_px]
    if img:
        out["pixel_values"] = torch.cat(img)
        out["image_grid_thw"] = torch.tensor([g for s in samples for g in s.img_grid])
    if vid:
        out["pixel_values_videos"] = torch.cat(vid)
        out["video_grid_thw"] = torch.tensor([g for s in samples for g in s.vid_grid])
    return out


def hf_inputs(b: dict) -> dict:
    """transformers 5 also wants mm_token_type_ids (0 text, 1 image, 2 video)."""
    tt = torch.zeros_like(b["input_ids"])
    tt[b["input_ids"] == IMAGE] = 1
    tt[b["input_ids"] == VIDEO] = 2
    return {**b, "mm_token_type_ids": tt}
