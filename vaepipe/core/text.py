"""Text normalisation and sentence splitting: what every stage does to a text before it counts.

``normalize_text`` is the one definition of a clean text (ingest applies it to the corpus, and
every query text -- neighbours, the registered model -- must go through it with the corpus's
``ingest.lowercase``). ``split_sentences`` is a rule-based English sentence splitter for
normalised prose (no models, no downloads).

``split_sentences(text)`` expects text that ``normalize_text`` has already folded to
single spaces, so hard-wrapped lines are gone before it runs. A boundary is a run of
terminators (``.``, ``!``, ``?``, ``…``) plus any closing quotes or brackets, then a space,
then something that does not start with a lowercase letter or a terminator (``"Why?" he
asked`` is one sentence, so is a spaced ``. . .``). A single ``.`` is then checked against
the word it ends:

- titles that precede a name never end a sentence (``Mr.``, ``Dr.``, ``Gen.``, ``St.``);
- words that precede a number do not end one before a digit (``No. 5``, ``Jan. 12``);
- single-letter initials (``John F. Kennedy``) do not, except the pronoun ``I``;
- dotted acronyms and ambiguous abbreviations (``U.S.``, ``p.m.``, ``Inc.``, ``Jr.``) end a
  sentence only when the next word is a common sentence opener (``the U.S. Government`` vs
  ``in the U.S. The``), the same collocation idea Punkt learns, written down by hand.

Decimals (``3.5``) and URLs never match because a boundary needs a space after the
terminator. Rules are tuned on the State of the Union corpus and the tests in
tests/test_ingest_sentences.py; they are heuristics, and say so.
"""

from __future__ import annotations

import re
import unicodedata
from itertools import chain, repeat

import numpy as np

