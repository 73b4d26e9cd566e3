"""Real image-text pairs: webdataset tar shards and CSV/TSV files, read the same way.

`build_pairs_dataset` makes a dataset from `DataConfig`: `ShardPairs` (data/shards.py) or
`CsvPairs` (data/csv_pairs.py); `load_csv_arrays` (a CSV decoded once into arrays) and
`stream_captions` (captions for the tokenizer) serve the step-indexed training data of
`threetowers.data.loader`, which also holds `StreamTrainData` for shards.

Every reader yields samples `{"image": float [3, S, S] in [0, 1], "caption": str, "key": str,
"bad_counts": ...}` made by the same `decode_rgb` + `image_transform`; `collate` batches them.
Captions stay text here; the training data (`data.loader`) tokenizes them.

Bad samples are skipped, never used, and counted by reason in a `BadSampleCounter`; each sample
gets one reason, the cheapest check first (image member present, caption, then image decode).
Reasons: missing_image, missing_caption, empty_caption, bad_text_encoding, unreadable_file,
corrupt_image, truncated_image, too_large, bad_aspect, unsupported_mode, unreadable_shard (a shard
that cannot be opened or read), truncated_shard (a local .tar that does not end with tar's
end-of-archive blocks: it was cut short, and what followed the cut is lost; its readable samples are
still used). A shard is counted once per visit, however many errors reading it raises.
Past `max_bad_fraction` (once `min_seen` samples were seen) reading stops with `BadDataError`,
which names example samples and their reasons.
"""

from __future__ import annotations

from ..schema import DataConfig
from .csv_pairs import CsvPairs
from .shards import ShardPairs


# ----------------------------------------------------------------------------- from config


def build_pairs_dataset(
    cfg: DataConfig, image_size: int, *, seed: int = 0, rank: int | None = None, world_size: int | None = None
) -> ShardPairs | CsvPairs:
    """`DataConfig` -> a dataset of real pairs; its `.counter` holds the bad-sample counts."""
    common = dict(augment=cfg.augment, max_bad_fraction=cfg.max_bad_fraction)
    if cfg.source == "webdataset":
        return ShardPairs(
            cfg.path, image_size, resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer,
            seed=seed, rank=rank, world_size=world_size, **common,
        )
    if cfg.source == "csv":
        columns = dict(image_column=cfg.image_column, caption_column=cfg.caption_column)
        return CsvPairs(cfg.path, image_size, **columns, **common)
    raise ValueError(f"data.source={cfg.source!r}: build_pairs_dataset reads webdataset | csv (the world has its own)")


