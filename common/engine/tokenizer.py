"""Tokenizer of a model directory: ``tokenizer.json`` + the chat template of ``tokenizer_config.json``."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
import tokenizers.decoders
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common.config import ConfigError
from common.engine.model_config import ModelLoadError, read_eos_token_ids, read_json

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment ``transformers`` uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def read_chat_template(value: str) -> str:
    """The template a ``--chat-template`` value gives: a file's text, or the value itself when it holds
    Jinja (``{``); ``ConfigError`` if it is neither or does not compile."""
    path = Path(value).expanduser()
    if path.is_file():
        source = path.read_text(encoding="utf-8")
    elif "{" in value:
        source = value
    else:
        raise ConfigError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    try:
        compile_chat_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"--chat-template: the template does not compile ({e})") from e
    return source


def _token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_source(path: Path, config: dict) -> str | None:
    """``chat_template.jinja`` if present, else ``chat_template`` (string, or list: the one named default)."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Encode/decode like ``AutoTokenizer`` (fast backend) and render the model's chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str],
        chat_template: str | None,
        eos_token_ids: tuple[int, ...],
        bos_token_id: int | None,
    ):
        self.backend = backend
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template) if chat_template is not None else None
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        )

    @classmethod
    def from_dir(cls, path: Path, chat_template: str | None = None) -> "Tokenizer":
        """Load from a model directory, with ``chat_template`` (a template's source) instead of the directory's
        when given; raises ``ModelLoadError`` if ``tokenizer.json`` is absent or bad."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{path}: no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises plain Exception on bad files
            raise ModelLoadError(f"{tokenizer_file}: cannot load tokenizer ({e})") from e
        config_file = path / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        eos_ids = dict.fromkeys(read_eos_token_ids(path))
        eos_token_id = backend.token_to_id(special["eos_token"]) if "eos_token" in special else None
        if eos_token_id is not None:
            eos_ids[eos_token_id] = None
        bos_token_id = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        try:
            template = chat_template if chat_template is not None else _chat_template_source(path, config)
            return cls(backend, special, template, tuple(eos_ids), bos_token_id)
        except jinja2.TemplateSyntaxError as e:
            raise ModelLoadError(f"{path}: chat template does not compile ({e})") from e

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. adds BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, context: list[int], skip_special_tokens: bool = True) -> Callable[[int], str | None] | None:
        """``tokenizers``' ``DecodeStream`` after ``context`` (one call per token, in Rust): each call takes the
        next id and returns its text delta, None while it ends inside a character; it raises where a window's
        text is not a prefix of the next one's.  None if ``context``'s text ends inside a character."""
        stream = tokenizers.decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
        if context and stream.step(self.backend, context) is None:
            return None
        return partial(stream.step, self.backend)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (byte-level form for byte-level tokenizers), None if unknown."""
        return self.backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` as ``transformers`` does; ``ValueError`` if there is no template or it refuses."""
        if self._template is None:
            raise ValueError("this model has no chat template; use the completions API with a plain prompt")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of objects with 'role' and 'content'")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **self.special_tokens,
            )  # fmt: skip
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template rejected the messages: {e}") from e
