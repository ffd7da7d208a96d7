"""The checkpoint's tokenizer: text <-> token ids, special ids, and its chat template (chat_template.py).

Reads an HF-style model folder (`tokenizer.json` plus `tokenizer_config.json`, optionally
`chat_template.jinja`, `generation_config.json` and `config.json`) without transformers: the
serving image needs only the `tokenizers` and `jinja2` wheels. Immutable after construction,
so one instance is shared by the request threads and the engine thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers.decoders import DecodeStream

from kvtriton.backend.engine.byte_level import token_bytes_table
from kvtriton.backend.engine.chat_template import ChatTemplate, select_template

# tokenizers would spread batch calls over its own thread pool, whose spinning threads then compete with
# the forward pass for the cores (seen: 0.06 ms became 4 ms on a 2-core CPU). A user's explicit setting wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The special-token fields of tokenizer_config.json exposed to chat templates, as HF does.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class InvalidPrefixError(RuntimeError):
    """tokenizers' DecodeStream met a decoder whose text is not monotonic in its ids (vLLM issue 17448)."""


class Tokenizer:
    """Encodes prompts, decodes outputs and renders chat prompts for one checkpoint."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        source: str = "<in memory>",
    ) -> None:
        """`special_tokens` maps bos_token/eos_token/unk_token/pad_token to token strings.

        BOS/EOS on `encode`: when `add_bos_token` or `add_eos_token` is given (not None) those
        flags decide alone and tokenizer.json's post-processor is bypassed, so a BOS is never
        added twice; when both are None the post-processor decides (Llama-3-style folders add
        their BOS there and declare nothing in tokenizer_config.json).
        """
        # A tokenizer.json may carry training-time truncation or padding; applied to a prompt
        # it would silently cut or pad it, so both are switched off.
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self._source = source
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        """Ids this tokenizer can decode: 0 <= id < vocab_size (added tokens included)."""

        self.special_tokens: dict[str, str] = {
            name: token for name, token in (special_tokens or {}).items() if token is not None
        }
        unknown = set(self.special_tokens) - set(_NAMED_SPECIAL_TOKENS)
        if unknown:
            raise ValueError(f"{source}: unknown special token field(s) {sorted(unknown)}")
        # BOS/EOS must exist to be added or to stop on; unk/pad only feed templates and
        # all_special_ids (HF would add a missing pad token to the vocabulary, we do not need it).
        self.bos_token_id: int | None = self._token_id(self.special_tokens.get("bos_token"), "bos_token")
        self._eos_token_id = self._token_id(self.special_tokens.get("eos_token"), "eos_token")
        special_ids = {backend.token_to_id(tok) for tok in self.special_tokens.values()} - {None}

        eos = set(self.checked_ids(extra_eos_token_ids, "eos_token_id"))
        if self._eos_token_id is not None:
            eos.add(self._eos_token_id)
        if not eos:
            raise ValueError(
                f"{source}: no end-of-sequence token; set eos_token in tokenizer_config.json "
                "or eos_token_id in generation_config.json"
            )
        self.eos_token_ids: frozenset[int] = frozenset(eos)

        marked = {i for i, added in backend.get_added_tokens_decoder().items() if added.special}
        self.all_special_ids: frozenset[int] = frozenset(marked | special_ids)

        self._config_decides_specials = add_bos_token is not None or add_eos_token is not None
        self._add_bos = bool(add_bos_token)
        self._add_eos = bool(add_eos_token)
        if self._add_bos and self.bos_token_id is None:
            raise ValueError(f"{source}: add_bos_token is true but no bos_token is set")
        if self._add_eos and self._eos_token_id is None:
            raise ValueError(f"{source}: add_eos_token is true but no eos_token is set")
        self._chat_template = ChatTemplate(chat_template, source) if chat_template else None
        self._token_bytes: dict[bool, tuple[bytes, ...] | None] = {}  # see token_bytes

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load from an HF-style model folder; errors name the file or field that is wrong."""
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {root} does not exist or is not a directory")
        tokenizer_file = root / "tokenizer.json"
        config_file = root / "tokenizer_config.json"
        for required in (tokenizer_file, config_file):
            if not required.is_file():
                raise FileNotFoundError(
                    f"{required.name} not found in {root}; kvtriton needs an HF fast-tokenizer folder "
                    "(tokenizer.json and tokenizer_config.json), e.g. one written by `kvtriton build`"
                )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ValueError(f"{tokenizer_file} is not a valid tokenizers file: {exc}") from exc
        config = _read_json(config_file)

        special = {
            name: _token_content(config.get(name), name, config_file) for name in _NAMED_SPECIAL_TOKENS
        }
        extra_eos: list[int] = []
        for optional in (root / "generation_config.json", root / "config.json"):
            if optional.is_file():
                extra_eos += _id_list(_read_json(optional).get("eos_token_id"), optional)

        template_file = root / "chat_template.jinja"
        # Newer transformers save the template next to the config; that file then wins, as in HF.
        template = (
            template_file.read_text(encoding="utf-8")
            if template_file.is_file()
            else config.get("chat_template")
        )
        return cls(
            backend,
            special_tokens=special,
            add_bos_token=_optional_bool(config, "add_bos_token", config_file),
            add_eos_token=_optional_bool(config, "add_eos_token", config_file),
            extra_eos_token_ids=extra_eos,
            chat_template=select_template(template, config_file),
            source=str(root),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as the checkpoint declares.

        Encode a rendered chat prompt with add_special_tokens=False: templates write their own BOS.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        _check_unicode(text)
        if not self._config_decides_specials:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self._add_bos:
                ids.insert(0, self.bos_token_id)
            if self._add_eos:
                ids.append(self._eos_token_id)
        return ids

    def encode_chat_prompt(self, rendered: str) -> list[int]:
        """Token ids of a prompt the chat template rendered (apply_chat_template): no special tokens added, as
        HF's apply_chat_template(tokenize=True) and vLLM's chat requests encode it, since templates write their
        own BOS (Llama's, Mistral's, Gemma's do); encode() would add a second one where the tokenizer adds BOS."""
        return self.encode(rendered, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes of an incomplete UTF-8 character show as U+FFFD."""
        return self._backend.decode(
            self.checked_ids(ids, "token id"), skip_special_tokens=skip_special_tokens
        )

    def decode_stream(self, context_ids: Sequence[int], skip_special_tokens: bool = True) -> DecodeStream:
        """A streaming decoder whose text starts after `context_ids` (the prompt's tail): see stream_step."""
        return DecodeStream(self.checked_ids(context_ids, "token id"), skip_special_tokens=skip_special_tokens)

    def stream_step(self, stream: DecodeStream, ids: list[int]) -> str | None:
        """The text `ids` complete on `stream`, or None while a character is incomplete. Raises ValueError for
        an id outside the vocabulary (the stream is left as it was), InvalidPrefixError when the decoder's
        output stopped being monotonic (the stream is then unusable)."""
        try:
            return stream.step(self._backend, self.checked_ids(ids, "token id"))
        except Exception as exc:
            if str(exc).startswith("Invalid prefix"):
                raise InvalidPrefixError(str(exc)) from exc
            raise

    def token_bytes(self, skip_special_tokens: bool = True) -> tuple[bytes, ...] | None:
        """Each id's bytes for a byte-level tokenizer (byte_level.py), else None; built on first use, ~0.1 s."""
        if skip_special_tokens not in self._token_bytes:  # two threads may both build it: the same table
            self._token_bytes[skip_special_tokens] = token_bytes_table(self._backend, skip_special_tokens)
        return self._token_bytes[skip_special_tokens]

    def to_json(self) -> str:
        """The tokenizers library's serialisation (tokenizer.json): what a grammar engine builds its vocabulary
        from."""
        return self._backend.to_str()

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry (not the text) of one id, e.g. 'Ġworld' for ' world'."""
        self.checked_ids((token_id,), "token id")
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None when the vocabulary has no such entry."""
        return self._backend.token_to_id(token)

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, continue_final_message: bool = False,
                            template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text for `messages` (and the tool definitions `tools`, OpenAI's shape), rendered by the
        checkpoint's own template as HF does (ChatTemplate.render says what the options do)."""
        if self._chat_template is None:
            raise ValueError(
                f"{self._source} has no chat template (chat_template in tokenizer_config.json or "
                "chat_template.jinja); send a plain prompt instead of messages"
            )
        return self._chat_template.render(messages, add_generation_prompt, self.special_tokens, tools,
                                          continue_final_message, template_kwargs)

    def _token_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self._source}: {field} {token!r} is not in the vocabulary of tokenizer.json")
        return token_id

    def checked_ids(self, ids: Iterable[int], what: str = "token id") -> list[int]:
        """ids as a list; ValueError naming the first one outside the vocabulary."""
        # tokenizers silently drops unknown ids when decoding; an out-of-range id is a caller bug.
        # Per-token hot path (the detokenizer): no copy of a list, two C-level scans.
        if not isinstance(ids, list):
            ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"{self._source}: {what} {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _token_content(value: Any, field: str, path: Path) -> str | None:
    """A special token is saved as a string or as a serialized AddedToken {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {field} must be a string or an object with 'content', got {value!r}")


def _optional_bool(config: dict, field: str, path: Path) -> bool | None:
    value = config.get(field)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{path}: {field} must be true or false, got {value!r}")
    return value


def _id_list(value: Any, path: Path) -> list[int]:
    """eos_token_id is absent, null, one id or a list of ids."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{path}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return values


def _check_unicode(text: str) -> None:
    """ValueError for text that is not Unicode scalar values: JSON's "\\ud800" escapes decode to a lone surrogate,
    which no UTF-8 encoder (the tokenizer's included) takes. A request's fault, said as such, not a TypeError."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text must be valid Unicode: a lone surrogate U+{ord(text[err.start]):04X} at character "
                         f"{err.start}") from None
