"""Running the experiment scripts from tests for less than a process start each.

A `python -m ravine.experiments.<script>` process spends 3-4 s of CPU importing JAX, Flax,
Orbax and the runtime before it reads a flag (and a finished train run 1-2 s more importing
matplotlib for its plot): most of what a failing run costs, and a good part of a short run.
Two ways around it, one for each kind of test:

- `Jobs(folder, env, preload)`, for tests about a process (its exit status, its stderr, a
  signal, a kill): one server (`python -c SERVER`, cwd the repository) imports `preload`
  and then forks a child per job. Each child is its own process: stdin /dev/null, stdout and
  stderr its own files, its own exit status and signals, running the module as `python -m`
  does (`runpy.run_module(..., run_name="__main__", alter_sys=True)`: the module's code runs
  as __main__, its flags are defined from the child's argv). The server has no thread and no
  JAX backend when it forks (asserted): a child starts its backend as a fresh process does.
  What the server imported is frozen out of the garbage collector's sight (`gc.freeze()`,
  after a collection). `preload` names what the scripts import, not a script itself (runpy
  would warn that it ran a module imported already). What the preloaded imports print would
  have led each process's stderr: `Jobs.import_noise()` (tests check it is empty).
- `run_main(main, argv, capfd)`, for tests about what a script computes, writes and says:
  the script's `main` in this process, its flags parsed as `cli.run` parses them (a bad one
  exits 2 with one line), so its programs compile in this process and stay compiled for
  the next call.
"""
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import warnings

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = r"""
import gc, json, os, runpy, sys, threading

preload = sys.argv[1:]
if "matplotlib.pyplot" in preload:  # as the train job's plot: the Agg backend
    import matplotlib
    matplotlib.use("Agg")
for name in preload:
    __import__(name)
from jax._src import xla_bridge

# What is imported stays, in every child: out of the collector's sight (gc.freeze, as the
# gc docs advise before fork), a child neither walks it at each collection nor copies the
# pages that walking would touch (0.4 s of each short job). Garbage first: collected.
gc.collect()
gc.freeze()
print(os.getpid(), flush=True)  # ready: what the imports printed is all in its stderr

for request in sys.stdin:
    argv, stdout_path, stderr_path, cwd = json.loads(request)  # argv: [MODULE, *ARGS]
    assert threading.active_count() == 1 and not xla_bridge.backends_are_initialized()
    pid = os.fork()
    if pid == 0:  # the child: the job's process from here on
        written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, stdout_path, written),
                               (2, stderr_path, written)):
            opened = os.open(path, mode)
            os.dup2(opened, fd)
            os.close(opened)
        os.chdir(cwd)
        sys.argv = list(argv)
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        sys.exit(0)  # (the scripts exit themselves: absl's app.run)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Jobs:
    """Starts `python -m` jobs as children of one SERVER process, one job at a time (a new
    job kills one still running); a job answers `poll`, `send_signal` and `communicate` as
    a `subprocess.Popen` does."""

    def __init__(self, folder, env, preload):
        self.folder, self.count, self.buffer, self.running = folder, 0, b"", None
        self.noise = os.path.join(folder, "server.stderr")
        with open(self.noise, "w") as noise:
            self.server = subprocess.Popen([sys.executable, "-c", SERVER, *preload], cwd=ROOT,
                                           env=env, stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=noise)
        assert self.line(600) == self.server.pid, "the job server did not start"

    def import_noise(self):
        with open(self.noise) as f:
            return f.read()

    def line(self, timeout):
        """The server's next line (a pid or an exit status), or None after `timeout` s."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = max(0.0, deadline - time.monotonic())
            if not select.select([self.server.stdout], [], [], remaining)[0]:
                return None
            chunk = os.read(self.server.stdout.fileno(), 4096)
            assert chunk, f"the job server ended: {self.import_noise()[-3000:]}"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return int(line)

    def start(self, argv, cwd=ROOT):
        """Starts `python -m argv[0] argv[1:]` in folder `cwd`; returns its `Job`."""
        self.end_running()
        self.count += 1
        stdout, stderr = (os.path.join(self.folder, f"job{self.count}.{name}")
                          for name in ("stdout", "stderr"))
        for path in (stdout, stderr):
            open(path, "w").close()  # there before the job writes (`Job` reads them)
        request = [list(argv), stdout, stderr, str(cwd)]
        self.server.stdin.write((json.dumps(request) + "\n").encode())
        self.server.stdin.flush()
        pid = self.line(600)
        assert pid is not None, "the job server did not start a job in 600 s"
        self.running = Job(self, pid, stdout, stderr)
        return self.running

    def run(self, argv, cwd=ROOT, timeout=600):
        """`python -m argv[0] argv[1:]` to its end: a `subprocess.CompletedProcess`."""
        job = self.start(argv, cwd)
        stdout, stderr = job.communicate(timeout)
        return subprocess.CompletedProcess(list(argv), job.returncode, stdout, stderr)

    def end_running(self):
        """Kills a job still running (one a failed test left): one job at a time."""
        if self.running is not None and self.running.poll() is None:
            os.kill(self.running.pid, signal.SIGKILL)
            self.running.communicate(60)

    def close(self):
        self.end_running()
        self.server.stdin.close()  # the server's loop ends
        self.server.wait(timeout=60)
        self.server.stdout.close()


