"""Issue 21, the research workflow: metric writers (TensorBoard, W&B), per-layer norms,
profiler traces, token-file corpora, and a user's own optimizer (--optimizer_module)."""
import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ravine.experiments.runtime import loop, setup
from ravine import optim
from ravine.experiments.runtime import builders, data, layer_norms, metrics, token_files, user_modules, writers
from ravine.experiments import prepare_data
from ravine.experiments.configs import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
SMALL = {"steps": 4, "batch_size": 8, "seq_len": 32, "log_every": 2, "eval_every": 4,
         "checkpoint_every": 2, "eval_batches": 1}


def tiny_config(**overrides):
    config = lm.get_config("tiny")
    config.schedule.warmup_steps = 1
    for key, value in {**SMALL, **overrides}.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


# ----------------------------------------------------------------------------- layer norms

def _block(rng, d=4, ff=6):
    return {"attn": {"query": {"kernel": rng.normal(size=(d, 2, 2))},
                     "out": {"kernel": rng.normal(size=(2, 2, d))}},
            "attn_norm": {"scale": rng.normal(size=(d,))},
            "mlp": {"up": {"kernel": rng.normal(size=(d, ff))},
                    "down": {"kernel": rng.normal(size=(ff, d))}},
            "mlp_norm": {"scale": rng.normal(size=(d,))}}


def _tree(rng, stacked=False):
    blocks = [_block(rng), _block(rng)]
    tree = {"embed": {"embedding": rng.normal(size=(10, 4))},
            "final_norm": {"scale": rng.normal(size=(4,))},
            "head": {"kernel": rng.normal(size=(4, 10))}}
    if stacked:
        tree["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    else:
        tree.update({f"block_{i}": block for i, block in enumerate(blocks)})
    return tree, blocks


def _numpy_norm(*arrays):
    return np.sqrt(sum(np.sum(np.square(a.astype(np.float64))) for a in arrays))


def _oracle(tree, blocks):
    """Group norms written out by hand."""
    groups = {"embed": [tree["embed"]["embedding"]], "final_norm": [tree["final_norm"]["scale"]],
              "head": [tree["head"]["kernel"]]}
    for i, block in enumerate(blocks):
        groups[f"block_{i}/attn"] = [block["attn"]["query"]["kernel"],
                                     block["attn"]["out"]["kernel"], block["attn_norm"]["scale"]]
        groups[f"block_{i}/mlp"] = [block["mlp"]["up"]["kernel"], block["mlp"]["down"]["kernel"],
                                    block["mlp_norm"]["scale"]]
    return {group: _numpy_norm(*arrays) for group, arrays in groups.items()}


@pytest.mark.parametrize("stacked", [False, True])
def test_layer_norms_match_numpy_also_when_blocks_are_stacked(stacked):
    trees = []
    for seed in range(3):  # grads, updates, params: the same blocks, stacked or not
        trees.append(_tree(np.random.default_rng(seed), stacked))
    (grads, g_blocks), (updates, u_blocks), (params, p_blocks) = trees
    got = jax.jit(layer_norms.layer_norms)(grads, updates, params)
    expected = {}
    for kind, (tree, blocks) in zip(("grad_norm", "update_norm", "param_norm"), trees):
        expected.update({f"{kind}/{g}": v for g, v in _oracle(tree, blocks).items()})
    for group in _oracle(params, p_blocks):
        expected[f"update_ratio/{group}"] = (expected[f"update_norm/{group}"]
                                             / expected[f"param_norm/{group}"])
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(float(got[key]), value, rtol=1e-5, err_msg=key)


def test_layer_norm_groups_of_the_transformer():
    config = tiny_config()
    params = jax.eval_shape(builders.make_train_step(config).init, jax.random.key(0)).params
    groups = {layer_norms.group_of(path)[0] for path, _ in jax.tree.leaves_with_path(params)}
    assert groups == {"embed", "final_norm", "head", "block_0/attn", "block_0/mlp",
                      "block_1/attn", "block_1/mlp"}


# ----------------------------------------------------------------------------- one run:
# TensorBoard event file = metrics.jsonl, layer norms in the rows, a profiler trace.

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    # checkpoint_every=0: only the final checkpoint (no test here reads one; a save of the
    # state on 8 devices costs ~1 s).
    loop.train(tiny_config(profile_steps="2,2", checkpoint_every=0), workdir, progress=False)
    return workdir


def _event_file(workdir):
    files = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
    assert len(files) == 1, files
    return os.path.join(workdir, files[0])


@pytest.mark.slow
def test_event_file_reads_back_as_metrics_jsonl(run_dir):
    rows = metrics.MetricsLog(os.path.join(run_dir, metrics.METRICS_FILE)).rows()
    assert [row["step"] for row in rows] == [2, 4]
    events = writers.read_scalars(_event_file(run_dir))
    expected = {}
    for row in rows:
        for key, value in writers.scalars(row).items():
            expected.setdefault(key, []).append((row["step"], value))
    assert {"loss", "lr", "grad_norm", "eval_loss", "grad_norm/head"} <= set(expected)
    assert set(events) - {"_hparams_/experiment", "_hparams_/session_start_info",
                          "_hparams_/session_end_info"} == set(expected)
    for key, points in expected.items():
        steps, values = zip(*events[key])
        assert list(steps) == [step for step, _ in points], key
        np.testing.assert_allclose(values, [v for _, v in points], rtol=1e-6, err_msg=key)


@pytest.mark.slow
def test_event_file_holds_the_config_as_hparams(run_dir):
    from tensorboardX.proto import event_pb2, plugin_hparams_pb2
    import struct
    with open(_event_file(run_dir), "rb") as f:
        while header := f.read(12):
            event = event_pb2.Event.FromString(f.read(struct.unpack("<Q", header[:8])[0]))
            f.read(4)
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    content = plugin_hparams_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content)
                    hparams = content.session_start_info.hparams
                    assert hparams["optimizer.name"].string_value == "adamw"
                    assert hparams["seq_len"].number_value == 32
                    return
    pytest.fail("no hparams summary in the event file")


