"""Measurable marks of the demo styles: does a reply look like emoji, a pirate, capitals, French?

Each check is deliberately simple, so that a reply carrying it is obvious to a reader too.
"""

from __future__ import annotations

import re
import unicodedata

PIRATE_WORDS = {"arr", "arrr", "ahoy", "matey", "mateys", "ye", "aye", "hearty", "hearties", "scallywag", "grog"}
FRENCH_STOP_WORDS = {
    "le", "la", "les", "de", "des", "du", "un", "une", "est", "et", "je", "vous", "il", "elle", "nous", "dans",
    "pour", "avec", "sur", "pas", "que", "qui", "au", "aux", "ce", "c'est", "sont", "ou", "mais", "très",
}  # fmt: skip
WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def is_emoji(char: str) -> bool:
    """Pictographs, symbols and their joiners and modifiers (variation selectors, skin tones, keycaps)."""
    return unicodedata.category(char) in {"So", "Sk", "Mn", "Cf"} or 0x1F000 <= ord(char) <= 0x1FFFF


def mostly_emoji(text: str) -> bool:
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(map(is_emoji, chars)) > len(chars) / 2


def pirate(text: str) -> bool:
    return any(word in PIRATE_WORDS for word in WORD.findall(text.lower()))


def mostly_capitals(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) > 0.8 * len(letters)


def french(text: str) -> bool:
    """At least two different French stop-words ("les, les, les" is not French): English prose of a
    line or two has none."""
    return len(FRENCH_STOP_WORDS.intersection(WORD.findall(text.lower()))) >= 2


MARKS = {"emoji": mostly_emoji, "pirate": pirate, "shouty": mostly_capitals, "french": french}
