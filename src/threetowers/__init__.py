"""threetowers: contrastive vision-language training with pretrained image models (CLIP, LiT, 3T).

The public face: everything a user (or the `threetowers` command, or a benchmark) needs.

    import threetowers as tt
    result = tt.train("3t", ["model.third.source=efficientnet_lite0", "train.steps=300"])
    model = tt.load_model(result.model_dir)
    scores = tt.evaluate(result.model_dir, tasks=["zeroshot_object", "retrieval"])
    tt.export_open_clip(result.model_dir, "exported")  # open_clip.create_model_and_transforms("local-dir:exported")
    model, tokenizer = tt.import_open_clip("local-dir:exported")  # and back (or a state dict + its open_clip config)
    tt.embed(result.model_dir, "my_images/", "embeddings/")  # then keys, emb = tt.load_embeddings("embeddings/")
"""

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config, resolve_config
from .core.preemption import Preempted
from .eval.suite import evaluate as evaluate_tasks
from .eval.tasks import build_tasks, run_tasks
from .eval.tasks import evaluate_saved as evaluate
from .inference import classify, embed, load_embeddings
from .interop.open_clip_export import UnsupportedExport, check_parity, export_open_clip
from .interop.open_clip_import import import_open_clip
from .model.factory import create_model, load_model, save_model
from .model.three_towers import ThreeTowers
from .third import FrozenImageModel, Preprocessing, ThirdTower, list_sources, load_third_tower, register_source
from .training.contrastive import train
from .training.pretrain import pretrain
from .training.trainer import EvaluationFailed, TrainingStopped, TrainResult

__all__ = [
    "Config", "ConfigError", "EvaluationFailed", "FrozenImageModel", "Preempted", "Preprocessing", "ThirdTower", "ThreeTowers",
    "TrainResult", "TrainingStopped", "UnsupportedExport", "__version__", "build_tasks", "check_parity",
    "classify", "create_model", "embed", "evaluate", "evaluate_tasks", "export_open_clip", "import_open_clip", "list_sources", "load_config", "load_embeddings", "load_model", "load_third_tower", "pretrain", "register_source",
    "resolve_config", "run_tasks", "save_model", "train",
]
