import json
import pickle
import random
import time

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from conftest import TINY
from threetowers.apps.cli import main
from threetowers.config import load_config
from threetowers.data.tokenizer import Tokenizer
from threetowers.third.classifier import Classifier, save_classifier

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "ring", "arrow"]
PLACES = ["on stripes", "left of a star", "right of a ring", "on a checker background", "above the dots"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"A {rng.choice(COLOURS)} {rng.choice(SHAPES)} {rng.choice(PLACES)}, next to a {rng.choice(COLOURS)} one."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(captions(500), vocab_size=400, context_length=16)


def test_special_ids_and_vocab(tok):
    assert tok.pad_id == 0 and tok.eot_id == 1
    assert tok.hf.id_to_token(0) == "<pad>" and tok.hf.id_to_token(1) == "<eot>"
    assert 258 < tok.vocab_size <= 400


def test_round_trip_lowercases(tok):
    text = "A Purple Heart left of a star, next to a Green one."
    ids = tok([text])[0]
    assert tok.decode(ids) == text.lower()
    # Unseen words and non-ASCII still round-trip: byte-level BPE has no unknown token.
    before = tok.truncated
    assert tok.decode(tok(["Über 🦓"])[0]) == "über 🦓"
    assert tok.truncated == before


def test_padding_eot_and_truncation_count(tok):
    short, long_ = "a red circle", " ".join(["a blue star"] * 20)
    before = tok.truncated
    out = tok([short, long_, short])
    assert out.dtype == torch.long and out.shape == (3, 16)
    n = len(tok.hf.encode(short, add_special_tokens=False).ids)
    assert out[0, n].item() == tok.eot_id
    assert out[0, :n].ne(0).all() and out[0, n + 1 :].eq(0).all()
    assert out[1, -1].item() == tok.eot_id and out[1].ne(0).all()  # cut, eot kept as the last token
    assert torch.equal(out[0], out[2])
    assert tok.truncated == before + 1
    tok([long_, long_])
    assert tok.truncated == before + 3  # cumulative
    # A caption that spells a special token does not produce its id.
    for t in (tok, pickle.loads(pickle.dumps(tok))):  # also in a DataLoader worker or a checkpoint
        spelled = t(["<eot> <pad>"])[0]
        n = int(spelled.ne(0).sum())
        assert spelled[: n - 1].ne(tok.eot_id).all() and spelled[n - 1].item() == tok.eot_id


def test_save_load_identical(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    json.loads(path.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    again = Tokenizer.from_file(path, context_length=16)
    texts = captions(50, seed=1)
    assert torch.equal(tok(texts), again(texts))
    assert again.vocab_size == tok.vocab_size and again.eot_id == tok.eot_id


def test_foreign_tokenizer_without_pad_or_eot(tmp_path):
    hf = HFTokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(captions(200), trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    path = tmp_path / "foreign.json"
    hf.save(str(path))
    tok = Tokenizer.from_file(path, context_length=12)
    assert tok.offset == 1  # id 0 is [UNK] there, so ids move up by one and 0 stays the pad
    assert tok.eot_token == "<eot>" and tok.hf.token_to_id("<eot>") == hf.get_vocab_size()
    assert tok.vocab_size == hf.get_vocab_size() + 2
    out = tok(["A red circle"])
    raw = hf.encode("A red circle").ids
    assert out[0, : len(raw)].tolist() == [i + 1 for i in raw]
    assert out[0, len(raw)].item() == tok.eot_id and out[0, len(raw) + 1 :].eq(0).all()
    assert out.max().item() < tok.vocab_size
    assert tok.decode(out[0]) == "A red circle"


def test_foreign_tokenizer_with_its_own_specials(tmp_path):
    hf = HFTokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[SEP]": 2, "red": 3, "star": 4}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["[PAD]", "[SEP]"])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = Tokenizer.from_file(path, context_length=5)
    assert (tok.offset, tok.eot_id, tok.vocab_size) == (0, 2, 5)
    assert tok(["red star red star red"]).tolist() == [[3, 4, 3, 4, 2]]
    assert tok.truncated == 1


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["a b"], vocab_size=100, context_length=8)
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer.train(["a b"], vocab_size=300, context_length=1)
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json", 8)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid"):
        Tokenizer.from_file(tmp_path / "bad.json", 8)


def test_training_on_20k_captions_is_fast():
    corpus = captions(20_000, seed=2)
    start = time.perf_counter()
    tok = Tokenizer.train(corpus, vocab_size=2048, context_length=32)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"training took {elapsed:.2f}s"
    assert tok(corpus[:256]).shape == (256, 32)


def test_the_cache_command_leaves_a_runs_tokenizer_alone(tmp_path, monkeypatch, capsys):
    """Issue #24: `threetowers cache` on other data replaced an existing run's tokenizer.json."""
    monkeypatch.setenv("THREETOWERS_CACHE", str(tmp_path / "world"))
    save_classifier(Classifier(load_config(None, TINY).model.image, 3), tmp_path / "h", ["a", "b", "c"])
    run = tmp_path / "runs" / "3t"
    run.mkdir(parents=True)
    Tokenizer.train(captions(200, seed=5), 300, 16).save(run / "tokenizer.json")  # the run's: other data
    before = (run / "tokenizer.json").read_bytes()
    cache = ["cache", "tiny", "model.method=3t", "model.third.source=checkpoint", f"model.third.path={tmp_path / 'h'}",
             "train.device=cpu", "train.threads=1", "data.world.num_pairs=64"]
    assert main([*cache, f"train.output_dir={run}"]) == 0
    assert "64 embeddings of" in capsys.readouterr().out
    assert (run / "tokenizer.json").read_bytes() == before and [p.name for p in run.iterdir()] == ["tokenizer.json"]
    assert any((tmp_path / "runs" / "cache").rglob("manifest.json"))  # where `train` looks: <output_dir>/../cache
    fresh = tmp_path / "runs" / "fresh"  # no tokenizer yet: the one trained is kept for `train`, as before
    assert main([*cache, f"train.output_dir={fresh}"]) == 0
    assert (fresh / "tokenizer.json").is_file()