class Job:
    def __init__(self, jobs, pid, stdout, stderr):
        self.jobs, self.pid, self.returncode = jobs, pid, None
        self.stdout_path, self.stderr_path = stdout, stderr

    def poll(self):
        if self.returncode is None:
            self.returncode = self.jobs.line(0)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:  # (Popen's rule: never a pid the job no longer has)
            os.kill(self.pid, sig)

    def stderr(self):
        """What the job has written to its stderr so far."""
        with open(self.stderr_path) as f:
            return f.read()

    def communicate(self, timeout=600):
        """Waits for the job to end; returns (its stdout, its stderr)."""
        if self.returncode is None:
            self.returncode = self.jobs.line(timeout)
            if self.returncode is None:
                os.kill(self.pid, signal.SIGKILL)
                self.returncode = self.jobs.line(60)
                raise subprocess.TimeoutExpired(f"job {self.pid}", timeout)
        with open(self.stdout_path) as f:
            return f.read(), self.stderr()


def json_lines(path):
    """The records of a JSON-lines file a job wrote (a study's runs.jsonl, a race's logs)."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def demo_runs(folder, runs):
    """{key: CompletedProcess} of `runs`, {key: (demo name, flags)}, each run as `python -m
    ravine.experiments.demos.<name> <flags>` by a child of one process that imported what the
    demos import once (tests/scripts.py's `Jobs`: a start is 3-4 s of imports, more than most
    tiny demo runs). The children see 8 CPU devices, as the tests do: a demo run at a test's
    setting compiles the same programs, and the compilation cache serves them."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
    jobs = Jobs(str(folder), env, ["ravine.optim", "ravine.models", "flax.linen",
                                   "ravine.experiments.runtime.cli", "matplotlib.pyplot"])
    try:
        assert jobs.import_noise() == ""  # what the imports print would lead each stderr
        return {key: jobs.run([f"ravine.experiments.demos.{name}", *flags], cwd=ROOT)
                for key, (name, flags) in runs.items()}
    finally:
        jobs.close()


# `python -c LOCK_HOLDER DIR`: holds DIR's run lock (`workdir.lock`, the job's own) and prints
# "locked" until killed. It loads only that module (and `cli`, which it imports): the runtime
# package's __init__ would load JAX, 3 s of CPU.
LOCK_HOLDER = """import os, sys, time, types
import ravine.experiments
runtime = types.ModuleType("ravine.experiments.runtime")
runtime.__path__ = [os.path.join(os.path.dirname(ravine.experiments.__file__), "runtime")]
sys.modules[runtime.__name__] = runtime
from ravine.experiments.runtime import workdir
assert "jax" not in sys.modules
with workdir.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


# ------------------------------------------------------------------------------- in process

def forget_flags():
    """Every absl flag unparsed, and the `--config.<field>` flags that ml_collections defines
    while it parses `--config` deleted: the flags as a new process has them."""
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


def process_warnings(module_name):
    """Python's warning filters in a new process that runs `module_name` as __main__, its
    warnings printed to stderr as a process prints them (pytest would record them)."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                     ResourceWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("default", category=DeprecationWarning,
                            module=rf"{module_name.replace('.', '[.]')}$")
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_main(module, args, capfd):
    """`python -m MODULE ARGS` in this process, for a script whose __main__ block is
    `cli.run(main)`: `(exit status, stdout, stderr)`. The flags are parsed by the parser
    `cli.run` gives absl (`cli.parse_flags`: a bad one exits 2 with one line), then
    `module.main` runs; a SystemExit is the exit status a process would end with.

    What a process prints on stderr is printed there here too: warnings
    (`process_warnings`) and log records from WARNING up (the process's absl handler; pytest
    would capture them). absl's app.run is left out: its one-time set-up (that handler on
    the root logger, faulthandler on the captured stderr) would outlive the call in this
    test process. ml_collections reads the `--config.<field>` overrides from sys.argv: it is
    the command's for the call. The flags and absl's verbosity are put back after.
    """
    from ravine.experiments.runtime import cli

    root, absl_logger = logging.getLogger(), logging.getLogger("absl")
    level, argv = absl_logger.level, sys.argv
    sys.argv = [module.__file__, *args]  # as `python -m` sets it
    forget_flags()
    capfd.readouterr()  # what came before is not this command's
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    root.addHandler(to_stderr)
    status = 0
    try:
        with warnings.catch_warnings():
            process_warnings(module.__name__)
            module.main(cli.parse_flags(sys.argv))
    except SystemExit as stop:
        status = 0 if stop.code is None else stop.code
    finally:
        root.removeHandler(to_stderr)
        sys.argv = argv
        forget_flags()
        absl_logger.setLevel(level)  # a script's main may set absl's verbosity
    out, err = capfd.readouterr()
    return status, out, err
