"""Issue 28, runs under faults: a changed token file, damaged race files, one lock per race
workdir, one-line errors. In-process and without training where the check allows it."""
import dataclasses
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from ravine.experiments import race, train
from ravine.experiments.configs import lm
from ravine.optim import _validate
from ravine.experiments.runtime import (builders, checkpointing, cli, loop, metrics,
                                        preemption, profiling, run_identity, setup, sweep,
                                        token_files)
from ravine.experiments.runtime import workdir as workdir_lib
from tests.scripts import LOCK_HOLDER, Jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """This file's runs of the scripts, each a child of one process that imported the train
    job and the race's dependencies once (tests/scripts.py: a `python -m` start is
    3-4 s of imports). No compilation cache, for all: the two-SIGTERMs run compiles its
    first step; the others end before compiling anything."""
    server = Jobs(str(tmp_path_factory.mktemp("jobs")), {**ENV, "JAX_COMPILATION_CACHE_DIR": ""},
                  ["ravine.experiments.runtime.loop", "ravine.experiments.runtime.sweep",
                   "ravine.experiments.race_stats", "ml_collections.config_flags"])
    yield server
    server.close()


# ----------------------------------------------------------------------------- token files

OLD_CHUNK, OLD_CHECK_CHUNKS = 4096, 256  # what the fingerprint used to sample


def _old_sampled(size):
    """Whether each position was in the sampled chunks of the old fingerprint."""
    starts = np.linspace(0, size - OLD_CHUNK, OLD_CHECK_CHUNKS).astype(np.int64)
    covered = np.zeros(size, bool)
    for start in starts:
        covered[start:start + OLD_CHUNK] = True
    return covered


