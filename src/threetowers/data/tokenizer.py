"""Caption tokenizer: a Hugging Face `tokenizers` BPE behind the project's token convention.

Convention (shared with the text tower): `LongTensor [B, context_length]`, pad id 0, every
sequence ends with the end-of-text token; a caption too long for the context is cut and keeps
the eot as its last token.

Our own tokenizer is a byte-level BPE over NFC-normalised, lower-cased text: byte-level so that
no caption ever maps to an unknown token, lower case because caption case carries little meaning
and a small vocabulary goes further without it. Its special tokens are `<pad>` (id 0) and
`<eot>` (id 1).

Any other `tokenizer.json` works too (`from_file`). Its own post-processing (BOS/CLS, padding,
truncation) is ignored; we append the eot and pad ourselves. A pretrained text encoder's tokenizer
(`own_specials=True`, for `model.text.kind=hf`) keeps its post-processing instead (BERT's
`[CLS] ... [SEP]`, whose `[SEP]` is then the eot) and must pad with id 0. If its id 0 is not a pad token,
every id is shifted up by one so that 0 stays free for padding (`vocab_size` includes the shift).
If it has no end-of-text token, `<eot>` is added to it (and saved with it).

CLIP's vocabulary (open_clip's default tokenizer, `data/clip_bpe.py`) has a real token at id 0 ("!")
that doubles as padding, and starts every sequence with `<|startoftext|>`. Its tokenizer.json says so
itself: its `padding` names id 0, a real token, as the pad token. Such a file is used as written: its
post-processor adds its start and end tokens, truncation keeps both, and ids are not shifted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from ..core.atomic import write_text_atomic

PAD, EOT = "<pad>", "<eot>"
# Names other tokenizers use for the same roles, recognised by `from_file`.
PAD_NAMES = (PAD, "[PAD]", "<|pad|>", "<|padding|>")
EOT_NAMES = (EOT, "<|endoftext|>", "</s>", "[SEP]", "<|eot_id|>")


class Tokenizer:
    """Texts -> `LongTensor [B, context_length]` (pad 0, eot last); counts truncations."""

    def __init__(self, hf: HFTokenizer, context_length: int, own_specials: bool = False) -> None:
        if context_length < 2:
            raise ValueError(f"context_length={context_length} must be >= 2 (at least one token plus the eot)")
        declared = hf.padding or {}
        # id 0 is a real token that the file itself declares as its padding (CLIP's "!"): use it as written
        self.zero_pads = declared.get("pad_id") == 0 and hf.id_to_token(0) not in PAD_NAMES
        hf.no_padding()
        hf.no_truncation()
        self.own_specials = own_specials = own_specials or self.zero_pads
        if own_specials:
            if hf.id_to_token(0) not in PAD_NAMES and not self.zero_pads:
                raise ValueError(f"this tokenizer's id 0 is {hf.id_to_token(0)!r}, not a padding token; a pretrained "
                                 "text encoder needs padding at id 0 (BERT-style vocabularies have [PAD] there)")
            # Its post-processor adds its special tokens; truncation leaves room for them.
            hf.enable_truncation(context_length)
        # A caption that literally contains "<eot>" or "<pad>" must not produce the special ids.
        hf.encode_special_tokens = True
        self.hf = hf
        self.context_length = context_length
        self.offset = 0 if own_specials or hf.id_to_token(0) in PAD_NAMES else 1
        eot = next((name for name in EOT_NAMES if hf.token_to_id(name) is not None), None)
        if eot is None:
            hf.add_special_tokens([EOT])
            eot = EOT
        self.eot_token = eot
        self.pad_id = 0
        self.eot_id = hf.token_to_id(eot) + self.offset
        self.truncated = 0  # cumulative number of texts cut to fit the context

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int, context_length: int) -> Tokenizer:
        """Byte-level BPE with `vocab_size` tokens (fewer if the corpus runs out of merges)."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 2:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                f"{len(alphabet) + 2} (256 bytes + <pad> + <eot>)"
            )
        hf = HFTokenizer(models.BPE())
        hf.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD, EOT],  # ids 0 and 1, in this order
            initial_alphabet=alphabet,
            show_progress=False,
        )
        hf.train_from_iterator(captions, trainer)
        return cls(hf, context_length)

    @classmethod
    def from_file(cls, path: str | Path, context_length: int, own_specials: bool = False) -> Tokenizer:
        """Load any Hugging Face `tokenizer.json` (see the module docstring for pad/eot handling)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {str(path)!r} does not exist (expected a Hugging Face tokenizer.json)")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{path} is not a valid Hugging Face tokenizer.json: {err}") from err
        return cls(hf, context_length, own_specials)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` atomically (temp file in the same folder, then rename)."""
        hf = self.hf
        if self.zero_pads:  # keep the declaration that id 0 doubles as padding, which `from_file` reads
            hf = HFTokenizer.from_str(hf.to_str())
            hf.enable_padding(pad_id=0, pad_token=hf.id_to_token(0))
        write_text_atomic(path, hf.to_str(pretty=True))

    # ------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        """Size of the embedding table a text tower needs for these ids."""
        return self.hf.get_vocab_size(with_added_tokens=True) + self.offset

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if self.own_specials:
            return self._encode_own(texts)
        room = self.context_length - 1  # the last slot is reserved for the eot
        rows = []
        for enc in self.hf.encode_batch(list(texts), add_special_tokens=False):
            ids = enc.ids
            if len(ids) > room:
                ids = ids[:room]
                self.truncated += 1
            if self.offset:
                ids = [i + self.offset for i in ids]
            rows.append(ids + [self.eot_id] + [self.pad_id] * (room - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.context_length)

    def _encode_own(self, texts: Sequence[str]) -> torch.Tensor:
        """With the tokenizer's own special tokens (truncated to the context by the tokenizer itself)."""
        rows = []
        for enc in self.hf.encode_batch(list(texts), add_special_tokens=True):
            self.truncated += bool(enc.overflowing)
            rows.append(enc.ids + [self.pad_id] * (self.context_length - len(enc.ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.context_length)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """One sequence of ids -> text; stops at the first eot and ignores padding."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        kept = []
        for i in ids:
            if i == self.eot_id:
                break
            if i != self.pad_id or self.zero_pads:
                kept.append(i - self.offset)
        return self.hf.decode(kept, skip_special_tokens=True).strip()

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        return [self.decode(row) for row in ids]

    def __setstate__(self, state: dict) -> None:
        # The flag is not part of the Rust tokenizer's serialised state (pickle, tokenizer.json).
        self.__dict__.update({"own_specials": False, "zero_pads": False, **state})
        self.hf.encode_special_tokens = True

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"eot={self.eot_token!r}, offset={self.offset}, own_specials={self.own_specials}, zero_pads={self.zero_pads})"
        )


def load_tokenizer(path: str | Path, text_cfg) -> Tokenizer:
    """The tokenizer.json at `path` as the text tower `text_cfg` (a TextTowerConfig) reads it."""
    return Tokenizer.from_file(path, text_cfg.context_length, own_specials=text_cfg.kind == "hf")
