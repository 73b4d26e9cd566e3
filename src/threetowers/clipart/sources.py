"""Find the clip-art packages and read each into `Item`s: an image file, its raw caption and where it came from.

Nothing here decodes an image (that is `images.py`, in worker processes) and nothing is installed:
a missing package is one `MissingSourceError` naming every missing piece with its install command,
raised before any work. Everything is listed in sorted order, so the items never depend on the
file system's order.

Drop reasons known when reading: openclipart's computer/icons/ ("icon": icon themes, not drawings,
titled by their theme's name) and a PNG whose SVG is missing or is not XML ("unreadable_svg"); a
Tux Paint stamp without its NAME.txt ("no_caption": the _mirror copies, the Tux cartoons); emoji.json's
"Component" category ("component": skin-tone swatches, hair parts) and skin-tone variations
("skin_variation"). Only the emoji styles whose image licences allow this use are read: Google's
(Apache-2.0) and Twitter's (CC-BY-4.0), not Apple's or Facebook's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .categories import clipart_class, emoji_class

OPENCLIPART = Path("/usr/share/openclipart")
TUXPAINT = Path("/usr/share/tuxpaint/stamps")
EMOJI_STYLES = ("google", "twitter")  # training style, test style
APT_OPENCLIPART = "apt-get install openclipart-png openclipart-svg"
APT_TUXPAINT = "apt-get install tuxpaint-stamps-default"
APT_RSVG = "apt-get install librsvg2-bin"
NPM_EMOJI = "npm pack emoji-datasource-google emoji-datasource-twitter"


class MissingSourceError(FileNotFoundError):
    """A source package is not installed or not where it was said to be (one line: every piece, its install command)."""


@dataclass(frozen=True)
class Item:
    source: str              # "openclipart", "tuxpaint", "emoji-google" or "emoji-twitter"
    origin: str              # the image's path relative to its source root
    image: str               # the file to read: a PNG or an SVG
    caption: str = ""        # raw: the work title, the stamp's English line, the emoji's name
    description: str = ""    # raw: openclipart's dc:description
    author: str = ""         # raw: openclipart's first dc:creator (a description naming the author is a credit)
    category: str | None = None  # a readable class name (categories.py) or None
    svg: str = ""            # openclipart: the SVG its PNG was rendered from, rendered instead of an unusable PNG
    added: tuple[int, ...] = ()  # emoji: the Emoji version that added it (of identical images the oldest is kept)
    drop: str = ""           # a drop reason already known when reading


# ----------------------------------------------------------------------------- checks and versions


def emoji_package_ok(path: Path, style: str) -> bool:
    if path.is_dir():
        return (path / "package.json").is_file() and (path / "emoji.json").is_file() and (path / "img" / style / "64").is_dir()
    return path.is_file() and tarfile.is_tarfile(path)


def check_sources(openclipart: Path, tuxpaint: Path, emoji: dict[str, Path | None]) -> None:
    """Raise one MissingSourceError that lists every missing source and the command that installs it."""
    missing = []
    lost = [str(openclipart / kind) for kind in ("png", "svg") if not (openclipart / kind).is_dir()]
    if lost:
        missing.append(f"openclipart ({', '.join(lost)}): {APT_OPENCLIPART}")
    if not tuxpaint.is_dir():
        missing.append(f"Tux Paint stamps ({tuxpaint}): {APT_TUXPAINT}")
    if not shutil.which("rsvg-convert"):
        missing.append(f"rsvg-convert (renders SVG stamps): {APT_RSVG}")
    for style, path in emoji.items():
        if path is None:
            missing.append(f"--emoji-{style} not given: {NPM_EMOJI}, then pass --emoji-{style} "
                           f"emoji-datasource-{style}-VERSION.tgz")
        elif not emoji_package_ok(Path(path), style):
            missing.append(f"--emoji-{style} {path} is not an npm package of emoji-datasource-{style} (a .tgz or the "
                           f"folder holding package.json, emoji.json, img/{style}/64/): {NPM_EMOJI}")
    if missing:
        raise MissingSourceError("clip-art sources missing: " + "; ".join(missing))


def debian_version(package: str) -> str:
    if not shutil.which("dpkg-query"):
        return "unknown"
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def tree_fingerprint(root: Path) -> str:
    """Identity of a source folder that is not the Debian package's own: its files' names and sizes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    return "files:" + digest.hexdigest()[:16]


def npm_version(path: Path) -> str:
    if path.is_dir():
        return json.loads((path / "package.json").read_text(encoding="utf-8")).get("version", "unknown")
    with tarfile.open(path) as tar:  # read package.json without extracting: npm pack puts it first
        for member in tar:
            if member.name == "package/package.json":
                return json.loads(tar.extractfile(member).read().decode("utf-8")).get("version", "unknown")
    return "unknown"


def package_versions(openclipart: Path, tuxpaint: Path, emoji: dict[str, Path]) -> dict[str, str]:
    """{package: version}: dpkg's version for a Debian package at its installed place, a fingerprint of the
    files for a folder given instead, package.json's version for an npm package."""
    versions = {}
    for name, root, default in (("openclipart-png", openclipart / "png", OPENCLIPART / "png"),
                                ("openclipart-svg", openclipart / "svg", OPENCLIPART / "svg"),
                                ("tuxpaint-stamps-default", tuxpaint, TUXPAINT)):
        versions[name] = debian_version(name) if root.resolve() == default.resolve() else tree_fingerprint(root)
    versions["librsvg2-bin"] = debian_version("librsvg2-bin")  # it renders the SVG stamps
    for style, path in emoji.items():
        versions[f"emoji-datasource-{style}"] = npm_version(Path(path))
    return versions


