"""Downloads without a network: `fetch_url` is replaced by a function serving local bytes.

Checks mirrors in order, hash verification, atomic placement (nothing under the final name
unless complete and verified) and safe tar extraction.
"""

import hashlib
import io
import os
import tarfile
import urllib.error

import numpy as np
import pytest
from test_dataset_formats import CIFAR_NAMES, idx_bytes, write_cifar_binary

from solstice.datamodules import CIFAR10, MNIST, FashionMNIST, _download
from solstice.datamodules._archive import safe_extract

pytestmark = pytest.mark.usefixtures("strict_promotion")


class Server:
    """Serves `files` (url -> bytes); unknown urls raise `URLError`, like an offline host."""

    def __init__(self, files=None, *, fail_after=None):
        self.files = dict(files or {})
        self.requested = []
        self.fail_after = fail_after

    def __call__(self, url, out, *, timeout=60.0):
        self.requested.append(url)
        if url not in self.files:
            raise urllib.error.URLError("offline")
        data = self.files[url]
        if self.fail_after is not None:
            out.write(data[: self.fail_after])
            raise ConnectionResetError("connection reset mid-download")
        out.write(data)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _leftovers(folder):
    return [name for name in os.listdir(folder) if name.startswith(".")]


def test_download_places_verified_file(tmp_path, monkeypatch):
    server = Server({"https://a/x.bin": b"hello"})
    monkeypatch.setattr(_download, "fetch_url", server)
    dest = tmp_path / "sub" / "x.bin"
    _download.download(["https://a/x.bin"], dest, "md5:" + _md5(b"hello"))
    assert dest.read_bytes() == b"hello"
    assert _leftovers(tmp_path / "sub") == []


def test_download_tries_mirrors_in_order(tmp_path, monkeypatch):
    server = Server({"https://b/x.bin": b"hello"})
    monkeypatch.setattr(_download, "fetch_url", server)
    dest = tmp_path / "x.bin"
    _download.download(["https://a/x.bin", "https://b/x.bin"], dest, "md5:" + _md5(b"hello"))
    assert server.requested == ["https://a/x.bin", "https://b/x.bin"]
    assert dest.read_bytes() == b"hello"


def test_download_hash_mismatch_names_file_and_hashes(tmp_path, monkeypatch):
    monkeypatch.setattr(_download, "fetch_url", Server({"https://a/x.bin": b"tampered"}))
    dest = tmp_path / "x.bin"
    expected = hashlib.sha256(b"hello").hexdigest()
    with pytest.raises(ValueError) as info:
        _download.download(["https://a/x.bin"], dest, "sha256:" + expected)
    message = str(info.value)
    assert "x.bin" in message and expected in message
    assert hashlib.sha256(b"tampered").hexdigest() in message
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_download_interrupted_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(
        _download, "fetch_url", Server({"https://a/x": b"0123456789"}, fail_after=4)
    )
    dest = tmp_path / "x"
    with pytest.raises(ConnectionError, match="connection reset"):
        _download.download(["https://a/x"], dest, "md5:" + _md5(b"0123456789"))
    assert not dest.exists() and _leftovers(tmp_path) == []

    def interrupted(url, out, *, timeout=60.0):
        out.write(b"01")
        raise KeyboardInterrupt

    monkeypatch.setattr(_download, "fetch_url", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _download.download(["https://a/x"], dest, "md5:" + _md5(b"0123456789"))
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_download_does_not_replace_on_failure(tmp_path, monkeypatch):
    dest = tmp_path / "x"
    dest.write_bytes(b"old")
    monkeypatch.setattr(_download, "fetch_url", Server({"https://a/x": b"bad"}))
    with pytest.raises(ValueError):
        _download.download(["https://a/x"], dest, "md5:" + _md5(b"good"))
    assert dest.read_bytes() == b"old"


def test_bad_known_hash_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="md5:<hex>"):
        _download.download(["https://a/x"], tmp_path / "x", "f68b3c2d")


# ---------------------------------------------------------------------------------------------
# MNIST / FashionMNIST


def _mnist_payloads(seed=0):
    import gzip

    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, (40,), dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, (12,), dtype=np.uint8),
    }
    return arrays, {name: gzip.compress(idx_bytes(a), mtime=0) for name, a in arrays.items()}


@pytest.mark.parametrize("cls", [MNIST, FashionMNIST])
def test_mnist_downloads_verifies_and_reads(tmp_path, monkeypatch, cls):
    arrays, payloads = _mnist_payloads()
    mirror = cls.mirrors[-1]
    server = Server({mirror + name: data for name, data in payloads.items()})
    monkeypatch.setattr(_download, "fetch_url", server)
    monkeypatch.setattr(cls, "resources", {name: _md5(d) for name, d in payloads.items()})
    dm = cls(tmp_path, batch_size=8, val_fraction=0.0, shuffle=False)
    dm.setup("fit")  # downloads what is missing
    raw = tmp_path / cls.folder / "raw"
    assert sorted(os.listdir(raw)) == sorted(payloads)
    np.testing.assert_array_equal(
        dm.splits["train"]["image"][:, 0], arrays["train-images-idx3-ubyte.gz"]
    )
    assert server.requested[-1] == mirror + "t10k-labels-idx1-ubyte.gz"
    # a second prepare_data finds everything and fetches nothing
    n = len(server.requested)
    cls(tmp_path, batch_size=8).prepare_data()
    assert len(server.requested) == n


