"""What Qwen3-VL answers with: the response parser (model/processing/responses.py) and the tool / Thinking templates.

- Parser: a table of real-looking answers (fenced, bare, truncated, with prose, broken JSON, wrong types), each
  with the objects expected, written by hand, or the error expected.
- Coordinates: Qwen3-VL's 0..1000 relative coordinates <-> pixels of the original image, exact round trips.
- Templates: our token ids against transformers' `Qwen3VLProcessor.apply_chat_template` (tokenize=True) for tool
  definitions, tool calls, tool responses (with an image) and Thinking turns. The Instruct reference is the official
  Qwen3-VL Instruct template (tests/templates/qwen3vl_instruct.jinja, verbatim from Qwen/Qwen3-VL-8B-Instruct's
  chat_template.json: 5292 bytes, sha256 3636d0f0bd6bef02...) against our own built-in template; the Thinking
  reference is transformers rendering the same template string we ship (chat_template_thinking.jinja), whose
  behaviour is also pinned by hand-written expected strings.
"""
import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import load_processor
from model.processing.chat_template import BUILTIN_THINKING_TEMPLATE
from model.processing.responses import (Box, draw_grounding, extract_grounding, from_pixels, parse_response,
                                        to_pixels)
from tests.test_processing import hf_proc  # noqa: F401 (fixture: transformers' processor, the oracle)

OFFICIAL_INSTRUCT = (Path(__file__).parent / "templates" / "qwen3vl_instruct.jinja").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def processor(thinking: bool | None = None):
    return load_processor(None, thinking=thinking)


def B(x1, y1, x2, y2, label=None, **extra):
    return {"bbox_2d": [x1, y1, x2, y2], "label": label, **extra}


def P(x, y, label=None, **extra):
    return {"point_2d": [x, y], "label": label, **extra}


# (id, text, expected boxes, expected points, expected error substrings in order)
GROUNDING_CASES = [
    ("fenced-list",
     '```json\n[\n\t{"bbox_2d": [135, 114, 300, 400], "label": "cat"},\n\t{"bbox_2d": [502, 98, 911, 977], '
     '"label": "dog"}\n]\n```',
     [B(135, 114, 300, 400, "cat"), B(502, 98, 911, 977, "dog")], [], []),
    ("bare-object", '{"bbox_2d": [0, 0, 1000, 1000], "label": "the whole picture"}',
     [B(0, 0, 1000, 1000, "the whole picture")], [], []),
    ("points", '```json\n[{"point_2d": [412, 318], "label": "red car"}, {"point_2d": [77, 901], "label": "sign"}]\n```',
     [], [P(412, 318, "red car"), P(77, 901, "sign")], []),
    ("prose-around",
     'Sure! I found two cups.\n```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cup"}, '
     '{"bbox_2d": [50, 60, 70, 80], "label": "cup"}]\n```\nBoth are on the table {left side}.',
     [B(10, 20, 30, 40, "cup"), B(50, 60, 70, 80, "cup")], [], []),
    ("truncated-in-object",
     '```json\n[\n  {"bbox_2d": [1, 2, 3, 4], "label": "a"},\n  {"bbox_2d": [5, 6, 7',
     [B(1, 2, 3, 4, "a")], [], ["grounding object 2: cut off before its closing brace"]),
    ("truncated-in-label", '[{"point_2d": [500, 500], "label": "cen', [], [], ["grounding object 1: cut off"]),
    ("trailing-comma-repaired", '[{"bbox_2d": [1, 2, 3, 4], "label": "a",},]', [B(1, 2, 3, 4, "a")], [], []),
    ("missing-comma", '[{"bbox_2d": [1, 2, 3, 4] "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"}]',
     [B(5, 6, 7, 8, "b")], [], ["grounding object 1: invalid JSON"]),
    ("three-numbers", '[{"bbox_2d": [1, 2, 3], "label": "a"}]', [], [],
     ["grounding object 1: 'bbox_2d' must be a list of 4 numbers, got [1, 2, 3]"]),
    ("string-coords", '{"bbox_2d": ["1", "2", "3", "4"], "label": "a"}', [], [],
     ["'bbox_2d' must be a list of 4 numbers"]),
    ("bool-coord", '{"point_2d": [true, 5]}', [], [], ["'point_2d' must be a list of 2 numbers"]),
    ("corners-swapped", '{"bbox_2d": [300, 20, 100, 40], "label": "a"}', [], [], ["x1 <= x2 and y1 <= y2"]),
    ("label-object", '{"bbox_2d": [1, 2, 3, 4], "label": {"name": "a"}}', [], [], ["'label' must be a string"]),
    ("label-number", '{"bbox_2d": [1, 2, 3, 4], "label": 3}', [B(1, 2, 3, 4, "3")], [], []),
    ("no-label-floats", '[{"bbox_2d": [1.5, 2.25, 3, 4]}]', [B(1.5, 2.25, 3, 4)], [], []),
    ("wrapper-object", '{"objects": [{"point_2d": [10, 20], "label": "x {y}"}], "count": 1}', [], [P(10, 20, "x {y}")],
     []),
    ("ocr-extra-key", '[{"bbox_2d": [10, 10, 200, 40], "text_content": "EXIT"}]',
     [B(10, 10, 200, 40, text_content="EXIT")], [], []),
    ("nested-attribute", '{"bbox_2d": [1, 2, 3, 4], "label": "car", "attrs": {"color": "red"}}',
     [B(1, 2, 3, 4, "car", attrs={"color": "red"})], [], []),
    ("mixed-two-fences", '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]\n```\nand\n```\n'
     '[{"point_2d": [9, 8], "label": "b"}]\n```', [B(1, 2, 3, 4, "a")], [P(9, 8, "b")], []),
    ("python-dict-quotes", "[{'bbox_2d': [12, 34, 56, 78], 'label': \"dog's bowl\"}]",
     [B(12, 34, 56, 78, "dog's bowl")], [], []),
    ("other-fence-and-bare-json", '```python\nprint({1: 2})\n```\n[{"point_2d": [3, 4], "label": "p"}]', [],
     [P(3, 4, "p")], []),
    ("cut-fence-then-fence", '```json\n[{"bbox_2d": [5, 6\n```\nretry:\n```json\n[{"bbox_2d": [1, 2, 3, 4]}]\n```',
     [B(1, 2, 3, 4)], [], ["grounding object 1: cut off before its closing brace"]),
    ("one-line-fence", '```json[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]```', [B(1, 2, 3, 4, "a")], [], []),
    ("plain-answer", "There are no cats in this image.", [], [], []),
    ("prose-braces-only", 'Use {"key": 1} and {x}.', [], [], []),
]


