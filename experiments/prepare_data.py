r"""Writes a token file from a text corpus: bytes as tokens (vocab 256), nothing downloaded.

    python -m ravine.experiments.prepare_data --corpus=DIR --out=tokens.bin          # uint16 .bin
    python -m ravine.experiments.prepare_data --out=stdlib.npy --dtype=uint8         # default corpus
    python -m ravine.experiments.train --config=experiments/configs/lm.py:tiny --workdir=runs/tok \
        --config.corpus=tokens.bin --config.vocab_size=256

The documents are read as experiments.train reads a text corpus (a file, or the .txt / .md /
.py files under a folder in sorted order; "" = the Python standard library) and joined
with a 0 byte. A `.bin` is headerless (nanoGPT's format: train on it with
`--config.token_dtype` set to the same `--dtype` when it is not uint16); a `.npy` keeps its
dtype. Training on a token file holds out its last `config.valid_fraction` of tokens for
evaluation (a split by position, where the text corpus splits by document).
"""
import os

import numpy as np
from absl import flags

from ravine.experiments.runtime import cli, data, token_files

_CORPUS = flags.DEFINE_string("corpus", "", "Text file or folder (default: the stdlib).")
_OUT = flags.DEFINE_string("out", None, "Token file to write: a .bin or .npy path.")
_DTYPE = flags.DEFINE_enum("dtype", "uint16", ["uint8", "uint16", "uint32"], "Token dtype.")


def byte_tokens(path, dtype="uint16"):
    """The documents of text corpus `path` ("" = the stdlib) as one array of byte ids,
    joined by 0 bytes."""
    path = os.path.abspath(os.path.expanduser(path or data.default_corpus_path()))
    parts = []
    for document in data.list_documents(path):
        try:
            with open(document, "rb") as f:
                parts.append(f.read())
        except OSError as error:
            raise ValueError(f"corpus file {document!r} cannot be read: {error.strerror}"
                             ) from None
    joined = data.SEPARATOR.join(part for part in parts if part)
    if not joined:
        raise ValueError(f"corpus {path!r} is empty (0 bytes)")
    return np.frombuffer(joined, np.uint8).astype(dtype)


def write(tokens, out):
    """Writes `tokens` to `out` (.npy with its dtype, else raw native-order bytes)."""
    if out.endswith(".npy"):
        np.save(out, tokens)
    else:
        tokens.tofile(out)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    out = _OUT.value
    if not out or not token_files.is_token_file(out):
        cli.fail(f"--out must be a .bin or .npy path, got {out!r}")
    with cli.usage_errors():
        tokens = byte_tokens(_CORPUS.value, _DTYPE.value)
    try:
        write(tokens, out)
    except OSError as error:
        cli.fail(f"--out {out!r}: {error.strerror or error}")
    dtype_flag = "" if out.endswith(".npy") or _DTYPE.value == "uint16" else (
        f" --config.token_dtype={_DTYPE.value}")
    print(f"prepare_data: wrote {tokens.size:,} tokens ({_DTYPE.value}, vocab "
          f"{token_files.BYTE_VOCAB}) to {out}; train on it with --config.corpus={out} "
          f"--config.vocab_size={token_files.BYTE_VOCAB}{dtype_flag}")


def run_script():
    """`ravine-prepare-data` / `python -m ravine.experiments.prepare_data`."""
    cli.run(main)


if __name__ == "__main__":
    run_script()
