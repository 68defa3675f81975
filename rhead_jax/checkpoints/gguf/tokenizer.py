"""The tokenizer of a GGUF file as Hugging Face files: ``tokenizer.json`` (a ``tokenizers.Tokenizer``
rebuilt from the GGUF vocabulary) and ``tokenizer_config.json`` (special tokens, BOS/EOS flags, chat
template).

Two kinds of vocabulary are rebuilt:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE from the vocabulary and merges, with llama.cpp's
  pre-tokenizer (SmolLM2, Llama 3, ...);
* ``"llama"`` (SentencePiece) in a ``gemma3`` file: Gemma's BPE with byte fallback, spaces as ``▁``.
  The file lists no merges: they are rebuilt from the vocabulary the way transformers' GGUF loader
  does (every split of a token into two tokens, the token's rank in the file ordering them), so the
  result tokenizes exactly as ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from rhead_jax.checkpoints.gguf.metadata import field

__all__ = ["build_tokenizer", "gemma_merges", "tokenizer_config"]

# GGUF token types (``gguf.TokenType``).
_TOKEN_TYPE_CONTROL: Final[int] = 3
_TOKEN_TYPE_USER_DEFINED: Final[int] = 4

# Llama 3's pre-tokenization regex.
_LLAMA3_SPLIT: Final[str] = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ``tokenizer.ggml.pre`` -> pre-tokenizer family. llama.cpp groups "smollm" with the StarCoder-style
# tokenizers: each digit split off on its own, then GPT-2's regex.
_PRE_TOKENIZER_FAMILIES: Final[dict[str, str]] = {
    "gpt2": "gpt2",
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "codeshell": "digits+gpt2",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
}


def _pre_tokenizer(pre: str) -> Any:
    """The ``tokenizers`` pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre`` value."""
    from tokenizers import Regex, pre_tokenizers

    family = _PRE_TOKENIZER_FAMILIES.get(pre)
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if family == "digits+gpt2":
        # Same as HF's SmolLM2 / StarCoder tokenizer.json. ``Digits`` splits on Unicode numerics,
        # which is llama.cpp's leading "\p{N}" split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if family == "llama3":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    raise ValueError(
        f"GGUF field 'tokenizer.ggml.pre' is {pre!r}, which this converter does not know. "
        f"Supported: {sorted(_PRE_TOKENIZER_FAMILIES)}."
    )


# ``general.architecture`` values whose SentencePiece ("llama") vocabulary is rebuilt as Gemma's.
_GEMMA_ARCHITECTURES: Final[tuple[str, ...]] = ("gemma3",)
_SPACE: Final[str] = "\u2581"  # SentencePiece's visible space, "▁"


def build_tokenizer(reader: Any, gguf_path: Path | str = "<gguf>") -> Any:
    """Rebuilds the ``tokenizers.Tokenizer`` a GGUF file's tokenizer metadata describes.

    ``gpt2`` vocabularies become byte-level BPE (below); a ``gemma3`` file's SentencePiece vocabulary
    becomes Gemma's BPE (:func:`_gemma_tokenizer`).

    Token ids equal their index in ``tokenizer.ggml.tokens``. Control tokens (type 3, e.g.
    ``<|im_start|>``) become special added tokens and user-defined tokens (type 4) plain added
    tokens, so both are matched whole. BOS/EOS are added by the post-processor only when
    ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say so (default: not added).

    Args:
      reader: an open :class:`gguf.GGUFReader`.
      gguf_path: used in error messages only.

    Raises:
      ValueError: the tokenizer model or pre-tokenizer is unsupported, or metadata is missing.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    path = Path(gguf_path)
    model = field(reader, "tokenizer.ggml.model", path=path)
    arch = field(reader, "general.architecture", None)
    if model == "llama" and arch in _GEMMA_ARCHITECTURES:
        return _gemma_tokenizer(reader, path)
    if model != "gpt2":
        raise ValueError(
            f"{path}: GGUF field 'tokenizer.ggml.model' is {model!r}; only 'gpt2' (byte-level BPE) "
            f"tokenizers are supported, and 'llama' (SentencePiece) in {' / '.join(_GEMMA_ARCHITECTURES)} "
            "files. Use the model's original Hugging Face tokenizer instead."
        )
    pre = field(reader, "tokenizer.ggml.pre", "gpt2", path=path)
    tokens: list[str] = list(field(reader, "tokenizer.ggml.tokens", path=path))
    merges_raw: list[str] = list(field(reader, "tokenizer.ggml.merges", path=path))
    token_types: list[int] = [int(t) for t in field(reader, "tokenizer.ggml.token_type", [], path=path)]
    if token_types and len(token_types) != len(tokens):
        raise ValueError(f"{path}: 'tokenizer.ggml.token_type' and 'tokenizer.ggml.tokens' differ in length.")

    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: 'tokenizer.ggml.tokens' contains duplicate tokens.")
    merges: list[tuple[str, str]] = []
    for merge in merges_raw:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"{path}: malformed merge {merge!r} in 'tokenizer.ggml.merges'.")
        merges.append((left, right))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()

    special = [
        AddedToken(tok, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
        for tok, kind in zip(tokens, token_types)
        if kind == _TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(tok, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)
        for tok, kind in zip(tokens, token_types)
        if kind == _TOKEN_TYPE_USER_DEFINED
    ]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{path}: rebuilt tokenizer has a different vocabulary size than the GGUF.")

    byte_level = processors.ByteLevel(trim_offsets=False)
    template = _bos_eos_template(reader, tokens, path)
    tokenizer.post_processor = byte_level if template is None else processors.Sequence([byte_level, template])
    return tokenizer


def _bos_eos_template(reader: Any, tokens: list[str], path: Path) -> Any:
    """The post-processor adding BOS / EOS as ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say
    (default: neither), or None when neither is added."""
    from tokenizers import processors

    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
    bos_id = field(reader, "tokenizer.ggml.bos_token_id", None)
    eos_id = field(reader, "tokenizer.ggml.eos_token_id", None)
    if (add_bos and bos_id is None) or (add_eos and eos_id is None):
        raise ValueError(f"{path}: add_bos/add_eos is set but the bos/eos token id is missing.")
    if not (add_bos or add_eos):
        return None
    specials: list[tuple[str, int]] = []
    prefix = suffix = ""
    if add_bos:
        bos = tokens[int(bos_id)]
        specials.append((bos, int(bos_id)))
        prefix = f"{bos}:0 "
    if add_eos:
        eos = tokens[int(eos_id)]
        if (eos, int(eos_id)) not in specials:
            specials.append((eos, int(eos_id)))
        suffix = f" {eos}:0"
    return processors.TemplateProcessing(
        single=f"{prefix}$A:0{suffix}",
        pair=f"{prefix}$A:0{suffix} {prefix.replace(':0', ':1')}$B:1{suffix.replace(':0', ':1')}",
        special_tokens=specials,
    )


def gemma_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """The BPE merges a Gemma vocabulary implies (the GGUF stores none).

    Every split of a token into two tokens of the vocabulary is a merge. Merges rank by the token
    they make, in file order (Gemma's scores do not follow its merge order; the order of the tokens
    does), and among one token's splits the longer left piece first. This is transformers'
    ``generate_merges(vocab, {token: -index})``, whose sort by (score, len(left), len(right)),
    descending and stable, reduces to that order because each token has one score and its splits
    differ in len(left).
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    for token in tokens:
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def _gemma_tokenizer(reader: Any, path: Path) -> Any:
    """Gemma's tokenizer (transformers' ``GemmaTokenizer``) from a SentencePiece GGUF vocabulary.

    BPE with byte fallback (``<0x00>``..``<0xFF>``), ``unk`` fused, spaces normalized to ``▁`` and no
    prefix space. A token of two or more spaces is stored with real spaces but looked up as ``▁▁``,
    so it is respelled first. Control tokens (type 3) become special added tokens; user-defined
    ones (type 4, e.g. newline runs) plain added tokens, matched whole, when their spelling is in
    the vocabulary.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens: list[str] = list(field(reader, "tokenizer.ggml.tokens", path=path))
    token_types: list[int] = [int(t) for t in field(reader, "tokenizer.ggml.token_type", [], path=path)]
    if token_types and len(token_types) != len(tokens):
        raise ValueError(f"{path}: 'tokenizer.ggml.token_type' and 'tokenizer.ggml.tokens' differ in length.")
    spelled = [_SPACE * len(token) if " " in token and not token.strip() else token for token in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    if len(vocab) != len(spelled):
        raise ValueError(f"{path}: 'tokenizer.ggml.tokens' contains duplicate tokens.")
    unk_id = field(reader, "tokenizer.ggml.unknown_token_id", None)
    if unk_id is None:
        raise ValueError(f"{path}: GGUF field 'tokenizer.ggml.unknown_token_id' is missing; Gemma's "
                         "tokenizer needs its unknown token.")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=gemma_merges(spelled), fuse_unk=True,
                                     unk_token=spelled[int(unk_id)], dropout=None, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    special = [AddedToken(token, special=True, normalized=False)
               for token, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_CONTROL]
    user = [AddedToken(token, special=False, normalized=False)
            for token, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_USER_DEFINED and token in vocab]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{path}: rebuilt tokenizer has a different vocabulary size than the GGUF.")
    template = _bos_eos_template(reader, tokens, path)
    if template is not None:
        tokenizer.post_processor = template
    return tokenizer


def tokenizer_config(reader: Any, *, max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` contents: special tokens, chat template, BOS/EOS flags."""
    tokens_field = reader.get_field("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        index = field(reader, f"tokenizer.ggml.{key}", None)
        return None if index is None else tokens_field.contents(int(index))

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    chat_template = field(reader, "tokenizer.chat_template", None)
    if chat_template:
        config["chat_template"] = chat_template
    return {key: value for key, value in config.items() if value is not None}