def test_a_same_size_token_file_changed_anywhere_is_refused_on_resume(tmp_path):
    size = 3 * OLD_CHUNK * OLD_CHECK_CHUNKS
    tokens = np.random.default_rng(0).integers(0, 1000, size).astype(np.uint16)
    path = str(tmp_path / "tokens.bin")
    tokens.tofile(path)
    before = token_files.load(path, vocab_size=1000)
    assert os.path.exists(token_files.cache_path(path))
    position = int(np.flatnonzero(~_old_sampled(size))[size // 10 % 1000])
    changed = tokens.copy()
    changed[position] = (changed[position] + 1) % 1000
    stat = os.stat(path)
    changed.tofile(path + ".new")
    os.replace(path + ".new", path)  # same size; even the old mtime restored:
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = token_files.load(path, vocab_size=1000)
    assert after.sha256 != before.sha256

    config = lm.get_config("tiny")
    config.corpus = path
    meta = {"step": 10, "signature": "same", "corpus_sha256": before.sha256,
            "config": run_identity.config_record(config)}
    resumed = types.SimpleNamespace(config=config, corpus=after, signature="same")
    with pytest.raises(cli.UsageError, match=f"corpus \\(SHA-256 of '{path}'"):
        run_identity.check_same_run(resumed, str(tmp_path / "w"), meta)
    same = types.SimpleNamespace(config=config, corpus=before, signature="same")
    run_identity.check_same_run(same, str(tmp_path / "w"), meta)  # unchanged: resumes


def test_a_stale_damaged_or_unwritable_hash_cache_is_harmless(tmp_path, monkeypatch):
    path = str(tmp_path / "t.bin")
    np.arange(5000, dtype=np.uint16).tofile(path)
    truth = token_files.load(path, vocab_size=5000).sha256
    with open(token_files.cache_path(path)) as f:
        assert json.load(f)["sha256"] == truth
    for garbage in ("{not json", "[]", '{"key": 3}', ""):
        with open(token_files.cache_path(path), "w") as f:
            f.write(garbage)
        assert token_files.load(path, vocab_size=5000).sha256 == truth
    with open(token_files.cache_path(path)) as f:  # rewritten
        assert json.load(f)["sha256"] == truth
    with open(token_files.cache_path(path)) as f:
        cached = json.load(f)
    cached["sha256"] = "0" * 64
    cached["key"]["mtime_ns"] -= 1  # a stale entry: another version of the file
    with open(token_files.cache_path(path), "w") as f:
        json.dump(cached, f)
    assert token_files.load(path, vocab_size=5000).sha256 == truth

    os.remove(token_files.cache_path(path))

    def unwritable(**_):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(token_files.tempfile, "mkstemp", unwritable)
    assert token_files.load(path, vocab_size=5000).sha256 == truth
    assert not os.path.exists(token_files.cache_path(path))
    assert os.listdir(tmp_path) == ["t.bin"]


def test_an_out_of_range_id_anywhere_is_named_with_its_position(tmp_path):
    size = 3 * OLD_CHUNK * OLD_CHECK_CHUNKS + 7
    tokens = np.random.default_rng(1).integers(0, 1000, size).astype(np.uint16)
    tokens[-1] = 1000
    path = str(tmp_path / "tokens.bin")
    tokens.tofile(path)
    with pytest.raises(ValueError, match=f"'{path}' holds token id 1000 at position "
                                         f"{size - 1} "):
        token_files.load(path, vocab_size=1000)
    tokens[size // 2 + 3] = 4000  # the first one is named, with the largest
    tokens.tofile(path + ".new")
    os.replace(path + ".new", path)
    with pytest.raises(ValueError, match=f"token id 4000 at position {size // 2 + 3} .*"
                                         "largest id 4000"):
        token_files.load(path, vocab_size=1000)
    assert token_files.load(path, vocab_size=4001).train.size > 0


def test_a_race_on_changed_data_is_refused_naming_the_corpus(tmp_path):
    base, workdir = lm.get_config("tiny"), str(tmp_path)
    corpus = types.SimpleNamespace(path="/data/tokens.bin", sha256="a" * 64)
    race.check_same_race(workdir, base, 4, {}, corpus)  # records it
    race.check_same_race(workdir, base, 4, {}, corpus)  # the same data: fine
    changed = types.SimpleNamespace(path="/data/tokens.bin", sha256="b" * 64)
    with pytest.raises(ValueError, match="corpus '/data/tokens.bin' changed"):
        race.check_same_race(workdir, base, 4, {}, changed)
    with open(tmp_path / race.RACE_FILE) as f:
        saved = json.load(f)
    del saved["corpus_sha256"]  # a race.json from before the hash was recorded
    (tmp_path / race.RACE_FILE).write_text(json.dumps(saved))
    race.check_same_race(workdir, base, 4, {}, changed)


# ----------------------------------------------------------------------------- race files


def _rows(steps, every=4, loss=2.0):
    return [{"step": step, "loss": loss, "eval_loss": loss} for step in range(0, steps + 1,
                                                                              every)]


class _FakeEngine:
    """Stands for `sweep.Engine`: "trains" a run into finite rows, measures a timing."""

    def __init__(self, steps):
        self.steps, self.trained, self.measured = steps, [], 0
        self.setup = types.SimpleNamespace(n_params=1234)

    def train_group(self, runs, group_dir, vectorized=False):
        self.trained += list(runs)
        return {run: _rows(self.steps, loss=1.5) for run in runs}

    def seconds_per_step(self, lr):
        self.measured += 1
        return 0.25

    def state_bytes(self):
        return 4096


def _job(workdir):
    config = race.run_config(lm.get_config("tiny"), "adamw", 1e-3, evals=4)
    job = race.OptimizerSweep(config, str(workdir), "loop", 1)
    job._engine = _FakeEngine(config.steps)  # noqa: SLF001 - no training in this test
    return job, config.steps


def test_damaged_run_files_are_retrained_with_one_warning_never_diverged(tmp_path, capsys):
    job, steps = _job(tmp_path)
    runs = [sweep.SweepRun(1e-3, seed) for seed in range(8)]
    os.makedirs(job.runs_dir)
    good = "".join(json.dumps(row) + "\n" for row in _rows(steps))
    diverged = [{"step": 0, "loss": 5.0, "eval_loss": 5.0},
                {"step": 4, "loss": math.nan}]  # a loop run stops on a non-finite loss
    contents = {
        0: good,                                         # finished: read back
        1: "".join(json.dumps(r) + "\n" for r in diverged),  # diverged: read back as such
        2: good[:len(good) // 2],                        # cut inside a line
        3: "".join(json.dumps(row) + "\n" for row in _rows(steps)[:2]),  # cut at a line end
        4: "",                                           # empty
        5: "not json at all\n",                          # garbage
        6: good.replace("\n", "\n[1, 2]\n", 1),          # a line that is not a row
        # 7: no file yet: trained
    }
    for seed, text in contents.items():
        with open(job._path(runs[seed]), "w") as f:  # noqa: SLF001
            f.write(text)
    records = job.train(runs)
    assert job.engine.trained == runs[2:]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5, err
    for seed, line in zip(range(2, 7), err):
        assert line.startswith(f"warning: race: {job._path(runs[seed])} ")  # noqa: SLF001
        assert line.endswith("; training that run again")
    assert "ends at step 4 of" in err[1] and "is empty" in err[2]
    assert not records[runs[0]]["diverged"] and records[runs[1]]["diverged"]
    assert all(not records[run]["diverged"] for run in runs[2:])
    assert all(records[run]["final_eval_loss"] == 1.5 for run in runs[2:])
    # Read back by a later invocation: nothing trained, nothing warned.
    again, _ = _job(tmp_path)
    assert again.missing(runs) == [] and capsys.readouterr().err == ""


def test_a_garbage_timing_file_is_measured_again_with_one_warning(tmp_path, capsys):
    job, _ = _job(tmp_path)
    os.makedirs(job.runs_dir)
    path = os.path.join(job.runs_dir, race.TIMING_FILE)
    for garbage in ('{"seconds_per_step": 0.1', "[]", '{"seconds_per_step": "x"}', ""):
        with open(path, "w") as f:
            f.write(garbage)
        assert job.timing(1e-3) == {"seconds_per_step": 0.25, "state_bytes": 4096,
                                    "params": 1234}
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"warning: race: {path} ") and "measuring again" in line
    assert job.timing(1e-3)["seconds_per_step"] == 0.25  # read back now
    assert job.engine.measured == 4 and capsys.readouterr().err == ""


@pytest.mark.parametrize("garbage", ["{bad json", "[1, 2]", '{"evals": 4}', ""])
def test_a_garbage_race_json_is_one_error_naming_it(tmp_path, garbage):
    path = tmp_path / race.RACE_FILE
    path.write_text(garbage)
    with pytest.raises(ValueError) as error:
        race.check_same_race(str(tmp_path), lm.get_config("tiny"), 4, {})
    message = cli.one_line(error.value)
    assert message.startswith(f"{str(path)!r} ") and "new --workdir" in message


# ----------------------------------------------------------------------------- race workdir


def test_a_second_race_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "race")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, workdir], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    base = lm.get_config("tiny")
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lib.WorkdirBusy) as error:
            with race.claim_workdir(workdir, base, 4, {}):
                pytest.fail("the race ran beside another")
        message = cli.one_line(error.value)
        assert f"pid {holder.pid}" in message and repr(workdir) in message
        assert sorted(os.listdir(workdir)) == [workdir_lib.LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    with race.claim_workdir(workdir, base, 4, {}):  # the kernel released the lock
        assert os.path.exists(os.path.join(workdir, race.RACE_FILE))
        with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {os.getpid()}"):
            with race.claim_workdir(workdir, base, 4, {}):
                pass


def test_a_race_workdir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    with pytest.raises(cli.UsageError) as error:
        with race.claim_workdir(str(path), lm.get_config("tiny"), 4, {}):
            pass
    message = cli.one_line(error.value)
    assert message.startswith(f"--workdir {str(path)!r} cannot be used") and "\n" not in str(
        error.value)
    assert path.read_text() == "not a folder"


def test_the_race_script_exits_2_with_one_line_on_a_file_workdir(tmp_path, jobs):
    (tmp_path / "file").write_text("not a folder")
    done = jobs.start(["ravine.experiments.race", "--workdir=file", "--optimizers=adamw",
                       "--lrs=1e-3,2e-3"], cwd=tmp_path)
    _, stderr = done.communicate(timeout=300)
    assert done.returncode == 2, stderr[-2000:]
    assert (jobs.import_noise() + stderr).splitlines() == [  # (imports' lines lead a job's)
        "error: --workdir 'file' cannot be used: File exists (file)"]


# ----------------------------------------------------------------------------- one-line errors


def test_an_exit_code_out_of_range_is_one_short_line(capsys):
    config = lm.get_config("tiny")
    config.preempt_exit_code = 300
    with pytest.raises(SystemExit) as done, cli.usage_errors():
        builders.validate(config)
    assert done.value.code == 2
    assert capsys.readouterr().err == (
        "error: config.preempt_exit_code must be one of 0-255, got 300\n")
    with pytest.raises(ValueError, match=r"must be one of \[1, 2, 4\], got 3"):  # listed
        _validate.one_of("x", 3, (1, 2, 4))


def test_the_race_refuses_init_from_in_one_line():
    base = lm.get_config("tiny")
    race.check_base(base)  # unset: fine
    base.init_from = "runs/other:10"
    with pytest.raises(ValueError, match="init_from='runs/other:10': the race .*cannot "
                                         "branch"):
        race.check_base(base)


# ----------------------------------------------------------------------------- branches, damage
# Trained in-process on a tiny model: 8 steps, checkpoints at 4 and 8.

WORDS = "a branch of the lazy dog and the quick brown fox over seven damaged folders".split()
RUN = {"steps": 8, "batch_size": 8, "seq_len": 32, "log_every": 4, "eval_every": 4,
       "checkpoint_every": 4, "keep_checkpoints": 5, "eval_batches": 1, "model.n_layers": 1,
       "schedule.name": "constant", "schedule.warmup_steps": None,
       "optimizer.learning_rate": 3e-3, "tensorboard": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(8):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=300)) + "\n")
    return str(folder)


