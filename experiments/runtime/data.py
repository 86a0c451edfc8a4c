"""Byte-level language-modelling data: a text corpus, a document split, seekable batches.

    corpus = load_corpus("")                      # "" = the Python standard library's source
    batch = sample_batch(corpus.train, seed=0, index=step, batch_size=32, seq_len=256)
    # batch: uint8 [1, 32, 257] (one micro-batch); inputs [..., :-1], targets [..., 1:]

- Corpus: one text file, or every .txt / .md / .py file under a folder (recursively, in
  sorted order of their relative paths). The default needs no download: the running
  interpreter's own standard library (`sysconfig.get_paths()["stdlib"]`), without
  site-packages / dist-packages, so it does not depend on what is installed.
- Split by document: a document goes to validation when a hash of its relative path falls
  in the lowest `valid_fraction` of the hash range, so a file keeps its split when others
  are added. A single-document corpus is split by position instead (its last
  `valid_fraction` of bytes). Documents are joined with a 0 byte (which text never holds)
  into one uint8 array per split.
- Batches: batch `index` draws its `batch_size` window starts uniformly from
  `np.random.default_rng([stream, seed, index])`, so any batch can be produced on its own
  (a resumed run sees exactly the batches it would have seen) and a process keeps only its
  rows of the global batch (`process_index` / `process_count`).
"""
import functools
import hashlib
import os
import stat
import sysconfig
import zlib
from typing import NamedTuple

import numpy as np

SUFFIXES = (".txt", ".md", ".py")
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
SEPARATOR = b"\0"
TRAIN_STREAM, EVAL_STREAM = 0, 1


class Corpus(NamedTuple):
    """A corpus split into training and validation bytes.

    Attributes:
      path: the file or folder it was read from.
      train, valid: uint8 arrays, the documents of each split joined by 0 bytes.
      n_bytes: total size of the documents read, in bytes.
      sha256: hex digest over the documents' relative paths and contents, in order.
      n_documents: number of documents read.
    """
    path: str
    train: np.ndarray
    valid: np.ndarray
    n_bytes: int
    sha256: str
    n_documents: int


def default_corpus_path():
    """The standard library folder of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def _kind(mode):
    """What a non-regular file is, in words (for error messages)."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular(path, what):
    """ValueError unless `path` is (a symlink to) a regular file: reading a FIFO or a device
    would block or never end, and a broken link cannot be read at all."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} is a broken symbolic link") from None
    except OSError as error:
        raise ValueError(f"{what} {path!r} cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path!r} is {_kind(mode)}, not a text file; remove it or "
                         "point config.corpus elsewhere")


def list_documents(path):
    """The documents of a corpus: `[path]` for a file, else its text files in sorted order.

    Raises:
      ValueError: naming `path` when it does not exist, is not a regular file or folder
        (e.g. /dev/null) or holds no .txt / .md / .py file, and naming a document in it
        that is not a regular file (a FIFO, a device, a broken symbolic link) or that a
        folder cannot be read.
    """
    if not os.path.lexists(path):
        raise ValueError(f"corpus {path!r} does not exist")
    if not os.path.isdir(path):
        _check_regular(path, "corpus")
        return [path]

    def unreadable(error):
        raise ValueError(f"corpus folder {error.filename!r} cannot be read: {error.strerror}")

    found = []
    for root, dirs, files in os.walk(path, onerror=unreadable):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        found.extend(os.path.join(root, f) for f in files if f.endswith(SUFFIXES))
    if not found:
        raise ValueError(f"corpus {path!r} holds no {' / '.join(SUFFIXES)} files")
    for document in found:
        _check_regular(document, "corpus file")
    return sorted(found, key=lambda f: os.path.relpath(f, path))


def _in_validation(name, valid_fraction):
    """Whether document `name` belongs to validation: crc32(name) in the lowest fraction."""
    return zlib.crc32(name.encode()) < valid_fraction * 2 ** 32


def _fingerprint(documents):
    """What a cached corpus depends on: each document's path, size and modification time."""
    stats = [os.stat(f) for f in documents]
    return tuple((f, st.st_size, st.st_mtime_ns) for f, st in zip(documents, stats))


