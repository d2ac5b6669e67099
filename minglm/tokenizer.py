"""Tokenizers for minglm: a character tokenizer (the default) and a byte-level BPE trained from scratch.

Both share the same first 8 ids, the special tokens of GLM (docs/official-code.md §1):

    [PAD]=0 (also <eos>, as in the official code)  [CLS]=1  [MASK]=2  [sMASK]=3  [gMASK]=4
    <sop>=5  <eop>=6  [UNK]=7

`CharTokenizer` then numbers the corpus' characters (Unicode code points, sorted) from 8; `BPETokenizer` puts the
256 bytes at 8..263 and its merges after them. `encode` turns the literal strings "[MASK]", "[sMASK]" and
"[gMASK]" in a text into their special ids, so a user can type a blank into a prompt.

What this file leaves out: Unicode normalisation, a GPT-2-compatible vocabulary, and the official tokenizers
(WordPiece / GPT-2 BPE); a small vocabulary is what makes a tiny GLM trainable on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>", "[UNK]"]
PAD_ID, CLS_ID, MASK_ID, SMASK_ID, GMASK_ID, SOP_ID, EOP_ID, UNK_ID = range(8)
EOS_ID = PAD_ID  # the official code uses the pad id as end of document (docs/official-code.md §1)
N_SPECIAL = len(SPECIAL_TOKENS)

# The only specials a user may type inside a text; the others are structural and only the data pipeline adds them.
_TYPED_SPECIALS = {"[MASK]": MASK_ID, "[sMASK]": SMASK_ID, "[gMASK]": GMASK_ID}
_TYPED_RE = re.compile(r"\[(?:MASK|sMASK|gMASK)\]")



def _checked_ids(ids, vocab_size: int, where: str, skip_special: bool) -> np.ndarray:
    """Ids as a flat int64 array, checked against the vocabulary (and without specials when asked): decode's input."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{where}: ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    return ids[ids >= N_SPECIAL] if skip_special else ids

class _SpecialIds:
    """The shared special-token attributes (both tokenizers inherit them)."""

    pad_id = PAD_ID
    eos_id = EOS_ID
    cls_id = CLS_ID
    mask_id = MASK_ID
    smask_id = SMASK_ID
    gmask_id = GMASK_ID
    sop_id = SOP_ID
    eop_id = EOP_ID
    unk_id = UNK_ID
    special_tokens = tuple(SPECIAL_TOKENS)

    def _split_specials(self, text: str) -> list[str | int]:
        """Cut `text` into plain pieces (str) and typed special ids (int), in order."""
        if not isinstance(text, str):
            raise ValueError(f"encode: text must be a str, got {type(text).__name__}")
        parts: list[str | int] = []
        pos = 0
        for m in _TYPED_RE.finditer(text):
            if m.start() > pos:
                parts.append(text[pos : m.start()])
            parts.append(_TYPED_SPECIALS[m.group()])
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        return parts


