"""`threetowers prepare clipart` on small fixtures in each package's layout (openclipart, Tux Paint stamps,
npm emoji-datasource): which captions are kept and why the others are dropped, the split by caption,
the crop, the output layouts read back by webdataset, idempotence, determinism and the one-line error
for missing sources. Without librsvg2-bin a stand-in rsvg-convert is put on PATH (the SVG-stamp test
that needs the real renderer is skipped)."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
from PIL import Image, ImageDraw

from threetowers.apps.cli import main
from threetowers.clipart import prepare_clipart
from threetowers.clipart.build import split
from threetowers.clipart.clean import caption_key, clean_title
from threetowers.clipart.layout import Pair

REAL_RSVG = shutil.which("rsvg-convert") is not None
FAKE_RSVG = f"""#!{sys.executable}
import io, sys
from PIL import Image
image = Image.new("RGB", (64, 64), "white")
image.paste((0, 0, 200), (8, 20, 56, 44))
out = io.BytesIO()
image.save(out, "PNG")
sys.stdout.buffer.write(out.getvalue())
"""
PAGE_SQUARE = 60  # the black square in the middle of the A4-like page


def drawing(index: int, size=(100, 80), kind: str = "ellipse") -> Image.Image:
    """A coloured shape on a transparent background, different for every index."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    colour = ((index * 67) % 200, (index * 131) % 200, (index * 29 + 60) % 200, 255)
    box = (10 + index % 7, 10, size[0] - 10, size[1] - 10 - index % 5)
    getattr(ImageDraw.Draw(image), kind)(box, fill=colour)
    return image


def png_bytes(image: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **kw)
    return out.getvalue()


def svg_text(title: str, description: str = "", creator: str = "Jane Doe") -> str:
    own = f"<dc:title>{escape(title)}</dc:title>" if title else ""
    return ('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
            'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:cc="http://web.resource.org/cc/" '
            'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" width="100" height="100"><metadata><rdf:RDF>'
            f'<cc:Work rdf:about="">{own}<dc:description>{escape(description)}</dc:description>'
            '<dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>'
            f'<dc:creator><cc:Agent><dc:title>{escape(creator)}</dc:title></cc:Agent></dc:creator></cc:Work>'
            '</rdf:RDF></metadata><rect x="10" y="10" width="80" height="80" fill="#c00"/></svg>')


