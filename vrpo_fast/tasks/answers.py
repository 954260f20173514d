"""Answer extraction and grading for the rule-rewarded tasks (math: numbers, sciqa: choice letters).

Both graders are deliberately tolerant of *formatting* (whitespace, thousands commas, "12.0" vs "12",
"(B)" vs "b)" vs "Answer: B") and strict about *content*: the reward must not be gameable by
printing every candidate, so an output that names several different choices, or no number at all,
scores 0.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import List, Optional, Sequence

# A number as written in text: optional sign (only when it is not a binary minus, i.e. not right
# after a digit, letter or closing bracket: in "10-3" the number is 3, not -3), then either
# comma-grouped thousands ("1,234,567") or plain digits, then an optional fraction. A trailing "."
# ("The answer is 12.") is not part of the number because the fraction needs a digit after the dot.
_SIGN = r"(?:(?<![\w)\]])[-\u2212])?"
_NUMBER = _SIGN + r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|" + _SIGN + r"\.\d+"
NUMBER_RE = re.compile(_NUMBER)

# Final-answer markers, strongest first in spirit; among all marker matches the *last* one wins.
_MARKERS = [
    r"####\s*\$?\s*(" + _NUMBER + r")",
    r"\\boxed\{\s*\$?\s*(" + _NUMBER + r")\s*\}",
    r"answer\s*(?:is|=|:)?\s*[:=]?\s*\$?\s*(" + _NUMBER + r")",
]
_MARKER_RES = [re.compile(p, re.IGNORECASE) for p in _MARKERS]


def parse_number(text: str) -> Optional[Decimal]:
    """``"1,234"`` -> 1234, ``"-3.50"`` -> -3.5, ``" 12 "`` -> 12; ``None`` if ``text`` is not a number."""
    if text is None:
        return None
    s = str(text).strip().replace("\u2212", "-").lstrip("$").replace(",", "").strip()
    if s.endswith("."):
        s = s[:-1]
    if not s or not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:  # pragma: no cover - the regex already excludes these
        return None


def format_number(value: Decimal) -> str:
    """Canonical text of a number: integers without a fraction ("12.0" -> "12"), no exponent."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text: str) -> Optional[str]:
    """The final numeric answer of a model output, canonicalised (see :func:`format_number`).

    The last final-answer marker wins ("#### 12", "\\boxed{12}", "The answer is 12", "Answer: 12");
    without a marker, the last number in the text. ``None`` if the text holds no number.
    """
    if not text:
        return None
    best_pos, best = -1, None
    for pattern in _MARKER_RES:
        for m in pattern.finditer(text):
            if m.start(1) > best_pos:
                best_pos, best = m.start(1), m.group(1)
    if best is None:
        found = NUMBER_RE.findall(text)
        if not found:
            return None
        best = found[-1]
    value = parse_number(best)
    return None if value is None else format_number(value)


def numbers_equal(a: str, b: str) -> bool:
    """Numeric equality of two number strings: "12" == "12.00" == " 12 ", "1,234" == "1234"."""
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


def grade_number(completion: str, gold: str) -> float:
    """1.0 if the final answer extracted from ``completion`` equals ``gold`` numerically, else 0.0."""
    pred = extract_number(completion)
    return 1.0 if pred is not None and numbers_equal(pred, gold) else 0.0


# ------------------------------------------------------------------------------------------------
# multiple choice

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def choice_letters(n_choices: int) -> str:
    if not 2 <= n_choices <= len(LETTERS):
        raise ValueError(f"a question needs between 2 and {len(LETTERS)} choices, got {n_choices}")
    return LETTERS[:n_choices]


def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^0-9a-z]+", " ", s.lower())).strip()


def _choice_from_text(text: str, choices: Sequence[str]) -> Optional[str]:
    """The letter of the one choice whose text the output contains (None if zero or several)."""
    hay = f" {_norm_text(text)} "
    hits = []
    for i, choice in enumerate(choices):
        needle = _norm_text(choice)
        if needle and f" {needle} " in hay:
            hits.append((i, needle))
    # "carbon dioxide" also contains "dioxide": a choice that is part of another hit does not count
    hits = [(i, n) for i, n in hits if not any(n != m and f" {n} " in f" {m} " for _, m in hits)]
    if len({n for _, n in hits}) == 1:
        return LETTERS[hits[0][0]]
    return None


def extract_choice(text: str, choices: Sequence[str]) -> Optional[str]:
    """The choice letter a model output picks, or ``None``.

    Accepted, in order of precedence: an explicit marker ("Answer: B", "the answer is (b)", last
    marker wins); the output being just a letter ("B", "(B)", "b)", "B."); a leading letter with a
    bracket or dot ("B) Jupiter", "(B) ..."); the text of exactly one choice ("Jupiter").
    Letters outside the question's range never count.
    """
    if not text or not text.strip():
        return None
    valid = choice_letters(len(choices))
    cls = f"[{valid}{valid.lower()}]"
    s = text.strip()

    marker = None
    for m in re.finditer(r"answer\s*(?:is)?\s*[:=]?\s*[(\[]?(" + cls + r")(?![A-Za-z])", s, re.IGNORECASE):
        marker = m.group(1)
    if marker is not None:
        return marker.upper()
    m = re.fullmatch(r"[(\[]?\s*(" + cls + r")\s*[)\].:]?", s)
    if m:
        return m.group(1).upper()
    m = re.match(r"[(\[]\s*(" + cls + r")\s*[)\]]|(" + cls + r")[).:](?:\s|$)", s)
    if m:
        return (m.group(1) or m.group(2)).upper()
    return _choice_from_text(s, choices)


def grade_choice(completion: str, gold_letter: str, choices: Sequence[str]) -> float:
    """1.0 if the output picks the gold letter (see :func:`extract_choice`), else 0.0."""
    pred = extract_choice(completion, choices)
    return 1.0 if pred is not None and pred == gold_letter.strip().upper() else 0.0


def format_choices(choices: Sequence[str]) -> str:
    """``"A) x B) y C) z"``: compact enough to keep a 4-choice question under ~80 characters."""
    return " ".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))


def normalize_answer_letter(answer, choices: Sequence[str]) -> str:
    """A user-supplied answer (letter, 0-based index, or the choice text) -> its letter.

    Raises ValueError with a short reason when it matches none of them.
    """
    valid = choice_letters(len(choices))
    if isinstance(answer, bool):
        raise ValueError(f"answer must be a letter, an index or a choice text, got {answer!r}")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer index {answer} is out of range for {len(choices)} choices")
        return LETTERS[answer]
    if isinstance(answer, str):
        a = answer.strip()
        m = re.fullmatch(r"[(\[]?([A-Za-z])[)\].]?", a)
        if m and m.group(1).upper() in valid:
            return m.group(1).upper()
        for i, c in enumerate(choices):
            if _norm_text(c) == _norm_text(a) and _norm_text(a):
                return LETTERS[i]
        raise ValueError(f"answer {answer!r} is not one of the letters {', '.join(valid)} nor a choice text")
    raise ValueError(f"answer must be a letter, an index or a choice text, got {type(answer).__name__}")


__all__: List[str] = [
    "NUMBER_RE",
    "parse_number",
    "format_number",
    "extract_number",
    "numbers_equal",
    "grade_number",
    "LETTERS",
    "choice_letters",
    "extract_choice",
    "grade_choice",
    "format_choices",
    "normalize_answer_letter",
]
