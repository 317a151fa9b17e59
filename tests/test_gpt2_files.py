"""``cs336.tokenizer.gpt2_files``: GPT-2's vocab.json / merges.txt, read and written.

The shipped files in tests/fixtures (written by the generator's own writer) load to what an
independent reader gets, and our writer reproduces them byte for byte; files we write load in HF
``tokenizers`` and tiktoken and give our ids (tokenizers trained here with ``train_bpe``). Damaged
or inconsistent files are refused as a whole, each kind with one error naming the file, the line
and the fix. Where ../shared exists, GPT-2's and the CS336 reference files are checked as well.
"""

from __future__ import annotations

import json

import pytest
import tiktoken
import tiktoken.load
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers
from tokenizers.implementations import ByteLevelBPETokenizer

from bpe_slow_reference import gpt2_byte_to_char, read_gpt2_files
from cs336.tokenizer import Tokenizer, train_bpe
from cs336.tokenizer.gpt2_files import (
    TokenizerFileError,
    bytes_to_unicode,
    load_tokenizer_dir,
    load_vocab,
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
    assert table == gpt2_byte_to_char()  # the test reference's own copy of GPT-2's table
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā"
    assert all(not c.isspace() and c.isprintable() for c in table.values())
    token = bytes(range(256))
    assert str_to_token(token_to_str(token)) == token
    with pytest.raises(KeyError):
        str_to_token(" ")  # a space is not in the alphabet (it is spelled Ġ)


def test_shipped_files_load_and_are_rewritten_byte_for_byte(bpe_fixtures, tmp_path):
    vocab, merges = load_vocab_merges(bpe_fixtures.vocab_json, bpe_fixtures.merges_txt)
    assert (vocab, merges) == read_gpt2_files(bpe_fixtures.vocab_json, bpe_fixtures.merges_txt)
    save_vocab_merges(vocab, merges, tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert (tmp_path / "vocab.json").read_bytes() == bpe_fixtures.vocab_json.read_bytes()
    assert (tmp_path / "merges.txt").read_bytes() == bpe_fixtures.merges_txt.read_bytes()


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


@pytest.fixture
def tokdir(tmp_path):
    vocab = {b: bytes([b]) for b in range(256)}
    merges = [(b"h", b"e"), (b"he", b"l")]
    vocab.update({256: b"he", 257: b"hel", 258: b"<|endoftext|>"})
    save_tokenizer_dir(tmp_path / "tok", vocab, merges, ["<|endoftext|>"])
    return tmp_path / "tok"


def _vocab_json(tokdir) -> dict:
    return json.loads((tokdir / "vocab.json").read_text(encoding="utf-8"))


def _set_vocab(tokdir, data):
    (tokdir / "vocab.json").write_text(data if isinstance(data, str) else json.dumps(data, ensure_ascii=False),
                                       encoding="utf-8")


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


def test_a_huge_id_is_refused_before_any_allocation(tokdir):
    vocab = _vocab_json(tokdir)
    vocab[bytes_to_unicode()[ord("h")] + "x"] = 2_000_000_000
    _set_vocab(tokdir, vocab)
    with pytest.raises(TokenizerFileError, match=r"vocab\.json: ids must be 0\.\.259 for 260 tokens, but id "
                                                 r"2000000000 occurs and id 259 is missing"):
        load_tokenizer_dir(tokdir)


@pytest.mark.parametrize("content, pattern", [
    ("", r"vocab\.json: vocab\.json is empty; write the tokenizer again"),
    ("   \n", r"vocab\.json is empty"),
    ('{"a": 0, "a": 1}', r"token 'a' appears twice"),
    ('{"a": 0.5}', r"token 'a' has id 0\.5; ids must be non-negative integers"),
    ('{"a": true}', r"token 'a' has id True"),
    ('{"a": -1}', r"token 'a' has id -1"),
    ('{"a": [0]}', r"token 'a' has id \[0\]"),
    ('"just a string"', r"expected a JSON object mapping token strings to ids, got str"),
    ("[" * 100000, r"(nested too deeply|not valid JSON)"),
    ('{"a": 0', r"vocab\.json:1: not valid JSON"),
])
def test_malformed_vocab_kinds(tokdir, content, pattern):
    _set_vocab(tokdir, content)
    with pytest.raises(TokenizerFileError, match=pattern) as info:
        load_tokenizer_dir(tokdir)
    assert str(tokdir / "vocab.json") in str(info.value)


def test_binary_and_non_utf8_files(tokdir):
    (tokdir / "merges.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(TokenizerFileError, match=r"merges\.txt: merges\.txt is not UTF-8"):
        load_tokenizer_dir(tokdir)
    (tokdir / "tokenizer.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: tokenizer\.json is not UTF-8"):
        load_tokenizer_dir(tokdir)


def test_vocab_must_be_dense(tokdir):
    vocab = _vocab_json(tokdir)
    vocab[bytes_to_unicode()[ord("h")] + "el"] = 300  # moves 'hel' from 257 to 300
    _set_vocab(tokdir, vocab)
    with pytest.raises(TokenizerFileError, match=r"id 300 occurs and id 257 is missing; renumber"):
        load_vocab(tokdir / "vocab.json")


def test_merges_consistent_with_vocab_and_tokenizer_json(tokdir):
    intact = load_tokenizer_dir(tokdir)
    merges = (tokdir / "merges.txt").read_text(encoding="utf-8")
    meta = json.loads((tokdir / "tokenizer.json").read_text())
    (tokdir / "merges.txt").write_text(merges.replace("he l\n", ""), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"records num_merges 2 but .* hold 1"):
        load_tokenizer_dir(tokdir)
    (tokdir / "tokenizer.json").write_text(json.dumps({"special_tokens": meta["special_tokens"]}))
    with pytest.raises(TokenizerFileError, match=r"token 'hel' \(id 257\) is made by no merge"):
        load_tokenizer_dir(tokdir)
    (tokdir / "merges.txt").write_text(merges + "hel q\n", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"merges\.txt:4: merged token 'helq' is not in the vocabulary"):
        load_tokenizer_dir(tokdir)
    (tokdir / "merges.txt").write_text(merges, encoding="utf-8")
    (tokdir / "tokenizer.json").write_text(json.dumps({**meta, "num_merges": 5}))
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json records num_merges 5 but .* hold 2"):
        load_tokenizer_dir(tokdir)
    (tokdir / "tokenizer.json").write_text(json.dumps({**meta, "vocab_size": "259"}))
    with pytest.raises(TokenizerFileError, match=r"'vocab_size' is '259'; expected a non-negative integer"):
        load_tokenizer_dir(tokdir)
    (tokdir / "tokenizer.json").write_text(json.dumps({**meta, "special_tokens": []}))
    with pytest.raises(TokenizerFileError, match=r"'<\|endoftext\|>' \(id 258\) is made by no merge .* and is "
                                                 r"not a special token"):
        load_tokenizer_dir(tokdir)
    (tokdir / "tokenizer.json").write_text(json.dumps(meta))
    assert load_tokenizer_dir(tokdir) == intact  # each error above came from its own damage


def test_resaved_gpt2_files_load_in_tiktoken_data_gym(cs336_fixtures, tmp_path):
    # Our writer reproduces GPT-2's files well enough for tiktoken's own GPT-2 reader, which
    # cross-checks vocab.json against merges.txt; the ranks equal GPT-2's ids.
    files = cs336_fixtures / "gpt2_vocab.json", cs336_fixtures / "gpt2_merges.txt"
    vocab, merges = load_vocab_merges(*files)
    save_vocab_merges(vocab, merges, tmp_path / "vocab.json", tmp_path / "merges.txt")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(tmp_path / "merges.txt"), str(tmp_path / "vocab.json"))
    reference, _ = read_gpt2_files(*files)
    assert ranks == {token: i for i, token in reference.items() if token != b"<|endoftext|>"}
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8") == "#version: 0.2\n" + files[1].read_text("utf-8")


def test_written_files_match_cs336_reference_files(cs336_fixtures, tmp_path):
    # The CS336 reference files are in GPT-2 format: our writer must spell every merge the same
    # way (line for line) and hold the same token strings (ids there follow another order).
    vocab, merges = train_bpe(cs336_fixtures / "corpus.en", 500, [EOT])
    save_vocab_merges(vocab, merges, tmp_path / "vocab.json", tmp_path / "merges.txt")
    ours = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    reference = (cs336_fixtures / "train-bpe-reference-merges.txt").read_text(encoding="utf-8").splitlines()
    assert ours[0].startswith("#version") and ours[1:] == reference
    ours_vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    reference_vocab = json.loads((cs336_fixtures / "train-bpe-reference-vocab.json").read_text(encoding="utf-8"))
    assert set(ours_vocab) == set(reference_vocab)


def test_load_tokenizer_dir_refuses_other_special_tokens(trained):
    """special_tokens are for a directory without tokenizer.json; with one, only the same tokens
    (in any order) are accepted, not silently replaced by the file's."""
    _, _, specials, directory = trained["special"]
    assert load_tokenizer_dir(directory, [EOT])[2] == [EOT]
    for other in (["<|pad|>"], [EOT, "<|pad|>"]):
        with pytest.raises(TokenizerFileError, match="lists the special tokens"):
            load_tokenizer_dir(directory, other)
    with pytest.raises(TokenizerFileError, match="lists the special tokens"):
        load_tokenizer_dir(trained["plain"][3], [EOT])