def load_corpus(path="", valid_fraction=0.05):
    """Reads a corpus and splits it by document (see the module docstring).

    Repeated calls in one process (e.g. a learning-rate sweep) return the cached arrays
    while no document changed.

    Args:
      path: a text file or a folder; "" means `default_corpus_path()`.
      valid_fraction: share of documents (or, for one document, of bytes) held out, in (0, 1).

    Raises:
      ValueError: naming the path when it is missing or empty, or a bad valid_fraction.
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")
    path = os.path.abspath(os.path.expanduser(path or default_corpus_path()))
    documents = list_documents(path)
    return _read_corpus(path, _fingerprint(documents), valid_fraction)


@functools.lru_cache(maxsize=4)
def _read_corpus(path, fingerprint, valid_fraction):
    digest = hashlib.sha256()
    train, valid = [], []
    n_bytes = 0
    for file, _, _ in fingerprint:
        name = os.path.relpath(file, path) if os.path.isdir(path) else os.path.basename(file)
        try:
            with open(file, "rb") as f:
                text = f.read()
        except OSError as error:
            raise ValueError(f"corpus file {file!r} cannot be read: {error.strerror}") from None
        digest.update(name.encode() + SEPARATOR + text + SEPARATOR)
        n_bytes += len(text)
        if text:
            (valid if _in_validation(name, valid_fraction) else train).append(text)
    if n_bytes == 0:
        raise ValueError(f"corpus {path!r} is empty (0 bytes)")
    if not train or not valid:  # one document, or the hash put all on one side: cut by bytes
        joined = SEPARATOR.join(train + valid)
        cut = len(joined) - max(1, int(len(joined) * valid_fraction))
        train, valid = [joined[:cut]], [joined[cut:]]
    as_array = lambda parts: np.frombuffer(SEPARATOR.join(parts), np.uint8)  # noqa: E731
    return Corpus(path=path, train=as_array(train), valid=as_array(valid), n_bytes=n_bytes,
                  sha256=digest.hexdigest(), n_documents=len(fingerprint))


def check_length(corpus, seq_len):
    """Raises ValueError naming the corpus when a split is shorter than one window."""
    for split in ("train", "valid"):
        size = getattr(corpus, split).size
        if size < seq_len + 1:
            raise ValueError(f"corpus {corpus.path!r} is too small: its {split} split has "
                             f"{size} bytes, fewer than seq_len + 1 = {seq_len + 1}")


def sample_batch(data, seed, index, batch_size, seq_len, micro_batches=1, process_index=0,
                 process_count=1, stream=TRAIN_STREAM):
    """This process's rows of batch number `index`: uint8 [micro_batches, batch_size / P,
    seq_len + 1].

    Row r of micro-batch k is the window `data[s : s + seq_len + 1]` with the starts `s`
    drawn uniformly, as an array [micro_batches, batch_size], from
    `default_rng([stream, seed, index])`; process p keeps rows
    `[p * batch_size / P, (p + 1) * batch_size / P)` of every micro-batch. The result depends
    only on the arguments, so batches can be made in any order (seekable) on any number of
    hosts, and K micro-batches of B rows hold the same windows as one batch of K * B rows.

    Args:
      data: a uint8 array (a corpus split).
      seed: the run's seed.
      index: which batch (the data position; e.g. the step).
      batch_size: rows per micro-batch, over all processes; divisible by process_count.
      seq_len: tokens per input sequence (each row holds one more, the last target).
      micro_batches: micro-batches per batch (gradient accumulation steps).
      process_index, process_count: this process and the number of processes.
      stream: TRAIN_STREAM or EVAL_STREAM, so evaluation batches differ from training ones.
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the "
                         f"{process_count} processes")
    rng = np.random.default_rng([stream, seed, index])
    starts = rng.integers(0, data.size - seq_len, size=(micro_batches, batch_size))
    local = batch_size // process_count
    starts = starts[:, process_index * local:(process_index + 1) * local]
    return data[starts[..., None] + np.arange(seq_len + 1)]