# C0/C1 controls that are not whitespace (whitespace is folded instead), and the BOM
_CTRL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ufeff]")
_ASCII_CTRL = bytes([*range(0x00, 0x09), *range(0x0E, 0x1C), 0x7F])
# ASCII whitespace per str.isspace (which bytes.split does not all know) -> " "
_ASCII_SPACE = bytes.maketrans(b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f", b" " * 9)


def normalize_text(text: str, lowercase: bool = False) -> str:
    """NFC, control characters removed, whitespace runs folded to one space, ends stripped.

    Controls go first so that NFC sees the characters they separated; lowercasing is
    followed by NFC again because case mapping may leave decomposed sequences. Idempotent.
    Every query text must go through this with the corpus's ``ingest.lowercase``.
    """
    if text.isascii():  # O(1) check; ASCII is already NFC and lowercases to ASCII
        b = text.encode("ascii").translate(_ASCII_SPACE, _ASCII_CTRL)  # C loops, no per-char Python
        b = b" ".join(b.split()) if b"  " in b else b.strip()
        return (b.lower() if lowercase else b).decode("ascii")
    text = " ".join(unicodedata.normalize("NFC", _CTRL.sub("", text)).split())
    if lowercase:
        text = unicodedata.normalize("NFC", text.lower())
    return text


_DOTTED = re.compile(r"^(?:[^\W\d_]\.)+[^\W\d_]$")  # U.S, e.g, a.m, D.C (the final dot is the candidate)

TITLES = frozenset(
    "mr mrs ms messrs mme mlle dr prof gen sen rep reps gov hon rev revd capt col lt sgt adm "
    "maj cmdr comdr supt pres st fr brig lieut gens sens".split()
)
BEFORE_NUMBER = frozenset(
    "no nos art arts sec secs vol vols p pp fig figs ch chap para ca approx "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
NEVER = frozenset("e.g i.e vs viz cf".split())
AMBIGUOUS = frozenset(
    "inc ltd co corp bros jr sr esq etc al dept govt univ assn ave blvd mt ft est".split()
)
# Words that often open a sentence; after an ambiguous abbreviation they signal a boundary.
STARTERS = frozenset(
    "the this that these those it its we our us i he she they his her their there a an "
    "in on at for but and or so if as when while after before since yet no not now then "
    "what why how who where which today tonight let my all some many most each every".split()
)
_OPEN = "\"'“‘([«"
_CLOSE = "\"'”’)]»"
_TERM = ".!?…"
_SPACE_AFTER = re.compile(r"[.!?…\"'”’)\]»] ")
_TRAIL = ".,;:!?\"'”’)]»"


_PLAIN, _NO, _NUM, _AMB = 0, 1, 2, 3
_CACHE: dict[str, int] = {}  # word before a "." -> its category; bounded below


def _category(word: str) -> int:
    """How a "." after ``word`` behaves: plain boundary, never, not before a digit, ambiguous."""
    w = word.lstrip(_OPEN)
    if not w:
        return _NO  # a "." standing alone: part of a spaced ellipsis
    low = w.lower()
    if low in TITLES or low in NEVER:
        return _NO
    if low in BEFORE_NUMBER:
        return _NUM
    if len(w) == 1 and w.isalpha():
        return _PLAIN if w == "I" else _NO  # an initial, unless it is the pronoun
    if _DOTTED.match(w) or low in AMBIGUOUS:
        return _AMB
    return _PLAIN


def split_sentences(text: str) -> list[str]:
    """Split normalised text into sentences; the pieces joined by spaces give back ``text``.

    Candidates come from one cheap regex (a terminator or closer, then a space: Python's re
    scans a one-character class plus a literal several times faster than a repetition);
    the rest of the boundary test is plain string indexing.
    """
    out: list[str] = []
    start = 0
    n = len(text)
    for m in _SPACE_AFTER.finditer(text):
        end = m.start() + 1            # the boundary, just after the closers
        j = m.start()
        while text[j] in _CLOSE and j > start:
            j -= 1                     # walk back over closing quotes and brackets
        if text[j] not in _TERM:
            continue
        i = j
        while i > start and text[i - 1] in _TERM:
            i -= 1                     # the whole run of terminators: text[i : j + 1]
        k = end + 1                    # the next word starts here; skip opening quotes
        while k < n and text[k] in _OPEN:
            k += 1
        if k >= n or text[k].islower() or text[k] in _TERM:
            continue                   # "Why?" he asked. / approx. equal / spaced ". . ."
        if i == j and text[j] == ".":  # a single "." : what does it follow?
            word = text[text.rfind(" ", 0, i) + 1 : i]
            cat = _CACHE.get(word)
            if cat is None:
                if len(_CACHE) > 100_000:
                    _CACHE.clear()
                cat = _CACHE[word] = _category(word)
            if cat == _NO or (cat == _NUM and text[k].isdigit()):
                continue
            if cat == _AMB:
                if k > end + 1:
                    continue           # an opening quote after an abbreviation: keep together
                nxt = text[k : (text.find(" ", k) + 1 or n + 1) - 1]
                if nxt.rstrip(_TRAIL).lower() not in STARTERS:
                    continue
        out.append(text[start:end])
        start = end + 1
    if start < n:
        out.append(text[start:])
    return out


# ---------------------------------------------------------------------------------------
# The same rules over many texts at once, on their UTF-8 bytes (ingest's batch path)

# Characters beyond ASCII that no rule looks at and that normalisation leaves alone: not letters,
# digits, whitespace or controls, their own lowercase, NFC, no canonical composition with any
# neighbour, and none of the quotes, brackets or terminators above (tests check each property
# over every code point). Text of ASCII and these goes through the batch path byte by byte.
PLAIN_NON_ASCII = "\u2014\u2013\u2022\u00b0\u00a2\u00a3\u00a7\u00b6\u2020\u2021\u20ac\u00a9\u00ae\u2010" \
    "\u2012\u2015\u00b7\u00a6\u00ac\u00b1\u00d7\u00f7\u00a4\u00a5\u2039\u203a\u201e\u201a"
# A boundary candidate in such text: a terminator run, closers, the space, then (not consumed)
# openers and a character that is not a lowercase letter, a terminator or a separator (0xfe, 0xff:
# never in UTF-8), nor the end, nor a space that ends its text (normalize_text strips it: then the
# openers end the text, and split_sentences cuts nothing). It runs over a shadow of the text in
# which every terminator is ".", every lowercase letter "a", quotes '"', brackets "(" or ")": the
# pattern then starts with a literal, which re finds about twice as fast as a character class;
# the positions are the same.
_SHADOW = bytes.maketrans(b"!?'[]" + bytes(range(0x61, 0x7B)), b'..\"()' + b"a" * 26)
_ASCII_BOUNDARY = re.compile(rb"""\.\.*[")]* (?=["(]*(?:[^a."(\xfe\xff ]| (?![\xfe\xff]|\Z)))""")
_ASCII_OPEN = frozenset(b"\"'([")
_ASCII_TRAIL = b".,;:!?\"')]"
_ASCII_STARTERS = frozenset(w.encode() for w in STARTERS)
_AFTER_SEPARATOR = re.compile(rb"[^\xfe\xff]*\Z")  # the part of a word after the last separator
_UNTIL_SEPARATOR = re.compile(rb"[^\xfe\xff]*")
_BACK = np.arange(1, 8)  # the last 7 bytes before a "."
_STOP = np.zeros(256, dtype=bool)  # bytes that may end or shorten the word before a "."
_STOP[list(b" .\"'([\xfe\xff")] = True
_BCACHE: dict[bytes, int] = {}  # bytes before a "." (back to a space) -> the word's category


def fold_ascii_whitespace(buf: bytes) -> bytes:
    """``normalize_text`` over many texts at once: ``buf`` holds UTF-8 texts of ASCII and
    ``PLAIN_NON_ASCII`` separated by bytes 0xfe and 0xff (left in place). Controls go, every
    whitespace run becomes one space; a text then differs from ``normalize_text``'s only by a
    space at either end (drop it). C loops over the whole buffer, nothing per text."""
    buf = buf.translate(_ASCII_SPACE, _ASCII_CTRL)
    space = np.frombuffer(buf, dtype=np.uint8) == 0x20
    again = np.flatnonzero(space[1:] & space[:-1]).tolist()  # i: the space at i + 1 goes
    if not again:
        return buf
    parts, start = [], 0
    for i in again:  # few: joining the slices beats a mask over every byte
        parts.append(buf[start: i + 1])
        start = i + 2
    parts.append(buf[start:])
    return b"".join(parts)


def ascii_sentence_cuts(buf: bytes) -> np.ndarray:
    """Where ``split_sentences`` cuts the texts in ``buf`` (as ``fold_ascii_whitespace`` leaves
    them: ASCII and ``PLAIN_NON_ASCII``, separated by bytes 0xfe and 0xff): the positions of the
    boundary spaces, in order. Cutting there and at the separators gives what ``split_sentences``
    gives text by text (held to that by tests/test_ingest_speed_path.py). One regex scan, then
    numpy over the candidates; Python runs only for a word not seen before and for the rare
    words that are not plain sentence ends (titles, abbreviations, initials)."""
    spans = np.fromiter(chain.from_iterable(map(re.Match.span, _ASCII_BOUNDARY.finditer(buf.translate(_SHADOW)))),
                        dtype=np.int64)
    starts, cuts = spans[0::2], spans[1::2] - 1
    arr = np.frombuffer(buf, dtype=np.uint8)
    after = arr[starts + 1]  # a match holds a space after its terminators: in range
    single = np.flatnonzero((arr[starts] == 0x2E) & (after != 0x2E) & (after != 0x21) & (after != 0x3F))
    if not len(single):
        return cuts
    # a single ".": what does it follow? A word whose last 7 bytes hold no space, dot, opening
    # quote or bracket, or separator is a plain sentence end (every listed word is shorter, an
    # initial is one letter, a dotted acronym has a dot in its last two): most need no look-up
    at = starts[single]
    window = arr[np.maximum(at[:, None] - _BACK, 0)]
    single = single[_STOP[window].any(axis=1) | (at < len(_BACK))]
    if not len(single):
        return cuts
    dots = starts[single].tolist()
    begins = (np.fromiter(map(buf.rfind, repeat(b" "), repeat(0), dots), dtype=np.int64, count=len(dots)) + 1).tolist()
    cats = np.fromiter(map(_BCACHE.get, map(buf.__getitem__, map(slice, begins, dots)), repeat(-1)),
                       dtype=np.int8, count=len(dots))
    for j in np.flatnonzero(cats < 0).tolist():
        cats[j] = _byte_category(buf[begins[j]: dots[j]])
    keep = np.ones(len(cuts), dtype=bool)
    for j in np.flatnonzero(cats != _PLAIN).tolist():
        keep[single[j]] = _ascii_boundary_after(buf, int(cuts[single[j]]) + 1, int(cats[j]))
    return cuts[keep]


def _byte_category(word: bytes) -> int:
    """``_category`` of the word before a "." in a joined buffer (the part after the last
    separator), remembered in a bounded cache."""
    if len(_BCACHE) > 100_000:
        _BCACHE.clear()
    tail = _AFTER_SEPARATOR.search(word).group()  # type: ignore[union-attr]  # matches ""
    cat = _BCACHE[word] = _category(tail.decode("utf-8"))
    return cat


def _ascii_boundary_after(buf: bytes, end: int, cat: int) -> bool:
    """For a "." after a word of category ``cat`` (not plain) and a space ending at ``end``: is
    it a boundary? (``split_sentences``'s rare branch, on bytes)"""
    if cat == _NO:
        return False
    k = end
    while buf[k] in _ASCII_OPEN:
        k += 1
    if cat == _NUM:
        return not 0x30 <= buf[k] <= 0x39
    if k > end:  # _AMB: an opening quote after an abbreviation keeps them together
        return False
    nxt = _UNTIL_SEPARATOR.match(buf, k).group().split(b" ", 1)[0]  # type: ignore[union-attr]
    return nxt.rstrip(_ASCII_TRAIL).lower() in _ASCII_STARTERS
