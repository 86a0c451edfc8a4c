"""Already-tokenized corpora: a flat array of token ids in a `.bin` or `.npy` file.

    python -m ravine.experiments.train --config=experiments/configs/lm.py:tiny --workdir=runs/tok \
        --config.corpus=tokens.bin --config.vocab_size=50257      # nanoGPT's GPT-2 .bin

- `.bin`: headerless, native byte order, `config.token_dtype` (default uint16, as nanoGPT's
  prepare scripts write; uint32 for vocabularies above 65536). `.npy`: its own dtype
  (a 1-D integer array). Either is memory-mapped: nothing is read until a batch needs it.
- `config.vocab_size` is required (the model's embedding size); ids must be < it. A sample
  is checked at start-up (`CHECK_CHUNKS` evenly spaced chunks of `CHUNK` tokens, plus the
  file's ends), not the whole file.
- Split by position: the last `config.valid_fraction` of the tokens (default 5%) is the
  validation split, the rest the training split. Batches are drawn exactly as from the
  text corpus (`data.sample_batch`: seekable, each process reads its own rows), so resumes
  are exact and several hosts read one shared file.
- The corpus' `sha256` (what a resume compares) covers the dtype, the length and the
  sampled chunks, not every byte: hashing a multi-GB file at each start would take seconds.

`python -m ravine.experiments.prepare_data --corpus=DIR --out=tokens.bin` writes a token file
from a text corpus (bytes as tokens, vocab 256).
"""
import hashlib
import os

import numpy as np

from ravine.experiments.runtime import data

SUFFIXES = (".bin", ".npy")
BIN_DTYPES = ("uint8", "uint16", "uint32", "int32")
DEFAULT_BIN_DTYPE = "uint16"
CHUNK, CHECK_CHUNKS = 4096, 256
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


def _sample(tokens):
    """`CHECK_CHUNKS` evenly spaced chunks of `CHUNK` tokens (the whole array if small)."""
    if tokens.size <= CHUNK * CHECK_CHUNKS:
        return [np.asarray(tokens)]
    starts = np.linspace(0, tokens.size - CHUNK, CHECK_CHUNKS).astype(np.int64)
    return [np.asarray(tokens[s:s + CHUNK]) for s in starts]


def load(path, valid_fraction=0.05, vocab_size=None, token_dtype=None):
    """A `data.Corpus` over a token file (see the module docstring).

    Raises:
      ValueError: naming the file and the problem: missing, not a regular file, empty, a
        size that is not a whole number of tokens, a .npy that is not 1-D integers, no
        `vocab_size`, or an id outside [0, vocab_size) in the sample.
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")
    path = os.path.abspath(os.path.expanduser(path))
    tokens = _open(path, token_dtype)
    if not vocab_size:
        raise ValueError(f"token file {path!r} needs config.vocab_size (the number of "
                         "token ids; e.g. 50257 for GPT-2's tokenizer)")
    digest = hashlib.sha256(f"{tokens.dtype.str}:{tokens.size}:".encode())
    for chunk in _sample(tokens):
        digest.update(chunk.tobytes())
        low, high = int(chunk.min()), int(chunk.max())
        if high >= vocab_size or low < 0:
            bad = high if high >= vocab_size else low
            raise ValueError(f"token file {path!r} holds token id {bad}, outside "
                             f"[0, config.vocab_size={vocab_size}) (wrong vocab_size or "
                             "token_dtype?)")
    cut = tokens.size - max(1, int(tokens.size * valid_fraction))
    return data.Corpus(path=path, train=tokens[:cut], valid=tokens[cut:],
                       n_bytes=int(tokens.size * tokens.dtype.itemsize),
                       sha256=digest.hexdigest(), n_documents=1)


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