def _config(corpus, **overrides):
    config = lm.get_config("tiny")
    for key, value in {**RUN, "corpus": corpus, **overrides}.items():
        *parents, name = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        target[name] = value
    return builders.adapt_to_optimizer(config)


def _losses(workdir):
    return {row["step"]: row["loss"]
            for row in metrics.MetricsLog(os.path.join(workdir, metrics.METRICS_FILE)).rows()}


def _damage(checkpoint):
    """Removes the largest array file of a checkpoint folder (as a lost or cut file)."""
    files = [os.path.join(root, name) for root, _, names in os.walk(checkpoint)
             for name in names if os.sep + "state" + os.sep in os.path.join(root, name)]
    os.remove(max(files, key=os.path.getsize))


def _listing(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, dirs, names in os.walk(folder) for name in dirs + names)


@pytest.mark.slow
def test_init_from_is_the_runs_identity_and_damaged_sources_fall_back(corpus, tmp_path,
                                                                      capsys, caplog,
                                                                      monkeypatch):
    """Items 4, 7, 11 and 12 of issue 28, on one set of compiled steps (a Setup whose config
    differs only in its branch point or profile_steps: nothing compiled again)."""
    monkeypatch.setattr(loop, "plot_losses", lambda *_: None)  # seconds of matplotlib
    s = setup.setup(_config(corpus))

    def train_as(workdir, **overrides):
        config = _config(corpus, **overrides)
        return loop.train(config, workdir, progress=False,
                          prepared=dataclasses.replace(s, config=config))

    src, a, b = (str(tmp_path / name) for name in ("src", "a", "b"))
    train_as(src)                                 # checkpoints 4 and 8
    train_as(a, init_from=f"{src}:4")             # a branch at 4, finished
    capsys.readouterr()
    # 4: a resume with another branch point is refused, listing it, before anything changes
    before = _listing(a)
    for overrides, change in [({"init_from": f"{src}:8"}, f"init_from '{src}:4' -> '{src}:8'"),
                              ({"init_from": ""}, f"init_from '{src}:4' -> ''"),
                              ({"init_from": f"{src}:4", "init_from_optimizer": True},
                               "init_from_optimizer False -> True")]:
        with pytest.raises(cli.UsageError) as error:
            train_as(a, **overrides)
        assert change in str(error.value) and "\n" not in str(error.value)
    assert _listing(a) == before
    train_as(a, init_from=f"{src}/:4")            # the same branch point, spelt otherwise
    with pytest.raises(cli.UsageError, match=f"init_from '' -> '{a}'"):
        train_as(src, init_from=a)                # a run that was no branch is not one now

    # 7: the newest source checkpoint damaged: the one before, with one warning line
    _damage(os.path.join(src, run_identity.CHECKPOINT_DIR, "8"))
    capsys.readouterr()
    train_as(b, init_from=src)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: config.init_from={src!r}: checkpoint 8 of {src!r} "
                           "cannot be restored (")
    assert line.endswith("branching from the one before")
    assert _losses(b) == _losses(a) and sorted(_losses(a)) == [4, 8]  # branched at 4, as a
    #    every one damaged, or the STEP asked for: one line naming it
    _damage(os.path.join(src, run_identity.CHECKPOINT_DIR, "4"))
    for spec, needle in [(src, f"no checkpoint of {src!r} can be restored (newest: 8, "),
                         (f"{src}:4", f"checkpoint 4 of {src!r} cannot be restored (")]:
        with pytest.raises(cli.UsageError) as error:
            train_as(str(tmp_path / "c"), init_from=spec)
        assert needle in str(error.value) and "\n" not in str(error.value)
    gc.collect()  # Orbax's other failed reads: never a "Task exception was never retrieved"
    assert capsys.readouterr().err == "" and not [
        record for record in caplog.records if record.name == "asyncio"]

    # 12: a source that is no run folder: one line, before the workdir is made
    empty, a_file = tmp_path / "empty", tmp_path / "file"
    empty.mkdir()
    a_file.write_text("not a run")
    for spec, needle in [(str(empty), f"no checkpoint in {str(empty)!r} (it has none)"),
                         (str(a_file), f"{str(a_file)!r} is a file, not a run's workdir"),
                         (f"{a}:abc", "STEP must be a checkpoint's step (DIR:STEP, an "
                                      "integer), got 'abc'"),
                         (str(tmp_path / "nowhere"), "does not exist")]:
        with pytest.raises(cli.UsageError, match=re.escape(needle)):
            train_as(str(tmp_path / "d"), init_from=spec)
    assert not os.path.exists(tmp_path / "d")

    # 11: profile_steps that cannot give a trace: one line, before the workdir is touched
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "plugins").write_text("a file where the trace goes")
    with pytest.raises(cli.UsageError, match="the trace goes under .* but '.*plugins' is a "
                                             "file"):
        train_as(str(tmp_path / "e"), profile_steps="2,2")
    assert os.listdir(tmp_path / "e") == ["plugins"]
    with pytest.raises(cli.UsageError, match=r"START 100 is past the run's last step \(8\)"):
        train_as(str(tmp_path / "f"), profile_steps="100,3")
    assert not os.path.exists(tmp_path / "f")


