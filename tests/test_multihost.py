"""Two real processes x 4 CPU devices (jax.distributed over gloo) train like one 8-device process."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multihost_worker as lm

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT_S = 420
# Most of a worker's time is compiling its train steps, and most of an XLA:CPU compile is its
# MLIR fusion emitters making each fusion's kernel: the older ones compile the same
# partitioned program 2-3x faster. The workers get them through XLA_FLAGS, with the tests'
# other compile flags (tests/conftest.py; they had none before: 19 -> 8 s of CPU each); the
# steps compiled here for the expected losses, as compiler options.
FUSION_EMITTERS_OFF = "--xla_cpu_use_fusion_emitters=false"
COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    out, port, n = tmp_path / "result.json", free_port(), 2
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # Each worker must bring exactly 4 CPU devices: no device count flag goes with the rest.
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [FUSION_EMITTERS_OFF])
    logs = [tmp_path / f"process{i}.log" for i in range(n)]
    procs = []
    for i in range(n):
        with open(logs[i], "w") as log:   # a file, not a pipe: a full pipe would block
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, str(i), str(n), str(port), str(out)],
                env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # A crashed process leaves the other waiting on collectives: stop both at once.
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, (
            f"process {i} (rc {proc.returncode}):\n{log.read_text()[-3000:]}")

    result = json.loads(out.read_text())
    assert result["process_count"] == 2 and result["device_count"] == 8
    assert result["batch_in_order"], "the processes' rows did not form the global batch in order"
    assert [run[:3] for run in result["runs"]] == [list(run) for run in lm.MULTIHOST_RUNS]
    assert jax.device_count() == 8
    for optimizer, mesh_spec, zero, losses in result["runs"]:
        expected = one_process_losses(optimizer, mesh_spec, zero)
        np.testing.assert_allclose(losses, expected, rtol=1e-5, err_msg=f"{mesh_spec} zero={zero}")


def one_process_losses(optimizer, mesh_spec, zero):
    """`lm.train_losses` (the workers' 20 steps) in this process, its step compiled with
    COMPILER_OPTIONS."""
    return lm.train_losses(optimizer, mesh_spec, zero, compiler_options=COMPILER_OPTIONS)
