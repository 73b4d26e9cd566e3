"""Captions: the words for objects, colours, sizes, relations and scenes, how a caption is phrased, and caption noise.

Captions are compositional English (templates, synonyms, optional clauses) naming the objects,
their colours, sizes, counts and spatial relations and the background. A `caption_noise` fraction
of training captions is corrupted the way web alt-text is: a wrong colour, a wrong or missing
object, a wrong background, or a generic text.
"""

from __future__ import annotations

import bisect

import numpy as np

from .backdrops import SCENES
from .renderer import COLOURS, below

COLOUR_WORDS = {c: [c] for c in COLOURS} | {"purple": ["purple", "violet"], "cyan": ["cyan", "turquoise"]}
SCENE_PHRASES: dict[str, list[str]] = {
    "plain": ["a plain background", "a blank background", "a plain backdrop", "a solid background"],
    "striped": ["a striped background", "a background with stripes", "stripes", "a striped backdrop"],
    "dotted": ["a dotted background", "a polka dot background", "a background of dots", "dots"],
    "checkered": ["a checkered background", "a checkerboard", "a checkered pattern", "a chessboard pattern"],
    "gradient": ["a gradient background", "a smooth gradient", "a colour gradient", "a fading background"],
    "grid": ["a grid background", "a grid of lines", "a grid pattern", "graph paper"],
    "noisy": ["a noisy background", "a grainy background", "random noise", "a speckled backdrop"],
    "wavy": ["a wavy background", "wavy lines", "a background of waves", "waves"],
    "brick": ["a brick wall", "a brick background", "bricks", "a brick pattern"],
    "rippled": ["a rippled background", "ripples", "a rippled pattern", "a target pattern"],
    "marbled": ["a marbled background", "a marble texture", "a blotchy background", "a mottled backdrop"],
}
# The words a clean caption uses for each scene (tests check captions against these).
SCENE_WORDS = {
    "plain": ["plain", "blank", "solid"], "striped": ["striped", "stripes"], "dotted": ["dotted", "dots", "polka dot"],
    "checkered": ["checkered", "checkerboard", "chessboard"], "gradient": ["gradient", "fading"],
    "grid": ["grid", "graph paper"], "noisy": ["noisy", "grainy", "noise", "speckled"], "wavy": ["wavy", "waves"],
    "brick": ["brick", "bricks"], "rippled": ["rippled", "ripples", "target"],
    "marbled": ["marbled", "marble", "blotchy", "mottled"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
RELATIONS = {
    "left": ["to the left of", "left of", "on the left of"], "right": ["to the right of", "right of"],
    "above": ["above", "over"], "below": ["below", "under", "beneath"],
}
THINGS = ["objects", "things", "items"]
COUNTS = {2: "two", 3: "three"}
TEMPLATES_1 = ["{a} on {bg}.", "{a} in front of {bg}.", "{bg} with {a}.", "a picture of {a} on {bg}.",
               "there is {a} on {bg}.", "an image of {a} against {bg}.", "{a}, with {bg} behind it.",
               "one {a_} on {bg}."]
TEMPLATES_2 = ["{a} {rel} {b} on {bg}.", "{bg} with {a} {rel} {b}.", "two {things} on {bg}: {a} and {b}.",
               "{a} and {b} on {bg}.", "on {bg}, {a} is {rel} {b}.", "a picture of {a} and {b} in front of {bg}."]
TEMPLATES_3 = ["three {things} on {bg}: {a}, {b} and {c}.", "{a}, {b} and {c} on {bg}.",
               "from left to right: {l0}, {l1} and {l2}, on {bg}.", "{bg} with {a} {rel} {b}, and {c}.",
               "a picture of {a}, {b} and {c} against {bg}."]
TEMPLATES_GROUPED = ["{list} on {bg}.", "{bg} with {list}.", "a picture of {list} in front of {bg}.",
                     "{count} {things} on {bg}: {list}."]
GENERIC = ["nice picture", "image", "untitled", "click to enlarge", "photo", "my new wallpaper", "stock image",
           "no description available", "screenshot", "best patterns of the year", "download free", "IMG_{:04d}.jpg"]
NOISE_KINDS = ["wrong_colour", "wrong_object", "missing_object", "wrong_background", "generic"]
NOISE_CDF = [0.25, 0.45, 0.6, 0.75]  # cumulative probabilities of the first four kinds


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(name: str) -> str:
    words = name.split(" ")
    i = words.index("of") - 1 if "of" in words else len(words) - 1  # "pair of trousers" -> "pairs of trousers"
    w = words[i]
    words[i] = w + "es" if w.endswith(("s", "x", "sh", "ch")) else w + "s"
    return " ".join(words)


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    """The first (canonical) word more often than each synonym, so prompts with class names match captions."""
    return words[0] if len(words) == 1 or rng.random() < 0.6 else words[below(rng, len(words))]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def relation(rng: np.random.Generator, a: dict, b: dict) -> str:
    """How object a lies relative to b, in words ("left of", "above", ...)."""
    dx = (b["x"] + b["box"] / 2) - (a["x"] + a["box"] / 2)
    dy = (b["y"] + b["box"] / 2) - (a["y"] + a["box"] / 2)  # image y grows downwards
    key = ("left" if dx > 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below")
    return _pick(rng, RELATIONS[key])


class Captioner:
    """Captions for one world: its image size (for positions), object classes and their synonyms."""

    def __init__(self, size: int, classes: list[str], synonyms: dict[str, list[str]], noise: float,
                 colour_words: float = 1.0, scene_words: float = 1.0) -> None:
        self.size = size
        self.classes = classes
        self.synonyms = synonyms
        self.noise = noise  # the fraction of noisy-recipe captions that are corrupted
        # The chance that a caption names an object's colour. Below 1, colour alone cannot match a
        # caption to its image, so a tower has to see shapes. At 1 no draw is made (worlds as before).
        self.colour_words = colour_words
        self.scene_words = scene_words  # the same for naming the background (else "a background")
        self._colours = list(COLOURS)

    def object_words(self, name: str) -> list[str]:
        """Every word a clean caption may use for an object class (synonyms and their plurals)."""
        return self.synonyms[name] + [_plural(w) for w in self.synonyms[name]]

    def describe(self, rng: np.random.Generator, scene: int, objs: list[dict], count: int, noisy: bool
                 ) -> tuple[str, list[str]]:
        """(noise kind or "", `count` captions). When noisy, the first is corrupted at the noise rate;
        the others are clean, distinct paraphrases (repeats only after 4 x count tries)."""
        noise, captions = "", []
        if noisy and rng.random() < self.noise:
            noise, caption = self._corrupt(rng, scene, objs)
            captions.append(caption)
        tries = 0
        while len(captions) < count:
            caption = self._caption(rng, scene, objs)
            tries += 1
            if caption not in captions or tries > 4 * count:
                captions.append(caption)
        return noise, captions

    def _phrase(self, rng: np.random.Generator, o: dict) -> str:
        words = [_pick(rng, SIZE_WORDS[o["size"]])] if o["size"] and rng.random() < 0.6 else []
        name = _pick(rng, self.synonyms[o["name"]])
        if o["colour"] is None or not self._names(rng, self.colour_words):
            return " ".join(words + [name])
        colour = _pick(rng, COLOUR_WORDS[o["colour"]])
        if rng.random() < 0.15:
            return " ".join(words + [name]) + " in " + colour
        return " ".join(words + [colour, name])

    @staticmethod
    def _names(rng: np.random.Generator, chance: float) -> bool:
        return chance >= 1 or rng.random() < chance  # at 1, no draw: the default world's captions as before

    def _caption(self, rng: np.random.Generator, scene: int, objs: list[dict]) -> str:
        bg = _pick(rng, SCENE_PHRASES[SCENES[scene]])
        if not self._names(rng, self.scene_words):
            bg = "a background"
        order = [objs[i] for i in rng.permutation(len(objs))]
        groups: dict[tuple, list[dict]] = {}
        for o in order:
            groups.setdefault((o["name"], o["colour"]), []).append(o)
        things = THINGS[below(rng, len(THINGS))]
        if len(groups) < len(objs):  # repeated objects: counted ("two red circles")
            parts = [_article(self._phrase(rng, g[0])) if len(g) == 1 else
                     " ".join([COUNTS[len(g)]] + ([g[0]["colour"]] if g[0]["colour"] and self._names(rng, self.colour_words) else [])
                              + [_plural(g[0]["name"])])
                     for g in groups.values()]
            template = TEMPLATES_GROUPED[below(rng, len(TEMPLATES_GROUPED))]
            return template.format(list=_join(parts), bg=bg, count=COUNTS[len(objs)], things=things)
        bare = [self._phrase(rng, o) for o in order]
        names = [_article(p) for p in bare]
        fields = {"bg": bg, "things": things, "a_": bare[0]} | dict(zip("abc", names))
        if len(order) >= 2:
            fields["rel"] = relation(rng, order[0], order[1])
            by_x = sorted(range(len(order)), key=lambda i: order[i]["x"] + order[i]["box"] / 2)
            fields |= {f"l{k}": names[i] for k, i in enumerate(by_x)}
        templates = {1: TEMPLATES_1, 2: TEMPLATES_2}.get(len(order), TEMPLATES_3)
        caption = templates[below(rng, len(templates))].format(**fields)
        if len(order) == 1 and rng.random() < 0.3:  # optional clause: where the object is
            caption = caption[:-1] + ", " + self._position(rng, order[0]) + "."
        return caption

    def _position(self, rng: np.random.Generator, o: dict) -> str:
        third = self.size / 3
        cx, cy = o["x"] + o["box"] / 2, o["y"] + o["box"] / 2
        h = "left" if cx < third else "right" if cx > 2 * third else ""
        v = "top" if cy < third else "bottom" if cy > 2 * third else ""
        if h and v:
            return f"in the {v} {h} corner"
        if h or v:
            return f"on the {h}" if h else f"at the {v}"
        return _pick(rng, ["in the centre", "in the middle"])

    def _corrupt(self, rng: np.random.Generator, scene: int, objs: list[dict]) -> tuple[str, str]:
        """A web-alt-text-like caption: partly wrong, or uninformative."""
        kind = NOISE_KINDS[bisect.bisect(NOISE_CDF, rng.random())]
        objs = [dict(o) for o in objs]
        coloured = [o for o in objs if o["colour"] is not None]
        if kind == "wrong_colour" and not coloured or kind == "missing_object" and len(objs) < 2:
            kind = "wrong_object"
        if kind == "generic":
            text = GENERIC[below(rng, len(GENERIC))]
            return kind, text.format(below(rng, 10000))
        if kind == "wrong_colour":
            o = coloured[below(rng, len(coloured))]
            k = len(self._colours)
            o["colour"] = self._colours[(self._colours.index(o["colour"]) + 1 + below(rng, k - 1)) % k]
        elif kind == "wrong_object":
            o = objs[below(rng, len(objs))]
            k = len(self.classes)
            o["name"] = self.classes[(self.classes.index(o["name"]) + 1 + below(rng, k - 1)) % k]
        elif kind == "missing_object":
            objs.pop(below(rng, len(objs)))
        else:
            scene = (scene + 1 + below(rng, len(SCENES) - 1)) % len(SCENES)
        return kind, self._caption(rng, scene, objs)
