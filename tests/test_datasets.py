"""Dataset downloads against a local HTTP server on 127.0.0.1 (no network needed)."""

import gzip
import hashlib
import http.server
import threading
from functools import partial

import pytest

from cs336.datasets import DATASETS, DatasetError, RemoteDataset, RemoteFile, fetch

TRAIN = ("Once upon a time there was a cat.<|endoftext|>" * 200).encode()
VALID = b"The cat slept.<|endoftext|>" * 20


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class LyingHandler(QuietHandler):
    """Announces more bytes than it sends: a connection cut mid-file."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"partial")


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "train.txt").write_bytes(TRAIN)
    (root / "valid.txt").write_bytes(VALID)
    (root / "train.txt.gz").write_bytes(gzip.compress(TRAIN))
    (root / "valid.txt.gz").write_bytes(gzip.compress(VALID))
    (root / "broken.gz").write_bytes(b"this is not gzip data at all" * 10)

    def start(handler=QuietHandler):
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    servers = []
    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def spec(train="train.txt", valid="valid.txt", gunzip=False, min_bytes=10, sha256=None):
    return {"toy": RemoteDataset("http://unused.invalid", RemoteFile(train, min_bytes, gunzip, sha256),
                                 RemoteFile(valid, min_bytes, gunzip))}


def leftovers(path):
    return [p.name for p in path.rglob("*") if p.name.startswith(".")]


def test_download_writes_both_files(server, tmp_path):
    url = server()
    train, valid = fetch("toy", tmp_path / "data", base_url=url, progress=False, datasets=spec())
    assert train.read_bytes() == TRAIN and valid.read_bytes() == VALID
    assert train.parent == tmp_path / "data" / "toy"
    assert leftovers(tmp_path / "data") == []
    # present files are reused: a dead server is not contacted again
    again = fetch("toy", tmp_path / "data", base_url="http://127.0.0.1:9", progress=False, datasets=spec())
    assert again == (train, valid)


def test_gzip_files_are_decompressed(server, tmp_path):
    url = server()
    train, valid = fetch("toy", tmp_path / "d", base_url=url, progress=False,
                         datasets=spec("train.txt.gz", "valid.txt.gz", gunzip=True))
    assert train.name == "train.txt" and train.read_bytes() == TRAIN and valid.read_bytes() == VALID


def test_checksum_is_verified(server, tmp_path):
    url = server()
    good = hashlib.sha256(TRAIN).hexdigest()
    assert fetch("toy", tmp_path / "ok", base_url=url, progress=False, datasets=spec(sha256=good))
    with pytest.raises(DatasetError, match="SHA-256"):
        fetch("toy", tmp_path / "bad", base_url=url, progress=False, datasets=spec(sha256="0" * 64))
    assert not (tmp_path / "bad" / "toy" / "train.txt").exists() and leftovers(tmp_path / "bad") == []


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(min_bytes=10_000_000), "less than the 10000000 expected"),
    (dict(train="missing.txt"), "HTTP 404"),
    (dict(train="broken.gz", gunzip=True), "not a valid gzip file"),
])
def test_bad_downloads_leave_nothing_behind(server, tmp_path, kwargs, fragment):
    url = server()
    with pytest.raises(DatasetError, match=fragment):
        fetch("toy", tmp_path / "d", base_url=url, progress=False, datasets=spec(**kwargs))
    files = [p for p in (tmp_path / "d").rglob("*") if p.is_file()]
    assert files == []


def test_cut_connection_is_detected(server, tmp_path):
    url = server(LyingHandler)
    with pytest.raises(DatasetError, match="stopped at|broke off"):
        fetch("toy", tmp_path / "d", base_url=url, progress=False, datasets=spec())
    assert [p for p in (tmp_path / "d").rglob("*") if p.is_file()] == []


def test_unreachable_server_and_unknown_name(tmp_path):
    with pytest.raises(DatasetError, match="cannot reach"):
        fetch("toy", tmp_path, base_url="http://127.0.0.1:9", progress=False, datasets=spec())
    with pytest.raises(DatasetError, match="valid choices: tinystories, owt"):
        fetch("wikitext", tmp_path)


def test_registered_datasets_point_at_the_handout_files():
    ts, owt = DATASETS["tinystories"], DATASETS["owt"]
    assert ts.train.name == "TinyStoriesV2-GPT4-train.txt" and ts.valid.name == "TinyStoriesV2-GPT4-valid.txt"
    assert owt.train.local_name == "owt_train.txt" and owt.valid.gunzip
    assert ts.base_url.startswith("https://huggingface.co/datasets/roneneldan/TinyStories")


def test_train_cli_reports_a_bad_download_without_traceback(server, tmp_path, capsys):
    from cs336.train import main

    url = server()
    served = tmp_path / "served"
    (served / "TinyStoriesV2-GPT4-train.txt").write_bytes(TRAIN)
    (served / "TinyStoriesV2-GPT4-valid.txt").write_bytes(VALID)
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", "tinystories", f"--data.dataset_base_url={url}", f"--data.data_dir={tmp_path / 'dl'}",
              "--out-dir", str(tmp_path / "run"), "--train.progress=false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "TinyStoriesV2-GPT4-train.txt" in err and "error page or a partial file" in err
    assert "Traceback" not in err
