"""Chat templates: the built-in ChatML template for Qwen3-VL and the one a checkpoint ships, compiled with Jinja2.

A checkpoint's template is taken, by priority, from chat_template.jinja, chat_template.json or tokenizer_config.json
(transformers' order); without one the built-in `chat_template.jinja` beside this file is used (it renders the same
text as the official Qwen3-VL Instruct template). `chat_template_thinking.jinja` is the official template of the
Thinking checkpoints (reasoning in `<think>`, generation prompt opening it), selected by `builtin_template(True)`.
Templates are compiled with the Jinja2 options transformers' `apply_chat_template` uses (sandboxed, trim_blocks,
lstrip_blocks, `tojson`, `raise_exception`, `strftime_now`).
"""
from __future__ import annotations

import json
from pathlib import Path

BUILTIN_CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")
BUILTIN_THINKING_TEMPLATE = Path(__file__).with_name("chat_template_thinking.jinja")


def builtin_template(thinking: bool = False) -> str:
    """Source of the built-in template: the Instruct one, or the official Thinking one (`thinking=True`)."""
    return (BUILTIN_THINKING_TEMPLATE if thinking else BUILTIN_CHAT_TEMPLATE).read_text(encoding="utf-8")


def read_chat_template(ckpt: Path, config: dict) -> str | None:
    """Checkpoint chat template, by priority: chat_template.jinja, chat_template.json, tokenizer_config.json."""
    if (ckpt / "chat_template.jinja").exists():
        return (ckpt / "chat_template.jinja").read_text(encoding="utf-8")
    if (ckpt / "chat_template.json").exists():
        tpl = json.loads((ckpt / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        if tpl:
            return tpl
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # list of {"name", "template"}: take the default one
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), tpl[0]["template"] if tpl else None)
    return tpl


def compile_template(source: str):
    """Compile a chat template with the Jinja2 options transformers uses (sandboxed, trim/lstrip blocks)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
