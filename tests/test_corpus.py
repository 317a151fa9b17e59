"""cs336.corpus: the embedded story corpus is seeded and split into documents."""

from cs336.corpus import EOT, corpus_text, write_corpus


def test_embedded_corpus_is_seeded_and_split_into_documents(tmp_path):
    text = corpus_text(50_000, seed=3)
    assert text == corpus_text(50_000, seed=3) and text != corpus_text(50_000, seed=4)
    docs = [d.strip() for d in text.split(EOT) if d.strip()]
    assert len(docs) > 50 and len(set(docs)) > 0.9 * len(docs)
    assert all(d[0].isupper() and d.rstrip()[-1] in '.!"' for d in docs)
    train, valid = write_corpus(tmp_path, 0.2, seed=1)
    t, v = train.read_text(), valid.read_text()
    assert 150_000 < len(t) < 200_000 and len(v) >= 10_000
    assert not t.startswith(v[:200])


def test_write_corpus_streams_the_stories(tmp_path):
    """The files hold exactly corpus_text's stories, written a story at a time: the text was built
    in memory first (about 3x data.corpus_mb at the peak, so a large corpus_mb ran out of memory)."""
    import tracemalloc

    tracemalloc.start()
    try:
        train, valid = write_corpus(tmp_path, 4.0, seed=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert train.read_bytes() == corpus_text(int(4e6 * 0.95), 5).encode()
    assert valid.read_bytes() == corpus_text(200_000, 5 + 1_000_003).encode()
    assert train.stat().st_size > 3_800_000 and peak < 1_000_000  # the text alone is 3.8 MB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.txt", "valid.txt"]
