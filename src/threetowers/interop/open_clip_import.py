"""Import an open_clip model: a threetowers model whose f, g, projections and temperature start from
it, with the tokenizer it was trained with. The Python face of `model.init_from` (which `train` applies
to a new run); the mapping itself, shared with the export, is `towers/open_clip_arch.py`, the loading
`model/open_clip_init.py`.

    model, tokenizer = import_open_clip("local-dir:exported/3t")          # a `threetowers export` folder
    model, tokenizer = import_open_clip("weights.pt", "ViT-B-32")         # an open_clip state dict + its config
"""

from __future__ import annotations

from omegaconf import OmegaConf

from ..config import load_config, override_layer
from ..data.clip_bpe import open_clip_tokenizer
from ..data.tokenizer import Tokenizer
from ..model.factory import create_model
from ..model.open_clip_init import init_from_open_clip
from ..model.three_towers import ThreeTowers


def import_open_clip(init_from: str, init_config: str = "", overrides: list[str] | None = None,
                     third=None) -> tuple[ThreeTowers, Tokenizer]:
    """(model in eval mode, tokenizer) for the open_clip model `init_from` (local-dir:PATH, or a weights
    file whose architecture `init_config` names: an open_clip model name or a model_cfg JSON file).
    A CLIP model unless `overrides` say otherwise (e.g. model.method=3t with its model.third.* settings;
    `third`: a built h). Its embeddings are open_clip's to float rounding (tests/test_open_clip_import.py)."""
    layer = OmegaConf.merge(override_layer(overrides or []),
                            {"model": {"init_from": init_from, "init_config": init_config}})
    cfg = load_config(None, OmegaConf.to_container(layer))
    tokenizer = open_clip_tokenizer(cfg.model)
    cfg.model.text.vocab_size = tokenizer.vocab_size  # as `train` sets it: the embedding table the tokenizer needs
    model = create_model(cfg, third=third)
    init_from_open_clip(model)
    return model.eval(), tokenizer
