"""Supervised fine-tuning data: JSONL conversations -> token ids, labels, vision inputs -> packed micro-batches.

Input formats (one JSON object per line; media paths relative to the dataset root):
  * transformers / qwen-vl-utils messages: {"messages": [{"role": "user", "content": [{"type": "image",
    "image": "a.png"}, {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}
  * LLaVA: {"image": "a.png" | [...], "video": ..., "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": "..."}]}, converted to messages (tags become media items, in order).
Each sample goes through the model's processor (chat template, media preprocessing, assistant-only labels as in
qwen-vl-finetune); the exact length of every sample is known up front from image headers / video metadata.
Position ids are computed per sample (model/positions.py, B=1) before packing; `pack_samples` concatenates samples into one row with `cu_seqlens`, so attention never crosses samples
and next-token targets are shifted inside each sample. `PackedBatchSampler` groups by length and packs to a token
budget, seeded by (seed, epoch) and resumable at any batch. Broken lines are reported with their line number and
skipped (counted) or fatal, by `DataConfig.on_error`.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from model.positions import get_rope_index, pack_position_ids

from .config import DataConfig
from .loss import IGNORE_INDEX

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TAG = re.compile(r"(<image>|<video>)")


class DataError(ValueError):
    """A malformed sample (bad JSON, unknown format or role, missing media, too long)."""


# ----------------------------------------------------------------------------------------------- formats
def _media_value(kind: str, value, where: str):
    """A media reference as the JSONL gives it: a path string (a video may also be a list of frame paths)."""
    if isinstance(value, str) and value:
        return value
    if kind == "video" and isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    expected = "a non-empty path string" + (" or a list of frame paths" if kind == "video" else "")
    raise DataError(f"{where}: {kind} must be {expected}, got {type(value).__name__} {str(value)[:60]!r}")


def to_messages(record: dict) -> list[dict]:
    """Normalise one JSONL record to a list of {"role", "content": [items]} messages.

    Args:
        record: a `messages` record or a LLaVA `conversations` record.
    Raises:
        DataError on unknown layouts, roles, a value of the wrong type or a tag / media count mismatch.
    """
    if not isinstance(record, dict):
        raise DataError(f"a line must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError("'messages' must be a non-empty list")
        out = []
        for n, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(f"message {n} must be an object with 'role' and 'content', got {type(m).__name__}")
            role = m.get("role")
            if role not in ROLES:
                raise DataError(f"unknown role {role!r} (expected one of {ROLES})")
            content = m.get("content", "")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise DataError(f"message {n}: content must be a string or a list, got {type(content).__name__}")
            items = []
            for it in content:
                if not isinstance(it, dict):
                    raise DataError(f"content item {it!r} is not an object")
                kind = it.get("type") or next((k for k in ("image", "video", "text") if k in it), None)
                if kind == "image_url":
                    url = it.get("image_url")
                    kind, it = "image", {"image": url.get("url") if isinstance(url, dict) else url}
                if kind not in ("image", "video", "text"):
                    raise DataError(f"unknown content item type {kind!r}")
                if kind != "text" and role != "user":
                    raise DataError(f"{kind} in a {role} turn (media are only supported in user turns)")
                if kind == "text":
                    if not isinstance(it.get("text"), str):
                        raise DataError(f"message {n}: text item needs a string 'text', got {it.get('text')!r}")
                    value = it["text"]
                else:
                    value = _media_value(kind, it.get(kind), f"message {n}")
                items.append({"type": kind, kind: value})
            out.append({"role": role, "content": items})
        return out
    if "conversations" in record:
        media = {k: record.get(k) for k in ("image", "video")}
        # one path, or a list of them (one per tag); anything else fails in _media_value
        media = {k: ([] if v is None else list(v) if isinstance(v, list) else [v]) for k, v in media.items()}
        media = {k: [_media_value(k, v, f"'{k}' entry") for v in vs] for k, vs in media.items()}
        used = {"image": 0, "video": 0}
        out = []
        if not isinstance(record["conversations"], list):
            raise DataError("'conversations' must be a list")
        for n, turn in enumerate(record["conversations"]):
            if not isinstance(turn, dict):
                raise DataError(f"turn {n} must be an object with 'from' and 'value', got {type(turn).__name__}")
            role = _LLAVA_ROLES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
            if role is None:
                raise DataError(f"unknown LLaVA speaker {turn.get('from')!r}")
            value = turn.get("value", "")
            if not isinstance(value, str):
                raise DataError(f"turn {n}: 'value' must be a string, got {type(value).__name__}")
            items = []
            for piece in _TAG.split(value):
                if piece in ("<image>", "<video>"):
                    kind = piece[1:-1]
                    if used[kind] >= len(media[kind]):
                        raise DataError(f"more {piece} tags than '{kind}' entries ({len(media[kind])})")
                    items.append({"type": kind, kind: media[kind][used[kind]]})
                    used[kind] += 1
                elif piece:
                    items.append({"type": "text", "text": piece})
            out.append({"role": role, "content": items})
        for kind in ("image", "video"):
            if used[kind] != len(media[kind]):
                raise DataError(f"{len(media[kind])} '{kind}' entries but {used[kind]} <{kind}> tags")
        return out
    raise DataError(f"record has neither 'messages' nor 'conversations' (keys: {sorted(record)[:8]})")


def _text(items: list[dict]) -> str:
    return "".join(it["text"] for it in items if it["type"] == "text")


# ----------------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """One tokenised sample (before packing). Shapes: input_ids / labels (L,), position_ids (3, L)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None         # (N, 1536) fp32
    image_grid_thw: torch.Tensor | None = None       # (n_images, 3) long
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    index: int = -1                                  # dataset index (for per-sample bookkeeping)


