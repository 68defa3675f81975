"""Loading haystack text and needle triples (ORIGINAL.md section 1 and 2.1).

The bundled haystack is Milton's *Areopagitica* (public domain, see ``data/PROVENANCE.md``);
the bundled needles are our own, written in the original's style and with its field names
(``needle``, ``question``, ``real_needle``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from rhead_jax import jsonl
from rhead_jax.errors import MissingFileError, UserError

PathLike = Union[str, Path]

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_HAYSTACK_PATH = DATA_DIR / "haystack_areopagitica.txt"
DEFAULT_NEEDLES_PATH = DATA_DIR / "needles.jsonl"
SAN_FRANCISCO_NEEDLES_PATH = DATA_DIR / "san_francisco.jsonl"

NEEDLE_FIELDS = ("needle", "question", "real_needle")

_HAYSTACK_FIX = "set config.haystack to a .txt file or a directory of .txt files (\"\" = the bundled Areopagitica)"
_NEEDLES_FIX = ("each line must be one JSON object with string fields needle, question, real_needle; "
                "set config.needles to such a JSONL file (\"\" = the bundled needles)")


@dataclass(frozen=True)
class Needle:
    """One test triple, with the original's field names.

    ``needle`` is the sentence inserted into the haystack, ``question`` is asked after the
    context, and ``real_needle`` is the answer span (a sub-phrase of the needle) whose tokens the
    retrieval score counts and against which ROUGE-1 recall is computed.
    """

    needle: str
    question: str
    real_needle: str

    @property
    def answer(self) -> str:
        """Alias of ``real_needle``."""
        return self.real_needle


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"haystack file {path} is not valid UTF-8 text: {e}; save it as UTF-8 or "
                        f"{_HAYSTACK_FIX}") from None


def load_haystack(path: Optional[PathLike] = None) -> str:
    """Return haystack text.

    ``path`` may be None (the bundled Areopagitica), a text file, or a directory whose ``*.txt``
    files are concatenated in sorted file-name order (the original globbed them in directory
    order). A file that does not end with a newline gets one appended before the next file so
    that the last word of one file and the first of the next do not run together.
    Raises :class:`~rhead_jax.errors.MissingFileError` (a FileNotFoundError) for a missing path and
    :class:`~rhead_jax.errors.UserError` (a ValueError) for an empty haystack; both name the path.
    """
    p = DEFAULT_HAYSTACK_PATH if path is None else Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"haystack path does not exist: {p}; {_HAYSTACK_FIX}")
    if p.is_dir():
        files = sorted(
            (f for f in p.iterdir() if f.is_file() and f.suffix == ".txt" and not f.name.startswith(".")),
            key=lambda f: f.name,
        )
        if not files:
            raise UserError(f"haystack directory {p} contains no .txt files; add some or {_HAYSTACK_FIX}")
        parts = []
        for f in files:
            t = _read_text(f)
            if t and not t.endswith("\n"):
                t += "\n"
            parts.append(t)
        text = "".join(parts)
        if not text.strip():
            raise UserError(f"haystack directory {p}: all {len(files)} .txt files are empty; {_HAYSTACK_FIX}")
        return text
    text = _read_text(p)
    if not text.strip():
        raise UserError(f"haystack file {p} is empty; {_HAYSTACK_FIX}")
    return text


def load_needles(path: Optional[PathLike] = None) -> List[Needle]:
    """Read needle triples from a JSONL file (None = the bundled ``data/needles.jsonl``).

    One JSON object per line with string fields ``needle``, ``question``, ``real_needle``; other
    fields are ignored and blank lines skipped. A missing file raises
    :class:`~rhead_jax.errors.MissingFileError` (a FileNotFoundError); malformed lines raise
    :class:`~rhead_jax.errors.UserError` (a ValueError) naming the file and line number.
    """
    p = DEFAULT_NEEDLES_PATH if path is None else Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"needles file does not exist: {p}; {_NEEDLES_FIX}")
    if not p.is_file():
        raise UserError(f"needles path {p} is not a file; {_NEEDLES_FIX}")
    needles: List[Needle] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, rec in jsonl.objects(fh, where=f"needles file {p}", fields=NEEDLE_FIELDS, fix=_NEEDLES_FIX):
            bad = [k for k in NEEDLE_FIELDS if not isinstance(rec[k], str) or not rec[k].strip()]
            if bad:
                raise UserError(f"needles file {p}, line {lineno}: field(s) {', '.join(bad)} must be "
                                "non-empty strings; fix that line")
            needles.append(Needle(needle=rec["needle"], question=rec["question"], real_needle=rec["real_needle"]))
    if not needles:
        raise UserError(f"needles file {p} contains no needles; {_NEEDLES_FIX}")
    return needles


def san_francisco_needle() -> Needle:
    """The San Francisco needle of the masking ablation (ORIGINAL.md section 7)."""
    return load_needles(SAN_FRANCISCO_NEEDLES_PATH)[0]
