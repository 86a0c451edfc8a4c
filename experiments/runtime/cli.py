"""Command-line plumbing shared by the experiment scripts: bad input exits 2 with ONE line.

Every script under experiments/ follows the same contract: a bad flag or config value
(unknown optimizer, invalid hyperparameter, missing file, ...) ends the process with exit
status 2 and a single line on stderr naming the value, never a traceback. Usage:

    from ravine.experiments.runtime import cli

    _CONFIG = config_flags.DEFINE_config_file("config")

    def main(argv):
        config = cli.flag_value(_CONFIG)      # a config file that fails to load -> exit 2
        with cli.usage_errors():              # ValueError raised while setting up -> exit 2
            setup = build_everything(config)
        run(setup)                            # errors from here on are bugs: tracebacks

    if __name__ == "__main__":
        cli.run(main)                         # absl app.run; flag parsing errors -> exit 2

Only wrap the set-up phase (parsing, validation, building objects) in `usage_errors`: a
ValueError deep inside a training loop is a bug and should keep its traceback.
"""
import contextlib
import re
import sys

from absl import app, flags

EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad flag or config value; the message names the value and says what is wrong."""


def one_line(message):
    """`message` as one line: whitespace runs collapsed to one space, and a traceback that
    absl / ml_collections embed in some messages cut down to its last line (the error)."""
    text = str(message)
    head, traceback_marker, _ = text.partition("Traceback (most recent call last):")
    if traceback_marker:
        text = f"{head} {text.strip().splitlines()[-1]}"
    return " ".join(text.split())


def fail(message):
    """Prints `error: <message>` as one line on stderr and exits with status 2."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def stopped(message, status):
    """Prints `message` as one line on stderr and exits with `status` (a run that stopped:
    diverged, interrupted, preempted, a failed save)."""
    print(one_line(message), file=sys.stderr, flush=True)
    sys.exit(status)


@contextlib.contextmanager
def usage_errors(*error_types):
    """Turns ValueError (UsageError included) and `error_types` raised inside into `fail`."""
    try:
        yield
    except (ValueError, *error_types) as error:
        fail(error)


def _unknown_config_field(argv, key):
    """The `--<flag>.<path>=...` argument whose path contains the unknown field `key`."""
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        if key in name.split(".")[1:]:
            return arg
    return None


def unknown_field_message(error, argv):
    """One line for ml_collections' KeyError / AttributeError about an unknown config field
    (whose text is a repr with an embedded 'Did you mean ...' line)."""
    text = str(error.args[0]) if error.args else str(error)
    key_match = re.search(r"[A-Za-z_]\w*", text)
    key = key_match.group(0) if key_match else text
    arg = _unknown_config_field(argv, key)
    message = f"unknown config field {key!r}" + (f" in {arg}" if arg else "")
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    return message + (f"; did you mean {suggestion.group(1)!r}?" if suggestion else "")


def parse_flags(argv):
    """absl flag parser for `app.run(main, flags_parser=parse_flags)`: errors exit 2.

    absl reports flag errors in two lines and exit status 1, and ml_collections raises a
    bare KeyError/AttributeError for an unknown `--config.<field>`; both become one line.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail(error)
    except (KeyError, AttributeError) as error:  # ml_collections: no such config field
        fail(unknown_field_message(error, argv))
    except OSError as error:  # a config file that cannot be read, with --config.<field>s
        fail(error)


def define_config_flag(define, *args, **kwargs):
    """`define(*args, **kwargs)` (e.g. `config_flags.DEFINE_config_file`), where an unknown
    `--config.<field>` on the command line exits 2 with one line: ml_collections applies
    the overrides when the flag is defined, before `app.run` parses anything."""
    try:
        return define(*args, **kwargs)
    except (KeyError, AttributeError) as error:
        fail(unknown_field_message(error, sys.argv))
    except OSError as error:
        fail(error)


def flag_value(holder):
    """`holder.value` of a config flag; a config file that fails to load exits 2.

    ml_collections loads the file lazily and raises (multi-line) on first access: the
    value is touched here so that happens now.
    """
    try:
        value = holder.value
        value.keys()  # a config that failed to load raises on any attribute access
        return value
    except Exception as error:  # noqa: BLE001 - whatever the config file raised
        fail(f"--{holder.name}: {error}")


def run(main):
    """`absl.app.run(main)` with `parse_flags`, so every flag error exits 2 with one line."""
    app.run(main, flags_parser=parse_flags)
