"""Metric writers: where a run's rows go besides metrics.jsonl (TensorBoard, Weights & Biases).

    writer = writers.for_run(config, workdir, meta, enabled=jax.process_index() == 0)
    writer.write({"step": 10, "loss": 5.1, "lr": 3e-4})   # every numeric field, by its name
    writer.close()

A writer is anything with `write(row)` and `close()` (as `metrics.MetricsLog`); a row is a
metrics.jsonl row (a dict with `step`). Only process 0 writes: the others get `Writers([])`.

- `TensorBoardWriter(logdir)`: event files (tensorboardX, no TensorFlow needed) in `logdir`,
  each numeric field of a row a scalar under the same name at the row's step, the config
  as hparams. Open a run with `tensorboard --logdir runs/` (a folder of workdirs).
- `WandbWriter(project, run_id, ...)`: a Weights & Biases run (`pip install ravine[wandb]`);
  `mode="offline"` needs no network (`wandb sync` uploads it later). The run id is kept in
  the checkpoint metadata (`checkpoint_meta()`), so a resumed run continues the same run.
"""
import json
import math
import numbers
import uuid

from ravine.experiments.runtime import workdir as workdir_lib

WANDB_META_KEY = "wandb_run_id"


def scalars(row):
    """The finite numeric fields of `row` but `step` (what a writer plots), as floats."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def hparams(config_record):
    """The config as flat `{"optimizer.b1": 0.9, ...}` of numbers, strings and bools (None
    and other values as their str), the form TensorBoard's hparams plugin takes."""
    flat = workdir_lib.flatten(config_record)
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in flat.items()}


class Writers:
    """Several writers as one; `checkpoint_meta()` gathers what each wants kept on resume."""

    def __init__(self, writers):
        self.writers = list(writers)

    def write(self, row):
        for writer in self.writers:
            writer.write(row)

    def checkpoint_meta(self):
        meta = {}
        for writer in self.writers:
            meta.update(getattr(writer, "checkpoint_meta", dict)())
        return meta

    def close(self):
        for writer in self.writers:
            writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorBoardWriter:
    """TensorBoard event files in `logdir` (tensorboardX).

    Args:
      logdir: the folder (a run's workdir: TensorBoard lists each workdir as a run).
      config: a flat dict of hparams (see `hparams`) to record once, or None.
    """

    def __init__(self, logdir, config=None):
        from tensorboardX import SummaryWriter  # here: only runs that write load it
        from tensorboardX.summary import hparams as hparams_summary
        self.writer = SummaryWriter(logdir, flush_secs=10)
        if config:
            # The hparams go into this run's own event file (SummaryWriter.add_hparams
            # would open a sub-run); no metric is declared, TensorBoard lists the scalars.
            for summary in hparams_summary(config, {}):
                self.writer.file_writer.add_summary(summary)

    def write(self, row):
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["step"])

    def close(self):
        self.writer.close()


class WandbWriter:
    """A Weights & Biases run: each row logged at its step.

    Args:
      project: the W&B project.
      run_id: the run's id; None starts a new run (its id: `checkpoint_meta()`).
      mode: "offline" (default; no network), "online" or "disabled".
      directory: where wandb keeps its files (the workdir).
      config: the resolved config (a dict) to attach, or None.
      entity, name: W&B's entity and run name ("" = wandb's defaults).
    """

    def __init__(self, project, run_id=None, mode="offline", directory=None, config=None,
                 entity="", name=""):
        import wandb  # optional dependency: pip install ravine[wandb]
        self.run = wandb.init(project=project, id=run_id or uuid.uuid4().hex[:8],
                              resume="allow", mode=mode, dir=directory, config=config,
                              entity=entity or None, name=name or None, reinit=True)

    def write(self, row):
        self.run.log(scalars(row), step=row["step"])

    def checkpoint_meta(self):
        return {WANDB_META_KEY: self.run.id}

    def close(self):
        self.run.finish()


def read_scalars(path):
    """`{tag: [(step, value), ...]}` of a TensorBoard event file (TFRecord framing: u64
    length, u32 CRC, the `Event` proto, u32 CRC; CRCs not checked), e.g. to compare a run's
    event file with its metrics.jsonl without TensorBoard installed."""
    import struct

    from tensorboardX.proto import event_pb2
    scalars_by_tag = {}
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = event_pb2.Event.FromString(f.read(length))
            f.read(4)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars_by_tag.setdefault(value.tag, []).append(
                        (event.step, value.simple_value))
    return scalars_by_tag


def for_run(config, workdir, meta, enabled=True):
    """The writers of a train run in `workdir`: TensorBoard unless `config.tensorboard` is
    False, W&B when `config.wandb.project` is set (continuing `meta`'s run id, the resumed
    checkpoint's metadata). `enabled=False` (processes other than 0): none."""
    if not enabled:
        return Writers([])
    record = json.loads(json.dumps(config.to_dict(), default=str))  # plain JSON values
    writers = []
    if config.get("tensorboard", True):
        writers.append(TensorBoardWriter(workdir, hparams(record)))
    wandb_config = config.get("wandb")
    if wandb_config is not None and wandb_config.project:
        writers.append(WandbWriter(
            wandb_config.project, meta.get(WANDB_META_KEY), wandb_config.mode, workdir,
            record, wandb_config.entity, wandb_config.name))
    return Writers(writers)


def validate(config):
    """ValueError naming `config.wandb.mode` when it is not one W&B knows, or a W&B run
    asked for without wandb installed."""
    wandb_config = config.get("wandb")
    if wandb_config is None or not wandb_config.project:
        return
    if wandb_config.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"config.wandb.mode must be offline, online or disabled, got "
                         f"{wandb_config.mode!r}")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(f"config.wandb.project={wandb_config.project!r} needs wandb: "
                         "pip install 'ravine[wandb]'") from None
