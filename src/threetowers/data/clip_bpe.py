"""The tokenizer of an open_clip model (`model.init_from`), and CLIP's BPE rebuilt with Hugging Face
`tokenizers` from the vocabulary file the installed open_clip ships.

CLIP's BPE (open_clip's default `SimpleTokenizer`, OpenAI's): text lower-cased with runs of whitespace
collapsed, split by CLIP's regular expression into words, numbers (one digit a piece) and punctuation
runs, each piece byte-encoded and merged by the BPE with `</w>` marking a word's end; every sequence is
`<|startoftext|> ... <|endoftext|>`, cut to the context with the end token kept last, padded with id 0
(which is also the token "!"). Its ids equal open_clip's (tests/test_open_clip_import.py), except that
open_clip first cleans text with ftfy and html.unescape: mojibake, HTML entities, ligatures and
full-width forms are not repaired here (curly quotes are straightened, as ftfy does).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..schema import ConfigError, ModelConfig
from ..towers.open_clip_arch import LOCAL_DIR, TEXT_DEFAULTS, read_open_clip_config
from .tokenizer import Tokenizer

SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # open_clip calls them <start_of_text>, <end_of_text>: the same ids
# CLIP's pre-tokenizer pattern (open_clip/tokenizer.py SimpleTokenizer.pat, without its special tokens)
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# ftfy's uncurl_quotes (ftfy.chardata SINGLE_QUOTE_RE / DOUBLE_QUOTE_RE), part of open_clip's cleaning
SINGLE_QUOTES, DOUBLE_QUOTES = "[\u02bc\u2018-\u201b]", "[\u201c-\u201f]"


def default_bpe_file() -> Path:
    """The BPE merges file open_clip tokenizes with by default (shipped inside the open_clip package)."""
    try:
        from open_clip.tokenizer import default_bpe
    except ImportError:
        raise ConfigError("CLIP's tokenizer is built from the vocabulary file open_clip ships: "
                          "pip install open-clip-torch") from None
    return Path(default_bpe())


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of the 256 bytes onto printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clip_bpe_tokenizer(context_length: int = 77, bpe_file: str | Path | None = None) -> Tokenizer:
    """CLIP's BPE tokenizer (49,408 ids: 256 bytes, the same with `</w>`, 48,894 merges, start and end)."""
    lines = gzip.open(bpe_file or default_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # as open_clip reads the file
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, end_of_word_suffix="</w>"))
    hf.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(SINGLE_QUOTES), "'"), normalizers.Replace(Regex(DOUBLE_QUOTES), '"'),
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),  # keep the matches, drop the rest
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (SOT, EOT)])
    hf.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, len(tokens) - 2), (EOT, len(tokens) - 1)])
    hf.enable_padding(pad_id=0, pad_token=tokens[0])  # declares that id 0 ("!") doubles as padding
    return Tokenizer(hf, context_length)


def open_clip_tokenizer(model: ModelConfig) -> Tokenizer:
    """The tokenizer the open_clip model `model.init_from` was trained with, as open_clip picks it: a
    local-dir's tokenizer.json when its text_cfg names a Hugging Face tokenizer, else CLIP's BPE. Refuses
    one whose end-of-text token is not the one the text tower pools."""
    model_cfg, _, where = read_open_clip_config(model.init_from, model.init_config)
    text = {**TEXT_DEFAULTS, **model_cfg["text_cfg"]}
    if text.get("hf_tokenizer_name"):  # read_open_clip_config allows this for a local-dir only
        tokenizer = Tokenizer.from_file(Path(model.init_from[len(LOCAL_DIR):]) / "tokenizer.json", model.text.context_length)
    else:
        tokenizer = clip_bpe_tokenizer(model.text.context_length)
    if text["pool_type"] == "argmax" and tokenizer.eot_id != tokenizer.vocab_size - 1:
        raise ConfigError(f"{where}: its text tower pools the highest id (pool_type=argmax), which in its tokenizer "
                          f"is not the end-of-text token ({tokenizer.eot_id} of {tokenizer.vocab_size} ids)")
    if text["pool_type"] == "eos" and text["eos_id"] != tokenizer.eot_id:
        raise ConfigError(f"{where}: text_cfg.eos_id={text['eos_id']}, but its tokenizer's end-of-text token is "
                          f"{tokenizer.eot_id}")
    return tokenizer
