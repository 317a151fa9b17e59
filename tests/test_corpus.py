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
