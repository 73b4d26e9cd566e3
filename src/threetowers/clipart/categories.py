"""The classes of the two zero-shot sets: readable names for emoji.json's categories, and a small explicit
table from the clip-art folders to classes.

The clip-art table maps a folder prefix (the longest that matches wins) to a class or to None (a folder
of that prefix's parent that does not belong to its class, e.g. furniture under buildings). Folders
that are too mixed to name (openclipart's recreation/, signs_and_symbols/ outside flags, Tux Paint's
symbols/, seasonal/) have no class: their drawings still train and test retrieval, but no zero-shot set.
"""

from __future__ import annotations

# emoji.json's top-level categories ("Component", skin-tone swatches and hair parts, is not a class).
EMOJI_CLASSES = {
    "Smileys & Emotion": "smiley face",
    "People & Body": "person",
    "Animals & Nature": "animal or plant",
    "Food & Drink": "food or drink",
    "Travel & Places": "place or vehicle",
    "Activities": "game or sport",
    "Objects": "tool or object",
    "Symbols": "symbol",
    "Flags": "flag",
}

EMOJI_TEMPLATES = ["an emoji of a {c}.", "a {c} emoji.", "an icon of a {c}.", "a drawing of a {c}.",
                   "a cartoon {c}.", "a small picture of a {c}."]

CLIPART_TEMPLATES = ["a drawing of a {c}.", "clip art of a {c}.", "an illustration of a {c}.",
                     "a cartoon drawing of a {c}.", "a simple drawing of a {c}.", "a sketch of a {c}."]

CLIPART_FOLDERS = {
    "openclipart": {
        "animals": "animal",
        "plants": "plant",
        "food": "food",
        "buildings": "building",
        "buildings/furniture": None,
        "people": "person",
        "people/bodypart": None,
        "people/smilies": None,
        "people/clothing": "piece of clothing",
        "signs_and_symbols/flags": "flag",
        "transportation/vehicles": "vehicle",
        "transportation/boating": "vehicle",
        "transportation/roadsigns": "road sign",
        "tools": "tool",
        "tools/weapons": None,
        "tools/toys": None,
    },
    "tuxpaint": {
        "animals": "animal",
        "plants": "plant",
        "food": "food",
        "clothes": "piece of clothing",
        "vehicles": "vehicle",
        "military/vehicles": "vehicle",
        "town/houses": "building",
        "town/monuments": "building",
        "town/flags": "flag",
        "town/roadsigns": "road sign",
        "people/cartoon": "person",
        "household/tools": "tool",
        "household/arttools": "tool",
    },
}

CLIPART_CLASSES = sorted({c for table in CLIPART_FOLDERS.values() for c in table.values() if c})


def clipart_class(source: str, rel: str) -> str | None:
    """The class of the file at `rel` (relative to its source root), by its longest listed folder prefix."""
    parts = rel.split("/")[:-1]
    table = CLIPART_FOLDERS[source]
    for depth in range(len(parts), 0, -1):
        prefix = "/".join(parts[:depth])
        if prefix in table:
            return table[prefix]
    return None


def emoji_class(category: str) -> str | None:
    return EMOJI_CLASSES.get(category)