@pytest.mark.parametrize("text,boxes,points,errors", [c[1:] for c in GROUNDING_CASES],
                         ids=[c[0] for c in GROUNDING_CASES])
def test_grounding_table(text, boxes, points, errors):
    out = parse_response(text)
    assert out["boxes"] == boxes
    assert out["points"] == points
    assert len(out["errors"]) == len(errors), out["errors"]
    for got, want in zip(out["errors"], errors):
        assert want in got
    assert out["content"] == text.strip() and out["reasoning"] is None and out["tool_calls"] == []


def test_typed_objects():
    boxes, points, errors = extract_grounding('[{"bbox_2d": [1, 2, 3, 4], "label": "a", "score": 0.5}]')
    assert boxes == [Box([1, 2, 3, 4], "a", {"score": 0.5})] and points == [] and errors == []


# (id, text, thinking_prompt, expected content, reasoning, tool calls, error substrings)
TURN_CASES = [
    ("one-call", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
     False, "", None, [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}], []),
    ("prose-and-two-calls",
     'Let me check both.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
     '{"name": "b", "arguments": {"q": "x</tool"}}\n</tool_call><|im_end|>',
     False, "Let me check both.", None, [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"q": "x</tool"}}],
     []),
    ("string-arguments", '<tool_call>{"name": "f", "arguments": "{\\"k\\": [1, 2]}"}</tool_call>', False, "", None,
     [{"name": "f", "arguments": {"k": [1, 2]}}], []),
    ("no-arguments", '<tool_call>{"name": "now"}</tool_call>', False, "", None, [{"name": "now", "arguments": {}}], []),
    ("broken-json-kept-apart",
     '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>',
     False, "", None, [{"name": "g", "arguments": {}}], ["tool_call 1: invalid JSON"]),
    ("no-name", '<tool_call>{"arguments": {}}</tool_call>', False, "", None, [],
     ["tool_call 1: 'name' must be a non-empty string"]),
    ("list-arguments", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', False, "", None, [],
     ["tool_call 1 (f): 'arguments' must be a JSON object, got list"]),
    ("unclosed", 'ok <tool_call>\n{"name": "f", "argum', False, "ok", None, [],
     ["tool_call 1: no closing </tool_call>"]),
    ("think-tags", "<think>\nThe user wants a cat.\n</think>\n\nA cat.", False, "A cat.", "The user wants a cat.",
     [], []),
    ("thinking-prompt-continuation", "Looking at the image...\n</think>\n\nA dog.<|im_end|>", True, "A dog.",
     "Looking at the image...", [], []),
    ("thinking-cut-short", "Hmm, the left object is", True, "", "Hmm, the left object is", [], []),
    ("instruct-no-think", "Hmm, the left object is", False, "Hmm, the left object is", None, [], []),
    ("reasoning-then-call",
     'I need the weather.\n</think>\n\n<tool_call>\n{"name": "w", "arguments": {"c": "Oslo"}}\n</tool_call>', True,
     "", "I need the weather.", [{"name": "w", "arguments": {"c": "Oslo"}}], []),
]