def training_processor(processor, data: DataConfig):
    """`processor` with the data config's pixel budgets and video sampling: what training preprocesses with, and
    what the export writes as the checkpoint's preprocessor configs."""
    import dataclasses

    from model.processing import Qwen3VLProcessor

    img = dataclasses.replace(processor.image_config, min_pixels=data.image_min_pixels,
                              max_pixels=data.image_max_pixels)
    vid = dataclasses.replace(processor.video_config, min_pixels=data.video_min_pixels,
                              max_pixels=data.video_max_pixels)
    return Qwen3VLProcessor(processor.tokenizer, img, vid, video_rule=processor.video_rule,
                            video_layout=processor.video_layout, fps=data.video_fps,
                            min_frames=min(processor.min_frames, data.video_max_frames),
                            max_frames=data.video_max_frames)


class ChatEncoder:
    """Conversations -> Encoded samples through the model's processor (chat template, media, assistant labels).

    The processor (model/processing/) is the one home of the chat template and the label rule; this class adds
    the training-side pieces: media paths relative to a dataset root, the data config's pixel budgets, an optional
    system prompt, per-sample position ids, and `length()`, the exact token count computed from image headers and
    video metadata without decoding pixels (what packing needs up front).

    Args:
        processor: model.processing.Qwen3VLProcessor (e.g. `load_processor(path)`).
        model_config: Qwen3VLConfig (token ids, merge size for get_rope_index).
        data: DataConfig (pixel budgets, video fps / max frames, system prompt).
    """

    def __init__(self, processor, model_config, data: DataConfig):
        self.proc = training_processor(processor, data)
        self.tok = processor.tokenizer
        self.cfg = model_config
        self.data = data

    def _prepare(self, messages, root: str, prompt_only: bool = False) -> list[dict]:
        """System prompt, absolute media paths; with prompt_only cut before the last assistant turn."""
        if self.data.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": [{"type": "text", "text": self.data.system_prompt}]}] + messages
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("no assistant turn (nothing to learn)")
        if prompt_only:
            messages = messages[:max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
        out = []
        allow = self.data.allow_outside_root
        for m in messages:
            items = [{**it, it["type"]: _resolve(root, it[it["type"]], allow)} if it["type"] in ("image", "video")
                     else it for it in m["content"]]
            out.append({"role": m["role"], "content": items})
        return out

    def length(self, messages, root: str) -> int:
        """Exact token count of a sample, from image headers / video metadata (no pixel decoding).

        The processor's geometry planner (model/processing/geometry.py) sizes the media here and in `encode`.
        Raises DataError for missing media, ValueError for unreadable media.
        """
        msgs = self._prepare(messages, root)
        for m in msgs:
            for it in m["content"]:
                if it["type"] == "text":
                    continue
                for p in it[it["type"]] if isinstance(it[it["type"]], list) else [it[it["type"]]]:
                    if not os.path.isfile(p):
                        raise DataError(f"{it['type']} file not found: {p}")
        return self.proc.count_tokens(msgs)

    def encode(self, messages, root: str, *, prompt_only: bool = False) -> Encoded:
        """Tokenise one conversation (labels on assistant turns); with `prompt_only` the generation prompt instead.

        Args:
            messages: output of `to_messages`.
            root: directory media paths are relative to.
        """
        out = self.proc.process_conversation(self._prepare(messages, root, prompt_only),
                                             add_generation_prompt=prompt_only, return_labels=not prompt_only)
        ids = out["input_ids"]
        labels = out.get("labels", torch.full_like(ids, IGNORE_INDEX))
        if not prompt_only and not bool((labels != IGNORE_INDEX).any()):
            raise DataError("no supervised tokens (empty assistant turns?)")
        img_grid, vid_grid = out.get("image_grid_thw"), out.get("video_grid_thw")
        pos, _ = get_rope_index(ids[None], img_grid, vid_grid, config=self.cfg)
        return Encoded(input_ids=ids, labels=labels, position_ids=pos[:, 0], pixel_values=out.get("pixel_values"),
                       image_grid_thw=img_grid, pixel_values_videos=out.get("pixel_values_videos"),
                       video_grid_thw=vid_grid)


def _resolve(root: str, p: str | list, allow_outside_root: bool = False) -> str | list:
    """A dataset media path (or frame-path list) -> path under `root`.

    Relative paths are joined to the root. Unless `allow_outside_root`, a path that leaves the root lexically
    (absolute, `file:///...`, or `..` past the root) is a DataError raised before the file system is touched, so a
    dataset can neither read nor probe files elsewhere (the message is the same whether the file exists or not).
    Symlinks inside the root are followed: whoever can place files under the root chooses what they hold anyway
    (and the Hugging Face cache lays datasets out as symlinks into its blob store).
    """
    from model.processing import local_path

    if isinstance(p, list):
        return [_resolve(root, q, allow_outside_root) for q in p]
    p = local_path(p)
    full = os.path.join(root, p)  # an absolute p replaces root
    if not allow_outside_root:
        base = os.path.normpath(os.path.abspath(root))
        if os.path.commonpath([base, os.path.normpath(os.path.abspath(full))]) != base:
            raise DataError(f"media path {p!r} is outside the dataset root (absolute or '..'); set "
                            f"data.allow_outside_root=true to read media from anywhere")
    return full


# ----------------------------------------------------------------------------------------------- dataset
class SFTDataset(torch.utils.data.Dataset):
    """A JSONL file of conversations; validates every line up front and knows each sample's token length.

    Args:
        path: JSONL file.  root: media root (default: the file's directory).
        encoder: ChatEncoder.  max_seq_len: longer samples are broken.  on_error: "skip" or "raise".
    Attributes:
        lengths: token count per kept sample (exact: pads counted from image headers).
        broken: list of (line number, reason) for skipped lines.
    """

    def __init__(self, path: str, encoder: ChatEncoder, root: str | None = None, max_seq_len: int = 2048,
                 on_error: str = "skip"):
        self.path, self.encoder, self.on_error = str(path), encoder, on_error
        self.root = root or os.path.dirname(os.path.abspath(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset file not found: {path}")
        self.records: list[tuple[int, list]] = []      # (line number, messages)
        self.lengths: list[int] = []
        self.broken: list[tuple[int, str]] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    msgs = to_messages(json.loads(line))
                    n = encoder.length(msgs, self.root)
                    if n > max_seq_len:
                        raise DataError(f"{n} tokens > data.max_seq_len={max_seq_len}")
                except Exception as e:  # noqa: BLE001 - any failure of one line is that line's data error
                    self._report(lineno, _reason(e))
                    continue
                self.records.append((lineno, msgs))
                self.lengths.append(n)
        if self.broken:
            log.warning("%s: skipped %d broken line(s), first: line %d: %s", path, len(self.broken),
                        *self.broken[0])
        if not self.records:
            raise DataError(f"{path}: no usable samples ({len(self.broken)} broken)")

    def _report(self, lineno: int, reason: str):
        if self.on_error == "raise":
            raise DataError(f"{self.path}:{lineno}: {reason}")
        self.broken.append((lineno, reason))
        if len(self.broken) <= 5:  # the first few in full; the rest are counted in the summary
            log.warning("%s:%d: skipped: %s", self.path, lineno, reason)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Encoded | None:
        lineno, msgs = self.records[i]
        try:
            enc = self.encoder.encode(msgs, self.root)
        except Exception as e:  # noqa: BLE001 - a sample that fails to load is that sample's data error
            if self.on_error == "raise":
                raise DataError(f"{self.path}:{lineno}: {_reason(e)}") from e
            log.warning("%s:%d: skipped at load time: %s", self.path, lineno, _reason(e))
            return None  # dropped from its batch and counted (pack_samples' n_dropped)
        enc.index = i
        return enc

    def answer(self, i: int) -> str:
        """Reference text of the last assistant turn of sample i (for CER)."""
        msgs = self.records[i][1]
        return _text([m for m in msgs if m["role"] == "assistant"][-1]["content"])

    def prompt(self, i: int) -> Encoded:
        """Sample i up to and including the last `<|im_start|>assistant\\n` (generation input)."""
        return self.encoder.encode(self.records[i][1], self.root, prompt_only=True)


def _reason(e: Exception) -> str:
    """One line for a per-sample failure: the exception's type and message."""
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------- packing
def pack_samples(samples: list[Encoded | None]) -> dict:
    """Concatenate samples into one packed row (B = 1) with per-sample shifted targets and cu_seqlens.

    Args:
        samples: encoded samples (None entries, i.e. samples that failed to load, are dropped and counted).
    Returns:
        dict with input_ids (1, T) long, labels (1, T) long (already shifted: labels[t] is the target at t),
        position_ids (3, 1, T) long, cu_seqlens (n + 1,) int32, pixel_values / image_grid_thw /
        pixel_values_videos / video_grid_thw (or None), doc_index (T,) long (sample slot of every token),
        indices (n,) dataset indices, n_dropped int.
    """
    kept = [s for s in samples if s is not None]
    out = {"n_dropped": len(samples) - len(kept), "indices": torch.tensor([s.index for s in kept], dtype=torch.long)}
    if not kept:
        out["input_ids"] = None
        return out
    lens = torch.tensor([s.input_ids.numel() for s in kept])
    out["input_ids"] = torch.cat([s.input_ids for s in kept])[None]
    # next-token targets inside each sample; the last token of a sample predicts nothing
    out["labels"] = torch.cat([torch.cat([s.labels[1:], s.labels.new_full((1,), IGNORE_INDEX)]) for s in kept])[None]
    out["position_ids"] = pack_position_ids([s.position_ids for s in kept])
    out["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])
    out["doc_index"] = torch.repeat_interleave(torch.arange(len(kept)), lens)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(s, key) for s in kept if getattr(s, key) is not None]
        out[key] = torch.cat(parts) if parts else None
    return out


class PackedBatchSampler:
    """Seeded, length-grouped packing of dataset indices into micro-batches of at most `token_budget` tokens.

    `batches(epoch)` is a pure function of (lengths, seed, epoch): shuffle, then inside windows of `group_size`
    batches pack first-fit-decreasing by length (or greedily in order without grouping), shuffle the batch order. Resuming = skipping the first k batches.

    Args:
        lengths: token length per sample.  token_budget: max tokens per batch.  seed: base seed.
        shuffle: shuffle samples and batches.  length_grouping: sort inside windows before packing.
        max_samples: max samples per batch (0 = no limit).
    """

    def __init__(self, lengths: list[int], token_budget: int, seed: int = 0, shuffle: bool = True,
                 length_grouping: bool = True, group_size: int = 64, max_samples: int = 0):
        too_long = [i for i, n in enumerate(lengths) if n > token_budget]
        if too_long:
            raise DataError(f"{len(too_long)} sample(s) exceed the token budget {token_budget} "
                            f"(first: index {too_long[0]}, {lengths[too_long[0]]} tokens)")
        self.lengths, self.budget, self.seed = list(lengths), token_budget, seed
        self.shuffle, self.grouping, self.group_size, self.max_samples = shuffle, length_grouping, group_size, max_samples

    def batches(self, epoch: int) -> list[list[int]]:
        """All micro-batches (lists of dataset indices) of one epoch, deterministic in (seed, epoch)."""
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.grouping:
            # first-fit decreasing inside windows of ~group_size batches: similar lengths share a batch and the
            # packing is tight (little of the budget wasted)
            mean = max(1.0, sum(self.lengths) / max(1, n))
            window = max(1, int(self.group_size * max(1, self.budget // mean)))
            out = []
            for s in range(0, n, window):
                bins: list[list[int]] = []
                room: list[int] = []
                for i in sorted(order[s:s + window], key=lambda j: -self.lengths[j]):
                    k = next((b for b in range(len(bins)) if room[b] >= self.lengths[i]
                              and not (self.max_samples and len(bins[b]) >= self.max_samples)), None)
                    if k is None:
                        bins.append([])
                        room.append(self.budget)
                        k = len(bins) - 1
                    bins[k].append(i)
                    room[k] -= self.lengths[i]
                out += bins
        else:
            out, cur, used = [], [], 0
            for i in order:
                if cur and (used + self.lengths[i] > self.budget or
                            (self.max_samples and len(cur) >= self.max_samples)):
                    out.append(cur)
                    cur, used = [], 0
                cur.append(i)
                used += self.lengths[i]
            if cur:
                out.append(cur)
        if self.shuffle:
            perm = torch.randperm(len(out), generator=g).tolist()
            out = [out[p] for p in perm]
        return out


class _ListSampler(torch.utils.data.Sampler):
    def __init__(self, batches):
        self.b = batches

    def __iter__(self):
        return iter(self.b)

    def __len__(self):
        return len(self.b)


class BatchStream:
    """Endless stream of this rank's packed micro-batches with an exact, resumable position.

    Global batch k of an epoch goes to rank k % world; every epoch is cut to a multiple of world * grad_accum so
    all ranks take the same number of steps. `position` = (epoch, global batches consumed in the epoch).

    Args:
        dataset: SFTDataset.  sampler: PackedBatchSampler.  rank, world: data-parallel coordinates.
        grad_accum: micro-batches per optimizer step.  num_workers, prefetch_factor: DataLoader settings.
    """

    def __init__(self, dataset, sampler: PackedBatchSampler, rank: int = 0, world: int = 1, grad_accum: int = 1,
                 num_workers: int = 0, prefetch_factor: int = 2, epoch: int = 0, offset: int = 0):
        self.ds, self.sampler, self.rank, self.world, self.accum = dataset, sampler, rank, world, grad_accum
        self.num_workers, self.prefetch = num_workers, prefetch_factor
        self.epoch, self.offset = epoch, offset
        self._it = None

    def _epoch_batches(self):
        b = self.sampler.batches(self.epoch)
        per_step = self.world * self.accum
        usable = len(b) // per_step * per_step
        if usable == 0:
            raise DataError(f"an epoch has {len(b)} micro-batches, fewer than world*grad_accum={per_step}; "
                            f"lower data.token_budget or add data")
        return b[:usable]

    def _start(self):
        b = self._epoch_batches()
        if self.offset >= len(b):
            self.epoch, self.offset = self.epoch + 1, 0
            b = self._epoch_batches()
        mine = b[self.offset + self.rank::self.world]
        kw = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch, "persistent_workers": False}
        # its own generator (worker seeds come from it): drawing from the global RNG here would shift every
        # later random op (dropout) by one draw in a resumed run, which builds its loader at another step
        gen = torch.Generator().manual_seed(self.sampler.seed * 1_000_003 + self.epoch)
        loader = torch.utils.data.DataLoader(self.ds, batch_sampler=_ListSampler(mine), collate_fn=pack_samples,
                                             num_workers=self.num_workers, generator=gen, **kw)
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.offset = self.epoch + 1, 0
            self._start()
            batch = next(self._it)
        self.offset += self.world
        return batch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in the current epoch (its micro-batches / (world * grad_accum))."""
        return len(self._epoch_batches()) // (self.world * self.accum)

    @property
    def position(self) -> dict:
        """{"epoch", "offset"}: where a resumed stream continues (offset counts global micro-batches)."""
        return {"epoch": self.epoch, "offset": self.offset}


def count_label_tokens(batch: dict) -> int:
    """Number of supervised target positions in a packed batch."""
    return 0 if batch.get("input_ids") is None else int((batch["labels"] != IGNORE_INDEX).sum())


def dataset_root(cfg: DataConfig, path: str) -> str:
    """The media root for dataset file `path`."""
    return cfg.root or str(Path(path).resolve().parent)
