"""The rule-based sentence splitter (vaepipe/core/text.py) on tricky English prose.

Each case is a piece of normalised text and the sentences a careful reader would cut it into.
The splitter is a heuristic; these cases are the behaviour it promises (docs/stages/ingest.md).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaepipe.core.text import normalize_text
from vaepipe.core.text import split_sentences
from vaepipe.stages.ingest import TransformOptions, segment

CASES = [
    # titles before names never end a sentence
    ("Mr. Smith went to Washington. He stayed.", ["Mr. Smith went to Washington.", "He stayed."]),
    ("Dr. Jones and Mrs. Brown met Gen. Grant. They talked.",
     ["Dr. Jones and Mrs. Brown met Gen. Grant.", "They talked."]),
    # dotted acronyms: a boundary only before a common sentence opener
    ("the U.S. Government is large. It grows.", ["the U.S. Government is large.", "It grows."]),
    ("I live in the U.S. The weather is fine.", ["I live in the U.S.", "The weather is fine."]),
    ("It ended at 5 p.m. The next day came.", ["It ended at 5 p.m.", "The next day came."]),
    ("Smith Inc. is big. It is.", ["Smith Inc. is big.", "It is."]),
    # words before numbers: no boundary before a digit
    ("Dr. Jones arrived on Jan. 5 at noon. Nobody came.", ["Dr. Jones arrived on Jan. 5 at noon.", "Nobody came."]),
    ("See No. 5 for details. Thanks.", ["See No. 5 for details.", "Thanks."]),
    # initials, but the pronoun I ends a sentence
    ("John F. Kennedy spoke. Then he left.", ["John F. Kennedy spoke.", "Then he left."]),
    ("The letter was from J. R. R. Tolkien. He wrote it.", ["The letter was from J. R. R. Tolkien.", "He wrote it."]),
    ("So did I. Then we left.", ["So did I.", "Then we left."]),
    # decimals and URLs: no space after the dot, no boundary
    ("It rose 3.5 percent. Prices fell.", ["It rose 3.5 percent.", "Prices fell."]),
    ("Visit example.com today. It is free.", ["Visit example.com today.", "It is free."]),
    # quotes after the period
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("She wrote \u201cNo.\u201d Then silence.", ["She wrote \u201cNo.\u201d", "Then silence."]),
    ('"Why?" he asked. Nobody answered.', ['"Why?" he asked.', "Nobody answered."]),
    ("(This is an aside.) The text goes on.", ["(This is an aside.)", "The text goes on."]),
    # ellipses: a spaced one is not a boundary, an unspaced run of terminators is one
    ("He paused . . . Then he spoke. Next.", ["He paused . . . Then he spoke.", "Next."]),
    ("Wait... What happened? Nothing!", ["Wait...", "What happened?", "Nothing!"]),
    ("Really?! Yes.", ["Really?!", "Yes."]),
    # lowercase after a terminator: not a new sentence
    ("Costs are approx. equal in both. Fine.", ["Costs are approx. equal in both.", "Fine."]),
    ("e.g. Apples are good. Yes.", ["e.g. Apples are good.", "Yes."]),
    # nothing to split
    ("No terminator at all", ["No terminator at all"]),
    ("", []),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:30] for c in CASES])
def test_split_sentences_cases(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_hard_wrapped_lines_are_joined_before_splitting() -> None:
    """Ingest folds line breaks inside a paragraph first, so a wrap after Mr. does not split."""
    opts = TransformOptions("sentence", min_chars=1, max_chars=1000, lowercase=False,
                            valid_fraction=0.1, test_fraction=0.1)
    raw = "This is a hard-\nwrapped line that goes\non. And Mr.\nSmith came.\n\n  New   paragraph here."
    assert segment(raw, opts) == ["This is a hard- wrapped line that goes on.", "And Mr. Smith came.",
                                  "New paragraph here."]


def test_lowercase_applies_after_splitting() -> None:
    """Capitals mark sentence starts, so lowercasing must come after the split."""
    opts = TransformOptions("sentence", 1, 1000, True, 0.1, 0.1)
    assert segment("I live in the U.S. The weather is fine.", opts) == ["i live in the u.s.", "the weather is fine."]


_PROSE = st.lists(
    st.sampled_from(["Mr.", "U.S.", "the", "The", "I.", "3.5", "Jan.", "5", "end.", "Why?", '"Stop."', "...",
                     ".", "Wow!", "(aside.)", "p.m.", "F.", "and", "It", "\u201cNo.\u201d", "caf\u00e9."]),
    max_size=30,
).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_PROSE, st.text(max_size=80).map(normalize_text)))
def test_pieces_join_back_to_the_text(text: str) -> None:
    """No character is lost or invented: the sentences joined by one space give the input back."""
    sents = split_sentences(text)
    assert " ".join(sents) == text
    assert all(s and s == s.strip() for s in sents)
