"""A plain fast tokenizer without transformers: `tokenizers.Tokenizer` as transformers sets it up.

`load_tokenizer` returns a :class:`FastTokenizer` for the checkpoints whose tokenizer is a plain
`tokenizer.json` (`"tokenizer_class": "PreTrainedTokenizerFast"`: the embedded SmolLM2) when
`native_config` finds nothing that transformers' `PreTrainedTokenizerFast` would change beyond what
is mirrored here. Importing transformers and building its tokenizer cost +71 MiB of resident
memory and ~2.5 s after `import jax` on a machine without torch; this costs +33 MiB and 0.16 s
(loaded machine; docs/performance.md, "Peak RSS"). The needle prompts, the stop tokens and the
decoded answers only need the Rust tokenizer and the chat template's Jinja environment.

What transformers (5.x) does to the Rust tokenizer of such a checkpoint, and so does this: no
truncation; where the file has no post-processor, the template that adds BOS / EOS as
`add_bos_token` / `add_eos_token` say; special tokens are never split. Calls: `tokenizer(text,
add_special_tokens=, return_offsets_mapping=)`, `decode`, `batch_decode`, `convert_ids_to_tokens` /
`convert_tokens_to_ids`, `get_vocab`, `get_added_vocab`, `len()`, `vocab_size`, the special tokens
and their ids, `apply_chat_template` (the template rendered in transformers' sandboxed Jinja
environment, then encoded without special tokens). Any other attribute is read from transformers'
own tokenizer of the same directory, built on first use (so the rest of transformers' interface
still works, at its import cost).
`tests/test_fast_tokenizer.py` checks the outputs against transformers' on the sweep's prompts.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

PLAIN_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
"""tokenizer_config.json's tokenizer_class of a plain tokenizer.json ("TokenizersBackend": its name in
files transformers 5 saves)."""
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def native_config(directory: str | Path) -> tuple[Any, dict] | None:
    """(the Rust tokenizer set up as transformers would, tokenizer_config.json) when this module
    gives transformers' outputs for the checkpoint's tokenizer; None where transformers does more
    than is mirrored here (then load_tokenizer uses transformers)."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if (config.get("tokenizer_class") not in PLAIN_CLASSES
            or not (directory / "tokenizer.json").is_file()
            or (directory / "special_tokens_map.json").exists() or (directory / "chat_templates").exists()
            or config.get("clean_up_tokenization_spaces", False)   # a clean-up pass (default off since transformers 4.45)
            or config.get("split_special_tokens") or config.get("added_tokens_decoder")
            or config.get("additional_special_tokens") or config.get("extra_special_tokens")
            or not isinstance(config.get("chat_template", ""), str)):    # named templates
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))   # (not through Python's json: its objects
    except Exception:                                                 # would stay in the heap, ~20 MiB)
        return None
    if tok.truncation or tok.padding:
        return None
    if tok.get_vocab_size(with_added_tokens=False) > 100_000:   # transformers may patch the pre-tokenizer then
        return None
    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    for name in SPECIAL_NAMES:    # transformers adds missing special tokens: only ones already there here
        text = _token_text(config.get(name))
        if text is not None and (text not in added or not added[text].special):
            return None
    jinja = directory / "chat_template.jinja"      # transformers 5 saves the template there
    if jinja.exists():
        config = {**config, "chat_template": jinja.read_text()}
    tok.no_truncation()
    tok.encode_special_tokens = False
    if tok.post_processor is None:
        from tokenizers import processors

        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        add_bos = bool(config.get("add_bos_token", False)) and bos is not None
        add_eos = bool(config.get("add_eos_token", False)) and eos is not None
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = ([(bos, tok.token_to_id(bos))] if add_bos else []) + ([(eos, tok.token_to_id(eos))] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tok, config


def _chat_environment():
    """transformers' Jinja environment for chat templates (utils/chat_template_utils.py): sandboxed,
    trim_blocks and lstrip_blocks, loop controls, its tojson, raise_exception, strftime_now, dict
    and namespace."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


class FastTokenizer:
    """transformers' `PreTrainedTokenizerFast` of a plain tokenizer.json, without transformers (module
    docstring); build it with `FastTokenizer.load` (None where transformers is needed)."""

    def __init__(self, backend, config: dict, directory: str | Path):
        self._tokenizer = backend
        self._config = config
        self.name_or_path = str(directory)
        self.chat_template = config.get("chat_template")
        self._template = None
        self._hf = None
        for name in SPECIAL_NAMES:
            setattr(self, name, _token_text(config.get(name)))

    @classmethod
    def load(cls, directory: str | Path) -> "FastTokenizer | None":
        found = native_config(directory)
        return None if found is None else cls(*found, directory)

    # -- what transformers' tokenizer gives, from the Rust tokenizer --------------------------------

    @property
    def backend_tokenizer(self):
        return self._tokenizer

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in SPECIAL_NAMES if getattr(self, name) is not None}

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in special]

    def _id(self, name: str) -> int | None:
        token = getattr(self, name)
        if token is None:
            return None
        index = self._tokenizer.token_to_id(token)
        return index if index is not None or name == "unk_token" else self.unk_token_id

    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))

    @property
    def all_special_ids(self) -> list[int]:
        ids = []
        for name in SPECIAL_NAMES:
            i = self._id(name)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __bool__(self) -> bool:
        return True

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        decoder = self._tokenizer.get_added_tokens_decoder()
        return {decoder[i].content: i for i in sorted(decoder)}

    def __call__(self, text, add_special_tokens: bool = True, return_offsets_mapping: bool = False,
                 verbose: bool = True, **kwargs) -> dict:
        """One string's {"input_ids", "attention_mask"[, "offset_mapping"]}; anything else
        (batches, padding, tensors) goes to transformers' tokenizer."""
        if not isinstance(text, str) or kwargs:
            return self._transformers()(text, add_special_tokens=add_special_tokens,
                                        return_offsets_mapping=return_offsets_mapping, verbose=verbose, **kwargs)
        enc = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        out = {"input_ids": enc.ids, "attention_mask": enc.attention_mask}
        if return_offsets_mapping:
            out["offset_mapping"] = enc.offsets
        return out

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **kwargs) -> str:
        if clean_up_tokenization_spaces or kwargs:
            return self._transformers().decode(token_ids, skip_special_tokens=skip_special_tokens,
                                               clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        return self._tokenizer.decode([int(i) for i in token_ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Sequence, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs):
        """One conversation (a list of {"role", "content"} dicts of strings) through the chat template:
        the text (tokenize=False) or its ids, encoded without special tokens (tokenize=True: a
        dict with "input_ids", as transformers returns); other arguments go to transformers."""
        plain = (isinstance(conversation, (list, tuple)) and conversation
                 and all(type(m) is dict and all(type(v) is str for v in m.values())   # noqa: E721 (exact types)
                         and not set(m) & {"reasoning_content", "thinking", "reasoning"} for m in conversation))
        if kwargs or not plain or not self.chat_template or _GENERATION_TAG.search(self.chat_template):
            return self._transformers().apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                            tokenize=tokenize, **kwargs)
        if self._template is None:
            self._template = _chat_environment().from_string(self.chat_template)
        text = self._template.render(messages=[dict(m) for m in conversation], tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens_map)
        if not tokenize:
            return text
        return self(text, add_special_tokens=False)

    # -- the rest of transformers' interface --------------------------------------------------------

    def _transformers(self):
        if self._hf is None:
            import transformers

            self._hf = transformers.PreTrainedTokenizerFast.from_pretrained(self.name_or_path, local_files_only=True)
        return self._hf

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._transformers(), name)

    def __repr__(self) -> str:
        return f"FastTokenizer({self.name_or_path!r}, vocab {len(self)})"
