"""The training runtime that the jobs (train, race, bench, scaling) are built on.

    builders      config -> model, schedule, optimizer (asked through its `optim.spec`), step
    train_lib     the pure train step: accumulation, loss scaling, skipping, averages
    setup         a run's validated pieces on a mesh (`Setup`), before any file is written
    run_identity  which run a workdir holds: resume, branch (`init_from`), config.json
    loop          the loop: steps, eval, logging, checkpoints, preemption, spike rollback
    sweep         many (lr, seed) runs sharing one compiled step (loop or vmap)
    checkpointing, workdir, metrics, writers, data, token_files, preemption, spikes,
    profiling, layer_norms, timing, cli, user_modules, kfac: what those need

Data flows one way: entry points -> runtime -> (optim, models, sharding).
"""
# K-FAC registers its spec (a train step of its own) with optim when its module loads.
from ravine.experiments.runtime import kfac  # noqa: F401,E402
