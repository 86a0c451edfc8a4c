"""experiments.data: corpus reading, document split, seekable per-process batches."""
import errno
import hashlib
import os
import re
import sysconfig

import numpy as np
import pytest

from ravine.experiments.runtime import data


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def folder(tmp_path):
    """Forty small documents with distinct contents, plus files the corpus must skip."""
    for i in range(40):
        write(str(tmp_path / f"d{i // 10}" / f"doc{i:02d}.{('txt', 'md', 'py')[i % 3]}"),
              f"document {i} " * (i + 1))
    write(str(tmp_path / "image.png"), "not text")
    write(str(tmp_path / "site-packages" / "pkg.py"), "installed package")
    write(str(tmp_path / "__pycache__" / "x.py"), "cache")
    return tmp_path


def test_list_documents_sorted_and_filtered(folder):
    docs = data.list_documents(str(folder))
    names = [os.path.relpath(d, folder) for d in docs]
    assert names == sorted(names) and len(names) == 40
    assert not any(n.startswith(("site-packages", "__pycache__")) or n.endswith(".png")
                   for n in names)
    assert data.list_documents(docs[0]) == [docs[0]]


def test_split_is_by_whole_document_and_deterministic(folder):
    corpus = data.load_corpus(str(folder), valid_fraction=0.25)
    texts = {open(d, "rb").read() for d in data.list_documents(str(folder))}
    train = set(corpus.train.tobytes().split(b"\0"))
    valid = set(corpus.valid.tobytes().split(b"\0"))
    assert train | valid == texts and not train & valid
    assert 0 < len(valid) < len(texts)
    assert corpus.n_documents == 40
    assert corpus.n_bytes == sum(len(t) for t in texts)
    again = data.load_corpus(str(folder), valid_fraction=0.25)
    np.testing.assert_array_equal(again.valid, corpus.valid)


def test_document_keeps_its_split_when_others_are_added(folder):
    before = data.load_corpus(str(folder), valid_fraction=0.25)
    write(str(folder / "zz_new.txt"), "a new document " * 7)
    after = data.load_corpus(str(folder), valid_fraction=0.25)
    old_valid = set(before.valid.tobytes().split(b"\0"))
    assert old_valid <= set(after.valid.tobytes().split(b"\0"))
    assert after.n_documents == before.n_documents + 1


def test_hash_and_size_follow_content(folder):
    docs = data.list_documents(str(folder))
    digest = hashlib.sha256()
    for d in docs:
        digest.update(os.path.relpath(d, folder).encode() + b"\0" + open(d, "rb").read() + b"\0")
    corpus = data.load_corpus(str(folder))
    assert corpus.sha256 == digest.hexdigest()
    write(docs[3], "changed")
    changed = data.load_corpus(str(folder))  # a changed file is re-read, not served cached
    assert changed.sha256 != corpus.sha256 and changed.n_bytes != corpus.n_bytes


def test_single_file_is_split_by_position(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(1000))
    write(str(tmp_path / "one.txt"), text)
    corpus = data.load_corpus(str(tmp_path / "one.txt"), valid_fraction=0.1)
    assert corpus.train.tobytes() + corpus.valid.tobytes() == text.encode()
    assert corpus.valid.size == 100


@pytest.mark.parametrize("make", ["missing", "empty_folder", "empty_file", "other_files"])
def test_missing_or_empty_corpus_names_the_path(tmp_path, make):
    path = tmp_path / "corpus"
    if make == "empty_folder":
        path.mkdir()
    elif make == "empty_file":
        path = tmp_path / "corpus.txt"
        path.write_text("")
    elif make == "other_files":
        path.mkdir()
        (path / "a.csv").write_text("1,2")
    with pytest.raises(ValueError, match=str(path)):
        data.load_corpus(str(path))


def test_too_small_corpus_for_the_sequence_length(tmp_path):
    write(str(tmp_path / "a.txt"), "x" * 50)
    corpus = data.load_corpus(str(tmp_path / "a.txt"), valid_fraction=0.2)
    data.check_length(corpus, seq_len=9)
    with pytest.raises(ValueError, match="valid split has 10 bytes"):
        data.check_length(corpus, seq_len=10)