@pytest.mark.parametrize("text,thinking,content,reasoning,calls,errors", [c[1:] for c in TURN_CASES],
                         ids=[c[0] for c in TURN_CASES])
def test_turn_table(text, thinking, content, reasoning, calls, errors):
    out = parse_response(text, thinking_prompt=thinking)
    assert (out["content"], out["reasoning"], out["tool_calls"]) == (content, reasoning, calls)
    assert len(out["errors"]) == len(errors), out["errors"]
    for got, want in zip(out["errors"], errors):
        assert want in got


def test_everything_in_one_call_and_strict():
    text = ('The user asks for the cat.\n</think>\n\nHere it is:\n```json\n[{"bbox_2d": [100, 200, 300, 400], '
            '"label": "cat"}, {"point_2d": [150, 250], "label": "eye"}]\n```\n<tool_call>\n{"name": "crop", '
            '"arguments": {"box": [100, 200, 300, 400]}}\n</tool_call>')
    proc = processor(True)
    out = proc.parse_response(text)
    assert out == {
        "content": 'Here it is:\n```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "cat"}, {"point_2d": [150, 250], '
                   '"label": "eye"}]\n```',
        "reasoning": "The user asks for the cat.",
        "tool_calls": [{"name": "crop", "arguments": {"box": [100, 200, 300, 400]}}],
        "boxes": [B(100, 200, 300, 400, "cat")], "points": [P(150, 250, "eye")], "errors": []}
    assert proc.parse_response(text, strict=True) == out
    with pytest.raises(ValueError, match=r"tool_call 1: invalid JSON.*grounding object 1: 'bbox_2d' must be"):
        proc.parse_response('r</think><tool_call>{"name": }</tool_call>{"bbox_2d": [1]}', strict=True)
    # a Thinking prompt opened <think>: text that never closes it is reasoning, nothing of it is parsed
    assert proc.parse_response('<tool_call>{"name": }</tool_call>', strict=True)["reasoning"] == (
        '<tool_call>{"name": }</tool_call>')
    with pytest.raises(TypeError, match="decoded text"):
        proc.parse_response([1, 2])


# --- coordinates ------------------------------------------------------------------------------------------------------
def test_pixels_hand_examples():
    assert to_pixels([250, 400], 1920, 1080) == [480, 432]
    assert to_pixels([0, 0, 1000, 1000], 640, 480) == [0, 0, 640, 480]
    assert to_pixels([500, 500, 750, 1000], 101, 33) == [50.5, 16.5, 75.75, 33]
    assert from_pixels([480, 432], 1920, 1080) == [250, 400]
    with pytest.raises(ValueError, match="image size must be positive"):
        to_pixels([1, 2], 0, 5)
    with pytest.raises(ValueError, match=r"\[x, y\] or \[x1, y1, x2, y2\]"):
        from_pixels([1, 2, 3], 5, 5)