def emoji_package(path: Path, style: str, work: Path) -> Path:
    """The package folder of an npm package: `path` itself, or its .tgz extracted (only the metadata and the
    64 px images of `style`) into `work`/_sources/<archive name>/ once."""
    if path.is_dir():
        return path
    target = work / "_sources" / path.name.removesuffix(".tgz").removesuffix(".tar.gz")
    if (target / "package" / "emoji.json").is_file():
        return target / "package"
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    wanted = ("package/package.json", "package/emoji.json", "package/LICENSE", f"package/img/{style}/64/")
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(wanted)]
        # The "data" filter refuses links and paths outside `partial` (Python >= 3.10.12 / 3.11.4).
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(partial, members=members, **safe)
    if not (partial / "package" / "emoji.json").is_file():
        shutil.rmtree(partial, ignore_errors=True)
        raise MissingSourceError(f"--emoji-{style} {path} holds no package/emoji.json: give the .tgz that "
                                 f"`{NPM_EMOJI}` writes")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # whole or absent: an interrupted extraction is redone
    return target / "package"


# ----------------------------------------------------------------------------- readers


def svg_title(path: Path) -> tuple[str, str, str] | None:
    """(title, description, creator) of an SVG's cc:Work: its own dc:title (the first direct child; later
    ones name the library and the authors), dc:description and the first author's name; None for XML
    that does not parse."""
    found = {"title": "", "description": "", "creator": ""}
    stack: list[str] = []
    try:
        for event, element in ET.iterparse(path, events=("start", "end")):
            tag = element.tag.rsplit("}", 1)[-1]
            if event == "start":
                stack.append(tag)
                continue
            stack.pop()
            if stack and stack[-1] == "Work" and tag in ("title", "description") and not found[tag]:
                found[tag] = element.text or ""
            elif tag == "title" and "creator" in stack and "Work" in stack and not found["creator"]:
                found["creator"] = element.text or ""
            if tag in ("Work", "metadata"):  # the rest is drawing: stop early
                break
    except ET.ParseError:
        return None
    return found["title"], found["description"], found["creator"]


def read_openclipart(root: Path) -> list[Item]:
    items = []
    for png in sorted((root / "png").rglob("*.png")):
        rel = png.relative_to(root / "png").as_posix()
        svg = (root / "svg" / rel).with_suffix(".svg")
        common = {"source": "openclipart", "origin": rel, "image": str(png),
                  "category": clipart_class("openclipart", rel), "svg": str(svg) if svg.is_file() else ""}
        if rel.startswith("computer/icons/"):  # icon themes, not drawings, and titled by their set's name
            items.append(Item(**common, drop="icon"))
            continue
        meta = svg_title(svg) if svg.is_file() else None
        if meta is None:
            items.append(Item(**common, drop="unreadable_svg"))
        else:
            items.append(Item(**common, caption=meta[0], description=meta[1], author=meta[2]))
    return items


def read_tuxpaint(root: Path) -> list[Item]:
    """One item per stamp NAME: NAME.png (or NAME.svg when there is no PNG) captioned by NAME.txt's first
    line, the English one (the other lines are translations)."""
    stems = sorted({p.with_suffix("") for p in root.rglob("*") if p.suffix in (".png", ".svg") and p.is_file()})
    items = []
    for stem in stems:
        image = stem.with_suffix(".png") if stem.with_suffix(".png").is_file() else stem.with_suffix(".svg")
        txt = stem.with_suffix(".txt")
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines() if txt.is_file() else []
        rel = image.relative_to(root).as_posix()
        items.append(Item("tuxpaint", rel, str(image), caption=lines[0] if lines else "",
                          category=clipart_class("tuxpaint", rel), drop="" if lines else "no_caption"))
    return items


def read_emoji(package: Path, style: str) -> list[Item]:
    """The emoji drawn in `style`: one item per base emoji. Skin-tone variations are items dropped as
    "skin_variation": they are near-duplicate images with near-identical names ("..., medium skin tone"),
    which would flood the set and make retrieval ambiguous."""
    entries = json.loads((package / "emoji.json").read_text(encoding="utf-8"))
    source, folder = f"emoji-{style}", package / "img" / style / "64"
    items = []
    for entry in sorted(entries, key=lambda e: e["image"]):
        if not entry.get(f"has_img_{style}"):
            continue
        category = entry.get("category") or ""
        added = tuple(int(n) for n in str(entry.get("added_in") or "0").split(".") if n.isdigit())
        items.append(Item(source, f"img/{style}/64/{entry['image']}", str(folder / entry["image"]),
                          caption=entry.get("name") or "", category=emoji_class(category), added=added,
                          drop="component" if category == "Component" else ""))  # skin-tone swatches, hair parts
        for variation in sorted((entry.get("skin_variations") or {}).values(), key=lambda v: v["image"]):
            if variation.get(f"has_img_{style}"):
                items.append(Item(source, f"img/{style}/64/{variation['image']}", str(folder / variation["image"]),
                                  caption=entry.get("name") or "", drop="skin_variation"))
    return items
