"""What Qwen3-VL answers with: reasoning, tool calls and grounding objects read back from generated text.

`parse_response(text)` splits one generated assistant turn into
- `reasoning`: the text before `</think>` (Thinking checkpoints; their generation prompt already opened `<think>`,
  so the generated text usually starts inside the reasoning), `None` when the turn has no reasoning;
- `tool_calls`: every `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block (the format the official
  chat templates ask for in their tool preamble), in order;
- `content`: the answer, with the tool-call blocks taken out;
- `boxes` / `points`: grounding objects found in the answer, `{"bbox_2d": [x1, y1, x2, y2], "label": ...}` and
  `{"point_2d": [x, y], "label": ...}`, as bare JSON or inside a markdown ```json fence.

Grounding coordinates stay as the model wrote them: Qwen3-VL uses coordinates relative to the image, scaled to
0..1000 (x right, y down; (0, 0) the top-left corner and (1000, 1000) the bottom-right one), whatever size the
processor resized the image to (Qwen2.5-VL used absolute pixels of the resized image instead). Source: the official
grounding cookbook, github.com/QwenLM/Qwen3-VL cookbooks/2d_grounding.ipynb, which maps a box to the original image
by `x / 1000 * width`, `y / 1000 * height`. `to_pixels` / `from_pixels` do that mapping; since the coordinates are
relative, the same call with the resized size (`geometry.plan_image`) gives pixels of the model's input.

Errors: text a model really emits is often broken (cut by max_new_tokens, a missing comma, a box with three
numbers). Nothing is swallowed and nothing raises by default: every object that cannot be read is left out and
reported, with its position and the reason, in the result's `errors` list; `strict=True` raises a ValueError with
the same messages instead.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
END_TOKENS = ("<|im_end|>", "<|endoftext|>")  # may end a turn decoded with skip_special_tokens=False
COORD_SCALE = 1000  # Qwen3-VL grounding coordinates: 0..1000 of the image width / height
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)  # ```json ... ```; an unclosed one runs to the end
_GROUNDING_QUOTED = ('"bbox_2d"', '"point_2d"', "'bbox_2d'", "'point_2d'")
_TRAILING_COMMA = re.compile(r",\s*([\]}])")


@dataclass
class Box:
    """One grounded box: bbox_2d = [x1, y1, x2, y2] (top-left, bottom-right) in 0..1000 coordinates.

    Args:
        extra: any other keys of the object (e.g. "text_content" in OCR spotting answers).
    """
    bbox_2d: list
    label: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"bbox_2d": list(self.bbox_2d), "label": self.label, **self.extra}


@dataclass
class Point:
    """One grounded point: point_2d = [x, y] in 0..1000 coordinates."""
    point_2d: list
    label: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"point_2d": list(self.point_2d), "label": self.label, **self.extra}


@dataclass
class ToolCall:
    """One `<tool_call>` block: the function name and its arguments (a JSON object)."""
    name: str
    arguments: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "arguments": self.arguments}


@dataclass
class ParsedResponse:
    """Everything read from one generated turn; `to_dict()` is what `parse_response` returns."""
    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"content": self.content, "reasoning": self.reasoning,
                "tool_calls": [t.to_dict() for t in self.tool_calls], "boxes": [b.to_dict() for b in self.boxes],
                "points": [p.to_dict() for p in self.points], "errors": list(self.errors)}


# --- reasoning --------------------------------------------------------------------------------------------------------
def split_reasoning(text: str, thinking_prompt: bool = False) -> tuple[str | None, str]:
    """(reasoning, rest) of one generated turn, split at the first `</think>`.

    Args:
        thinking_prompt: the prompt ended with `<think>\\n` (Thinking template), so a turn without `</think>` was
            cut inside its reasoning: all of it is reasoning. Otherwise such a turn is all answer, unless it
            opens `<think>` itself (then it is reasoning cut short).
    Returns:
        reasoning with the surrounding newlines stripped (None when the turn has none), answer without the
        newlines that follow `</think>` (the official templates write "</think>\\n\\n").
    """
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep:
        stripped = text.lstrip()
        if stripped.startswith(THINK_OPEN):
            return stripped[len(THINK_OPEN):].strip("\n"), ""
        return (text.strip("\n"), "") if thinking_prompt else (None, text)
    head = head.split(THINK_OPEN)[-1]  # as the official Thinking template does
    return head.strip("\n"), tail.lstrip("\n")


# --- tool calls -------------------------------------------------------------------------------------------------------
def _excerpt(s: str, n: int = 60) -> str:
    s = s.strip()
    return repr(s if len(s) <= n else s[:n] + "...")


def parse_tool_call(body: str, where: str = "tool_call") -> ToolCall:
    """One `<tool_call>` body -> ToolCall; ValueError naming the problem.

    `arguments` may be a JSON object or a string holding one (the official templates render both the same way);
    a missing `arguments` is an empty object.
    """
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at char {e.pos}): {_excerpt(body)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with 'name' and 'arguments', got {type(obj).__name__}")
    name, args = obj.get("name"), obj.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} ({name}): 'arguments' is a string that is not JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where} ({name}): 'arguments' must be a JSON object, got {type(args).__name__}")
    return ToolCall(name, args)


def extract_tool_calls(text: str) -> tuple[list[ToolCall], str, list[str]]:
    """All `<tool_call>...</tool_call>` blocks of `text`, in order.

    Returns:
        (calls, text without the blocks, errors). A block whose JSON is broken is left out of `calls` and reported;
        a last block that never closes (generation cut) is reported and dropped from the text.
    """
    calls, errors, kept, pos, k = [], [], [], 0, 0
    while True:
        start = text.find(TOOL_OPEN, pos)
        if start < 0:
            kept.append(text[pos:])
            break
        kept.append(text[pos:start])
        k += 1
        end = text.find(TOOL_CLOSE, start)
        body = text[start + len(TOOL_OPEN):end if end >= 0 else len(text)]
        if end < 0:
            errors.append(f"tool_call {k}: no closing {TOOL_CLOSE} (truncated?): {_excerpt(body)}")
            break
        try:
            calls.append(parse_tool_call(body.strip(), f"tool_call {k}"))
        except ValueError as e:
            errors.append(str(e))
        pos = end + len(TOOL_CLOSE)
    return calls, "".join(kept), errors


# --- grounding --------------------------------------------------------------------------------------------------------
def _match_object(text: str, start: int) -> tuple[int | None, bool]:
    """(index of the `}` closing the `{` at `start` or None if it never closes, whether a grounding key is one of
    this object's own keys); braces inside strings do not count."""
    depth, in_str, esc, direct = 0, False, False, False
    for j in range(start, len(text)):
        c = text[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c in "\"'":  # single quotes: a Python-style dict; not tracked as strings (apostrophes in prose)
            in_str = c == '"'
            direct = direct or (depth == 1 and text.startswith(_GROUNDING_QUOTED, j))
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j, direct
    return None, direct


def _objects(text: str):
    """Yield (start, source, or None when it never closes) of each JSON-looking `{...}` in `text` that has a
    grounding key of its own; objects wrapping such objects (`{"objects": [...]}`) are looked into."""
    i = 0
    while (start := text.find("{", i)) >= 0:
        end, direct = _match_object(text, start)
        if not direct:
            i = start + 1
            continue
        yield start, (text[start:end + 1] if end is not None else None)
        if end is None:
            return
        i = end + 1


def _load_object(src: str):
    """json.loads, then with trailing commas removed, then as a Python literal (single-quoted keys); None if all
    fail. Only literals are evaluated (`ast.literal_eval`), never code."""
    for s in (src, _TRAILING_COMMA.sub(r"\1", src)):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            pass
    try:
        return ast.literal_eval(src)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _coords(value, n: int, key: str) -> list:
    if not isinstance(value, list) or len(value) != n:
        raise ValueError(f"'{key}' must be a list of {n} numbers, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"'{key}' must be a list of {n} numbers, got {value!r}")
    return list(value)


def _label(obj: dict):
    label = obj.get("label")
    if label is None or isinstance(label, str):
        return label
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        return str(label)  # e.g. a counting prompt's "label": 3
    raise ValueError(f"'label' must be a string, got {label!r}")


def grounding_from_object(obj: dict) -> Box | Point:
    """One parsed JSON object -> Box or Point; ValueError naming the problem."""
    extra = {k: v for k, v in obj.items() if k not in ("bbox_2d", "point_2d", "label")}
    if "bbox_2d" in obj:
        b = _coords(obj["bbox_2d"], 4, "bbox_2d")
        if b[0] > b[2] or b[1] > b[3]:
            raise ValueError(f"'bbox_2d' must be [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, got {b}")
        return Box(b, _label(obj), extra)
    return Point(_coords(obj["point_2d"], 2, "point_2d"), _label(obj), extra)


def extract_grounding(text: str) -> tuple[list[Box], list[Point], list[str]]:
    """Boxes and points in `text`: JSON objects with a `bbox_2d` or `point_2d` key, alone or in a list, bare or in
    ```json fences (an unclosed fence runs to the end). Returns (boxes, points, errors)."""
    # Fence bodies and the prose between them are scanned apart, so that an object cut off inside one fence
    # does not swallow the next fence's objects.
    parts, pos = [], 0
    for m in _FENCE.finditer(text):
        parts += [text[pos:m.start()], m.group(1)]
        pos = m.end()
    parts.append(text[pos:])
    boxes, points, errors = [], [], []
    k = 0
    for part in parts:
        for start, src in _objects(part):
            k += 1
            if src is None:
                errors.append(f"grounding object {k}: cut off before its closing brace (truncated?): "
                              f"{_excerpt(part[start:])}")
                continue
            obj = _load_object(src)
            if not isinstance(obj, dict):
                errors.append(f"grounding object {k}: invalid JSON: {_excerpt(src)}")
                continue
            try:
                item = grounding_from_object(obj)
            except ValueError as e:
                errors.append(f"grounding object {k}: {e}")
                continue
            (boxes if isinstance(item, Box) else points).append(item)
    return boxes, points, errors


# --- one call ---------------------------------------------------------------------------------------------------------
def parse(text: str, *, thinking_prompt: bool = False) -> ParsedResponse:
    """Read one generated assistant turn (decoded text) into a ParsedResponse; see the module docstring."""
    if not isinstance(text, str):
        raise TypeError(f"parse_response expects the decoded text (str), got {type(text).__name__}")
    text = text.rstrip()
    while text.endswith(END_TOKENS):
        text = text[:-len(next(t for t in END_TOKENS if text.endswith(t)))].rstrip()
    reasoning, rest = split_reasoning(text, thinking_prompt)
    calls, content, errors = extract_tool_calls(rest)
    content = content.strip()
    boxes, points, g_errors = extract_grounding(content)
    return ParsedResponse(content, reasoning, calls, boxes, points, errors + g_errors)


def parse_response(text: str, *, thinking_prompt: bool = False, strict: bool = False) -> dict:
    """One generated turn -> {"content", "reasoning", "tool_calls", "boxes", "points", "errors"} (plain dicts).

    Args:
        text: the decoded generation (special tokens kept or skipped; a trailing <|im_end|> is ignored).
        thinking_prompt: the prompt ended inside `<think>` (Thinking template; see `split_reasoning`).
        strict: raise ValueError listing every error instead of returning them under "errors".
    Returns:
        tool_calls: [{"name", "arguments"}]; boxes: [{"bbox_2d": [x1, y1, x2, y2], "label", ...}];
        points: [{"point_2d": [x, y], "label", ...}]; coordinates as in the text (0..1000).
    """
    result = parse(text, thinking_prompt=thinking_prompt)
    if strict and result.errors:
        raise ValueError("could not read the response: " + "; ".join(result.errors))
    return result.to_dict()


# --- coordinates ------------------------------------------------------------------------------------------------------
def to_pixels(coords, width: int, height: int) -> list[float]:
    """0..1000 coordinates [x1, y1, x2, y2] or [x, y] -> pixels of an image of width x height: x / 1000 * width.

    The result is continuous (pixel edges: 0 is the left edge of the first pixel column, `width` the right edge of
    the last); round it to index pixels.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if len(coords) not in (2, 4):
        raise ValueError(f"expected [x, y] or [x1, y1, x2, y2], got {coords!r}")
    return [c / COORD_SCALE * (width if i % 2 == 0 else height) for i, c in enumerate(coords)]


def from_pixels(coords, width: int, height: int) -> list[int]:
    """Pixels [x1, y1, x2, y2] or [x, y] of a width x height image -> 0..1000 coordinates (rounded to ints, as the
    model writes them): round(x / width * 1000)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if len(coords) not in (2, 4):
        raise ValueError(f"expected [x, y] or [x1, y1, x2, y2], got {coords!r}")
    return [round(c / (width if i % 2 == 0 else height) * COORD_SCALE) for i, c in enumerate(coords)]


def grounding_to_pixels(parsed: dict, width: int, height: int) -> dict:
    """`parse_response` result -> {"boxes": [...], "points": [...]} with bbox_2d / point_2d in pixels (floats) of a
    width x height image (the original image, or the resized one)."""
    return {"boxes": [{**b, "bbox_2d": to_pixels(b["bbox_2d"], width, height)} for b in parsed.get("boxes", [])],
            "points": [{**p, "point_2d": to_pixels(p["point_2d"], width, height)} for p in parsed.get("points", [])]}


# --- drawing ----------------------------------------------------------------------------------------------------------
_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#9a6324"]


def draw_grounding(image, parsed: dict, path=None, *, width: int = 3, radius: int = 6):
    """Draw a `parse_response` result's boxes and points (0..1000 coordinates) on `image`; returns a PIL image.

    Args:
        image: PIL image or path (any mode; drawn on an RGB copy).
        path: if given, the drawing is also saved there (PNG by the suffix).
        width: box outline in pixels; radius: point marker radius in pixels.
    """
    from PIL import Image, ImageDraw, ImageOps

    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")  # the orientation the model saw
    else:
        image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    W, H = image.size
    for k, b in enumerate(parsed.get("boxes", [])):
        x1, y1, x2, y2 = to_pixels(b["bbox_2d"], W, H)
        color = _COLORS[k % len(_COLORS)]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        if b.get("label"):
            draw.text((x1 + width, y1 + width), str(b["label"]), fill=color)
    for k, p in enumerate(parsed.get("points", [])):
        x, y = to_pixels(p["point_2d"], W, H)
        color = _COLORS[k % len(_COLORS)]
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline="white")
        if p.get("label"):
            draw.text((x + radius + 2, y - radius), str(p["label"]), fill=color)
    if path is not None:
        image.save(path)
    return image
