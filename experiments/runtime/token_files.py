"""Already-tokenized corpora: a flat array of token ids in a `.bin` or `.npy` file.

    python -m ravine.experiments.train --config=experiments/configs/lm.py:tiny --workdir=runs/tok \
        --config.corpus=tokens.bin --config.vocab_size=50257      # nanoGPT's GPT-2 .bin

- `.bin`: headerless, native byte order, `config.token_dtype` (default uint16, as nanoGPT's
  prepare scripts write; uint32 for vocabularies above 65536). `.npy`: its own dtype
  (a 1-D integer array). Either is memory-mapped: nothing is read until a batch needs it.
- `config.vocab_size` is required (the model's embedding size); ids must be < it. Every id
  is checked at start-up (an id outside [0, vocab_size) is named with its first position),
  before anything trains.
- Split by position: the last `config.valid_fraction` of the tokens (default 5%) is the
  validation split, the rest the training split. Batches are drawn exactly as from the
  text corpus (`data.sample_batch`: seekable, each process reads its own rows), so resumes
  are exact and several hosts read one shared file.
- The corpus' `sha256` (what a resume compares, so a resume on changed data is refused)
  covers the dtype, the length and every token. It is computed in one pass with the ids'
  range, once per file version, and cached beside the file in `FILE.ravine-sha256.json`
  (`CACHE_SUFFIX`), keyed by the file's size, mtime_ns, ctime_ns and inode, and the dtype:
  any rewrite or replacement of the file changes the key and the next start re-hashes it
  (about 1 s per GB). A cache that is stale, unreadable or damaged is ignored and rewritten;
  one that cannot be written (a read-only folder) costs only the re-hash at each start.

`python -m ravine.experiments.prepare_data --corpus=DIR --out=tokens.bin` writes a token file
from a text corpus (bytes as tokens, vocab 256).
"""
import hashlib
import json
import os
import tempfile

import numpy as np
from absl import logging

from ravine.experiments.runtime import data

SUFFIXES = (".bin", ".npy")
BIN_DTYPES = ("uint8", "uint16", "uint32", "int32")
DEFAULT_BIN_DTYPE = "uint16"
SCAN_TOKENS = 1 << 22  # tokens per block of the hashing / range scan
CACHE_SUFFIX = ".ravine-sha256.json"
BYTE_VOCAB = 256


def is_token_file(path):
    """Whether `path` names a token file (by its suffix) rather than text."""
    return str(path).endswith(SUFFIXES)


def _open(path, token_dtype):
    """The memory-mapped 1-D token array of `path`; ValueError naming the problem."""
    if not os.path.lexists(path):
        raise ValueError(f"token file {path!r} does not exist")
    data._check_regular(path, "token file")  # noqa: SLF001 - the same rule as text corpora
    if path.endswith(".npy"):
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as error:
            raise ValueError(f"token file {path!r} is not a readable .npy file: {error}"
                             ) from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token file {path!r} holds a {tokens.dtype} array of shape "
                             f"{tokens.shape}; expected a 1-D integer array of token ids")
        if token_dtype and np.dtype(token_dtype) != tokens.dtype:
            raise ValueError(f"config.token_dtype={token_dtype!r} but {path!r} holds "
                             f"{tokens.dtype} (a .npy file carries its dtype: unset it)")
        return tokens
    name = token_dtype or DEFAULT_BIN_DTYPE
    if name not in BIN_DTYPES:
        raise ValueError(f"config.token_dtype must be one of {', '.join(BIN_DTYPES)}, got "
                         f"{name!r}")
    dtype = np.dtype(name)
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"token file {path!r} is empty (0 bytes)")
    if size % dtype.itemsize:
        raise ValueError(f"token file {path!r} has {size} bytes, not a multiple of "
                         f"{name}'s {dtype.itemsize} (wrong config.token_dtype?)")
    return np.memmap(path, dtype=dtype, mode="r")


def cache_path(path):
    """Where the hash and id range of token file `path` are cached (beside it)."""
    return path + CACHE_SUFFIX


def _cache_key(path, tokens):
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "dtype": tokens.dtype.str, "tokens": int(tokens.size)}


def _read_cache(path, key):
    """The cached `{"sha256", "min", "max"}` of `path` if its key is `key`, else None."""
    try:
        with open(cache_path(path)) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return {"sha256": str(cached["sha256"]), "min": int(cached["min"]),
                    "max": int(cached["max"])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass  # none, stale or damaged: hash again
    return None


def _write_cache(path, key, scanned):
    """Writes the cache atomically; a folder that cannot be written costs only time."""
    folder = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ravine-sha256-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, **scanned}, f)
            os.replace(tmp, cache_path(path))
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as error:
        logging.warning("token file %s: cannot cache its hash in %s (%s); it is hashed "
                        "again at each start", path, cache_path(path),
                        error.strerror or error)


