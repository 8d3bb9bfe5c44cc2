"""Scoring for the needle evaluations: teacher-forced answer matching (V-NIAH / LongVA protocol) and free
generation judged by the value the answer states (eval/answers.py).
(Character error rate for generated text is in eval/metrics.py.)

Teacher forcing: the gold answer is appended to the prompt and the sample counts as correct only if the argmax of
the logits at every answer position equals the gold token (Zhang et al. 2024, "Long Context Transfer from Language
to Vision", V-NIAH). One forward pass per sample, no sampling noise, and only A + 1 positions get logits.

The sweep (eval/niah.py) talks to the model through `NeedleModel`, two calls on one `Case`:
    answer_hits(case, answer_ids) -> list[bool]   # per gold token: is it the argmax after prompt + earlier tokens?
    generate(case, max_new_tokens) -> str         # the greedy answer text
`Qwen3VLNeedleModel` implements it for a Qwen3VL (one forward, or `needle.chunk_size` > 0: `Qwen3VL.prefill` in
chunks into a KVCache, then teacher forcing / `generate(past_key_values=...)` on the cache; a streamed case
(`needle.stream`) is prefilled a chunk of temporal groups at a time, its pixels made chunk by chunk). Tests
implement it with transparent fakes.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .answers import parse_number, parse_numbers, parse_time

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


class NeedleModel(Protocol):
    """What the sweep needs from a model under test."""

    def answer_hits(self, case, answer_ids: list[int]) -> list[bool]:
        """Per gold answer token, whether the model's argmax after the prompt (and the gold tokens before) is it."""

    def generate(self, case, max_new_tokens: int) -> str:
        """The model's greedy answer to `case.inputs`, decoded without special tokens."""


def _media(model, inputs: dict) -> dict:
    dev = model.device
    kw = {k: inputs[k].to(dev) for k in MEDIA_KEYS if k in inputs}
    for k in ("pixel_values", "pixel_values_videos"):
        if k in kw:
            kw[k] = kw[k].to(model.dtype)
    return kw


@torch.no_grad()
def teacher_forced_hits(model, inputs: dict, answer_ids: list[int]) -> torch.Tensor:
    """(A,) bool: whether the model's argmax at each answer position is the gold token (one forward).

    Args:
        model: Qwen3VL (or anything called as model(ids, logits_to_keep=, **media) -> .logits).
        inputs: processor output for ONE prompt ending with the generation prompt (input_ids (1, P), pixels ...).
        answer_ids: gold answer token ids (A,).
    """
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("teacher forcing scores one prompt at a time")
    if not answer_ids:
        raise ValueError("empty answer")
    dev = model.device
    ans = torch.tensor([answer_ids], device=dev)
    ids = torch.cat([inputs["input_ids"].to(dev), ans], dim=1)
    A = len(answer_ids)
    # logits at positions P-1 .. P+A-2 predict the A answer tokens: the last A+1 positions, minus the final one
    logits = model(ids, logits_to_keep=A + 1, **_media(model, inputs)).logits[0, :A]
    return (logits.argmax(-1) == ans[0]).cpu()


def teacher_forced_correct(model, inputs: dict, answer_ids: list[int]) -> tuple[bool, float]:
    """Whether the model's argmax reproduces `answer_ids` after the prompt, and the fraction of answer tokens right."""
    hits = teacher_forced_hits(model, inputs, answer_ids)
    return bool(hits.all()), float(hits.float().mean())


