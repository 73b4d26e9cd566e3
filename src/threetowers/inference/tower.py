"""One tower of a saved model as an embedder: what `threetowers embed` and `classify` run.

A `TowerEmbedder` has the two things h's per-shard store asks of h (`third/store.py`,
`ShardEmbeddings`): `info()`, its identity, and `embed(inputs)`. So stored embeddings of a trained
tower get the same build, resume and refusal rules as h's cache, and a file made by another model,
tower, dtype or precision is never mistaken for this one's: the fingerprint is a digest of the
model's files (weights and config; the tokenizer too for text) with the tower and the dtype.

Towers: `image` = `ThreeTowers.encode_image` (f for CLIP/3T, h through its head for LiT),
`text` = `encode_text` (g, or g_h for LiT), `third` = `encode_image_third` (h through h's head:
LiT's image side, or a 3T model's h pair; h is rebuilt from its source and checked by fingerprint).
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import torch

from ..core.formats import saved_dir
from ..core.sets import to_device
from ..data.tokenizer import load_tokenizer
from ..model.factory import load_model, read_model_meta, recorded_thirds
from ..model.three_towers import ThreeTowers
from ..schema import third_sections

TOWERS = ("image", "text", "third")
DTYPES = ("float16", "float32")
MODEL_HINT = ("give a run's model/ folder (e.g. runs/3t/model, written at the end of `threetowers train`) "
              "or one of its checkpoints/step_N/ folders")


def check_model_dir(model_dir: str | Path) -> tuple[Path, dict]:
    """(the saved model's folder, its model.json), or an error naming the folder and what to give."""
    directory = saved_dir(model_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {model_dir} does not exist; {MODEL_HINT}")
    if not (directory / "model.json").is_file():
        raise FileNotFoundError(f"MODEL_DIR {model_dir} is not a saved model (it has no model.json); {MODEL_HINT}")
    return directory, read_model_meta(directory)


def third_index(tower: str) -> int:
    """Which h a `third` tower is: `third` the first (0), `third.K` the K-th (K - 1), as h_K's names go."""
    return int(tower.split(".", 1)[1]) - 1 if tower.startswith("third.") else 0


def choose_tower(method: str, tower: str | None, texts: bool, num_thirds: int = 1) -> str:
    """The tower to run (default: image, or text with --texts); refuses combinations that mean nothing.
    `num_thirds`: the model's h's (`third.K` names the K-th of them)."""
    tower = tower or ("text" if texts else "image")
    several = re.fullmatch(r"third\.([1-9][0-9]*)", tower)
    if tower not in TOWERS and not several:
        raise ValueError(f"--tower {tower}: choose one of {', '.join(TOWERS)} (third.K: the K-th h of a model with several)")
    if several and method != "clip" and int(several[1]) > num_thirds:
        names = ", ".join(["third"] + [f"third.{k}" for k in range(2, num_thirds + 1)])
        raise ValueError(f"--tower {tower}: this model has {num_thirds} third tower(s) h; choose {names}")
    tower = "third" if tower == "third.1" else tower
    if texts and tower != "text":
        raise ValueError(f"--texts embeds captions with the text tower, but --tower {tower} embeds images; "
                         f"drop --tower {tower} (or drop --texts to embed images)")
    if not texts and tower == "text":
        raise ValueError("--tower text embeds captions: add --texts and give a text file with one caption a line")
    if tower.startswith("third") and method == "clip":
        raise ValueError("--tower third needs a model with a third tower h (model.method lit or 3t); this model is "
                         "clip: use --tower image")
    return tower


def file_digest(paths: list[Path]) -> str:
    """sha256 over the files' bytes, in order (read in 1 MiB blocks: a model of any size fits)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class TowerEmbedder:
    """A saved model's `tower` on `device`: L2-normalised embeddings of decoded images (float
    [B, 3, S, S] in [0, 1] at `input_size`) or of tokens, in fp32 or under bf16 autocast (`amp`)."""

    def __init__(self, model_dir: str | Path, tower: str, dtype: str = "float16", amp: bool = False,
                 device: torch.device | str = "cpu", model: ThreeTowers | None = None):
        """`model`: the model of `model_dir` already loaded (else loaded here, with h where the tower needs it)."""
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
        directory, meta = check_model_dir(model_dir)
        method = meta["config"]["model"]["method"]
        self.tower = tower = choose_tower(method, tower, tower == "text", len(recorded_thirds(meta)))
        k, is_third = third_index(tower), tower.startswith("third")
        files = [directory / "model.safetensors", directory / "model.json"]
        if tower == "text":
            files.append(directory / "tokenizer.json")
            if not files[-1].is_file():
                raise FileNotFoundError(f"{directory} has no tokenizer.json; its text tower cannot read captions "
                                        "without the tokenizer it was trained with")
        if model is None:
            model = load_model(directory, with_third=True if is_third else None)
        self.model = model.to(device).eval()
        cfg = self.model.cfg
        self.tokenizer = load_tokenizer(files[-1], cfg.model.text) if tower == "text" else None
        self.device, self.amp, self.dtype = torch.device(device), amp, dtype
        self.encode = {"image": self.model.encode_image, "text": self.model.encode_text}.get(
            tower, functools.partial(self.model.encode_image_third, k=k))
        # h's side: LiT's image and text towers, and a 3T model's h pairs, live in h's space (h_k's for third.K).
        in_h_space = is_third or method == "lit"
        uses_h = is_third or (tower == "image" and method == "lit")
        third = self.model.thirds[k] if self.model.third_infos else None
        self.input_size = third.preprocessing.input_size if uses_h else cfg.model.image.image_size
        if tower == "text":
            preprocessing = {"context_length": cfg.model.text.context_length}
        else:
            preprocessing = third.preprocessing.to_dict() if uses_h else {"input_size": self.input_size}
        self.files = files
        self.name = f"{method}/{tower}"
        self._info = {
            "name": self.name, "preprocessing": preprocessing,
            "dim": (third_sections(cfg.model)[k][1].head_dim or self.model.third_infos[k]["dim"]) if in_h_space
            else cfg.model.embed_dim,
            "precision": ("bf16-autocast" if amp else "fp32") + (f"+h-{third.precision}" if uses_h else ""),
        }

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the model's files with the tower and the dtype; read once, when first asked for."""
        return hashlib.sha256(f"{file_digest(self.files)}\0{self.tower}\0{self.dtype}".encode()).hexdigest()

    def info(self) -> dict:
        """The identity h's store records and checks (`third.store.third_identity`)."""
        return {**self._info, "fingerprint": self.fingerprint}

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """float32 [B, D] on the CPU, L2-normalised; non-finite output stops with the model named."""
        if self.tower != "text":
            # As uint8 [B, H, W, 3], the way the evaluation passes images: the same pixels to the bit (the
            # decoder's floats are k/255 up to rounding), and a quarter of the bytes to ship to a GPU.
            inputs = inputs.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.encode(to_device(inputs, self.device)).float().cpu()
        if not torch.isfinite(out).all():
            raise ValueError(f"the {self.name} tower gave non-finite embeddings (NaN or inf); check the model "
                             "(a run whose loss diverged?), or try without --amp")
        return out