@pytest.mark.slow
def test_layer_norms_in_rows_add_up_to_the_global_grad_norm(run_dir):
    rows = metrics.MetricsLog(os.path.join(run_dir, metrics.METRICS_FILE)).rows()
    for row in rows:
        groups = [key for key in row if key.startswith("grad_norm/")]
        assert len(groups) == 7, groups  # embed, final_norm, head, 2 blocks x attn / mlp
        total = np.sqrt(sum(row[key] ** 2 for key in groups))
        np.testing.assert_allclose(total, row["grad_norm"], rtol=1e-4)
        for group in groups:
            name = group.split("/", 1)[1]
            np.testing.assert_allclose(
                row[f"update_ratio/{name}"],
                row[f"update_norm/{name}"] / row[f"param_norm/{name}"], rtol=1e-5)


@pytest.mark.slow
def test_profile_steps_write_a_trace_naming_the_steps(run_dir):
    folder = os.path.join(run_dir, "plugins", "profile")
    (run,) = os.listdir(folder)
    files = os.listdir(os.path.join(folder, run))
    assert any(f.endswith(".xplane.pb") for f in files), files
    (trace,) = [f for f in files if f.endswith(".trace.json.gz")]
    with gzip.open(os.path.join(folder, run, trace)) as f:
        events = json.load(f)["traceEvents"]
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
    assert steps == [2, 3]


def test_profile_steps_validated():
    with pytest.raises(ValueError, match="START,COUNT"):
        builders.validate(tiny_config(profile_steps="3"))
    with pytest.raises(ValueError, match=">= 1"):
        builders.validate(tiny_config(profile_steps="0,2"))


# ----------------------------------------------------------------------------- W&B

def test_wandb_offline_resume_continues_the_run(tmp_path):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'ravine[wandb]')")
    config = tiny_config(**{"wandb.project": "ravine-test", "tensorboard": False})
    first = writers.for_run(config, str(tmp_path), {})
    first.write({"step": 1, "loss": 2.5})
    meta = first.checkpoint_meta()
    first.close()
    again = writers.for_run(config, str(tmp_path), meta)  # a resume: meta from the checkpoint
    again.write({"step": 2, "loss": 2.0})
    assert again.checkpoint_meta() == meta
    again.close()
    run_id = meta[writers.WANDB_META_KEY]
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    # offline-run-<time>-<id>, and "-1" after it when both start in the same second
    assert len(runs) == 2 and all(f"-{run_id}" in d for d in runs), runs
    for run in runs:
        assert os.path.exists(tmp_path / "wandb" / run / f"run-{run_id}.wandb")


def test_wandb_mode_validated():
    with pytest.raises(ValueError, match="config.wandb.mode"):
        builders.validate(tiny_config(**{"wandb.project": "p", "wandb.mode": "cloud"}))


# ----------------------------------------------------------------------------- token files

