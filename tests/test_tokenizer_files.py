"""GPT-2 file formats: our vocab.json / merges.txt load in HF ``tokenizers`` and tiktoken and give
our ids; malformed files give one error naming the file and line.

The tokenizer is trained here with ``train_bpe`` on a generated corpus (no shared files).
"""

from __future__ import annotations

import json

import pytest
import tiktoken
import tiktoken.load
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers
from tokenizers.implementations import ByteLevelBPETokenizer

from cs336.tokenizer import Tokenizer, train_bpe
from cs336.tokenizer.gpt2_files import (
    TokenizerFileError,
    bytes_to_unicode,
    load_tokenizer_dir,
    load_vocab_merges,
    save_tokenizer_dir,
    save_vocab_merges,
    str_to_token,
    token_to_str,
    tokenizer_hash,
)
from cs336.tokenizer.pretokenize import GPT2_PATTERN

EOT = "<|endoftext|>"
BASE = (
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 1,234 foxes!\n"
    "Der Fuchs springt über den faulen Hund. Größe, Straße.\n"
    "狐狸跳过了懒狗。 Emoji 🦊🐕 and tabs\tand  double  spaces.\n\n"
)
TEXTS = [
    "Hello, world!",
    "The quick brown fox's friends   jumped\n\n over 3.14 dogs 🦊",
    BASE,
    "  leading spaces and trailing  \n",
    "ünïcödé 東京 \u00a0 nbsp",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(vocab, merges) trained with and without the special token, saved to directories."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    corpus.write_text((BASE + EOT) * 40 + BASE.upper() * 10, encoding="utf-8")
    out = {}
    for name, specials in (("plain", []), ("special", [EOT])):
        vocab, merges = train_bpe(corpus, 420, specials)
        directory = root / name
        save_tokenizer_dir(directory, vocab, merges, specials)
        out[name] = (vocab, merges, specials, directory)
    return out


def test_byte_map_is_gpt2s():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā"
    assert all(not c.isspace() and c.isprintable() for c in table.values())
    token = bytes(range(256))
    assert str_to_token(token_to_str(token)) == token


@pytest.mark.parametrize("name", ["plain", "special"])
def test_save_load_roundtrip(trained, name):
    vocab, merges, specials, directory = trained[name]
    loaded_vocab, loaded_merges, loaded_specials = load_tokenizer_dir(directory)
    assert loaded_vocab == vocab
    assert loaded_merges == merges
    assert loaded_specials == specials
    text = (directory / "merges.txt").read_text(encoding="utf-8")
    assert text.startswith("#version: 0.2\n") and text.count("\n") == len(merges) + 1


def test_hf_tokenizers_loads_our_files(trained):
    vocab, merges, _, directory = trained["plain"]
    ours = Tokenizer(vocab, merges)
    hf = HFTokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    bl = ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf.encode(text).ids == ids
        assert bl.encode(text).ids == ids
        assert hf.decode(ids) == text


def test_hf_tokenizers_with_special_token(trained):
    vocab, merges, specials, directory = trained["special"]
    ours = Tokenizer(vocab, merges, specials)
    hf = HFTokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens([EOT])
    for text in TEXTS:
        joined = text + EOT + text
        assert hf.encode(joined).ids == ours.encode(joined)


def test_tiktoken_gpt2_loader_reads_our_files(trained):
    # tiktoken's own GPT-2 (data gym) reader; it checks vocab.json against merges.txt.
    vocab, merges, _, directory = trained["plain"]
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(directory / "merges.txt"), str(directory / "vocab.json"), clobber_one_byte_tokens=True
    )
    assert ranks == {token: idx for idx, token in vocab.items()}
    enc = tiktoken.Encoding("ours", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    ours = Tokenizer.from_files(directory / "vocab.json", directory / "merges.txt")
    for text in TEXTS:
        assert enc.encode_ordinary(text) == ours.encode(text)


def test_tiktoken_from_our_files_with_special_token(trained):
    _, _, specials, directory = trained["special"]
    raw = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    ranks = {str_to_token(k): v for k, v in raw.items() if k != EOT}
    enc = tiktoken.Encoding("ours", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: raw[EOT]})
    ours = Tokenizer.from_files(directory / "vocab.json", directory / "merges.txt", specials)
    for text in TEXTS:
        joined = EOT + text + EOT + EOT + text
        assert enc.encode(joined, allowed_special={EOT}) == ours.encode(joined)