def test_mnist_real_hashes_reject_fake_files(tmp_path, monkeypatch):
    _, payloads = _mnist_payloads()
    server = Server({MNIST.mirrors[0] + name: data for name, data in payloads.items()})
    monkeypatch.setattr(_download, "fetch_url", server)
    with pytest.raises(ValueError) as info:
        MNIST(tmp_path, batch_size=8).prepare_data()
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert MNIST.resources["train-images-idx3-ubyte.gz"] in message
    assert _md5(payloads["train-images-idx3-ubyte.gz"]) in message
    raw = tmp_path / "MNIST" / "raw"
    assert os.listdir(raw) == []


def test_mnist_offline_download_gives_file_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(_download, "fetch_url", Server())
    with pytest.raises(FileNotFoundError) as info:
        MNIST(tmp_path, batch_size=8).prepare_data()
    message = str(info.value)
    for name in MNIST.resources:
        assert name in message
    assert os.path.join(str(tmp_path), "MNIST", "raw") in message and "offline" in message
    for mirror in MNIST.mirrors:
        assert mirror in message


# ---------------------------------------------------------------------------------------------
# CIFAR-10 archive


def _cifar_archive(tmp_path):
    src = tmp_path / "src"
    parts = write_cifar_binary(src)
    (src / "cifar-10-batches-bin" / "batches.meta.txt").write_text("airplane\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    return parts, buffer.getvalue()


def test_cifar_downloads_and_extracts(tmp_path, monkeypatch):
    parts, archive = _cifar_archive(tmp_path)
    monkeypatch.setattr(_download, "fetch_url", Server({CIFAR10.url: archive}))
    monkeypatch.setattr(CIFAR10, "md5", _md5(archive))
    root = tmp_path / "data"
    dm = CIFAR10(root, batch_size=16, val_fraction=0.0, shuffle=False)
    dm.setup("fit")
    names = sorted(os.listdir(root / "cifar-10-batches-bin"))
    assert names == sorted(n + ".bin" for n in CIFAR_NAMES)  # only the six batches
    np.testing.assert_array_equal(dm.splits["test"]["image"], parts[5][0])
    assert _leftovers(root) == []


def test_cifar_archive_hash_mismatch(tmp_path, monkeypatch):
    _, archive = _cifar_archive(tmp_path)
    monkeypatch.setattr(_download, "fetch_url", Server({CIFAR10.url: archive}))
    with pytest.raises(ValueError) as info:
        CIFAR10(tmp_path / "data", batch_size=16).prepare_data()
    message = str(info.value)
    assert "cifar-10-binary.tar.gz" in message and CIFAR10.md5 in message
    assert _md5(archive) in message
    assert not (tmp_path / "data" / "cifar-10-binary.tar.gz").exists()
    # an archive already on disk is checked too
    (tmp_path / "data" / "cifar-10-binary.tar.gz").write_bytes(archive)
    with pytest.raises(ValueError, match=f"md5 {_md5(archive)}, expected {CIFAR10.md5}"):
        CIFAR10(tmp_path / "data", batch_size=16).prepare_data()


def test_cifar_offline_gives_file_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(_download, "fetch_url", Server())
    with pytest.raises(FileNotFoundError, match="offline"):
        CIFAR10(tmp_path, batch_size=16).prepare_data()


def _tar_with(tmp_path, add):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar)
    return path


def _file(tar, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _link(tar, name, target, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


@pytest.mark.parametrize(
    "add,member",
    [
        (lambda t: _file(t, "/etc/evil"), "/etc/evil"),
        (lambda t: _file(t, "cifar-10-batches-bin/../../evil"), "../../evil"),
        (lambda t: _link(t, "cifar/link", "../../etc/passwd", tarfile.SYMTYPE), "cifar/link"),
        (lambda t: _link(t, "cifar/abs", "/etc/passwd", tarfile.SYMTYPE), "cifar/abs"),
        (lambda t: _link(t, "cifar/hard", "../outside", tarfile.LNKTYPE), "cifar/hard"),
        (lambda t: _link(t, "cifar/fifo", "", tarfile.FIFOTYPE), "cifar/fifo"),
    ],
)
def test_safe_extract_refuses_escapes(tmp_path, add, member):
    archive = _tar_with(tmp_path, lambda tar: (_file(tar, "cifar/ok.bin"), add(tar)))
    dest = tmp_path / "dest"
    with pytest.raises(ValueError) as info:
        safe_extract(archive, dest)
    assert member in str(info.value) and "evil.tar.gz" in str(info.value)
    assert not (dest / "cifar" / "ok.bin").exists()  # checked before anything is written
    assert not (tmp_path / "evil").exists() and _leftovers(dest) == []


def test_safe_extract_keeps_inside_links_out(tmp_path):
    def add(tar):
        _file(tar, "cifar/a.bin", b"abc")
        _link(tar, "cifar/b.bin", "a.bin", tarfile.SYMTYPE)

    files = safe_extract(_tar_with(tmp_path, add), tmp_path / "dest")
    assert files == [os.path.join(tmp_path, "dest", "cifar", "a.bin")]
    assert (tmp_path / "dest" / "cifar" / "a.bin").read_bytes() == b"abc"
    assert not (tmp_path / "dest" / "cifar" / "b.bin").exists()


def test_safe_extract_requires_expected_members(tmp_path):
    archive = _tar_with(tmp_path, lambda tar: _file(tar, "cifar/a.bin"))
    with pytest.raises(ValueError, match="lacks the expected members.*b.bin"):
        safe_extract(archive, tmp_path / "dest", members=["cifar/a.bin", "cifar/b.bin"])
