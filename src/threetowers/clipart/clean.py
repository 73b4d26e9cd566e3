"""Caption cleaning: one caption (or one drop reason) per item, and the key captions are grouped by.

Every caption: HTML entities decoded (some titles are double-escaped), UTF-8 read as Latin-1 repaired
("LÃ©zard" -> "Lézard"), Unicode NFKC, whitespace collapsed, trailing full stops dropped (titles and
emoji names have none, Tux Paint's sentences do: "A frog." -> "A frog", so all sources read alike).

- openclipart (the SVG's work title, plus its description when that adds something): a credit prefix
  "Clipart by NAME - " is cut (the rest is the title; when it is a set's name the collection rule
  drops it); " - " becomes ", " and "_", "-" become spaces; a single camelCase token is split
  ("RoundPointShovel"); an all-capitals title is lower-cased. Dropped: empty ("no_title"), a file name
  ("untitled", "img_0023", "books-aj.svg", an e-mail address: "file_name"), a code (no letters, a single token with a
  digit: "fc01", "guitar1", "BlueMan#101", "HASH(...)": "code"), fewer than 3 letters ("too_short"),
  a title with an Italian, French or Portuguese function word ("Casa dei sogni": "non_english"). A title equal
  to its file's stem is NOT dropped: Debian named the files after their titles ("hot_dog.svg",
  "Hot Dog"), so that test would drop ~300 good titles. Single-word foreign titles ("Cavallo") are
  kept: no cheap test tells them from English names. The set-name rule ("collection_title": a title
  on more than `COLLECTION_LIMIT` distinct images, e.g. "gramastar", "card") needs all items and is
  applied in build.py. The description is added ("Apple Bitten: Apple with a bite taken out") when
  it is short (<= `MAX_DESCRIPTION` characters), has letters, is English by the same test, is not
  contact data, a link, tool or provenance boilerplate ("Created with Inkscape") or the author's name,
  is not on more than `COLLECTION_LIMIT` items (a set's text: "UK roadsigns"), and is not contained
  in the title ("Crawfish (B and W)" / "Crawfish"); when it contains the title it replaces it
  ("Loaf of bread" for the title "bread").
- Tux Paint (the stamp's English line): no stamp text ("no_caption"), no letters ("code"), fewer than
  3 letters ("too_short"). No set-name rule: Tux Paint writes one caption per stamp ("A flower."
  on 6 different flowers is a caption, not a set's name).
- emoji (the Unicode name): lower-cased (names are mostly UPPER CASE, newer ones Title Case);
  "KEYCAP: *" stays as it is; no letter minimum ("OX", "OM" are the names). Flags are kept: each is
  a distinct image with a distinct name, though many share a design.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from .sources import Item

COLLECTION_LIMIT = 5   # a title on more than this many distinct images names a set, not a drawing
MAX_DESCRIPTION = 60   # characters: longer descriptions are prose about the work (history, licences)
MIN_LETTERS = 3

FILE_NAME = re.compile(r"@|\.(svg|png|jpe?g|gif|eps|ai|pdf|py)$|^(img|dsc|image|drawing|untitled|layer|new document|"
                       r"unnamed)[\s_#-]*\d*$", re.IGNORECASE)
CREDIT = re.compile(r"^clip ?art by [^-]+ - ", re.IGNORECASE)
CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
# Descriptions that are about the file, not the drawing: contact data, links, tools, provenance.
JUNK_DESCRIPTION = re.compile(r"@|https?:|www\.|\.com\b|hash\(|\.svg\b|\.png\b|inkscape|sodipodi|clip ?art|"
                              r"made with|created|converted|derivat|derived|drew|originally|version|site web",
                              re.IGNORECASE)
# Function words of Italian, French and Portuguese (the other languages openclipart titles are often in)
# that are not English words; a title holding one is not an English caption. So does a lower-case "e"
# between two words (Italian "and"; not "Vitamin E", "Semaphore Flag e").
NON_ENGLISH = frozenset("di del della delle dei degli dello sul sulla sulle con il gli una alla alle nel nella "
                        "de des du le la les et au aux une pour sur avec à um é".split())
ARTICLE = re.compile(r"^(a|an|the) ")


@dataclass(frozen=True)
class Caption:
    text: str        # the caption ("" when dropped)
    reason: str      # the drop reason, or "" when kept
    title_key: str = ""  # openclipart: the key of the title alone, which set names are counted by


def normalise(text: str) -> str:
    text = html.unescape(html.unescape(text))
    try:
        text = text.encode("latin-1").decode("utf-8")  # UTF-8 bytes that were read as Latin-1
    except (UnicodeEncodeError, UnicodeDecodeError):
        pass
    text = " ".join(unicodedata.normalize("NFKC", text).split())
    return text.rstrip(". ")


def caption_key(text: str) -> str:
    """What makes two captions the same: case, end punctuation and a leading article do not count."""
    text = " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())
    return ARTICLE.sub("", text)


def letters(text: str) -> int:
    return sum(c.isalpha() for c in text)


def is_code(text: str) -> bool:
    return letters(text) == 0 or text.upper().startswith("HASH(") or (" " not in text and any(c.isdigit() for c in text))


def is_non_english(text: str) -> bool:
    return bool(re.search(r"\w e \w", text)) or any(w in NON_ENGLISH for w in re.findall(r"\w+", text.casefold()))


def clean_title(raw: str) -> tuple[str, str]:
    """(caption, "") or ("", drop reason) for an openclipart work title."""
    title = CREDIT.sub("", normalise(raw))
    if not title:
        return "", "no_title"
    if FILE_NAME.search(title):
        return "", "file_name"
    if is_code(title):
        return "", "code"
    title = " ".join(re.sub(r"[_-]+", " ", title.replace(" - ", ", ")).split()).strip(" ,")
    if letters(title) < MIN_LETTERS:
        return "", "too_short"
    if is_non_english(title):
        return "", "non_english"
    if " " not in title:
        title = CAMEL.sub(" ", title)
    return (title.lower() if title.isupper() else title), ""


def clean_description(raw: str, title: str, author: str, common: set[str]) -> str:
    """The description to add to `title` ("" for none)."""
    text = normalise(raw)
    key, title_key, author_key = caption_key(text), caption_key(title), caption_key(normalise(author))
    if (not key or key in common or len(text) > MAX_DESCRIPTION or letters(text) < MIN_LETTERS
            or JUNK_DESCRIPTION.search(text) or is_non_english(text) or key in title_key
            or (author_key and author_key in key)):
        return ""
    return text


def common_descriptions(items: list[Item]) -> set[str]:
    """Description keys on more than COLLECTION_LIMIT openclipart items: a set's text, not one drawing's."""
    counts = Counter(caption_key(normalise(i.description)) for i in items if i.source == "openclipart" and not i.drop)
    return {key for key, n in counts.items() if key and n > COLLECTION_LIMIT}


def clean_caption(item: Item, common: set[str]) -> Caption:
    if item.drop:
        return Caption("", item.drop)
    if item.source == "openclipart":
        title, reason = clean_title(item.caption)
        if reason:
            return Caption("", reason)
        description = clean_description(item.description, title, item.author, common)
        if description and caption_key(title) in caption_key(description):
            text = description[0].upper() + description[1:]
        else:
            text = f"{title}: {description}" if description else title
        return Caption(text, "", caption_key(title))
    text = normalise(item.caption)
    if not text:
        return Caption("", "no_caption")
    if item.source.startswith("emoji-"):  # curated names: no junk to filter
        return Caption(text.lower(), "")
    if letters(text) == 0:
        return Caption("", "code")
    if letters(text) < MIN_LETTERS:
        return Caption("", "too_short")
    return Caption(text, "")