def _code_points(text: str) -> np.ndarray:
    """The Unicode code points of `text` as a uint32 array, without a Python loop (UTF-32 is 4 bytes a char)."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


class CharTokenizer(_SpecialIds):
    """One id per character of the training corpus; unknown characters become [UNK] and are counted.

    >>> tok = CharTokenizer.from_texts(["hello"])
    >>> tok.decode(tok.encode("he[MASK]o"))
    'he[MASK]o'
    """

    def __init__(self, chars: list[str] | str):
        chars = sorted(set(chars))
        for c in chars:
            if len(c) != 1:
                raise ValueError(f"CharTokenizer: every vocabulary entry must be one character, got {c!r}")
        self.chars: list[str] = chars
        self.vocab_size = N_SPECIAL + len(chars)
        self.id_to_token: list[str] = SPECIAL_TOKENS + chars
        # Lookup table code point -> id (-1 = unknown). Its size is the largest code point + 1 (about 40 k entries
        # with Chinese), so encoding a 5 M-character corpus is one fancy-indexing pass.
        cps = _code_points("".join(chars)).astype(np.int64)
        self._table = np.full(int(cps.max()) + 1 if len(cps) else 1, -1, dtype=np.int32)
        self._table[cps] = np.arange(N_SPECIAL, self.vocab_size, dtype=np.int32)
        self._id_to_str = np.array(self.id_to_token, dtype=object)
        self.last_unknown = 0

    @classmethod
    def from_texts(cls, texts) -> CharTokenizer:
        """Build the vocabulary from an iterable of strings (or one string)."""
        if isinstance(texts, str):
            texts = [texts]
        chars: set[str] = set()
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"CharTokenizer.from_texts: expected str documents, got {type(t).__name__}")
            chars.update(t)
        return cls(sorted(chars))

    # -- encoding -------------------------------------------------------------------------------------------------
    def _encode_plain(self, text: str) -> tuple[np.ndarray, int]:
        cps = _code_points(text)
        ids = np.full(len(cps), UNK_ID, dtype=np.int32)
        inside = cps < len(self._table)
        ids[inside] = self._table[cps[inside]]
        unknown = ids < 0
        ids[unknown] = UNK_ID
        n_unknown = int(unknown.sum()) + int((~inside).sum())
        return ids, n_unknown

    def encode_array(self, text: str) -> np.ndarray:
        """Encode to an int32 array (the fast path for whole corpora). Sets `last_unknown`."""
        pieces, total_unknown = [], 0
        for part in self._split_specials(text):
            if isinstance(part, int):
                pieces.append(np.array([part], dtype=np.int32))
            else:
                ids, n_unknown = self._encode_plain(part)
                pieces.append(ids)
                total_unknown += n_unknown
        self.last_unknown = total_unknown
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        """Encode to a list of ids; "[MASK]", "[sMASK]", "[gMASK]" become specials; unknown chars become [UNK]."""
        return self.encode_array(text).tolist()

    def count_unknown(self, text: str) -> int:
        """How many characters of `text` are not in the vocabulary (they would encode to [UNK])."""
        return sum(self._encode_plain(p)[1] for p in self._split_specials(text) if isinstance(p, str))

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids back to text. Specials print as their names ([MASK], <sop>, ...) unless `skip_special`."""
        ids = _checked_ids(ids, self.vocab_size, "CharTokenizer.decode", skip_special)
        return "".join(self._id_to_str[ids].tolist())

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        data = {"type": "char", "special_tokens": SPECIAL_TOKENS, "chars": self.chars}
        Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path) -> CharTokenizer:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("type") != "char" or data.get("special_tokens") != SPECIAL_TOKENS:
            raise ValueError(f"CharTokenizer.load: {path} is not a minglm character tokenizer file")
        return cls(data["chars"])

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------------------------
# Byte-level BPE
# ---------------------------------------------------------------------------------------------------------------

# Pre-tokenisation in the GPT-2 spirit, with the standard library's `re`: contractions, an optional space plus a run
# of letters / digits / other symbols, and whitespace. Every character belongs to one alternative, so joining the
# pieces gives the text back exactly. Merges never cross a piece boundary.
_PRETOKEN_RE = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")
_BYTE0 = N_SPECIAL  # id of byte 0


def _pair_codes(seq: np.ndarray, base: int) -> np.ndarray:
    return seq[:-1].astype(np.int64) * base + seq[1:]


def _merge_positions(codes: np.ndarray, code: int, same: bool) -> np.ndarray:
    """Left-to-right, non-overlapping positions i where the pair (seq[i], seq[i+1]) has `code`."""
    idx = np.flatnonzero(codes == code)
    if same and len(idx) > 1:
        # "a a a" holds the pair (a, a) at i and i+1: keep every other position inside each run of neighbours.
        new_run = np.concatenate([[True], np.diff(idx) != 1])
        run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(idx)), 0))
        idx = idx[(np.arange(len(idx)) - run_start) % 2 == 0]
    return idx


def _apply_merge(seq: np.ndarray, idx: np.ndarray, new_id: int, *extra: np.ndarray):
    """Write `new_id` at idx and delete idx+1 from `seq` (and from the parallel arrays in `extra`)."""
    seq[idx] = new_id
    keep = np.ones(len(seq), dtype=bool)
    keep[idx + 1] = False
    return (seq[keep],) + tuple(e[keep] for e in extra)