@pytest.mark.parametrize("size", [(7, 5), (640, 480), (999, 1000), (1000, 333), (1920, 1080), (2000, 1999)])
def test_coordinate_round_trips(size):
    W, H = size
    rng = np.random.default_rng()
    coords = rng.integers(0, 1001, (200, 4)).tolist()
    for c in coords:  # model coordinates -> pixels -> model coordinates: exact
        assert from_pixels(to_pixels(c, W, H), W, H) == c
    px = np.stack([rng.integers(0, W + 1, 200), rng.integers(0, H + 1, 200)], 1).tolist()
    for p in px:  # pixels -> 0..1000 ints -> pixels: exact when a side <= 1000 px (one step >= 1 px), else within 1 px
        back = [round(v) for v in to_pixels(from_pixels(p, W, H), W, H)]
        tol = [0 if s <= 1000 else 1 for s in (W, H)]
        assert abs(back[0] - p[0]) <= tol[0] and abs(back[1] - p[1]) <= tol[1], (p, back)


def test_processor_maps_to_the_original_image(tmp_path):
    # A 90-degree EXIF rotation: stored 40 x 90, seen (and answered about) as 90 high x 40 wide.
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (90, 40), "white").save(path, exif=exif)
    proc = processor()
    parsed = proc.parse_response('[{"bbox_2d": [250, 100, 500, 1000], "label": "a"}, {"point_2d": [1000, 500]}]')
    want = {"boxes": [{"bbox_2d": [10, 9, 20, 90], "label": "a"}], "points": [{"point_2d": [40, 45], "label": None}]}
    assert proc.grounding_to_pixels(parsed, str(path)) == want
    assert proc.grounding_to_pixels(parsed, (90, 40)) == want
    assert proc.grounding_to_pixels(parsed, np.zeros((90, 40, 3), np.uint8)) == want


def test_draw_grounding_png(tmp_path):
    img = Image.new("RGB", (200, 100), "white")
    parsed = parse_response('[{"bbox_2d": [100, 200, 500, 800], "label": "box"}, {"point_2d": [750, 500]}]')
    out = draw_grounding(img, parsed, tmp_path / "g.png", width=2, radius=5)
    back = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert (back == np.asarray(out)).all()
    red = (230, 25, 75)  # first palette colour
    assert tuple(back[50, 20]) == red and tuple(back[50, 99]) == red  # left / right edges at x = 20, 100
    assert tuple(back[20, 60]) == red and tuple(back[79, 60]) == red  # top / bottom edges at y = 20, 80
    assert tuple(back[50, 60]) == (255, 255, 255)  # inside the box: untouched
    assert tuple(back[50, 150]) == red  # the point at (150, 50)
    assert tuple(back[10, 190]) == (255, 255, 255)
    assert tuple(np.asarray(img)[50, 20]) == (255, 255, 255)  # the input image is not drawn on


# --- chat templates against transformers ------------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "zoom", "description": "Crop a region (0..1000 coordinates).",
                                      "parameters": {"type": "object",
                                                     "properties": {"bbox_2d": {"type": "array"}}}}},
]


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def conversations():
    img, crop = _image(64, 96, 1), _image(40, 40, 2)
    return {
        "tools-calls-responses": [
            {"role": "system", "content": "You are a careful agent."},
            {"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": "Weather in Köln?"}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Köln"}}},
                {"type": "function", "function": {"name": "zoom", "arguments": '{"bbox_2d": [1, 2, 3, 4]}'}}]},
            {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
            {"role": "tool", "content": [{"type": "image", "image": crop}, {"type": "text", "text": "cropped"}]},
            {"role": "assistant", "content": "It is 21 °C and clear."},
            {"role": "user", "content": "Thanks, and tomorrow?"},
        ],
        "thinking-multi-turn": [
            {"role": "system", "content": [{"type": "text", "text": "Think first."}]},
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
            {"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": "Where is the cat?"}]},
            {"role": "assistant", "content": "<think>\nLook left.\n</think>\n\n",
             "tool_calls": [{"function": {"name": "zoom", "arguments": {"bbox_2d": [0, 0, 500, 1000]}}}]},
            {"role": "tool", "content": "no cat on the left"},
            {"role": "assistant", "content": "Right side.", "reasoning_content": "Then it is on the right."},
        ],
    }