# openclipart: (path under png/, title, description, image); None as image: written specially below.
KEPT_OPENCLIPART = {
    "animals/birds/robin.png": ("Robin", "", "Robin"),
    "animals/mammals/whale.png": ("Blue whale", "", "Blue whale"),
    "food/fruit/apple_page.png": ("Green Apple", "", "Green Apple"),
    "food/pear.png": ("Clipart by Nicu Buculei - pear", "", "pear"),
    "electronics/bulb.png": ("Lightbulb", "A glowing light bulb", "Lightbulb: A glowing light bulb"),
    "food/bread.png": ("bread", "A loaf of bread", "A loaf of bread"),
    "transportation/vehicles/fire_truck.png": ("Fire_Truck", "Created with Inkscape", "Fire Truck"),
    "buildings/homes/house.png": ("Small house", "", "Small house"),
    "plants/tree.png": ("Oak tree", "", "Oak tree"),
    "plants/rose.png": ("Red rose", "", "Red rose"),
    "transportation/boating/boat.png": ("Sailing boat", "", "Sailing boat"),
    "tools/hammer.png": ("CLAW HAMMER", "", "claw hammer"),
    "recreation/music/violin.png": ("Violin", "Violin", "Violin"),
    "people/gnome.png": ("Garden gnome", "", "Garden gnome"),
    "office/stapler.png": ("RoundPointShovel", "", "Round Point Shovel"),
    "geography/jutland.png": ("Denmark - Jutland", "", "Denmark, Jutland"),
}
DROPPED_OPENCLIPART = {  # path: (title, reason)
    "plants/tree_copy.png": ("Oak tree copy", "duplicate"),          # the same bytes as plants/tree.png
    "plants/rose_again.png": ("Rose again", "duplicate_image"),      # other bytes, the same pixels as rose.png
    "signs_and_symbols/flags/robin_link.png": ("Robin", "duplicate"),  # a symlink to animals/birds/robin.png
    **{f"shapes/stars/star_{k}.png": ("gramastar", "collection_title") for k in range(6)},
    "misc/fc01.png": ("fc01", "code"),
    "misc/photo.png": ("img_0023", "file_name"),
    "misc/casa.png": ("Casa dei sogni", "non_english"),
    "misc/author_only.png": ("", "no_title"),                         # only the creator's dc:title
    "misc/tv.png": ("TV", "too_short"),
    "computer/icons/home.png": ("Etiquette Icons", "icon"),
    "unsorted/empty.png": ("Empty frame", "blank_image"),
    "unsorted/broken.png": ("Broken picture", "unreadable_image"),
    "unsorted/badxml.png": ("Bad XML", "unreadable_svg"),
}
TUXPAINT = {  # path: (the stamp's text or None, its caption or drop reason)
    "animals/frog.png": ("A frog.\nfr.utf8=Une grenouille.\nde.utf8=Ein Frosch.", "A frog"),
    "vehicles/car.png": ("A red car.", "A red car"),
    "town/houses/hut.png": ("A hut.", "A hut"),
    "food/cake.svg": ("A birthday cake.", "A birthday cake"),
    **{f"plants/flower{k}.png": ("A flower.", "A flower") for k in range(6)},  # no set-name rule for stamps
    "cartoon/tux/tux-yes1.png": (None, "no_caption"),
    "symbols/q.png": ("?!", "code"),
    "symbols/xy.png": ("Xy.", "too_short"),
}
EMOJI = [  # name, category, image; the waving hand has a skin-tone variation
    ("GRINNING FACE", "Smileys & Emotion", "1f600.png"), ("FROG FACE", "Animals & Nature", "1f438.png"),
    ("KEYCAP: *", "Symbols", "002a-fe0f-20e3.png"), ("Egypt Flag", "Flags", "1f1ea-1f1ec.png"),
    ("WAVING HAND SIGN", "People & Body", "1f44b.png"), ("OX", "Animals & Nature", "1f402.png"),
    ("EMOJI MODIFIER FITZPATRICK TYPE-1-2", "Component", "1f3fb.png"),
    # Two flags drawn alike (the same file): the one Unicode added first is kept.
    ("Clipperton Island Flag", "Flags", "1f1e8-1f1f5.png"), ("France Flag", "Flags", "1f1eb-1f1f7.png"),
]
SAME_PICTURE = {"1f1e8-1f1f5.png": "15.0", "1f1eb-1f1f7.png": "2.0"}  # image: added_in
EMOJI_CAPTIONS = {"grinning face", "frog face", "keycap: *", "egypt flag", "waving hand sign", "ox", "france flag"}


