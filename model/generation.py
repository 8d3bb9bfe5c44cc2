"""Autoregressive generation for Qwen3-VL: a preallocated KV cache (bf16 or FP8, saved and loaded, truncated to a
prefix), logits processing (temperature, top-k, top-p) and the decode loop (greedy or sampling, stop tokens,
left-padded batches, MRoPE decode positions from rope deltas, continuing after a cached prefix).

The decode loop follows the usual HF semantics: a sequence that has emitted a stop token keeps emitting the pad
token; generation ends when every sequence has stopped or max_new_tokens is reached.

The long-video engine on top of the cache ("index once, ask many") is `Qwen3VL.prefill` (model/qwen3vl.py): a
prompt of any length is prefilled chunk by chunk into a cache, the cache is saved, and every later question is
prefilled after `cache.truncate(prefix_len)`; docs/long_context.md walks through it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .positions import decode_position_ids

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
CACHE_FORMAT = "qwen3vl-lab-kvcache"
CACHE_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float8_e4m3fn": FP8}



INITIAL_FREE_TOKENS = 1024  # generate's own cache starts with this much room and doubles on demand

def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) keys or values -> float8_e4m3fn values and one fp32 scale per row (per token and KV head).

    scale = max |x| / 448 over the row, so the largest entry maps to e4m3's largest finite value; x ~ x8 * scale.
    """
    scale = x.abs().amax(-1).float().clamp(min=1e-12) / FP8_MAX
    x8 = (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, scale


def dequantize_kv(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `quantize_kv` up to rounding: (..., D) fp8 and (...) scales -> (..., D) in dtype (the fp32
    product rounded once; the Triton kernels do the same tile by tile)."""
    return (x8.float() * scale.float()[..., None]).to(dtype)


def config_fingerprint(config) -> str:
    """sha256 of the model configuration that determines what the cache holds (the config.json layout: the
    attention backend is left out, rope scaling is in, since keys are cached after RoPE)."""
    blob = json.dumps(config.to_hf(), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _ids_fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _scale_buffer(shape, device) -> torch.Tensor:
    """FP8 scales of one layer as a (B, max_len, Hkv) view of head-major (B, Hkv, max_len) storage: a kernel reading
    the keys of one KV head reads their scales contiguously (token-major storage would fetch a 32-byte sector per
    4-byte scale)."""
    B, L, H = shape[:3]
    return torch.zeros(B, H, L, dtype=torch.float32, device=device).transpose(1, 2)


class KVCache:
    """Per-layer K/V buffers of shape (B, max_len, Hkv, hd), filled left to right; `length` tokens are valid.

    dtype: the storage dtype. torch.float8_e4m3fn stores K/V in FP8 with one fp32 scale per (sequence, token, KV
    head) (`quantize_kv`); the attention backends dequantise (model/attention.py: the Triton kernels inside the
    kernel, tile by tile; SDPA and FlexAttention on a bf16 copy of one layer at a time).

    Besides K/V the cache keeps, on the host, the token ids it holds and, per token, the next free MRoPE position
    (1 + the largest position id so far): enough to continue a prompt after any prefix (`truncate`), to check that
    a saved cache belongs to a prompt and a model (`save` / `load`), and to give the rope deltas of decoding.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, *, compute_dtype: torch.dtype | None = None):
        if dtype not in _DTYPES.values():
            raise ValueError(f"KVCache: dtype must be one of {list(_DTYPES)}, got {dtype}")
        for name, v in (("num_layers", num_layers), ("batch", batch), ("max_len", max_len),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"KVCache: {name} must be an int >= 1, got {v!r}")
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.quantized = dtype == FP8
        # what attention computes in when the storage is FP8 (the model's dtype, set by prefill / forward)
        self.compute_dtype = compute_dtype or (torch.bfloat16 if self.quantized else dtype)
        # zeros, not empty: a static decode step reads the whole buffer (model/generation.py's StaticDecoder), and
        # stale NaN bit patterns past the valid length would reach SDPA's output through 0 * NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k_scale = self.v_scale = None
        if self.quantized:
            self.k_scale = [_scale_buffer(shape, device) for _ in range(num_layers)]
            self.v_scale = [_scale_buffer(shape, device) for _ in range(num_layers)]
        self.num_layers, self.batch, self.max_len = num_layers, batch, max_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.length = 0  # tokens already stored (same for every layer once a forward pass completes)
        self._pending = 0
        # host bookkeeping: token ids, next free position after each token, key padding (None: no padding)
        self.token_ids = torch.zeros(batch, max_len, dtype=torch.int64)
        self.next_pos = torch.zeros(batch, max_len, dtype=torch.int64)
        self.key_padding: torch.Tensor | None = None
        self.config_hash: str | None = None
        self.static_pos: torch.Tensor | None = None  # static (CUDA-graph) decoding: see StaticDecoder

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, dtype: torch.dtype | None = None) -> "KVCache":
        """A cache sized for `model` (Qwen3VL): its layers, KV heads, head_dim; dtype default: the model's."""
        t = model.config.text
        p = next(model.parameters())
        cache = cls(t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim, dtype or p.dtype,
                    p.device, compute_dtype=p.dtype)
        cache.config_hash = config_fingerprint(model.config)
        return cache

    # ------------------------------------------------------------------ filling
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k/v (B, L, Hkv, hd) for `layer`; return the valid prefix including them as (k, v, scales):
        scales is None, or (k_scale, v_scale) (B, Lk, Hkv) fp32 when the cache is FP8 (k, v then FP8).

        In static mode (`StaticDecoder`) one token is written at the device-side position `static_pos` and the
        whole buffers are returned (the valid length travels in the attention mask's key_length)."""
        if self.static_pos is not None:
            return self._static_update(layer, k, v)
        L = k.shape[1]
        end = self.length + L
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        if k.shape[0] != self.batch:
            raise ValueError(f"KV cache holds {self.batch} sequences, the input has {k.shape[0]}")
        if self.quantized:
            (k8, ks), (v8, vs) = quantize_kv(k), quantize_kv(v)
            self.k[layer][:, self.length:end], self.k_scale[layer][:, self.length:end] = k8, ks
            self.v[layer][:, self.length:end], self.v_scale[layer][:, self.length:end] = v8, vs
            self._pending = L
            return (self.k[layer][:, :end], self.v[layer][:, :end],
                    (self.k_scale[layer][:, :end], self.v_scale[layer][:, :end]))
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        self._pending = L
        return self.k[layer][:, :end], self.v[layer][:, :end], None

    def _static_update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        idx = self.static_pos  # (1,) long on the device: no host value, so a CUDA graph replays at any length
        if self.quantized:
            (k8, ks), (v8, vs) = quantize_kv(k), quantize_kv(v)
            # FP8 through a byte view (index_copy_ has no float8 kernel); the scales through their strided views
            self.k[layer].view(torch.uint8).index_copy_(1, idx, k8.view(torch.uint8))
            self.v[layer].view(torch.uint8).index_copy_(1, idx, v8.view(torch.uint8))
            self.k_scale[layer].index_copy_(1, idx, ks)
            self.v_scale[layer].index_copy_(1, idx, vs)
            return self.k[layer], self.v[layer], (self.k_scale[layer], self.v_scale[layer])
        self.k[layer].index_copy_(1, idx, k.to(self.dtype))
        self.v[layer].index_copy_(1, idx, v.to(self.dtype))
        return self.k[layer], self.v[layer], None

    def advance(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        """Commit the tokens written by the last forward pass, with their ids (B, L), positions (3, B, L) and
        0/1 mask (B, L) (None: all real tokens)."""
        L = self._pending
        s, e = self.length, self.length + L
        if input_ids is not None:
            self.token_ids[:, s:e] = input_ids.detach().to("cpu", torch.int64)
        if position_ids is not None:
            nxt = position_ids.detach().amax(0).to("cpu", torch.int64) + 1  # (B, L)
            if s > 0:
                nxt = torch.maximum(nxt, self.next_pos[:, s - 1:s])
            self.next_pos[:, s:e] = nxt.cummax(dim=1).values
        if attention_mask is not None and not bool(attention_mask.all()):
            if self.key_padding is None:
                self.key_padding = torch.ones(self.batch, self.max_len, dtype=torch.bool)
            self.key_padding[:, s:e] = attention_mask.detach().to("cpu").bool()
        elif self.key_padding is not None:
            self.key_padding[:, s:e] = True
        self.length = e
        self._pending = 0

    def convert(self, dtype: torch.dtype) -> "KVCache":
        """Re-store the valid tokens in another dtype (e.g. bf16 -> FP8 after a bf16 prefill), one layer at a time
        (peak memory: the cache plus one layer in the new dtype). Returns self."""
        if dtype not in _DTYPES.values():
            raise ValueError(f"KVCache.convert: dtype must be one of {list(_DTYPES)}, got {dtype}")
        if dtype == self.dtype:
            return self
        n, shape = self.length, (self.batch, self.max_len, self.num_kv_heads, self.head_dim)
        fp8 = dtype == FP8
        ks, vs = [], []
        for i in range(self.num_layers):
            new = []
            for buf, sc in ((self.k, self.k_scale), (self.v, self.v_scale)):
                x = buf[i][:, :n] if sc is None else dequantize_kv(buf[i][:, :n], sc[i][:, :n], self.compute_dtype)
                out = torch.zeros(shape, dtype=dtype, device=self.device)
                scale = _scale_buffer(shape, self.device) if fp8 else None
                if fp8:
                    out[:, :n], scale[:, :n] = quantize_kv(x)
                else:
                    out[:, :n] = x
                buf[i] = None  # free this layer's old storage before the next one is allocated
                new.append((out, scale))
            (self.k[i], k_s), (self.v[i], v_s) = new
            ks.append(k_s), vs.append(v_s)
        self.k_scale, self.v_scale = (ks, vs) if fp8 else (None, None)
        self.dtype, self.quantized = dtype, fp8
        return self

    def grow(self, max_len: int) -> "KVCache":
        """Reallocate to a larger max_len, keeping the valid tokens (generate grows its own cache on demand, so a
        huge max_new_tokens does not allocate its whole cache up front)."""
        if max_len <= self.max_len:
            return self
        n = self.length
        for bufs in (self.k, self.v):
            for i, x in enumerate(bufs):
                y = torch.zeros((self.batch, max_len, *x.shape[2:]), dtype=x.dtype, device=x.device)
                y[:, :n] = x[:, :n]
                bufs[i] = y
        if self.quantized:
            for bufs in (self.k_scale, self.v_scale):
                for i, x in enumerate(bufs):
                    y = _scale_buffer((self.batch, max_len, self.num_kv_heads), self.device)
                    y[:, :n] = x[:, :n]
                    bufs[i] = y
        for name in ("token_ids", "next_pos", "key_padding"):
            x = getattr(self, name)
            if x is not None:
                y = (torch.ones if name == "key_padding" else torch.zeros)(self.batch, max_len, dtype=x.dtype)
                y[:, :n] = x[:, :n]
                setattr(self, name, y)
        self.max_len = max_len
        return self

    def nbytes(self) -> int:
        """Device bytes of the K/V storage (and scales), at max_len."""
        n = sum(x.numel() * x.element_size() for x in self.k + self.v)
        if self.quantized:
            n += sum(x.numel() * 4 for x in self.k_scale + self.v_scale)
        return n

    # ------------------------------------------------------------------ positions
    @property
    def next_position(self) -> torch.Tensor:
        """(B, 1) long: the MRoPE position of the next token appended (all three axes), on the cache's device."""
        if self.length == 0:
            return torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        return self.next_pos[:, self.length - 1:self.length].to(self.device)

    @property
    def rope_deltas(self) -> torch.Tensor:
        """(B, 1) long: next position - length, as a one-shot forward of the cached prompt returns it."""
        return self.next_position - self.length

    def attention_mask(self) -> torch.Tensor | None:
        """(B, length) long 0/1 over the cached tokens, or None when no cached token is padding."""
        if self.key_padding is None or bool(self.key_padding[:, :self.length].all()):
            return None
        return self.key_padding[:, :self.length].to(self.device, torch.long)

    def truncate(self, n: int) -> "KVCache":
        """Keep the first n tokens (a prefix: e.g. a video, to ask another question after it). Nothing is copied
        or freed: later tokens are overwritten by the next append."""
        if not isinstance(n, int) or not 0 <= n <= self.length:
            raise ValueError(f"KVCache.truncate: n must be an int in [0, {self.length}], got {n!r}")
        self.length, self._pending = n, 0
        return self

    def check_model(self, model):
        """Refuse a cache built by a model with another configuration (its keys would be meaningless here)."""
        want = config_fingerprint(model.config)
        if self.config_hash is not None and self.config_hash != want:
            raise ValueError(f"this KV cache was built by a model with another configuration (config sha256 "
                             f"{self.config_hash[:12]}..., this model {want[:12]}...): architecture, rope scaling "
                             "and token ids must match; rebuild the cache with this model")
        t = model.config.text
        got = (self.num_layers, self.num_kv_heads, self.head_dim)
        if got != (t.num_hidden_layers, t.num_key_value_heads, t.head_dim):
            raise ValueError(f"KV cache shape (layers, kv heads, head_dim) = {got} does not fit the model "
                             f"({t.num_hidden_layers}, {t.num_key_value_heads}, {t.head_dim})")
        self.config_hash = want

    def prompt_fingerprint(self) -> str:
        """sha256 of the cached token ids (all sequences, the first `length` positions)."""
        return _ids_fingerprint(self.token_ids[:, :self.length])

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Write the valid prefix to a directory: one safetensors file per layer (k, v, and their scales for FP8),
        `tokens.safetensors` (ids, next positions, key padding) and `cache.json` (metadata: format, shapes, dtype,
        length, config and prompt fingerprints, rope deltas). Written to a temporary directory beside `path` and
        renamed into place, so a crash leaves the old cache or none, never half of one."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        n = self.length
        try:
            for i in range(self.num_layers):
                t = {"k": self.k[i][:, :n], "v": self.v[i][:, :n]}
                if self.quantized:
                    t |= {"k_scale": self.k_scale[i][:, :n], "v_scale": self.v_scale[i][:, :n]}
                save_file({name: x.contiguous() for name, x in t.items()}, str(tmp / f"layer_{i:03d}.safetensors"))
            tokens = {"token_ids": self.token_ids[:, :n].contiguous(), "next_pos": self.next_pos[:, :n].contiguous()}
            if self.key_padding is not None:
                tokens["key_padding"] = self.key_padding[:, :n].contiguous()
            save_file(tokens, str(tmp / "tokens.safetensors"))
            meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "num_layers": self.num_layers,
                    "batch": self.batch, "length": n, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                    "dtype": str(self.dtype).removeprefix("torch."),
                    "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                    "config_sha256": self.config_hash, "prompt_sha256": self.prompt_fingerprint(),
                    "rope_deltas": (self.next_pos[:, n - 1] - n).tolist() if n else [0] * self.batch}
            (tmp / "cache.json").write_text(json.dumps(meta, indent=1) + "\n")
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu", *, max_len: int | None = None, model=None) -> "KVCache":
        """Read a cache written by `save`, preallocated to max_len (default: its length) on `device`.

        model: if given, a cache built by a model with another configuration is refused. Missing or truncated
        files, shapes that disagree with cache.json, or token ids that do not match its fingerprint raise
        ValueError naming the file.
        """
        from safetensors import safe_open

        path = Path(path)
        meta_file = path / "cache.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"no KV cache at {path} (cache.json missing)")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_file}: not valid JSON ({e})") from e
        if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
            raise ValueError(f"{meta_file}: not a {CACHE_FORMAT} v{CACHE_VERSION} cache "
                             f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
        try:
            L, B, n = int(meta["num_layers"]), int(meta["batch"]), int(meta["length"])
            hkv, hd, dtype = int(meta["num_kv_heads"]), int(meta["head_dim"]), _DTYPES[meta["dtype"]]
            compute = _DTYPES[meta.get("compute_dtype", "bfloat16")]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{meta_file}: missing or malformed field ({e!r})") from e
        max_len = n if max_len is None else max_len
        if max_len < max(n, 1):
            raise ValueError(f"KVCache.load: max_len {max_len} < the cached length {n}")
        cache = cls(L, B, max_len, hkv, hd, dtype, device, compute_dtype=compute)
        cache.config_hash = meta.get("config_sha256")

        def read(file: Path, names: dict[str, tuple]) -> dict[str, torch.Tensor]:
            if not file.is_file():
                raise ValueError(f"KV cache {path}: {file.name} is missing")
            out = {}
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name, (shape, dt) in names.items():
                        if name not in f.keys():
                            raise ValueError(f"tensor {name!r} missing")
                        x = f.get_tensor(name)
                        if tuple(x.shape) != shape or x.dtype != dt:
                            raise ValueError(f"tensor {name!r} is {x.dtype} {tuple(x.shape)}, cache.json says "
                                             f"{dt} {shape}")
                        out[name] = x
            except ValueError as e:
                raise ValueError(f"KV cache {path}: {file.name}: {e}") from e
            except Exception as e:  # safetensors' errors for truncated or corrupt files
                raise ValueError(f"KV cache {path}: {file.name} is truncated or corrupt ({e})") from e
            return out

        want = {"token_ids": ((B, n), torch.int64), "next_pos": ((B, n), torch.int64)}
        tok_file = path / "tokens.safetensors"
        tokens = read(tok_file, want)
        cache.token_ids[:, :n], cache.next_pos[:, :n] = tokens["token_ids"], tokens["next_pos"]
        with safe_open(str(tok_file), framework="pt", device="cpu") as f:
            if "key_padding" in f.keys():
                cache.key_padding = torch.ones(B, max_len, dtype=torch.bool)
                cache.key_padding[:, :n] = read(tok_file, {"key_padding": ((B, n), torch.bool)})["key_padding"]
        if _ids_fingerprint(cache.token_ids[:, :n]) != meta.get("prompt_sha256"):
            raise ValueError(f"KV cache {path}: the token ids in tokens.safetensors do not match cache.json's "
                             "prompt_sha256 (files from different caches, or modified)")
        kv = {"k": ((B, n, hkv, hd), dtype), "v": ((B, n, hkv, hd), dtype)}
        if cache.quantized:
            kv |= {"k_scale": ((B, n, hkv), torch.float32), "v_scale": ((B, n, hkv), torch.float32)}
        for i in range(L):
            t = read(path / f"layer_{i:03d}.safetensors", kv)
            cache.k[i][:, :n], cache.v[i][:, :n] = t["k"], t["v"]
            if cache.quantized:
                cache.k_scale[i][:, :n], cache.v_scale[i][:, :n] = t["k_scale"], t["v_scale"]
        cache.length = n
        if model is not None:
            cache.check_model(model)
        return cache


class StaticDecoder:
    """One decode step (one token per sequence) with static shapes, replayed as a CUDA graph on a GPU.

    Eager decoding of a small batch is bound by the host: a 28-layer decoder launches ~1,700 kernels per token, tens
    of ms of Python and launch overhead, far more than reading the cache. Here the step reads the whole
    preallocated cache with the valid length on the device (`AttentionMask.key_length`; the Triton split-KV kernel
    loads it), writes the new K/V at a device-side position (`KVCache.static_pos`), so every launch has the same
    arguments at every length: the step is captured once and replayed. Dense decoders without padding; the
    cache's host bookkeeping (ids, positions) is updated after each replay.

    Args:
        model: Qwen3VL (dense). cache: its KVCache, filled by the prompt.
        graph: capture a CUDA graph (default: on CUDA devices); False runs the same static step eagerly.
    """

    @torch.no_grad()
    def __init__(self, model, cache: KVCache, graph: bool | None = None):
        dev = cache.device
        self.model, self.cache = model, cache
        self.graph = None
        self.max_len = cache.max_len
        self.tok = torch.zeros(cache.batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(3, cache.batch, 1, dtype=torch.long, device=dev)
        cache.static_pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_length = torch.zeros(cache.batch, dtype=torch.int32, device=dev)
        self._set_length()
        if graph is None:
            graph = dev.type == "cuda"
        self.logits = None
        if graph:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up outside the graph (kernel compilation, allocator)
                for _ in range(2):
                    model._decode_static(self.tok, self.pos, cache, self.key_length)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model._decode_static(self.tok, self.pos, cache, self.key_length)

    @staticmethod
    def supported(model, cache: KVCache, attention_mask) -> bool:
        """Whether generate should decode `model` on `cache` with this class: a dense decoder, no padding, no
        dynamic (NTK) rope scaling (its tables depend on the host-side maximum position), and the Triton backend
        (its split-KV kernel reads the valid length on the device; SDPA would get a mask over the whole
        preallocated cache and repeated K/V, slower than eager decoding)."""
        return (not model.config.is_moe and attention_mask is None and cache.key_padding is None
                and model.config.attn_backend == "triton" and model.config.text.rope.rope_type != "dynamic")

    def _set_length(self):
        self.cache.static_pos.fill_(self.cache.length)  # device writes of host ints: no synchronisation
        self.key_length.fill_(self.cache.length + 1)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) long, position_ids (3, B, 1) -> logits (B, 1, vocab); appends the token to the cache."""
        c = self.cache
        if c.length + 1 > c.max_len:
            raise RuntimeError(f"KV cache full: {c.length + 1} tokens > max_len {c.max_len}")
        self.tok.copy_(tokens)
        self.pos.copy_(position_ids)
        self._set_length()
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self.model._decode_static(self.tok, self.pos, c, self.key_length)
        c._pending = 1
        c.advance(tokens, position_ids)
        return logits

    def close(self):
        """Leave static mode (the cache goes back to appending through `update`)."""
        self.cache.static_pos = None
        self.graph = None


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering: (B, V) fp32 logits -> filtered logits."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k!r}")
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
             generator: torch.Generator | None = None, past_key_values: KVCache | None = None,
             prefill_chunk_size: int | None = None, cache_dtype: torch.dtype | None = None,
             static_decode: bool | None = None, **vision_inputs) -> torch.Tensor:
    """Generate up to max_new_tokens after a (left-padded) prompt, or after a cached prefix.

    Args:
        model: Qwen3VL. input_ids: (B, L) long: the prompt, or with past_key_values the tokens that follow the
            cached prefix (e.g. a question after a cached video). attention_mask: (B, L) 0/1 (left padding) or None.
        stop_token_ids: ids that end a sequence; default (config.eos_token_id, config.pad_token_id), as the
            official generation_config.json. pad_token_id: what a stopped sequence emits; default config.pad_token_id.
        past_key_values: a KVCache holding a prefix (`Qwen3VL.prefill`, or `KVCache.load`); the new tokens are
            appended to it (positions continue from it) and so are the generated ones. It must have room for
            len(input_ids) + max_new_tokens more tokens; `cache.truncate(prefix_len)` afterwards restores the prefix.
        prefill_chunk_size: prefill the prompt in chunks of this many tokens (`Qwen3VL.prefill`); None: one pass
            (chunks are always used after a cached prefix, of 8192 tokens by default).
        cache_dtype: storage dtype of a new cache (default the model's; torch.float8_e4m3fn halves it).
        static_decode: decode with `StaticDecoder` (a CUDA graph per call; default: on CUDA devices when the
            model and batch allow it), else one eager forward per token.
        vision_inputs: pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw.
    Returns: (B, L + n_new) long token ids (n_new <= max_new_tokens): the new tokens after input_ids.
    """
    cfg = model.config
    if stop_token_ids is None:
        stop_token_ids = (cfg.eos_token_id, cfg.pad_token_id)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    B, L = input_ids.shape
    if L == 0:
        raise ValueError("generate: input_ids is empty (B, 0); give at least one prompt token")
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding: the last prompt position of every row must be a real token")
    if attention_mask is None and B > 1 and bool((input_ids[:, 0] == pad_token_id).any()):
        import warnings

        warnings.warn("generate: some rows start with the pad token but no attention_mask was given; padded rows "
                      "are then attended as text. Pass the processor's attention_mask.", stacklevel=3)
    if do_sample:
        process_logits(torch.zeros(1, 2), temperature, top_k, top_p)  # validate the sampling settings up front
    cache = past_key_values
    own_cache = cache is None
    if own_cache:  # grown on demand: a huge max_new_tokens does not allocate its whole cache up front
        cache = KVCache.for_model(model, B, L + min(max_new_tokens, INITIAL_FREE_TOKENS), cache_dtype)
    elif cache.length + L + max_new_tokens > cache.max_len:
        raise ValueError(f"past_key_values has room for {cache.max_len - cache.length} more tokens, this call needs "
                         f"{L} prompt + {max_new_tokens} new; allocate a larger cache (KVCache.load(..., max_len=))")
    stop = torch.tensor(list(stop_token_ids), device=input_ids.device)
    if past_key_values is not None or prefill_chunk_size is not None:
        out = model.prefill(input_ids, cache, chunk_size=prefill_chunk_size or 8192, attention_mask=attention_mask,
                            **vision_inputs)
    else:
        out = model(input_ids, attention_mask=attention_mask, past_key_values=cache, logits_to_keep=1,
                    **vision_inputs)
    rope_deltas = cache.rope_deltas
    mask = cache.attention_mask()
    if static_decode is None:
        static_decode = cache.device.type == "cuda" and max_new_tokens > 1
    static = None
    if static_decode and StaticDecoder.supported(model, cache, mask):
        if own_cache:  # a graph holds its buffers: size the cache for the whole answer first
            cache.grow(L + max_new_tokens)
        static = StaticDecoder(model, cache)
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
        if own_cache and cache.length + 1 > cache.max_len:
            cache.grow(min(2 * cache.max_len, L + max_new_tokens))
        pos = decode_position_ids(cache.length, rope_deltas)  # (3, B, 1)
        if static is not None:
            out = _Logits(static.step(nxt[:, None], pos))
        else:
            out = model(nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=1)
    if static is not None:
        static.close()
    return torch.cat(tokens, dim=1)


class _Logits:
    """The one field of Qwen3VLOutput the decode loop reads."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
