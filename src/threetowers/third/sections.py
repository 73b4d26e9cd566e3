"""The settings of the third towers a config names: model.third (one h) or model.thirds (K h's), and the
3T term weights that go with them, checked before any work starts (`config.validate` calls this).

What the settings mean (which sections, which weights) is `schema.third_sections` and
`schema.loss_weights`; two h's built from different settings that turn out to be one h (the same
weights fingerprint) are refused when they are built (`model/factory.build_thirds`).
"""

from __future__ import annotations

import math

from ..schema import Config, ConfigError, ThirdTowerConfig, third_sections
from .registry import source_names

# Each h's section (model.third, or every entry of model.thirds): its fields' choices.
_THIRD_CHOICES = {"heads": ("none", "shared", "per_term"), "precision": ("auto", "fp32", "bf16")}
# What makes two sections the same h before anything is built.
_THIRD_SAME = ("source", "name", "path", "input_size", "precision")


def validate_thirds(cfg: Config) -> None:
    """The third towers (model.third, or the list model.thirds) and the 3T term weights, one per term."""
    m = cfg.model
    if m.thirds is not None:
        if not m.thirds:
            raise ConfigError("model.thirds=[] lists no third tower; give at least one section (source, path, ...), "
                              "or leave model.thirds unset to use model.third")
        if m.third != ThirdTowerConfig():
            raise ConfigError("model.third and model.thirds are both set; list every h in model.thirds and leave "
                              "model.third unset (set in one place, no h setting can be silently ignored)")
    sections = third_sections(m)
    if m.method == "clip":
        if m.thirds is not None or m.third.source != "none" or m.third.heads != "none":
            raise ConfigError(
                "model.method=clip uses no third tower, but "
                + (f"model.thirds lists {len(m.thirds)}" if m.thirds is not None else
                   f"model.third.source={m.third.source!r}, model.third.heads={m.third.heads!r}")
                + "; use method=lit or 3t, or set model.third.source=none")
    if m.method == "lit" and len(sections) > 1:
        raise ConfigError(f"model.method=lit takes one third tower (h is its image side), but model.thirds lists "
                          f"{len(sections)}; several h's are for model.method=3t")
    sources = ("none", *source_names())  # the registry: plugins included
    seen: dict[tuple, str] = {}
    for where, t in sections:
        if t.source not in sources:
            raise ConfigError(f"{where}.source={t.source!r} is not allowed; choose one of {', '.join(sources)}")
        for key, allowed in _THIRD_CHOICES.items():
            if getattr(t, key) not in allowed:
                raise ConfigError(f"{where}.{key}={getattr(t, key)!r} is not allowed; choose one of {', '.join(allowed)}")
        for key in ("head_dim", "input_size"):
            if getattr(t, key) < 0:
                raise ConfigError(f"{where}.{key}={getattr(t, key)} must be >= 0 (0: h's own)")
        if t.source == "none":
            raise ConfigError(f"model.method={m.method} needs a frozen pretrained image model: set {where}.source "
                              f"({' | '.join(source_names())})")
        if m.method == "lit" and t.heads == "per_term":
            raise ConfigError(f"model.method=lit has one term; {where}.heads must be none or shared")
        same = tuple(getattr(t, key) for key in _THIRD_SAME)
        if same in seen:
            raise ConfigError(f"{seen[same]} and {where} are the same h ({', '.join(f'{k}={v!r}' for k, v in zip(_THIRD_SAME, same) if v)}); "
                              "each h of model.thirds must differ in its model or preprocessing")
        seen[same] = where
    weights = list(cfg.loss.weights) if cfg.loss.weights is not None else None
    if weights is None:
        return
    # LiT and CLIP have one term of weight 1 (their weights are read by nothing): three, as for one h.
    k = len(sections) if m.method == "3t" else 1
    names = ["fg"] + [f"{side}h{'' if i == 0 else f'.{i + 1}'}" for i in range(k) for side in "fg"]
    if len(weights) != len(names) or not all(math.isfinite(w) and w >= 0 for w in weights):
        count = {3: "three", 5: "five"}.get(len(names), str(len(names)))
        with_k = "one third tower" if k == 1 else f"the {k} third towers of model.thirds"
        raise ConfigError(f"loss.weights={weights} must be {count} non-negative numbers ({', '.join(names)}) for "
                          f"{with_k}, or unset for the default (1/3 for fg, the h terms sharing 2/3)")
    if m.method == "3t" and not sum(weights) > 0:
        raise ConfigError(f"loss.weights={weights}: with every weight 0, 3T has no loss to train on; give at "
                          "least one term a positive weight")
