"""The house: layers read from the code's own imports, one owner per concept, the public face,
and h's registry (plugins are accepted everywhere) and its single build."""

import ast
from pathlib import Path

import pytest
import torch

import threetowers
from conftest import TINY
from threetowers.config import ConfigError, load_config
from threetowers.third import FrozenImageModel, Preprocessing, register_source, source_names
from threetowers.third import registry
from threetowers.towers.vit import VisionTransformer

PACKAGE = Path(threetowers.__file__).parent
# Lower layers never import higher ones; a layer's packages may import each other only within themselves.
LAYERS = [["core"], ["schema"], ["towers"], ["third"], ["config"], ["model", "world", "clipart"], ["data"], ["eval"],
          ["training", "interop", "inference"], ["__init__"], ["apps"], ["__main__"]]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# Imports inside functions keep these optional dependencies optional; nothing else may hide there.
OPTIONAL = {"efficientnet_lite_pytorch", "clip_benchmark", "open_clip", "transformers"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported threetowers module, inside a function?) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, inside))
                # `from . import sources` imports a module too
                found.extend((f"{target}.{a.name}", inside) for a in child.names if f"{target}.{a.name}" in MODULES)
            elif isinstance(child, ast.Import):
                found.extend((a.name, inside) for a in child.names)
            visit(child, inside)

    visit(tree, False)
    return found


MODULES = modules()


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_import_goes_down_the_layers_and_none_makes_a_cycle():
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for target, _ in imports(name, path):
            if target.split(".")[0] != "threetowers" or target not in MODULES or target == name:
                continue
            graph.setdefault(name, set()).add(target)
            mine, theirs = layer(name), layer(target)
            assert mine in RANK, f"{name}: package {mine} has no place in LAYERS"
            assert RANK[theirs] < RANK[mine] or mine == theirs, f"{name} imports {target}: upwards or sideways"
    # No cycle among modules (a package's __init__ importing its own modules is not one).
    state: dict[str, int] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if node.startswith(nxt + ".") or nxt.startswith(node + ".") and MODULES[node].name == "__init__.py":
                continue  # package face <-> its own submodules
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, nxt]))
            if not state.get(nxt):
                walk(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            walk(node, [])


def test_imports_inside_functions_only_keep_optional_dependencies_optional():
    hidden = [f"{name}: {target}" for name, path in MODULES.items() for target, inside in imports(name, path)
              if inside and target.split(".")[0] not in OPTIONAL]
    assert hidden == []


def test_no_module_is_longer_than_450_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 450}
    assert long == {}


def test_the_public_face_holds_the_library():
    for name in threetowers.__all__:
        assert getattr(threetowers, name) is not None, name
    assert callable(threetowers.train) and callable(threetowers.evaluate) and callable(threetowers.create_model)
    # The training package is not shadowed by the `train` function.
    import threetowers.training.trainer as trainer

    assert trainer.run is not None


# ----------------------------------------------------------------------------- h: one registry, built once


class Calls:
    n = 0
    seed = 7


@pytest.fixture
def plugin(monkeypatch):
    """A source registered the way a user's plugin does it, removed again after the test."""
    Calls.n, Calls.seed = 0, 7
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))

    @register_source("test_plugin_h")
    def make(cfg) -> FrozenImageModel:
        """A tiny ViT standing in for a user's pretrained model."""
        Calls.n += 1
        with torch.random.fork_rng():
            torch.manual_seed(Calls.seed)
            module = VisionTransformer(image_size=16, patch_size=4, width=24, depth=1, heads=2)
        return FrozenImageModel(module, 24, Preprocessing(16), "plugin-h")

    return make


def test_a_plugin_source_is_accepted_by_validation_and_listed(plugin):
    assert "test_plugin_h" in source_names() and "test_plugin_h" in threetowers.list_sources()
    cfg = load_config(None, TINY + ["model.method=lit", "model.third.source=test_plugin_h"])
    assert cfg.model.third.source == "test_plugin_h"
    with pytest.raises(ConfigError, match="model.third.source='nope'.*test_plugin_h"):
        load_config(None, TINY + ["model.method=lit", "model.third.source=nope"])


def test_the_builtin_sources_are_registered_before_anyone_reads_the_registry():
    assert {"checkpoint", "timm", "torchvision", "efficientnet_lite0", "callable"} <= set(source_names())


def test_create_model_builds_h_once_and_load_model_refuses_another_h(plugin, tmp_path):
    cfg = load_config(None, TINY + ["model.method=3t", "model.third.source=test_plugin_h"])
    model = threetowers.create_model(cfg)
    assert Calls.n == 1 and model.third is not None and not any(p.requires_grad for p in model.third.parameters())
    threetowers.save_model(model, tmp_path / "m")
    loaded = threetowers.load_model(tmp_path / "m", with_third=True)
    assert Calls.n == 2 and loaded.third.fingerprint == model.third.fingerprint
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(loaded.encode_image(images), model.eval().encode_image(images))
    Calls.seed = 8  # the source now gives other weights: the saved model must not pair with them
    with pytest.raises(ValueError, match="trained with third tower plugin-h"):
        threetowers.load_model(tmp_path / "m", with_third=True)
    assert threetowers.load_model(tmp_path / "m").third is None  # f and g alone need no h


def test_training_builds_h_once(plugin, tmp_path):
    result = threetowers.train(None, TINY + [
        "model.method=lit", "model.third.source=test_plugin_h", f"train.output_dir={tmp_path / 'run'}",
        "train.steps=2", "train.batch_size=16", "train.progress=false", "data.world.num_pairs=64", "model.text.vocab_size=300",
        "data.world.image_size=24", f"data.world.cache_dir={tmp_path / 'world'}", f"data.cache_dir={tmp_path / 'c'}",
        "eval.tasks=[zeroshot_object]", "eval.num_images=32", "train.threads=1", "eval.mixing_alphas=[]"])
    assert Calls.n == 1 and "eval/zeroshot_object/top1" in result.metrics