def merge_pair(ids, pair: tuple[int, int], new_id: int) -> list[int]:
    """``ids`` with every left-to-right, non-overlapping occurrence of ``pair`` replaced by ``new_id``: one BPE merge,
    as training and encoding apply it (``viz.tokens`` replays a word's merges with it)."""
    seq = np.asarray(ids, dtype=np.int64)
    if len(seq) < 2:
        return seq.tolist()
    base = int(max(seq.max(), *pair)) + 1
    idx = _merge_positions(_pair_codes(seq, base), pair[0] * base + pair[1], pair[0] == pair[1])
    return _apply_merge(seq.copy(), idx, new_id)[0].tolist()


class BPETokenizer(_SpecialIds):
    """Byte-level BPE: 8 specials, 256 byte tokens (ids 8..263), then one id per learned merge.

    Training counts adjacent pairs over the *distinct* pre-tokenised words at once with `np.bincount` on pair codes
    (left * base + right), weighted by how often each word occurs, so each merge is a handful of vectorised passes
    (GLM's recipe does not depend on the tokenizer; this one is for users who want sub-word units).
    """

    def __init__(self, merges: list[tuple[int, int]]):
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        self.vocab_size = N_SPECIAL + 256 + len(self.merges)
        # the bytes each id stands for
        self.token_bytes: list[bytes] = [s.encode() for s in SPECIAL_TOKENS] + [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            if not (0 <= a < len(self.token_bytes) and 0 <= b < len(self.token_bytes)) or a < _BYTE0 or b < _BYTE0:
                raise ValueError(f"BPETokenizer: merge ({a}, {b}) refers to an unknown or special id")
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self._base = self.vocab_size
        # rank of each pair code (merge order); lookups go through a sorted array of codes
        codes = np.array([a * self._base + b for a, b in self.merges], dtype=np.int64)
        order = np.argsort(codes, kind="stable")
        self._codes_sorted = codes[order]
        self._rank_sorted = order.astype(np.int64)
        self._cache: dict[str, list[int]] = {}
        self.last_unknown = 0  # byte-level: nothing is ever unknown

    # -- training -------------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts, vocab_size: int = 1000, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges until `vocab_size` ids (specials and bytes included) or no pair occurs `min_frequency` times."""
        if isinstance(texts, str):
            texts = [texts]
        if vocab_size < N_SPECIAL + 256:
            raise ValueError(f"BPETokenizer.train: vocab_size must be >= {N_SPECIAL + 256}, got {vocab_size}")
        words: Counter[str] = Counter()
        for t in texts:
            words.update(_PRETOKEN_RE.findall(t))
        merges: list[tuple[int, int]] = []
        if not words:
            return cls(merges)
        # One flat array of all distinct words, separated by 0 ([PAD], never part of a word); cnt = word frequency.
        word_list = list(words)
        blob = "\0".join(word_list).encode("utf-8")
        seq = np.frombuffer(blob, dtype=np.uint8).astype(np.int32) + _BYTE0
        seq[seq == _BYTE0] = 0  # the NUL separators; a NUL inside a word is split there too, harmlessly
        lens = np.array([len(w.encode("utf-8")) + 1 for w in word_list], dtype=np.int64)
        cnt = np.repeat(np.array([words[w] for w in word_list], dtype=np.float64), lens)[: len(seq)]
        base = vocab_size
        next_id = N_SPECIAL + 256
        while next_id < vocab_size:
            codes = _pair_codes(seq, base)
            valid = (seq[:-1] > 0) & (seq[1:] > 0)
            counts = np.bincount(codes[valid], weights=cnt[:-1][valid], minlength=1)
            best = int(np.argmax(counts))
            if counts[best] < min_frequency:
                break
            a, b = divmod(best, base)
            idx = _merge_positions(np.where(valid, codes, -1), best, a == b)
            seq, cnt = _apply_merge(seq, idx, next_id, cnt)
            merges.append((a, b))
            next_id += 1
        return cls(merges)

    # -- encoding -------------------------------------------------------------------------------------------------
    def _encode_words(self, word_list: list[str]) -> list[np.ndarray]:
        """BPE-encode distinct words together: repeatedly apply the lowest-rank merge present anywhere."""
        if not word_list:
            return []
        blob = "\0".join(word_list).encode("utf-8")
        seq = np.frombuffer(blob, dtype=np.uint8).astype(np.int32) + _BYTE0
        seq[seq == _BYTE0] = 0
        # remember which bytes were real NULs inside words (none in practice; they map back to byte 0 = id 8)
        wlens = np.array([len(w.encode("utf-8")) for w in word_list], dtype=np.int64)
        sep_pos = np.cumsum(wlens + 1)[:-1] - 1
        real_nul = seq == 0
        real_nul[sep_pos] = False
        seq[real_nul] = _BYTE0
        n_merges = len(self.merges)
        big = np.int64(n_merges)
        while n_merges and len(seq) > 1:
            # Each word applies its own lowest-rank merge this round; words are independent, so this equals
            # running BPE word by word, in about as many rounds as the longest word has merges.
            codes = _pair_codes(seq, self._base)
            valid = (seq[:-1] > 0) & (seq[1:] > 0)
            where = np.minimum(np.searchsorted(self._codes_sorted, codes), n_merges - 1)
            found = valid & (self._codes_sorted[where] == codes)
            if not found.any():
                break
            rank = np.where(found, self._rank_sorted[where], big)
            word = np.cumsum(seq[:-1] == 0)  # word index of each pair position
            word_min = np.full(int(word[-1]) + 1, big)
            np.minimum.at(word_min, word, rank)
            idx = np.flatnonzero(found & (rank == word_min[word]))
            if len(idx) > 1:  # a pair (a, a) can sit at i and i+1: keep every other one in each run, left to right
                new_run = np.concatenate([[True], np.diff(idx) != 1])
                run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(idx)), 0))
                idx = idx[(np.arange(len(idx)) - run_start) % 2 == 0]
            new_ids = (N_SPECIAL + 256 + rank[idx]).astype(np.int32)
            (seq,) = _apply_merge(seq, idx, 0)
            seq[idx - np.arange(len(idx))] = new_ids  # positions shift left by the deletions before them
        parts = np.split(seq, np.flatnonzero(seq == 0))  # every part after the first starts with its separator
        return parts[:1] + [p[1:] for p in parts[1:]]

    def encode_array(self, text: str) -> np.ndarray:
        out: list[int] = []
        for part in self._split_specials(text):
            if isinstance(part, int):
                out.append(part)
                continue
            pieces = _PRETOKEN_RE.findall(part)
            todo = [w for w in dict.fromkeys(pieces) if w not in self._cache]
            for w, ids in zip(todo, self._encode_words(todo)):
                self._cache[w] = ids.tolist()
            for w in pieces:
                out.extend(self._cache[w])
        if len(self._cache) > 200_000:  # keep memory bounded on huge inputs
            self._cache.clear()
        self.last_unknown = 0
        return np.array(out, dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def count_unknown(self, text: str) -> int:
        """Always 0: every byte has an id."""
        return 0

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = _checked_ids(ids, self.vocab_size, f"{type(self).__name__}.decode", skip_special)
        return b"".join(self.token_bytes[i] for i in ids.tolist()).decode("utf-8", errors="replace")

    @property
    def id_to_token(self) -> list[str]:
        return [b.decode("utf-8", errors="replace") for b in self.token_bytes]

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        data = {"type": "bpe", "special_tokens": SPECIAL_TOKENS, "merges": self.merges}
        Path(path).write_text(json.dumps(data), encoding="utf-8")

    @classmethod
    def load(cls, path) -> BPETokenizer:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("type") != "bpe" or data.get("special_tokens") != SPECIAL_TOKENS:
            raise ValueError(f"BPETokenizer.load: {path} is not a minglm BPE tokenizer file")
        return cls([tuple(m) for m in data["merges"]])

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"


class WordTokenizer(_SpecialIds):
    """Whole words with a byte fallback: 8 specials, the 256 bytes (ids 8..263), then the most frequent pieces.

    The text is cut into the same pieces as BPE's (a word with its leading space, `` the``; a run of punctuation;
    spaces), and every piece seen often enough in training gets an id of its own; any other piece is spelled in
    its UTF-8 bytes, so nothing is ever unknown. A blank over one common word is then one token and ``<eop>``: the
    model chooses a word instead of spelling it, which is what the fill benchmark scores. Training is one count.

    What it leaves out: sub-word units for rare words (BPE's merges), so a rare word costs a few byte tokens.
    """

    def __init__(self, pieces: list[str]):
        self.pieces = list(pieces)
        self.token_bytes: list[bytes] = [s.encode() for s in SPECIAL_TOKENS] + [bytes([b]) for b in range(256)]
        self.token_bytes += [p.encode("utf-8") for p in self.pieces]
        self.vocab_size = len(self.token_bytes)
        self._ids = {p: N_SPECIAL + 256 + i for i, p in enumerate(self.pieces)}
        if len(self._ids) != len(self.pieces) or any(len(p.encode("utf-8")) < 2 for p in self.pieces):
            raise ValueError("WordTokenizer: pieces must be distinct and longer than one byte")
        self.last_unknown = 0  # bytes cover everything

    @classmethod
    def train(cls, texts, vocab_size: int = 4096, min_frequency: int = 2) -> WordTokenizer:
        """Keep the ``vocab_size - 264`` most frequent pieces of two or more bytes (ties by first appearance)."""
        if isinstance(texts, str):
            texts = [texts]
        if vocab_size < N_SPECIAL + 256:
            raise ValueError(f"WordTokenizer.train: vocab_size must be >= {N_SPECIAL + 256}, got {vocab_size}")
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(_PRETOKEN_RE.findall(t))
        keep = [p for p, c in counts.most_common() if c >= min_frequency and len(p.encode("utf-8")) >= 2]
        return cls(keep[: vocab_size - N_SPECIAL - 256])

    def encode_array(self, text: str) -> np.ndarray:
        out: list[int] = []
        for part in self._split_specials(text):
            if isinstance(part, int):
                out.append(part)
                continue
            for piece in _PRETOKEN_RE.findall(part):
                i = self._ids.get(piece)
                if i is None:
                    out.extend(_BYTE0 + b for b in piece.encode("utf-8"))
                else:
                    out.append(i)
        return np.array(out, dtype=np.int32)

    # byte-level like BPE: the same id list, bytes behind every id, nothing unknown
    encode = BPETokenizer.encode
    count_unknown = BPETokenizer.count_unknown
    decode = BPETokenizer.decode

    def save(self, path) -> None:
        data = {"type": "word", "special_tokens": SPECIAL_TOKENS, "pieces": self.pieces}
        Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path) -> WordTokenizer:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("type") != "word" or data.get("special_tokens") != SPECIAL_TOKENS:
            raise ValueError(f"WordTokenizer.load: {path} is not a minglm word tokenizer file")
        return cls(list(data["pieces"]))

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(path) -> CharTokenizer | BPETokenizer | WordTokenizer:
    """Load either tokenizer from its JSON file (the "type" field says which)."""
    kind = json.loads(Path(path).read_text(encoding="utf-8")).get("type")
    if kind == "char":
        return CharTokenizer.load(path)
    if kind == "bpe":
        return BPETokenizer.load(path)
    if kind == "word":
        return WordTokenizer.load(path)
    raise ValueError(f"load_tokenizer: {path} has unknown tokenizer type {kind!r}")


def tokenizer_record(tokenizer) -> tuple[dict, str]:
    """The tokenizer's own JSON (as a dict) and its SHA-256 fingerprint (of the canonical JSON).

    A checkpoint stores both, and loading a run compares the fingerprint with the run's tokenizer.json, so a model is
    never paired with a vocabulary it was not trained on.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer.save(path)
        data = json.loads(path.read_text(encoding="utf-8"))
    canon = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
    return data, hashlib.sha256(canon).hexdigest()