def test_profile_ranges_the_run_passes_or_cuts_short_are_one_warning(tmp_path, capsys):
    profiling.check("", str(tmp_path), 20)
    profiling.check("18,3", str(tmp_path), 20)
    assert capsys.readouterr().err == ""
    profiling.check("18,5", str(tmp_path), 20)
    assert capsys.readouterr().err == ("warning: config.profile_steps='18,5': the run ends at "
                                       "step 20, so the trace covers steps 18-20 only\n")
    profiling.Profiler("10,3", str(tmp_path)).warn_if_done(9)
    assert capsys.readouterr().err == ""
    profiling.Profiler("10,3", str(tmp_path)).warn_if_done(12)
    assert capsys.readouterr().err == ("warning: config.profile_steps: steps 10-12 ran before "
                                       "this resume from step 12; no trace is written\n")


@pytest.mark.slow
def test_a_damaged_group_checkpoint_is_skipped_with_one_warning(corpus, tmp_path, capsys):
    """Item 6: a race's group resumes past a damaged checkpoint to the same rows (so the same
    report) as a group never interrupted, naming the checkpoint in one warning line."""
    config = race.run_config(_config(corpus), "adamw", 3e-3, evals=2)
    engine = sweep.Engine(config)
    runs = [sweep.SweepRun(3e-3, 0)]
    group = str(tmp_path / race.GROUPS_DIR / "adamw" / "loop_x")
    whole = engine.train_group(runs, group)       # leaves its checkpoint 4 (keep 1)
    assert os.listdir(group) == ["4"]
    _damage(os.path.join(group, "4"))
    capsys.readouterr()
    assert engine.train_group(runs, group) == whole  # from the start
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: {group}: checkpoint 4 cannot be restored (")
    assert line.endswith("starting from the beginning")
    assert engine.train_group(runs, group) == whole  # its checkpoint 4 saved anew
    assert capsys.readouterr().err == ""


def test_orbax_failed_read_reports_are_dropped_and_others_kept():
    """asyncio's "... exception was never retrieved" for Orbax's other failed reads of a damaged
    checkpoint comes as a Task, a Future or a _GatheringFuture, depending on which read the
    garbage collector reaches first (CI saw the Future and _GatheringFuture forms under load);
    each is dropped, by its message or its traceback through Orbax. Another task's is kept."""
    import logging

    def record(message, exc_info=None):
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1771, message,
                                 None, exc_info)

    def raised_in(filename):
        code = compile("raise ValueError('read failed')", filename, "exec")
        try:
            exec(code, {})
        except ValueError:
            return sys.exc_info()

    keep = checkpointing._FailedReadFilter().filter
    assert not keep(record("Task exception was never retrieved\nfuture: <Task finished "
                           "coro=<_read_array_index_and_device_put() done, defined at "
                           "/x/orbax/checkpoint/serialization.py:300>>"))
    assert not keep(record("Future exception was never retrieved\nfuture: <Future finished "
                           "exception=ValueError('FAILED_PRECONDITION: Error reading \"params.w/0\" "
                           "in OCDBT database at local file \"/run/checkpoints/4/state/\"')>"))
    assert not keep(record("_GatheringFuture exception was never retrieved\nfuture: "
                           "<_GatheringFuture finished exception=Exception('read failed')>",
                           raised_in("/site-packages/orbax/checkpoint/_src/serialization.py")))
    assert keep(record("Task exception was never retrieved\nfuture: <Task finished "
                       "coro=<fetch() done>>", raised_in("/home/user/fetch.py")))
    assert keep(record("Unclosed client session"))


