"""`prepare_clipart`: the sources read, cleaned, split and written, with a manifest written last.

Order of work (each item gets exactly one drop reason, the first that applies; `clean.py` and
`images.py` describe the rules):
1. read every source (`sources.py`); caption rules (`clean.py`);
2. duplicates by the source image's bytes ("duplicate"; Debian links identical openclipart files, some
   emoji share a picture): per source one copy is kept (`duplicates` says which);
3. openclipart set names: a title on more than `COLLECTION_LIMIT` of the remaining images
   ("collection_title");
4. images (`images.py`) in worker processes, in a fixed order; then duplicates by the output pixels
   ("duplicate_image": the same drawing in two files), among openclipart + Tux Paint together and
   within each emoji style;
5. splits. Emoji: every Google-style image trains; the Twitter-style images are the cross-style test
   sets. openclipart + Tux Paint: held out BY CAPTION (sha256 of the seed and the caption's key below
   `heldout_fraction`), so a caption is never in both training and test; a drawing whose caption is a
   training emoji's name ("Butterfly") always trains, for the same reason. Training pairs are in a seeded
   hash order (shards mix the sources); test sets in path order.

Everything is sorted or hashed, never in dict or file-system order, so the same packages and options
give the same pairs, splits and digest whatever the worker count.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ..core.atomic import write_json_atomic
from .categories import CLIPART_CLASSES, CLIPART_TEMPLATES, EMOJI_CLASSES, EMOJI_TEMPLATES
from .clean import COLLECTION_LIMIT, caption_key, clean_caption, common_descriptions
from .images import process
from .layout import Pair, write_classification, write_retrieval, write_train
from .sources import (
    EMOJI_STYLES, OPENCLIPART, TUXPAINT, Item, check_sources, emoji_package, package_versions, read_emoji, read_openclipart,
    read_tuxpaint,
)

FORMAT = 2  # bump when a rule changes what a build holds: an older build then counts as changed
# (2: a drawing whose caption names a training emoji is never held out)
SOURCES = ("openclipart", "tuxpaint", "emoji-google", "emoji-twitter")
OURS = {"train", "wds", "_sources", "manifest.json"}  # what a build writes into OUT_DIR
LICENCES = {
    "openclipart": "public domain (Debian openclipart-png, openclipart-svg)",
    "tuxpaint": "GPL-2.0 (Debian tuxpaint-stamps-default)",
    "emoji-google": "Apache-2.0 images (Noto Emoji, npm emoji-datasource-google); emoji.json names MIT",
    "emoji-twitter": "CC-BY-4.0 images (Twemoji, npm emoji-datasource-twitter); emoji.json names MIT",
}


class OutputExistsError(FileExistsError):
    """OUT_DIR holds a different build or other files (FileExistsError: the command line says it in one line)."""


def check_out_dir(out: Path, current: dict, force: bool, log: Callable[[str], None]) -> dict | None:
    """The existing manifest when OUT_DIR is up to date; None when a build may (re)write it."""
    manifest = out / "manifest.json"
    if manifest.is_file() and not force:
        old = json.loads(manifest.read_text(encoding="utf-8"))
        changed = [f"format {old.get('format')} -> {FORMAT}"] if old.get("format") != FORMAT else []
        for group in ("options", "packages"):
            before, now = old.get(group, {}), current[group]
            changed += [f"{k} {before.get(k)} -> {now.get(k)}" for k in sorted(set(before) | set(now))
                        if before.get(k) != now.get(k)]
        if not changed:
            log(f"{out} is up to date (same packages and options); nothing to do")
            return old
        raise OutputExistsError(f"{out} holds a clip-art build with other settings ({'; '.join(changed)}): "
                                "use a new OUT_DIR, or --force to rebuild this one")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OURS and not p.name.startswith(".")) \
        if out.is_dir() else []
    if foreign and not manifest.is_file() and not force:
        raise OutputExistsError(f"{out} holds files that are not a clip-art build ({', '.join(foreign[:5])}): "
                                "use a new or empty OUT_DIR")
    return None


def duplicates(indices: list[int], items: list[Item], captions: list, key: Callable[[int], str]) -> dict[int, int]:
    """{duplicate: the index kept in its place} under `key`. Of each group the item with a class is kept,
    then the oldest emoji (France's flag, not St. Martin's, which Unicode added later with the same
    picture), then the shortest caption ("family", not "family: man, woman, boy"), then the first by path."""
    kept, dupes = {}, {}
    for i in sorted(indices, key=lambda i: (items[i].source, items[i].category is None, items[i].added,
                                            len(captions[i].text), items[i].origin)):
        if key(i) in kept:
            dupes[i] = kept[key(i)]
        else:
            kept[key(i)] = i
    return dupes


def heldout(caption: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}\n{caption_key(caption)}".encode()).hexdigest()
    return int(digest[:16], 16) / 2 ** 64 < fraction


def clean(items: list[Item], image_size: int, workers: int) -> tuple[dict[int, str], dict[int, Pair]]:
    """({item index: drop reason}, {item index: its pair}): steps 1 to 4 of the module docstring."""
    common = common_descriptions(items)
    captions = [clean_caption(item, common) for item in items]
    reasons = {i: c.reason for i, c in enumerate(captions) if c.reason}

    def survivors() -> list[int]:
        return [i for i in range(len(items)) if i not in reasons]

    hashes = {i: hashlib.sha256(Path(items[i].image).read_bytes()).hexdigest() for i in survivors()}
    same_file = duplicates(survivors(), items, captions, lambda i: f"{items[i].source}:{hashes[i]}")
    reasons.update(dict.fromkeys(same_file, "duplicate"))
    titles = Counter(captions[i].title_key for i in survivors() if items[i].source == "openclipart")
    reasons.update({i: "collection_title" for i in survivors()
                    if items[i].source == "openclipart" and titles[captions[i].title_key] > COLLECTION_LIMIT})

    todo = survivors()
    jobs = [(items[i].image, items[i].svg, image_size) for i in todo]
    bar = {"total": len(jobs), "desc": "clip-art images", "unit": "img", "disable": None}
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:  # map keeps the order: results do not depend on `workers`
            results = list(tqdm(pool.map(process, jobs, chunksize=16), **bar))
    else:
        results = list(tqdm(map(process, jobs), **bar))
    pngs = {}
    for i, (png, reason) in zip(todo, results):
        if reason:
            reasons[i] = reason
        else:
            pngs[i] = (png, hashlib.sha256(png).hexdigest())
    group = {"openclipart": "clipart", "tuxpaint": "clipart"}  # they share the held-out split
    same_pixels = duplicates(survivors(), items, captions,
                             lambda i: f"{group.get(items[i].source, items[i].source)}:{pngs[i][1]}")
    reasons.update(dict.fromkeys(same_pixels, "duplicate_image"))
    # A Twitter emoji's retrieval sample lists the names of the identical images dropped in its place (one
    # a line, as CLIP_benchmark allows): the flags that share a picture, the families drawn alike.
    also = defaultdict(list)
    for dupe, kept in sorted({**same_file, **same_pixels}.items()):
        while kept in same_pixels:
            kept = same_pixels[kept]
        if items[kept].source == "emoji-twitter" and captions[dupe].text != captions[kept].text:
            also[kept].append(captions[dupe].text)
    pairs = {i: Pair(items[i].source, items[i].origin, captions[i].text, items[i].category, *pngs[i],
                     also=tuple(sorted(set(also[i])))) for i in survivors()}
    return reasons, pairs


def split(pairs: list[Pair], seed: int, heldout_fraction: float) -> dict[str, list[Pair]]:
    """The pairs of every output set (step 5 of the module docstring), in their order."""
    by_path = sorted(pairs, key=lambda p: (p.source, p.origin))
    clipart = [p for p in by_path if p.source in ("openclipart", "tuxpaint")]
    google = [p for p in by_path if p.source == "emoji-google"]
    # A drawing named like a training emoji ("Butterfly", "A horse") trains: no held-out caption is
    # ever seen in training, whichever source it trained with.
    emoji_names = {caption_key(p.caption) for p in google}
    held = [heldout(p.caption, seed, heldout_fraction) and caption_key(p.caption) not in emoji_names for p in clipart]
    test_clipart = [p for p, h in zip(clipart, held) if h]
    train_clipart = [p for p, h in zip(clipart, held) if not h]
    twitter = [p for p in by_path if p.source == "emoji-twitter"]
    train = sorted(train_clipart + google,
                   key=lambda p: hashlib.sha256(f"{seed}\n{p.source}\n{p.origin}".encode()).hexdigest())
    return {
        "train": train,
        "emoji_retrieval": twitter,
        "clipart_retrieval": test_clipart,
        "emoji_category/train": [p for p in google if p.category],
        "emoji_category/test": [p for p in twitter if p.category],
        "clipart_category/train": [p for p in train_clipart if p.category],
        "clipart_category/test": [p for p in test_clipart if p.category],
    }


def digest_of(sets: dict[str, list[Pair]]) -> str:
    """sha256 over every set's (set, text, image hash) records in order; a class set's text is the class."""
    digest = hashlib.sha256()
    for name, pairs in sets.items():
        for p in pairs:
            text = p.category if "category" in name else p.text if name.endswith("retrieval") else p.caption
            digest.update(f"{name}\t{text}\t{p.digest}\n".encode())
    return digest.hexdigest()


def source_counts(items: list[Item], reasons: dict[int, str]) -> dict:
    counts = {source: {"found": 0, "kept": 0, "dropped": Counter()} for source in SOURCES}
    for i, item in enumerate(items):
        counts[item.source]["found"] += 1
        if i in reasons:
            counts[item.source]["dropped"][reasons[i]] += 1
        else:
            counts[item.source]["kept"] += 1
    for entry in counts.values():
        entry["dropped"] = dict(sorted(entry["dropped"].items()))
    return counts


def prepare_clipart(out_dir: str | Path, *, image_size: int = 128, seed: int = 0, heldout_fraction: float = 0.1,
                    emoji_google: str | Path | None = None, emoji_twitter: str | Path | None = None,
                    openclipart: str | Path = OPENCLIPART, tuxpaint: str | Path = TUXPAINT, workers: int | None = None,
                    force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build (or find up to date) the clip-art benchmark in `out_dir`; returns its manifest."""
    start = time.perf_counter()
    if image_size < 16:
        raise ValueError(f"--image-size must be at least 16, not {image_size}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction must be between 0 and 1, not {heldout_fraction}")
    out, openclipart, tuxpaint = Path(out_dir), Path(openclipart), Path(tuxpaint)
    emoji = dict(zip(EMOJI_STYLES, (emoji_google, emoji_twitter)))
    check_sources(openclipart, tuxpaint, emoji)  # every missing piece in one message, before any work
    current = {"format": FORMAT, "options": {"image_size": image_size, "seed": seed, "heldout_fraction": heldout_fraction},
               "packages": package_versions(openclipart, tuxpaint, {s: Path(p) for s, p in emoji.items()})}
    if (done := check_out_dir(out, current, force, log)) is not None:
        return done
    (out / "manifest.json").unlink(missing_ok=True)  # no manifest until the new build is complete
    for name in ("train", "wds"):
        shutil.rmtree(out / name, ignore_errors=True)

    items = read_openclipart(openclipart) + read_tuxpaint(tuxpaint)
    for style, path in emoji.items():
        items += read_emoji(emoji_package(Path(path), style, out), style)
    reasons, pairs = clean(items, image_size, workers or min(4, os.cpu_count() or 1))
    sets = split(list(pairs.values()), seed, heldout_fraction)

    pattern = write_train(out, sets["train"])
    for name in ("emoji_retrieval", "clipart_retrieval"):
        write_retrieval(out / "wds" / name, sets[name])
    classes = {"emoji_category": list(EMOJI_CLASSES.values()), "clipart_category": CLIPART_CLASSES}
    for name, templates in (("emoji_category", EMOJI_TEMPLATES), ("clipart_category", CLIPART_TEMPLATES)):
        write_classification(out / "wds" / name, {s: sets[f"{name}/{s}"] for s in ("train", "test")},
                             classes[name], templates)
    counts = source_counts(items, reasons)
    manifest = {
        **current, "counts": counts,
        "splits": {**{name: len(sets[name]) for name in ("train", "emoji_retrieval", "clipart_retrieval")},
                   **{name: {s: len(sets[f"{name}/{s}"]) for s in ("train", "test")} for name in classes}},
        "classes": classes, "train_shards": pattern, "digest": digest_of(sets), "licences": LICENCES,
    }
    write_json_atomic(out / "manifest.json", manifest)  # last: its presence means the build is complete
    kept = ", ".join(f"{s} {counts[s]['kept']}" for s in SOURCES)
    log(f"clip-art: {len(pairs)} pairs kept of {len(items)} found ({kept}); train {len(sets['train'])}, "
        f"emoji_retrieval {len(sets['emoji_retrieval'])}, clipart_retrieval {len(sets['clipart_retrieval'])}; "
        f"{time.perf_counter() - start:.0f} s -> {out}")
    return manifest