def write_openclipart(root: Path) -> None:
    index = 0
    for rel, (title, desc, _) in KEPT_OPENCLIPART.items():
        index += 1
        (root / "svg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "svg" / rel).with_suffix(".svg").write_text(svg_text(title, desc))
        (root / "png" / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel == "food/fruit/apple_page.png":  # an opaque A4-like page with a small drawing in the middle
            page = Image.new("RGB", (600, 848), "white")
            page.paste((0, 0, 0), (270, 394, 270 + PAGE_SQUARE, 394 + PAGE_SQUARE))
            (root / "png" / rel).write_bytes(png_bytes(page))
        else:
            (root / "png" / rel).write_bytes(png_bytes(drawing(index)))
    for rel, (title, _) in DROPPED_OPENCLIPART.items():
        index += 1
        (root / "svg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "png" / rel).parent.mkdir(parents=True, exist_ok=True)
        svg = svg_text(title) if rel != "unsorted/badxml.png" else "<svg><metadata><cc:Work>"
        (root / "svg" / rel).with_suffix(".svg").write_text(svg)
        png = root / "png" / rel
        if rel == "plants/tree_copy.png":
            shutil.copyfile(root / "png/plants/tree.png", png)
        elif rel == "plants/rose_again.png":
            png.write_bytes(png_bytes(Image.open(root / "png/plants/rose.png"), compress_level=1))
        elif rel == "signs_and_symbols/flags/robin_link.png":
            png.symlink_to(os.path.relpath(root / "png/animals/birds/robin.png", png.parent))
        elif rel == "unsorted/empty.png":
            png.write_bytes(png_bytes(Image.new("RGBA", (90, 90), (0, 0, 0, 0))))
        elif rel == "unsorted/broken.png":
            png.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        else:
            png.write_bytes(png_bytes(drawing(index, kind="rectangle")))


def write_tuxpaint(root: Path) -> None:
    for index, (rel, (txt, _)) in enumerate(TUXPAINT.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".svg":
            path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="80" height="60">'
                            '<circle cx="40" cy="30" r="25" fill="#ff0000"/></svg>')
        else:
            path.write_bytes(png_bytes(drawing(50 + index)))
        if txt is not None:
            path.with_suffix(".txt").write_text(txt + "\n", encoding="utf-8")


def write_emoji(root: Path, style: str) -> Path:
    package = root / f"emoji-datasource-{style}-16.0.0" / "package"
    (package / "img" / style / "64").mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": f"emoji-datasource-{style}", "version": "16.0.0"}))
    entries = []
    for index, (name, category, image) in enumerate(EMOJI):
        entry = {"name": name, "short_name": name.lower(), "image": image, "category": category,
                 "subcategory": "x", "has_img_google": True, "has_img_twitter": True,
                 "added_in": SAME_PICTURE.get(image, "1.0")}
        if image == "1f44b.png":
            entry["skin_variations"] = {"1F3FB": {"image": "1f44b-1f3fb.png", "has_img_google": True,
                                                  "has_img_twitter": True}}
            (package / "img" / style / "64" / "1f44b-1f3fb.png").write_bytes(png_bytes(drawing(99, (64, 64))))
        entries.append(entry)
        shift = 0 if style == "google" else 40  # another design of the same emoji
        design = 90 if image in SAME_PICTURE else 100 + index
        (package / "img" / style / "64" / image).write_bytes(png_bytes(drawing(design + shift, (64, 64))))
    (package / "emoji.json").write_text(json.dumps(entries))
    return package


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("packages")
    write_openclipart(root / "openclipart")
    write_tuxpaint(root / "stamps")
    google = write_emoji(root / "npm", "google")
    twitter = write_emoji(root / "npm", "twitter")
    tgz = root / "npm" / "emoji-datasource-twitter-16.0.0.tgz"  # as `npm pack` writes it: package/...
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(twitter, arcname="package")
    shutil.rmtree(twitter.parent)
    with pytest.MonkeyPatch.context() as mp:
        if not REAL_RSVG:  # CI without librsvg2-bin: a stand-in that draws a blue bar
            (root / "bin").mkdir()
            (root / "bin" / "rsvg-convert").write_text(FAKE_RSVG)
            (root / "bin" / "rsvg-convert").chmod(0o755)
            mp.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        yield {"openclipart": root / "openclipart", "tuxpaint": root / "stamps", "emoji_google": google,
               "emoji_twitter": tgz}


def cli_args(sources: dict, out: Path, *extra: str) -> list[str]:
    return ["prepare", "clipart", str(out), "--openclipart", str(sources["openclipart"]), "--tuxpaint",
            str(sources["tuxpaint"]), "--emoji-google", str(sources["emoji_google"]), "--emoji-twitter",
            str(sources["emoji_twitter"]), "--heldout-fraction", "0.5", *extra]


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("clipart")
    manifest = prepare_clipart(out, heldout_fraction=0.5, workers=1, log=lambda _: None, **sources)
    return out, manifest


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def pairs(out: Path) -> dict[str, list[dict]]:
    """{"train": [json meta + png], "clipart_retrieval": [...], ...} read back from the tars."""
    train = [dict(json.loads(s["json"]), png=s["png"]) for shard in sorted((out / "train").glob("*.tar"))
             for s in read_tar(shard).values()]
    tests = {name: [{"caption": s["txt"].decode(), "png": s["png"]}
                    for s in read_tar(out / "wds" / name / "test" / "0.tar").values()]
             for name in ("clipart_retrieval", "emoji_retrieval")}
    return {"train": train, **tests}


def test_clean_title_rules():
    assert clean_title("Clipart by Nicu Buculei - pear") == ("pear", "")
    assert clean_title("arki_arrow_left") == ("arki arrow left", "")
    assert clean_title("Baden-W&uuml;rttemberg") == ("Baden Württemberg", "")
    assert clean_title("L&Atilde;&copy;zard") == ("Lézard", "")
    assert clean_title("Naval Semaphore Flag e") == ("Naval Semaphore Flag e", "")
    assert clean_title("Warning...") == ("Warning", "")
    for title, reason in [("fc01", "code"), ("BlueMan#101", "code"), ("HASH(0x8a41038)", "code"), ("1234", "code"),
                          ("img_0023", "file_name"), ("books-aj.svg", "file_name"), ("ralf@ark.in-berlin.de",
                          "file_name"), ("Secchio e spugna", "non_english"), ("direction à suivre", "non_english"),
                          ("", "no_title"), ("WC", "too_short")]:
        assert clean_title(title) == ("", reason), title
    assert caption_key("A Frog.") == caption_key("frog") == "frog"


def test_kept_and_dropped_with_reasons(built):
    out, manifest = built
    counts = manifest["counts"]
    reasons: dict[str, int] = {}
    for _, reason in DROPPED_OPENCLIPART.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    n_oc = len(KEPT_OPENCLIPART) + len(DROPPED_OPENCLIPART)
    assert counts["openclipart"] == {"found": n_oc, "kept": len(KEPT_OPENCLIPART), "dropped": dict(sorted(reasons.items()))}
    assert counts["tuxpaint"] == {"found": len(TUXPAINT), "kept": 10,
                                  "dropped": {"code": 1, "no_caption": 1, "too_short": 1}}
    for source in ("emoji-google", "emoji-twitter"):  # 9 emoji + 1 skin-tone variation
        assert counts[source] == {"found": 10, "kept": 7,
                                  "dropped": {"component": 1, "duplicate": 1, "skin_variation": 1}}
    got = pairs(out)
    captions = {p["caption"] for split in ("train", "clipart_retrieval") for p in got[split]
                if p.get("source", "openclipart") != "emoji-google"}
    kept_oc = {caption for *_, caption in KEPT_OPENCLIPART.values()}
    kept_tux = {"A frog", "A red car", "A hut", "A birthday cake", "A flower"}
    assert captions == kept_oc | kept_tux
    assert {p["caption"] for p in got["train"] if p["source"] == "emoji-google"} == EMOJI_CAPTIONS
    assert {p["caption"].splitlines()[0] for p in got["emoji_retrieval"]} == EMOJI_CAPTIONS
    # A test image lists the names of the identical images dropped in its place.
    assert "france flag\nclipperton island flag" in {p["caption"] for p in got["emoji_retrieval"]}
    by_caption = {p["caption"]: p for p in got["train"]}
    if "Robin" in by_caption:  # of the symlinked pair, the first by path is kept
        assert by_caption["Robin"]["origin"] == "animals/birds/robin.png"


def test_split_by_caption(built):
    out, manifest = built
    got = pairs(out)
    train = {caption_key(p["caption"]) for p in got["train"]}  # emoji names included
    test = {caption_key(p["caption"]) for p in got["clipart_retrieval"]}
    assert train and test and not train & test
    flowers = [p for split in ("train", "clipart_retrieval") for p in got[split] if p["caption"] == "A flower"]
    assert len(flowers) == 6  # all six in one split, none dropped as a set name
    assert manifest["splits"]["train"] == len(got["train"])
    assert manifest["splits"]["clipart_retrieval"] == len(got["clipart_retrieval"])


def test_a_drawing_named_like_a_training_emoji_is_never_held_out():
    """With almost every caption held out, "An ox" (the emoji "OX" trains) and only it stays in training."""
    def pair(source, caption, i):
        return Pair(source, f"x/{i}.png", caption, None, b"", f"{i:064x}")
    drawings = [pair("tuxpaint", c, i) for i, c in enumerate(["An ox", "A frog", "A hut", "A red car", "A kite"])]
    sets = split([*drawings, pair("emoji-google", "ox", 9)], seed=0, heldout_fraction=0.999)
    assert [p.caption for p in sets["clipart_retrieval"]] == ["A frog", "A hut", "A red car", "A kite"]
    assert sorted(p.caption for p in sets["train"]) == ["An ox", "ox"]


def test_images_cropped_square_on_white(built):
    out, _ = built
    by_caption = {p["caption"]: p for split in pairs(out).values() for p in split}
    page = np.asarray(Image.open(io.BytesIO(by_caption["Green Apple"]["png"])))
    assert page.shape == (128, 128, 3)
    rows, cols = np.flatnonzero((page < 128).all(axis=2).any(axis=1)), np.flatnonzero((page < 128).all(axis=2).any(axis=0))
    # The 60 px square of a 600 x 848 page fills the image less the margin, centred.
    assert rows[-1] - rows[0] >= 110 and cols[-1] - cols[0] >= 110
    assert abs(rows[0] - (127 - rows[-1])) <= 1 and abs(cols[0] - (127 - cols[-1])) <= 1
    robin = np.asarray(Image.open(io.BytesIO(by_caption["Robin"]["png"])))
    assert robin.shape == (128, 128, 3) and (robin[0, 0] == 255).all()  # transparent corner -> white


def test_layouts_read_back(built):
    wds = pytest.importorskip("webdataset")
    out, manifest = built
    retrieval = list(wds.WebDataset(str(out / "wds/emoji_retrieval/test/0.tar"), shardshuffle=False)
                     .decode("pil").to_tuple("png", "txt"))
    assert len(retrieval) == 7 and {t.splitlines()[0] for _, t in retrieval} == EMOJI_CAPTIONS
    assert all(image.size == (128, 128) and image.mode == "RGB" for image, _ in retrieval)
    assert (out / "wds/emoji_retrieval/dataset_type.txt").read_text().strip() == "retrieval"
    assert (out / "wds/clipart_retrieval/test/nshards.txt").read_text().strip() == "1"
    for name, n_classes in (("emoji_category", 9), ("clipart_category", len(manifest["classes"]["clipart_category"]))):
        root = out / "wds" / name
        classes = root.joinpath("classnames.txt").read_text().splitlines()
        assert len(classes) == n_classes and classes == manifest["classes"][name]
        assert all("{c}" in t for t in root.joinpath("zeroshot_classification_templates.txt").read_text().splitlines())
        for part in ("train", "test"):
            labels = [int(c) for c, in wds.WebDataset(str(root / part / "0.tar"), shardshuffle=False)
                      .to_tuple("cls")]
            assert len(labels) == manifest["splits"][name][part] and all(0 <= c < n_classes for c in labels)
    emoji_classes = manifest["classes"]["emoji_category"]
    emoji_test = [emoji_classes[int(c)] for c, in wds.WebDataset(str(out / "wds/emoji_category/test/0.tar"),
                                                                shardshuffle=False).to_tuple("cls")]
    # The Component is no class; the others keep emoji.json's category.
    assert sorted(emoji_test) == sorted(["smiley face", "animal or plant", "symbol", "flag", "person", "animal or plant",
                                         "flag"])
    stats = json.loads((out / "train/00000_stats.json").read_text())
    assert stats["count"] == stats["successes"] == manifest["splits"]["train"] and stats["failed_to_download"] == 0
    assert manifest["train_shards"] == "train/{00000..00000}.tar"
    sample = next(iter(read_tar(out / "train/00000.tar").values()))
    meta = json.loads(sample["json"])
    assert set(meta) == {"key", "caption", "source", "origin", "category"} and len(meta["key"]) == 9
    assert sample["txt"].decode() == meta["caption"]


def test_clip_benchmark_reads_the_sets(built):
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    out, _ = built
    data = builder.build_dataset("wds/emoji_category", root=str(out / "wds/emoji_category"),
                                 transform=lambda image: image, split="test", download=False)
    assert data.classes[0] == "smiley face" and len(list(data)) == 7
    data = builder.build_dataset("wds/clipart_retrieval", root=str(out / "wds/clipart_retrieval"),
                                 transform=lambda image: image, split="test", download=False, task="zeroshot_retrieval")
    assert all(isinstance(texts, list) and texts for _, texts in data)


def test_second_run_does_nothing(built, sources):
    out, manifest = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    said = []
    start = time.perf_counter()
    again = prepare_clipart(out, heldout_fraction=0.5, workers=1, log=said.append, **sources)
    assert time.perf_counter() - start < 5
    assert again == json.loads(json.dumps(manifest)) and "up to date" in said[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_cli_same_digest_other_dir_two_workers_then_refuse_and_force(built, sources, tmp_path, capsys):
    out_a, manifest_a = built
    out = tmp_path / "b"
    assert main(cli_args(sources, out, "--workers", "2")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["digest"] == manifest_a["digest"] and manifest["counts"] == manifest_a["counts"]
    assert (out / "train/00000.tar").read_bytes() == (out_a / "train/00000.tar").read_bytes()
    capsys.readouterr()
    assert main(cli_args(sources, out, "--image-size", "64")) == 1
    err = capsys.readouterr().err
    assert "image_size 128 -> 64" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "manifest.json").read_text())["options"]["image_size"] == 128  # untouched
    assert main(cli_args(sources, out, "--image-size", "64", "--force")) == 0
    assert json.loads((out / "manifest.json").read_text())["options"]["image_size"] == 64
    assert Image.open(io.BytesIO(pairs(out)["emoji_retrieval"][0]["png"])).size == (64, 64)


def test_missing_sources_one_message(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty_bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))  # no rsvg-convert either
    status = main(["prepare", "clipart", str(tmp_path / "out"), "--openclipart", str(tmp_path / "no_openclipart"),
                   "--tuxpaint", str(tmp_path / "no_stamps"), "--emoji-twitter", str(tmp_path / "none.tgz")])
    err = capsys.readouterr().err
    assert status == 1 and len(err.strip().splitlines()) == 1
    for command in ("apt-get install openclipart-png openclipart-svg", "apt-get install tuxpaint-stamps-default",
                    "apt-get install librsvg2-bin", "npm pack emoji-datasource-google emoji-datasource-twitter",
                    "--emoji-google not given", "none.tgz"):
        assert command in err
    assert not (tmp_path / "out").exists()  # checked before any work


@pytest.mark.skipif(not REAL_RSVG, reason="rsvg-convert (librsvg2-bin) is not installed")
def test_svg_stamp_rendered(built):
    out, _ = built
    cake = next(p for split in pairs(out).values() for p in split if p["caption"] == "A birthday cake")
    image = np.asarray(Image.open(io.BytesIO(cake["png"]))).astype(int)
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
    assert red.mean() > 0.5  # the red circle, cropped to fill the image
