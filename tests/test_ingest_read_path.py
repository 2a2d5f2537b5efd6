"""The byte-level .txt paragraph reader (readers.TextReader._paragraph_spans / read_arrays)
against the string-level algorithm it replaced, kept here as the reference: same records,
same sources, same batches, same counts, on random text with every kind of whitespace, bad
bytes, NULs and tiny blocks (so records cross block boundaries)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pyarrow as pa
import pytest

import vaepipe.stages.readers as readers
from vaepipe.stages.readers import InputFile, ReadOptions, TextReader, _SPACE_NOT_NL, _string_array

# The reference: what TextReader._paragraphs did on decoded text before (commit 5752a22).
_PARA_SEP = re.compile(r"\n(?:[^\S\n]*\n)+")
_LEAD_BLANK = re.compile(r"(?:[^\S\n]*\n)*")


def reference_paragraphs(blocks: list[bytes]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    carry, line, started = "", 1, False
    for block in blocks:
        text = carry + block.decode("utf-8", "surrogateescape")
        pos = 0
        if not started:
            pos = _LEAD_BLANK.match(text).end()  # type: ignore[union-attr]
            line += text.count("\n", 0, pos)
            started = pos < len(text)
        for m in _PARA_SEP.finditer(text, pos):
            if text[pos:m.start()].strip():
                out.append((line, text[pos:m.start()]))
            line += text.count("\n", pos, m.end())
            pos = m.end()
        carry = text[pos:]
        if len(carry) > readers.MAX_PARAGRAPH:
            cut = carry.rfind("\n", 0, len(carry) - 1) + 1 or len(carry)
            if carry[:cut].strip():
                out.append((line, carry[:cut].rstrip("\n")))
            line += carry.count("\n", 0, cut)
            carry = carry[cut:]
    if carry.strip():
        out.append((line, carry.rstrip("\n")))
    return out


PIECES = ["word", "Ünïcödé", "x", " ", "  ", "\t", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0",
          "\u1680", "\u2000", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\u200b", "\n", "\n",
          "\n", "\n\n", "\r\n", "—", "é", "日本", "😀"]
BAD = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x80", b"\x80\x80", b"\xc0\x80"]


def random_file(rng: random.Random, bad: bool) -> bytes:
    parts = [rng.choice(PIECES).encode() for _ in range(rng.randrange(0, 400))]
    if bad:
        for _ in range(rng.randrange(1, 4)):
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(BAD))
    if rng.random() < 0.2:
        parts.insert(rng.randrange(len(parts) + 1), b"\0")
    return b"".join(parts)


def _reader(unit: str = "sentence", policy: str = "replace") -> TextReader:
    return TextReader(ReadOptions(unit, policy, "text", "text", 10**9))


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "BLOCK", 7)
    monkeypatch.setattr(readers, "MAX_PARAGRAPH", 40)
    monkeypatch.setattr(readers, "BATCH_CHARS", 50)
    monkeypatch.setattr(readers, "_check_text", lambda f, head: None)  # 7-byte heads: not what is tested


@pytest.mark.parametrize("seed", range(300))
def test_spans_equal_the_string_algorithm(tmp_path: Path, small_blocks: None, seed: int) -> None:
    rng = random.Random(seed)
    data = random_file(rng, bad=seed % 3 == 0)
    path = tmp_path / "a.txt"
    path.write_bytes(data)
    f = InputFile(path, "a.txt", "txt", None)
    reader = _reader()
    want = reference_paragraphs(list(reader._blocks(f)))
    got = [(int(n), buf[a:b].decode("utf-8", "surrogateescape"))
           for buf, spans, lines in reader._paragraph_spans(f)
           for (a, b), n in zip(spans.tolist(), lines.tolist(), strict=True)]
    assert got == want


@pytest.mark.parametrize("policy", ["replace", "drop"])
@pytest.mark.parametrize("seed", range(60))
def test_read_arrays_equal_read_columns(tmp_path: Path, small_blocks: None, seed: int, policy: str) -> None:
    """The Arrow path gives the list path's records, sources, batch boundaries and counts."""
    rng = random.Random(1000 + seed)
    data = random_file(rng, bad=seed % 2 == 0)
    path = tmp_path / "a.txt"
    path.write_bytes(data)
    f = InputFile(path, "a.txt", "txt", None)
    lists, arrays = _reader(policy=policy), _reader(policy=policy)
    want = [(texts, sources) for texts, sources, _ in lists.read_columns(f)]
    got = [(texts.to_pylist(), sources.to_pylist()) for texts, sources, _ in arrays.read_arrays(f)]
    assert got == want
    assert arrays.stats == lists.stats


def test_read_arrays_of_a_corpus_file_is_one_batch_per_block(tmp_path: Path) -> None:
    text = "".join(f"Paragraph {i} has a line\nand another.\n\n" for i in range(200_000))
    path = tmp_path / "c.txt"
    path.write_text(text)
    f = InputFile(path, "c.txt", "txt", None)
    got = list(_reader("paragraph").read_arrays(f))
    want = list(_reader("paragraph").read_columns(f))
    assert [len(t) for t, _, _ in got] == [len(t) for t, _, _ in want] and len(got) > 1
    assert [t.to_pylist() for t, _, _ in got] == [t for t, _, _ in want]
    assert got[-1][1][-1].as_py() == f"c.txt:{3 * 200_000 - 2}"


def test_space_pattern_is_str_isspace_but_newline() -> None:
    """Every code point: its UTF-8 is one whitespace match exactly when Python calls it
    whitespace (and it is not a line feed), which is what the string regex's [^\\S\\n] meant."""
    pat = re.compile(_SPACE_NOT_NL)
    wrong = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000
             and (pat.fullmatch(chr(c).encode()) is not None) != (chr(c).isspace() and c != 0x0A)]
    assert wrong == []


@pytest.mark.parametrize("raw", [b"ok", "é日😀".encode(), b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80",
                                 b"\xe2\x80", b"\x80", b"a\xffb", b"\xef\xbf\xbf"])
def test_string_array_accepts_what_the_strict_decoder_accepts(raw: bytes) -> None:
    import numpy as np

    arr, chars = _string_array(raw + b"\n" + raw, np.array([[0, len(raw)], [len(raw) + 1, 2 * len(raw) + 1]]))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        assert arr is None
        return
    assert arr is not None and arr.to_pylist() == [text, text] and chars == 2 * len(text)
    assert arr.type == pa.string()


@pytest.mark.parametrize("text", ["", "plain", "é日😀", "a\udc80b", "\udcff", "x\ud800y", "\udbff\udfff",
                                  "é\udc80"])
def test_bad_byte_check_is_the_surrogate_regex(text: str) -> None:
    """The fast check answers as ``_BAD`` does, JSON-made surrogates outside its range included."""
    assert readers._has_bad_bytes(text) == (readers._BAD.search(text) is not None)