def test_token_file_split_and_batches(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1000, size=10_000).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    corpus = token_files.load(str(tmp_path / "t.bin"), 0.05, vocab_size=1000)
    assert corpus.train.dtype == np.uint16 and isinstance(corpus.train, np.memmap)
    np.testing.assert_array_equal(corpus.train, tokens[:9500])
    np.testing.assert_array_equal(corpus.valid, tokens[9500:])  # the last 5%
    batch = data.sample_batch(corpus.train, 0, 7, 4, 16)
    starts = np.random.default_rng([data.TRAIN_STREAM, 0, 7]).integers(0, 9500 - 16, (1, 4))
    for row, start in zip(batch[0], starts[0]):
        np.testing.assert_array_equal(row, tokens[start:start + 17])
    np.save(tmp_path / "t.npy", tokens.astype(np.uint32))
    from_npy = token_files.load(str(tmp_path / "t.npy"), 0.05, vocab_size=1000)
    assert from_npy.train.dtype == np.uint32 and from_npy.sha256 != corpus.sha256
    np.testing.assert_array_equal(from_npy.valid, tokens[9500:])


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda p: p.write_bytes(b"abc"), {"vocab_size": 10}, "3 bytes, not a multiple of uint16"),
    (lambda p: np.arange(8, dtype=np.uint16).tofile(p), {}, "needs config.vocab_size"),
    (lambda p: np.arange(8, dtype=np.uint16).tofile(p), {"vocab_size": 5},
     "token id 5 at position 5 .*largest id 7"),
    (lambda p: np.arange(8, dtype=np.uint16).tofile(p), {"vocab_size": 9,
                                                         "token_dtype": "float32"}, "token_dtype"),
    (lambda p: p.write_bytes(b""), {"vocab_size": 9}, "empty"),
])
def test_bad_bin_files_name_the_problem(tmp_path, make, kwargs, message):
    path = tmp_path / "bad.bin"
    make(path)
    with pytest.raises(ValueError, match=message):
        token_files.load(str(path), **kwargs)


def test_bad_npy_files_name_the_problem(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="1-D integer"):
        token_files.load(str(tmp_path / "m.npy"), vocab_size=10)
    np.save(tmp_path / "v.npy", np.zeros(64, np.int32))
    with pytest.raises(ValueError, match="carries its dtype"):
        token_files.load(str(tmp_path / "v.npy"), vocab_size=10, token_dtype="uint16")
    with pytest.raises(ValueError, match="does not exist"):
        token_files.load(str(tmp_path / "none.bin"), vocab_size=10)


def test_text_corpus_keeps_bytes_and_refuses_token_fields(tmp_path):
    assert builders.build_model_config(tiny_config()).vocab_size == 256
    (tmp_path / "a.txt").write_text("hello world " * 100)
    with pytest.raises(ValueError, match="token_dtype"):
        token_files.corpus_for_config(tiny_config(corpus=str(tmp_path), token_dtype="uint16"))
    with pytest.raises(ValueError, match="vocab_size=100"):
        token_files.corpus_for_config(tiny_config(corpus=str(tmp_path), vocab_size=100))


def test_prepare_data_writes_the_bytes_as_tokens(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second")
    (tmp_path / "docs" / "a.txt").write_text("first é")
    tokens = prepare_data.byte_tokens(str(tmp_path / "docs"))
    assert tokens.dtype == np.uint16
    assert bytes(tokens.astype(np.uint8)) == "first é".encode() + b"\0second"
    prepare_data.write(tokens, str(tmp_path / "t.bin"))
    corpus = token_files.load(str(tmp_path / "t.bin"), 0.2, vocab_size=256)
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.valid]), tokens)


class _StopAt:
    """A stop signal that fires at a given step (as SIGTERM would)."""
    name = "test"

    def __init__(self, step):
        self.step = step

    def reached(self, step):
        return step == self.step


@pytest.mark.slow
def test_token_file_run_resumes_exactly(tmp_path):
    tokens = prepare_data.byte_tokens(os.path.join(ROOT, "experiments"), "uint16")
    path = str(tmp_path / "tokens.bin")
    prepare_data.write(tokens, path)
    config = tiny_config(corpus=path, vocab_size=300, log_every=1, eval_every=0)
    # One setup for the three runs (as `prepared`): the step is traced and compiled once.
    s = setup.setup(config)
    whole = loop.train(config, str(tmp_path / "whole"), progress=False, prepared=s)
    assert whole["params"] == s.n_params == sum(
        leaf.size for leaf in jax.tree.leaves(s.abstract_state.params))
    stopped = loop.train(config, str(tmp_path / "cut"), progress=False, prepared=s,
                         stop=_StopAt(2))
    assert stopped["stopped_by"] == "test" and stopped["steps"] == 2
    resumed = loop.train(config, str(tmp_path / "cut"), progress=False, prepared=s)
    losses = lambda summary: [(r["step"], r["loss"]) for r in summary["history"]]  # noqa: E731
    assert losses(resumed) == losses(whole)
    embedding = s.abstract_state.params["embed"]["embedding"]
    assert embedding.shape[0] == 300  # config.vocab_size