class Qwen3VLNeedleModel:
    """`NeedleModel` over a Qwen3VL.

    Args:
        model: Qwen3VL in eval mode. tokenizer: the processor's (decodes generated ids).
        chunk_size: 0 = one forward per prompt; > 0 = prefill the prompt in chunks of this many tokens into a
            KVCache (the long-video engine, model/generation.py), then teacher-force one token at a time or
            decode on the cache -- for prompts whose one-forward activations do not fit.
        sparsity: the prompt prefill's `attn_sparsity` (model/sparsity.py; needs chunk_size > 0); the answer
            tokens after it are scored or decoded densely.
        groups_per_chunk: a streamed case (`case.stream`, needle.stream): temporal groups decoded, patchified and
            prefilled per step; None: as many as fit in chunk_size tokens (at least 1).
        max_new_tokens: the generate mode's answer budget (room kept in the shared prompt cache, below).
    With chunk_size > 0 both scoring modes of a case share one prefill: the prompt minus its last token is prefilled
    once into a KV cache (the expensive part at 1M tokens), and each mode truncates the cache back to that prefix and
    continues from the last prompt token. One case's cache is held at a time.
    """

    def __init__(self, model, tokenizer, chunk_size: int = 0, sparsity=None, groups_per_chunk: int | None = None,
                 max_new_tokens: int = 24):
        self.model, self.tokenizer, self.chunk_size = model, tokenizer, chunk_size
        self.sparsity, self.groups_per_chunk = sparsity, groups_per_chunk
        self.max_new_tokens = max_new_tokens
        self._prefix = None  # (case, cache holding its prompt minus the last token)

    def _prefix_cache(self, case, room: int):
        """The KV cache of `case`'s prompt minus its last token, truncated back to that prefix (prefilled on the
        case's first use, with room for max(room, max_new_tokens + 1) more tokens)."""
        ids = case.inputs["input_ids"].to(self.model.device)
        if self._prefix is None or self._prefix[0] is not case or \
                self._prefix[1].max_len - (ids.shape[1] - 1) < room:
            self._prefix = None  # free the previous case's cache before allocating this one
            cache, _ = self._prefill(case, ids[:, :-1], max(room, self.max_new_tokens + 1))
            self._prefix = (case, cache)
        return self._prefix[1].truncate(ids.shape[1] - 1)

    def _prefill(self, case, ids: torch.Tensor, room: int):
        """A new cache holding `ids` (1, L) (the case's prompt or a prefix of it that keeps the whole video, + `room`
        free tokens), prefilled in chunks with a token progress bar; returns (cache, last logits (V,))."""
        from tqdm.auto import tqdm

        from model.generation import KVCache

        cache = KVCache.for_model(self.model, 1, ids.shape[1] + room)
        with tqdm(total=ids.shape[1], unit="tok", unit_scale=True, desc="prefill", leave=False) as bar:
            if case.stream is None:
                out = self.model.prefill(ids, cache, chunk_size=self.chunk_size, progress=bar.update,
                                         sparsity=self.sparsity,
                                         **_media(self.model, case.inputs))
            else:
                out = self._prefill_stream(case, ids, cache, bar.update)
        return cache, out.logits[0, -1]

    def _prefill_stream(self, case, ids: torch.Tensor, cache, progress):
        """Prefill a streamed case: per chunk of temporal groups, its slice of `ids` (from the end of the last one
        through this chunk's last `<|vision_end|>`; the first slice also holds the prompt before the video) with
        that chunk's pixel rows, then the rest of `ids`. Each slice holds whole groups, so positions (continued from
        the cache), vision features and DeepStack rows equal a one-call prefill's (model/processing/stream.py)."""
        stream = case.stream
        pad = ids[0] == self.model.config.video_token_id
        ends = (torch.nonzero(pad[:-1] & ~pad[1:]).flatten() + 2).tolist()  # after each group's <|vision_end|>
        if len(ends) != stream.num_groups:
            raise ValueError(f"a streamed case's prompt holds {len(ends)} video groups, its stream plans "
                             f"{stream.num_groups} (its ids must keep the whole video)")
        # default: as many groups as fit one decoder pass (the last group has the longest timestamp text)
        stream.groups_per_chunk = self.groups_per_chunk or max(
            1, self.chunk_size // len(stream.video_ids(stream.num_groups - 1)))
        start, out = 0, None
        for chunk in stream:
            end = ends[chunk.first_group + len(chunk.timestamps) - 1]
            out = self.model.prefill(ids[:, start:end], cache, chunk_size=self.chunk_size, progress=progress,
                                     sparsity=self.sparsity,
                                     **_media(self.model, {"pixel_values_videos": chunk.pixel_values,
                                                           "video_grid_thw": torch.tensor([list(chunk.grid_thw)])}))
            start = end
        if start < ids.shape[1]:
            out = self.model.prefill(ids[:, start:], cache, chunk_size=self.chunk_size, progress=progress,
                                     sparsity=self.sparsity)
        return out

    @torch.no_grad()
    def answer_hits(self, case, answer_ids: list[int]) -> list[bool]:
        if not self.chunk_size:
            return teacher_forced_hits(self.model, case.full_inputs(), answer_ids).tolist()
        cache = self._prefix_cache(case, len(answer_ids) + 1)
        last = case.inputs["input_ids"][:, -1:].to(self.model.device)
        logits = self.model.prefill(last, cache).logits[0, -1]
        hits = []
        for t in answer_ids:  # the gold token goes in whatever the model predicted (teacher forcing)
            hits.append(int(logits.argmax()) == t)
            logits = self.model.prefill(torch.tensor([[t]], device=self.model.device), cache).logits[0, -1]
        return hits

    @torch.no_grad()
    def generate(self, case, max_new_tokens: int) -> str:
        ids = case.inputs["input_ids"].to(self.model.device)
        if not self.chunk_size:
            out = self.model.generate(ids, max_new_tokens=max_new_tokens, **_media(self.model, case.full_inputs()))
            new = out[0, ids.shape[1]:]
        else:
            # the prompt but its last token is cached; generate() continues the cache from that one token
            cache = self._prefix_cache(case, max_new_tokens + 1)
            out = self.model.generate(ids[:, -1:], past_key_values=cache, max_new_tokens=max_new_tokens,
                                      prefill_chunk_size=self.chunk_size)
            new = out[0, 1:]
        return self.tokenizer.decode(new.tolist(), skip_special_tokens=True).strip()


def judge(case, text: str) -> dict:
    """Score a generated answer: {"correct": bool, "parsed": value(s), + "abs_error" (time) / "recall" (numbers)}."""
    if case.kind == "text":
        return {"correct": " ".join(text.split()) == " ".join(case.answer.split()), "parsed": text}
    if case.kind == "number":
        v = parse_number(text)
        return {"correct": v is not None and v == case.values[0], "parsed": v}
    if case.kind == "time":
        v = parse_time(text)
        err = None if v is None else abs(v - case.values[0])
        return {"correct": err is not None and err <= case.tolerance + 1e-9, "parsed": v, "abs_error": err}
    if case.kind == "numbers":
        said = set(parse_numbers(text))
        recall = [float(v in said) for v in case.values]
        return {"correct": all(recall), "parsed": sorted(said), "recall": recall}
    raise ValueError(f"unknown answer kind {case.kind!r}")


def judge_teacher_forced(case, hits: list[bool], answer_ids: list[int], tokenizer) -> dict:
    """Teacher-forced score: all answer tokens right; for "numbers", also each needle's tokens (recall per needle)."""
    out = {"correct": bool(all(hits)), "token_accuracy": sum(hits) / len(hits)}
    if case.kind == "numbers":
        # which answer tokens spell which needle: decode the prefix token by token
        recall, pos = [], 0
        spans = []
        text = ""
        for i, t in enumerate(answer_ids):
            text += tokenizer.decode([t])
            spans.append(len(text))
        starts = [0] + spans[:-1]
        for v in case.values:
            s = case.answer.index(str(v), pos)
            e = s + len(str(v))
            pos = e
            toks = [i for i, (a, b) in enumerate(zip(starts, spans)) if a < e and b > s]
            recall.append(float(all(hits[i] for i in toks)))
        out["recall"] = recall
    return out