# ----------------------------------------------------------------------------- signals


def test_a_second_signal_exits_at_once_with_one_line_and_later_ones_are_ignored(
        tmp_path, monkeypatch, capfd):
    """Item 8, in-process: the train job's handler; `os._exit` replaced to be seen."""
    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(train.os, "_exit", fake_exit)
    (tmp_path / run_identity.CHECKPOINT_DIR / "8").mkdir(parents=True)
    (tmp_path / run_identity.CHECKPOINT_DIR / "12.orbax-checkpoint-tmp-3").mkdir()
    for sig, code in [(signal.SIGINT, 130), (signal.SIGTERM, 99)]:
        stop = preemption.StopSignal(exit_now=train._exit_now(str(tmp_path), 99))  # noqa: SLF001
        with stop.installed():
            os.kill(os.getpid(), sig)
            assert stop.reached(1) and capfd.readouterr().err == ""
            with pytest.raises(Exited) as exited:
                os.kill(os.getpid(), sig)
            os.kill(os.getpid(), signal.SIGTERM)  # a third: ignored
            os.kill(os.getpid(), signal.SIGINT)
        assert exited.value.args == (code,)
        assert capfd.readouterr().err == (
            f"interrupted by a second {signal.Signals(sig).name}; re-running the same command "
            "resumes from checkpoint 8\n")
    with pytest.raises(Exited) as exited:  # a code set-up refuses: the default
        train._exit_now(str(tmp_path), 300)("SIGTERM")  # noqa: SLF001
    assert exited.value.args == (143,)
    capfd.readouterr()