@pytest.mark.parametrize("name", ["tools-calls-responses", "thinking-multi-turn"])
@pytest.mark.parametrize("thinking", [False, True], ids=["instruct", "thinking"])
@pytest.mark.parametrize("gen", [True, False], ids=["gen-prompt", "no-gen-prompt"])
def test_template_token_ids_match_transformers(hf_proc, name, thinking, gen):
    conv = conversations()[name]
    ours = processor(thinking)
    reference = BUILTIN_THINKING_TEMPLATE.read_text(encoding="utf-8") if thinking else OFFICIAL_INSTRUCT
    kwargs = {"tools": TOOLS} if name.startswith("tools") else {}
    got = ours.process_conversation(conv, add_generation_prompt=gen, return_labels=False, **kwargs)
    ref = hf_proc.apply_chat_template(conv, chat_template=reference, add_generation_prompt=gen, tokenize=True,
                                      return_dict=True, **kwargs)
    assert got["input_ids"].tolist() == list(ref["input_ids"][0]), ours.decode(got["input_ids"])
    assert got["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()


def test_thinking_template_by_hand():
    tok = processor(True).tokenizer
    assert tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n")
    # Reasoning of turns before the last user query is dropped; the last turn keeps it (from a field or inline).
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\na2"}]
    assert tok.apply_chat_template(conv) == (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n")
    # Tool turns do not start a new query: every assistant step after the user's question keeps its reasoning.
    conv = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": "r1",
             "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "content": "res"},
            {"role": "assistant", "content": "done", "reasoning_content": "r2"}]
    assert tok.apply_chat_template(conv) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nr1\n</think>\n\n<tool_call>\n"
        '{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nres\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\ndone<|im_end|>\n")


def test_tool_calls_round_trip_through_transformers_template(hf_proc):
    conv = conversations()["tools-calls-responses"][:3]
    text = hf_proc.apply_chat_template(conv, chat_template=OFFICIAL_INSTRUCT, tools=TOOLS, tokenize=False)
    turn = text.rsplit("<|im_start|>assistant\n", 1)[1]
    out = processor().parse_response(turn)
    assert out["content"] == "Checking." and out["errors"] == [] and out["reasoning"] is None
    assert out["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Köln"}},
                                 {"name": "zoom", "arguments": {"bbox_2d": [1, 2, 3, 4]}}]
    # and back: the parsed calls, rendered again as an assistant turn, give the same text
    again = conv[:2] + [{"role": "assistant", "content": out["content"],
                         "tool_calls": [{"function": c} for c in out["tool_calls"]]}]
    assert processor().apply_chat_template(again, tools=TOOLS) == text
    thinking = hf_proc.apply_chat_template(conversations()["thinking-multi-turn"],
                                           chat_template=BUILTIN_THINKING_TEMPLATE.read_text(encoding="utf-8"),
                                           tokenize=False)
    last = thinking.rsplit("<|im_start|>assistant\n", 1)[1]
    assert parse_response(last) == {"content": "Right side.", "reasoning": "Then it is on the right.",
                                    "tool_calls": [], "boxes": [], "points": [], "errors": []}


def test_load_processor_template_choice(tmp_path):
    from model.processing.tokenizer import default_tokenizer_json_path

    (tmp_path / "tokenizer.json").write_text(default_tokenizer_json_path().read_text())
    (tmp_path / "chat_template.jinja").write_text(BUILTIN_THINKING_TEMPLATE.read_text(encoding="utf-8"))
    ckpt = load_processor(tmp_path)
    assert ckpt.thinking  # a Thinking checkpoint's own template
    assert not load_processor(tmp_path, thinking=False).thinking  # explicit choice wins
    assert not processor().thinking and processor(True).thinking
    json.dumps(ckpt.parse_response("x"))  # plain, JSON-serialisable result


def test_special_tokens_typed_in_reasoning_are_text():
    proc = processor(True)
    conv = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "reasoning_content": "r <|im_end|> x"}]
    ids = proc.process_conversation(conv)["input_ids"].tolist()
    assert ids.count(proc.im_end_id) == 2  # the user's and the assistant's turn ends, not the typed one
    assert proc.decode(ids).endswith("<think>\nr <|im_end|> x\n</think>\n\na<|im_end|>\n")


def test_official_instruct_template_file_is_intact():
    import hashlib

    assert hashlib.sha256(OFFICIAL_INSTRUCT.encode()).hexdigest().startswith("3636d0f0bd6bef02")