def test_tokenizer_hash_tracks_content(trained, tmp_path):
    vocab, merges, specials, directory = trained["special"]
    copy = tmp_path / "copy"
    save_tokenizer_dir(copy, vocab, merges, specials)
    assert tokenizer_hash(copy) == tokenizer_hash(directory)
    save_tokenizer_dir(copy, vocab, merges[:-1], specials)
    assert tokenizer_hash(copy) != tokenizer_hash(directory)


def test_save_is_atomic_and_rejects_duplicate_tokens(tmp_path):
    vocab = {b: bytes([b]) for b in range(256)}
    save_vocab_merges(vocab, [], tmp_path / "vocab.json", tmp_path / "merges.txt")
    before = (tmp_path / "vocab.json").read_bytes()
    with pytest.raises(ValueError, match="same bytes"):
        save_vocab_merges({**vocab, 256: b"a"}, [], tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert (tmp_path / "vocab.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]


def _write_pair(tmp_path, vocab_text: str, merges_text: str):
    (tmp_path / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (tmp_path / "merges.txt").write_text(merges_text, encoding="utf-8")
    return tmp_path / "vocab.json", tmp_path / "merges.txt"


def _byte_vocab(extra: dict[str, int] | None = None) -> str:
    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    vocab.update(extra or {})
    return json.dumps(vocab, ensure_ascii=False, indent=0)


@pytest.mark.parametrize(
    "vocab_text, merges_text, pattern",
    [
        ('{"a": 0,\n "b": }', "", r"vocab\.json:2: not valid JSON"),
        ("[1, 2]", "", r"vocab\.json: expected a JSON object"),
        ('{"a": "zero"}', "", r"vocab\.json: token 'a' has id 'zero'"),
        ('{"a": 0, "b": 0}', "", r"vocab\.json: id 0 is used by two tokens"),
        ('{"a b": 0}', "", r"vocab\.json: token 'a b' contains ' '.*not in GPT-2"),
        ("{}", "", r"vocab\.json: the vocabulary is empty"),
        (None, "#version: 0.2\nh e\nh e x\n", r"merges\.txt:3: expected two tokens"),
        (None, "#version: 0.2\nh e\nhe q\n", r"merges\.txt:3: merged token 'heq' is not in the vocabulary"),
        (None, "#version: 0.2\nh zz\n", r"merges\.txt:2: 'zz' is not in the vocabulary"),
        (None, "h e\nh\u3000e\n", r"merges\.txt:2: expected two tokens"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, vocab_text, merges_text, pattern):
    if vocab_text is None:
        vocab_text = _byte_vocab({"he": 256})
    vocab_path, merges_path = _write_pair(tmp_path, vocab_text, merges_text)
    with pytest.raises(TokenizerFileError, match=pattern) as info:
        load_vocab_merges(vocab_path, merges_path)
    assert str(tmp_path) in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(TokenizerFileError, match="vocab.json not found"):
        load_vocab_merges(tmp_path / "nope.json", tmp_path / "merges.txt")
    with pytest.raises(TokenizerFileError, match="is a directory"):
        load_vocab_merges(tmp_path, tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_bytes(b'{"\xff": 0}')
    with pytest.raises(TokenizerFileError, match="not UTF-8"):
        load_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(TokenizerFileError, match="not a directory"):
        load_tokenizer_dir(tmp_path / "absent")
    vocab_path, merges_path = _write_pair(tmp_path, _byte_vocab(), "")
    (tmp_path / "tokenizer.json").write_text('{"special_tokens": "x"}', encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: expected an object"):
        load_tokenizer_dir(tmp_path)


def test_written_files_match_cs336_reference_files(fixtures_dir, tmp_path):
    # The CS336 reference files are in GPT-2 format: our writer must spell every merge the same
    # way (line for line) and hold the same token strings (ids there follow another order).
    vocab, merges = train_bpe(fixtures_dir / "corpus.en", 500, [EOT])
    save_vocab_merges(vocab, merges, tmp_path / "vocab.json", tmp_path / "merges.txt")
    ours = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    reference = (fixtures_dir / "train-bpe-reference-merges.txt").read_text(encoding="utf-8").splitlines()
    assert ours[0].startswith("#version") and ours[1:] == reference
    ours_vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    reference_vocab = json.loads((fixtures_dir / "train-bpe-reference-vocab.json").read_text(encoding="utf-8"))
    assert set(ours_vocab) == set(reference_vocab)