@pytest.mark.slow
def test_two_sigterms_during_the_first_compile_exit_143_with_one_line(corpus, tmp_path, jobs):
    """Item 8 end to end: SIGTERM as the first step starts compiling, another 0.3 s later
    (the interpreter crashed with exit 139 when the second raised inside the compilation)."""
    workdir = str(tmp_path / "run")
    flags = [f"--config.{key}={value}" for key, value in {**RUN, "steps": 200}.items()]
    process = jobs.start(["ravine.experiments.train", "--config=experiments/configs/lm.py:tiny",
                          f"--workdir={workdir}", f"--config.corpus={corpus}", *flags])
    deadline = time.time() + 300
    while "0/200" not in process.stderr():  # the progress bar: the loop is about to compile
        assert process.poll() is None and time.time() < deadline, process.stderr()[-2000:]
        time.sleep(0.01)                     # step 1 (without a cache: seconds)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "Fatal" not in stderr
    # Python runs a handler between bytecodes: two signals that both land inside one C++
    # call are seen as one, and the run stops after its first step as for one.
    assert stderr.splitlines()[-1] in (
        "interrupted by a second SIGTERM; re-running the same command resumes from the start "
        "(no checkpoint yet)",
        "stopped by SIGTERM at step 1 (checkpoint 1 saved); re-running the same command "
        "resumes from it")