def test_default_corpus_is_the_stdlib_without_installed_packages():
    assert data.default_corpus_path() == sysconfig.get_paths()["stdlib"]
    docs = data.list_documents(data.default_corpus_path())
    assert any(d.endswith(os.sep + "os.py") for d in docs)
    assert not any(f"{os.sep}site-packages{os.sep}" in d for d in docs)
    corpus = data.load_corpus("")
    assert corpus.n_bytes > 5_000_000 and corpus.valid.size > 100_000
    assert corpus.train.dtype == np.uint8


RAMP = (np.arange(5000) % 256).astype(np.uint8)  # each window is a run of consecutive bytes


def test_batches_are_windows_and_seekable():
    batch = data.sample_batch(RAMP, seed=3, index=7, batch_size=6, seq_len=16)
    assert batch.shape == (1, 6, 17) and batch.dtype == np.uint8
    np.testing.assert_array_equal(np.diff(batch.astype(int), axis=-1) % 256, 1)
    np.testing.assert_array_equal(
        batch, data.sample_batch(RAMP, seed=3, index=7, batch_size=6, seq_len=16))
    other_step = data.sample_batch(RAMP, seed=3, index=8, batch_size=6, seq_len=16)
    other_seed = data.sample_batch(RAMP, seed=4, index=7, batch_size=6, seq_len=16)
    evaluation = data.sample_batch(RAMP, seed=3, index=7, batch_size=6, seq_len=16,
                                   stream=data.EVAL_STREAM)
    for other in (other_step, other_seed, evaluation):
        assert not np.array_equal(batch, other)


def test_batches_cover_the_whole_array_edges():
    tiny = np.arange(10, dtype=np.uint8)
    rows = np.concatenate([data.sample_batch(tiny, 0, i, 50, 8)[0] for i in range(4)])
    assert {row[0] for row in rows} == {0, 1}  # starts 0 and 1 are the only full windows


def test_processes_read_disjoint_shares_of_the_global_batch():
    whole = data.sample_batch(RAMP, seed=0, index=5, batch_size=8, seq_len=10, micro_batches=3)
    shares = [data.sample_batch(RAMP, seed=0, index=5, batch_size=8, seq_len=10,
                                micro_batches=3, process_index=p, process_count=4)
              for p in range(4)]
    assert shares[0].shape == (3, 2, 11)
    np.testing.assert_array_equal(np.concatenate(shares, axis=1), whole)
    with pytest.raises(ValueError, match="batch_size 6"):
        data.sample_batch(RAMP, 0, 0, 6, 10, process_index=0, process_count=4)


def test_micro_batches_hold_the_same_windows_as_one_big_batch():
    micro = data.sample_batch(RAMP, seed=1, index=2, batch_size=8, seq_len=12, micro_batches=4)
    whole = data.sample_batch(RAMP, seed=1, index=2, batch_size=32, seq_len=12)
    np.testing.assert_array_equal(micro.reshape(1, 32, 13), whole)


@pytest.mark.parametrize("special", ["fifo", "broken_link", "folder_named_txt"])
def test_special_files_in_a_corpus_folder_are_refused_by_name(folder, special):
    """A FIFO would block the read forever; a broken link cannot be read; neither is text."""
    path = folder / "d0" / "special.txt"
    if special == "fifo":
        os.mkfifo(path)
        needle = "is a FIFO"
    elif special == "broken_link":
        os.symlink(folder / "no_such_target.txt", path)
        needle = "is a broken symbolic link"
    else:
        path.mkdir()
        (path / "inner.txt").write_text("text")  # a folder named *.txt: walked into, fine
        data.load_corpus(str(folder))
        return
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}' {needle}"):
        data.load_corpus(str(folder))


def test_a_device_as_corpus_is_named_as_such():
    with pytest.raises(ValueError, match="'/dev/null' is a character device, not a text file"):
        data.load_corpus("/dev/null")


def test_an_unreadable_corpus_file_is_named(folder, monkeypatch):
    path = folder / "d1" / "doc11.py"
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: make the read fail as it would for a user
        def denied(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return open(file, *args, **kwargs)

        monkeypatch.setattr(data, "open", denied, raising=False)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}' cannot be read: "
                                         "Permission denied"):
        data.load_corpus(str(folder))
