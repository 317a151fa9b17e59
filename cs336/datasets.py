"""Download the public text files of ``--dataset tinystories|owt`` (used by cs336.train).

    python -m cs336.train --preset tinystories --dataset tinystories   # fetches, then trains

Files come from the Hugging Face Hub locations the CS336 handout names: TinyStories V2 (GPT-4
stories, Eldan and Li 2023) from ``roneneldan/TinyStories`` and the OpenWebText sample from
``stanford-cs336/owt-sample`` (gzip, decompressed here). ``data.dataset_base_url`` replaces the
location (a mirror, or a local server in the tests). Each file is streamed to a temporary file
in the target directory with a tqdm bar and renamed into place only after its checks pass:

- the byte count equals the server's Content-Length (a cut connection is caught);
- the size is at least ``min_bytes``, a lower bound well under the real size, so an HTML error
  page or a truncated mirror is caught (the figures are bounds, not exact sizes);
- the SHA-256 digest matches when one is recorded (none is recorded for the public files here).

A file already present with at least ``min_bytes`` is reused.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cs336.fileio import temp_beside
from cs336.interrupt import deferred_signals


class DatasetError(RuntimeError):
    """A dataset download failed or produced a file that fails its checks."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    """File name at the base URL."""
    min_bytes: int
    """Smallest plausible size of the file as served."""
    gunzip: bool = False
    """Decompress after download; the local name drops the .gz suffix."""
    sha256: str | None = None
    """Expected digest of the file as served, when known."""

    @property
    def local_name(self) -> str:
        return self.name[:-3] if self.gunzip and self.name.endswith(".gz") else self.name


@dataclass(frozen=True)
class RemoteDataset:
    base_url: str
    train: RemoteFile
    valid: RemoteFile


DATASETS = {
    # TinyStoriesV2-GPT4: train is about 2.2 GB and valid about 22 MB.
    "tinystories": RemoteDataset(
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main",
        RemoteFile("TinyStoriesV2-GPT4-train.txt", 1_000_000_000),
        RemoteFile("TinyStoriesV2-GPT4-valid.txt", 10_000_000)),
    # OWT sample: about 11 GB (train) and 0.3 GB (valid) of text before compression.
    "owt": RemoteDataset(
        "https://huggingface.co/datasets/stanford-cs336/owt-sample/resolve/main",
        RemoteFile("owt_train.txt.gz", 1_000_000_000, gunzip=True),
        RemoteFile("owt_valid.txt.gz", 30_000_000, gunzip=True)),
}

CHUNK = 1 << 20


def download(url: str, dest: Path, spec: RemoteFile, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically, checking size and digest (see the module docstring)."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    received = 0
    tmp = None
    try:
        with deferred_signals():  # the cleanup below knows the name before a signal can land
            fd, tmp = temp_beside(dest, ".part")
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise DatasetError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}; check the URL "
                               "or data.dataset_base_url") from None
        except (urllib.error.URLError, OSError) as exc:
            raise DatasetError(f"cannot reach {url} ({getattr(exc, 'reason', exc)}); check the network, "
                               f"or download {spec.name} yourself and pass --train-text/--valid-text") from None
        with response, os.fdopen(fd, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            with tqdm(total=expected, unit="B", unit_scale=True, desc=spec.name, disable=not progress) as bar:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, ValueError) as exc:
                        raise DatasetError(f"download of {url} broke off after {received} bytes ({exc}); "
                                           "run again") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and received != expected:
            raise DatasetError(f"download of {url} stopped at {received} of {expected} bytes; run again")
        if received < spec.min_bytes:
            raise DatasetError(f"{url} gave {received} bytes, less than the {spec.min_bytes} expected of "
                               f"{spec.name}; the server sent an error page or a partial file")
        if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
            raise DatasetError(f"{url}: SHA-256 {digest.hexdigest()} differs from the recorded "
                               f"{spec.sha256}; the file is corrupted or was replaced upstream")
        if spec.gunzip:
            _gunzip(Path(tmp), dest, url)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _gunzip(src: Path, dest: Path, url: str) -> None:
    tmp = None
    try:
        with deferred_signals():
            fd, tmp = temp_beside(dest, ".part")
        with gzip.open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
        os.replace(tmp, dest)
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{url} is not a valid gzip file ({exc}); run again or check the mirror") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def fetch(name: str, data_dir: str | os.PathLike, *, base_url: str | None = None,
          progress: bool = True, datasets: dict[str, RemoteDataset] | None = None) -> tuple[Path, Path]:
    """Local (train, valid) text paths of dataset ``name``, downloading what is missing."""
    datasets = DATASETS if datasets is None else datasets
    if name not in datasets:
        raise DatasetError(f"unknown dataset {name!r}; valid choices: {', '.join(datasets)}")
    ds = datasets[name]
    base = (base_url or ds.base_url).rstrip("/")
    out_dir = Path(data_dir) / name
    paths = []
    for spec in (ds.train, ds.valid):
        dest = out_dir / spec.local_name
        if not (dest.is_file() and (spec.gunzip or dest.stat().st_size >= spec.min_bytes)):
            download(f"{base}/{spec.name}", dest, spec, progress=progress)
        paths.append(dest)
    return paths[0], paths[1]