@pytest.mark.slow
def test_a_bad_init_from_exits_2_with_one_line_and_no_orbax_traceback(corpus, tmp_path,
                                                                      jobs):
    """Item 12 end to end (the other sources' lines are checked in-process above)."""
    (tmp_path / "empty").mkdir()
    done = jobs.start(["ravine.experiments.train", "--config=experiments/configs/lm.py:tiny",
                       f"--workdir={tmp_path / 'run'}", f"--config.corpus={corpus}",
                       f"--config.init_from={tmp_path / 'empty'}"])
    _, stderr = done.communicate(timeout=300)
    assert done.returncode == 2, stderr[-3000:]
    assert (jobs.import_noise() + stderr).splitlines() == [
        f"error: config.init_from='{tmp_path / 'empty'}': no checkpoint in "
        f"'{tmp_path / 'empty'}' (it has none)"]
    assert not os.path.exists(tmp_path / "run")


def test_a_checkpoint_folder_leaves_no_orbax_thread_running(tmp_path):
    """Item 12's cause: Orbax cleans a folder in a thread it waited for only at the first
    save, so a run stopping before one left it running into interpreter shutdown."""
    os.makedirs(tmp_path / "c" / "4.orbax-checkpoint-tmp-1")  # a killed save's leftover
    checkpoints = checkpointing.Checkpoints(str(tmp_path / "c"))
    try:
        assert not [thread for thread in threading.enumerate()
                    if "_target_setting_result" in thread.name]
        assert os.listdir(tmp_path / "c") == []
    finally:
        checkpoints.close()
