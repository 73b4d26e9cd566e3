"""Using a trained model: a tower's embeddings of one's own data, stored part by part (`embed`), and
zero-shot classification of one's own images over one's own labels (`classify`)."""

from .classification import Classified, classify, parse_labels, read_templates, write_csv
from .embedding import EmbedResult, embed, load_embeddings
from .tower import TOWERS, TowerEmbedder

__all__ = ["Classified", "EmbedResult", "TOWERS", "TowerEmbedder", "classify", "embed", "load_embeddings",
           "parse_labels", "read_templates", "write_csv"]