def _blocks(tokens):
    for start in range(0, tokens.size, SCAN_TOKENS):
        yield start, np.ascontiguousarray(tokens[start:start + SCAN_TOKENS])


def _scan(tokens):
    """`{"sha256", "min", "max"}`: the hash of dtype, length and every token, in one pass."""
    digest = hashlib.sha256(f"{tokens.dtype.str}:{tokens.size}:".encode())
    low, high = None, None
    for _, block in _blocks(tokens):
        digest.update(memoryview(block).cast("B"))
        block_low, block_high = int(block.min()), int(block.max())
        low = block_low if low is None else min(low, block_low)
        high = block_high if high is None else max(high, block_high)
    return {"sha256": digest.hexdigest(), "min": low, "max": high}


def fingerprint(path, tokens):
    """`{"sha256", "min", "max"}` of token file `path` (memory-mapped as `tokens`): from the
    cache beside the file when its key still matches, else scanned and cached."""
    key = _cache_key(path, tokens)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    if tokens.nbytes > 1 << 30:
        logging.info("hashing token file %s (%.1f GB) once; cached in %s", path,
                     tokens.nbytes / 1e9, cache_path(path))
    scanned = _scan(tokens)
    if _cache_key(path, tokens) == key:  # not rewritten while it was read
        _write_cache(path, key, scanned)
    return scanned


def _first_outside(tokens, vocab_size):
    """`(position, id)` of the first token outside [0, vocab_size), or None."""
    for start, block in _blocks(tokens):
        bad = np.flatnonzero((block >= vocab_size) | (block < 0))
        if bad.size:
            return start + int(bad[0]), int(block[bad[0]])
    return None


def load(path, valid_fraction=0.05, vocab_size=None, token_dtype=None):
    """A `data.Corpus` over a token file (see the module docstring).

    Raises:
      ValueError: naming the file and the problem: missing, not a regular file, empty, a
        size that is not a whole number of tokens, a .npy that is not 1-D integers, no
        `vocab_size`, or an id outside [0, vocab_size) (with its first position).
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")
    path = os.path.abspath(os.path.expanduser(path))
    tokens = _open(path, token_dtype)
    if not vocab_size:
        raise ValueError(f"token file {path!r} needs config.vocab_size (the number of "
                         "token ids; e.g. 50257 for GPT-2's tokenizer)")
    scanned = fingerprint(path, tokens)
    if scanned["max"] >= vocab_size or scanned["min"] < 0:
        found = _first_outside(tokens, vocab_size)
        position, bad = found if found else ("?", scanned["max"])
        raise ValueError(f"token file {path!r} holds token id {bad} at position {position} "
                         f"(the first outside [0, config.vocab_size={vocab_size}); largest "
                         f"id {scanned['max']}; wrong vocab_size or token_dtype?)")
    cut = tokens.size - max(1, int(tokens.size * valid_fraction))
    return data.Corpus(path=path, train=tokens[:cut], valid=tokens[cut:],
                       n_bytes=int(tokens.size * tokens.dtype.itemsize),
                       sha256=scanned["sha256"], n_documents=1)


def corpus_for_config(config):
    """The corpus of an lm config: a token file (`corpus` ends in .bin / .npy) or text
    (`data.load_corpus`); ValueError for vocab / dtype fields that do not fit the corpus."""
    vocab_size, token_dtype = config.get("vocab_size"), config.get("token_dtype")
    if is_token_file(config.corpus):
        return load(config.corpus, config.valid_fraction, vocab_size, token_dtype)
    if token_dtype:
        raise ValueError(f"config.token_dtype={token_dtype!r} is for token files (.bin / "
                         f".npy); config.corpus={config.corpus!r} is text")
    if vocab_size is not None and vocab_size < BYTE_VOCAB:
        raise ValueError(f"config.vocab_size={vocab_size} is too small for a byte-level "
                         f"text corpus (needs >= {BYTE_VOCAB})")
    return data.load_corpus(config.corpus, config.valid_fraction)


def vocab_size(config):
    """The model's vocabulary: `config.vocab_size`, or 256 (bytes) when unset."""
    return config.get("vocab_size") or BYTE_VOCAB