@pytest.mark.slow
def test_scripts_on_token_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text " * 400)
    out = str(tmp_path / "t.bin")
    done = subprocess.run([sys.executable, "-m", "ravine.experiments.prepare_data",
                           f"--corpus={tmp_path / 'docs'}", f"--out={out}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 4,000 tokens" in done.stdout
    assert os.path.getsize(out) == 8000
    bad = subprocess.run([sys.executable, "-m", "ravine.experiments.train",
                          "--config=experiments/configs/lm.py:tiny",
                          f"--workdir={tmp_path / 'w'}", f"--config.corpus={out}",
                          "--config.vocab_size=100"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2  # the first id >= 100: "s" (115) at 0; the largest "x" (120)
    assert bad.stderr.strip().splitlines() == [
        f"error: token file {out!r} holds token id 115 at position 0 (the first outside "
        "[0, config.vocab_size=100); largest id 120; wrong vocab_size or token_dtype?)"]
    assert not os.path.exists(tmp_path / "w")


# ----------------------------------------------------------------------------- your optimizer

def test_optimizer_module_names_from_argv():
    argv = ["prog", "--optimizer_module=a,b", "--config.steps=3", "--optimizer_module", "c"]
    assert user_modules.names_in(argv) == ["a", "b", "c"]
    assert user_modules.names_in(["prog", "--optimizer_modules=x"]) == []


needs_register = pytest.mark.skipif(
    not hasattr(optim, "register"),
    reason="optim.register (issue 21 item 6, branch new_adam) is not on this branch yet")


@needs_register
def test_optimizer_module_adds_its_factory_to_the_config():
    user_modules.define_and_import(["prog", "--optimizer_module=tests.user_optimizer"])
    assert "signum" in optim.available()
    # what a user's spec declares reaches the runtime: polyak_sgd's eval params
    from tests import user_optimizer
    config = tiny_config(**{"optimizer.name": "polyak_sgd", "clip_norm": 0.0})
    assert builders.make_train_step(config).eval_params is user_optimizer.polyak_eval_params
    # under the runtime's clipping it is handed polyak_sgd's own state, not the chain's
    config.clip_norm = 1.0
    fns = builders.make_train_step(config)
    state = jax.jit(fns.init)(jax.random.key(0))  # flax's init op by op: ~80 tiny compiles
    leaves_equal = jax.tree.map(lambda a, b: bool((a == b).all()),
                                fns.eval_params(state.params, state.opt_state),
                                state.opt_state[1]["average"])
    assert all(jax.tree.leaves(leaves_equal))
    config = tiny_config(**{"optimizer.name": "signum", "optimizer.sign_eps": 0.5,
                            "optimizer.learning_rate": 0.1, "clip_norm": 0.0})
    config.schedule.name = "constant"
    config.schedule.warmup_steps = None
    tx = builders.build_optimizer(config, builders.build_schedule(config))
    params = {"w": jnp.array([1.0, 2.0, 3.0])}
    grads = {"w": jnp.array([10.0, -2.0, 0.5])}
    updates, _ = tx.update(grads, tx.init(params), params)
    # m = 0.1 * g = [1, -0.2, 0.05]; |m| > 0.5 only for the first entry
    np.testing.assert_allclose(updates["w"], [-0.1, 0.0, 0.0], rtol=1e-6)


@needs_register
@pytest.mark.slow
def test_train_script_with_optimizer_module(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text to learn " * 300)
    done = subprocess.run(
        [sys.executable, "-m", "ravine.experiments.train", "--optimizer_module=tests.user_optimizer",
         "--config=experiments/configs/lm.py:tiny", f"--workdir={tmp_path / 'w'}",
         f"--config.corpus={tmp_path / 'docs'}", "--config.optimizer.name=signum",
         "--config.optimizer.momentum=0.5", "--config.optimizer.learning_rate=1e-3",
         *[f"--config.{k}={v}" for k, v in SMALL.items()], "--config.schedule.warmup_steps=1",
         "--config.model.n_layers=1",  # the model's depth is not what is tested: 1 compiles faster
        ],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.load(open(tmp_path / "w" / "config.json"))["config"]["optimizer"]
    assert saved["name"] == "signum" and saved["momentum"] == 0.5
    missing = subprocess.run(
        [sys.executable, "-m", "ravine.experiments.train", "--optimizer_module=no_such_module",
         f"--workdir={tmp_path / 'x'}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: --optimizer_module=no_such_module: ModuleNotFoundError: No module named "
        "'no_such_module'"]


@pytest.mark.slow
def test_race_with_optimizer_module_uses_each_optimizers_spec(tmp_path):
    """Two users' optimizers race with no ravine file edited: signum's grid is centred on
    its own centre_lr (0.05); polyak_sgd (eval_params: its average) runs in a vmapped
    program. (That its sweep runs, evaluated at its average, equal its solo train runs is
    tests/test_race.py::test_sweep_runs_equal_solo_train_runs.)"""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text to learn " * 300)
    # One layer: the race's grid and eval params do not depend on the depth; the tiny
    # config's second layer made the race's 8 compiled programs take ~60% longer.
    small = {**SMALL, "eval_every": None, "checkpoint_every": 0, "schedule.warmup_steps": 1,
             "model.n_layers": 1}
    done = subprocess.run(
        [sys.executable, "-m", "ravine.experiments.race", "--optimizer_module=tests.user_optimizer",
         "--optimizers=signum,polyak_sgd", "--lr_points=3", "--max_lr_points=3",
         "--seeds_at_best=1", "--evals=2",
         "--sweep=vmap", f"--workdir={tmp_path / 'race'}", f"--config.corpus={tmp_path / 'docs'}",
         *[f"--config.{k}={v}" for k, v in small.items() if v is not None]],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "race" / "runs"
    assert {"lr0.025_seed0.jsonl", "lr0.05_seed0.jsonl", "lr0.1_seed0.jsonl"} <= set(
        os.listdir(runs / "signum"))
    assert "lr0.1_seed0.jsonl" in os.listdir(runs / "polyak_sgd")
    report = open(tmp_path / "race" / "report.md").read()
    assert "signum" in report and "polyak_sgd" in report


@needs_register
def test_readme_user_file_registers_an_optimizer_that_trains(tmp_path):
    """The README's my_opt.py, as a user saves it, through --optimizer_module's import."""
    import re
    readme = open(os.path.join(ROOT, "README.md")).read()
    (source,) = [block for block in re.findall(r"```py\n(.*?)```", readme, re.S)
                 if block.startswith("# my_opt.py")]
    (tmp_path / "my_opt.py").write_text(source)
    if "my_signum" not in optim.available():
        user_modules.import_user_module(str(tmp_path / "my_opt.py"))
    assert "momentum" in lm.get_config("tiny").optimizer
    tx = optim.create("my_signum", learning_rate=0.1, momentum=0.5)
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    m = np.zeros(2)
    for g in ([1.0, -3.0], [-4.0, 1.0]):  # numpy transcription of the update
        m = 0.5 * m + 0.5 * np.array(g)
        updates, state = tx.update({"w": jnp.array(g)}, state, params)
        np.testing.assert_allclose(updates["w"], -0.1 * np.sign(m), rtol=1e-6)


@pytest.mark.slow
def test_bench_layer_norms_times_both_settings(monkeypatch):
    from ravine.experiments.benchmarks import bench_layer_norms
    # The steps `measure` builds (and times) are the ones checked below: building them again
    # would trace and compile both a second time.
    built, build = {}, bench_layer_norms.build

    def recorded(variant, optimizer, layer_norms):
        built[layer_norms] = build(variant, optimizer, layer_norms)
        return built[layer_norms]

    monkeypatch.setattr(bench_layer_norms, "build", recorded)
    times = bench_layer_norms.measure("tiny", "adamw", rounds=2, steps=1)
    assert sorted(times) == ["with", "without"]
    assert all(len(values) == 2 and all(v > 0 for v in values) for values in times.values())
    # The metrics each step returns (the initial state was donated to the first step: its
    # shapes only; the trace is the one measure compiled).
    for layer_norms, (step, state, batch) in built.items():
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        metrics = jax.eval_shape(step, shapes, batch)[1]
        assert ("layers" in metrics) == layer_norms, sorted(metrics)
    assert sorted(built) == [False, True]
