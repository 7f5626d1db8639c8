"""Fuzzing train.py's command line and config files (hypothesis): every generated set of flags and
YAML values ends either in a run that ``--fast-dev-run`` completes (or, for several processes, in a
job that would start: every check before it passed) or in one line ``error: ...`` with exit code 2;
never a traceback.

Generated: names of every registry and misspelt ones; values of each flag's type, of other types,
outside their domains, empty and odd text; flags of the chosen model, dataset and strategy, and
unknown ones; config files with known and unknown keys (spelt with - or _), values of every YAML
type, invalid YAML and files that are no mapping. Examples are derandomised, so CI runs the same
ones each time; ``XD_FUZZ_EXAMPLES=500 pytest tests/test_fuzz_command_line.py`` searches further.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lightning_xd.datamodules  # noqa: F401  (registers the names)
import lightning_xd.models  # noqa: F401
import lightning_xd.strategies  # noqa: F401
import train as train_script
from lightning_xd.launch.cli import build_parser
from lightning_xd.launch.registry import DATAMODULES, MODELS, STRATEGIES

EXAMPLES = int(os.environ.get("XD_FUZZ_EXAMPLES", "150"))

# Flags left out, each because a fuzzed value would make a run long, not wrong: sleeping or hanging
# ranks, reaching other hosts, recording video. Their own checks are tested in test_bad_input.py.
LEFT_OUT = {
    "help",
    "list",
    "config",
    "straggler_delay",
    "inject_fault",
    "collective_timeout",
    "hostfile",
    "launch_agent",
    "dashboard_video",
    "data_dir",
    "cache_dir",
    "run_dir",
}
NAMES = {"model": MODELS, "data": DATAMODULES, "strategy": STRATEGIES}


def package_names(registry) -> list[str]:
    """The names lightning_xd registers (other tests register models of their own in the same process)."""
    return [n for n in registry.names() if registry.get(n).build.__module__.startswith("lightning_xd.")]


# what the datamodules' and models' constructors take but train.py fills in itself
FILLED_IN = {"data_dir", "cache_dir", "nprocs", "self"}

odd_text = st.sampled_from(["", " ", "-1", "1e400", "nan", "true", "0x10", "1,2", "a b", "None", "--x", "∞"])
small_int = st.integers(-3, 8)
any_float = st.one_of(st.floats(-2, 4), st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf")]))


def value_for(kind, choices=None) -> st.SearchStrategy:
    """A value as the command line spells it: mostly of the flag's type, sometimes not."""
    if choices:
        typed = st.sampled_from([str(c) for c in choices] + [f"{choices[0]}x"])
    elif kind is int:
        typed = small_int.map(str)
    elif kind is float:
        typed = any_float.map(str)
    elif kind is bool:
        typed = st.sampled_from(["true", "false", "yes", "0", "maybe"])
    else:
        typed = st.text(alphabet="abcdefgh,:=0123456789-_.", max_size=8)
    return st.one_of(typed, typed, typed, typed, typed, odd_text)


def own_flags() -> dict[str, st.SearchStrategy | None]:
    """train.py's flags: a value strategy each, or None for switches."""
    flags = {}
    for action in build_parser()._actions:
        if action.dest in LEFT_OUT or not action.option_strings:
            continue
        switch = action.nargs == 0
        flags[action.option_strings[0]] = None if switch else value_for(action.type, action.choices)
    return flags


def constructor_flags(names: list[str]) -> dict[str, st.SearchStrategy]:
    """The flags of the models', datasets' and strategies' constructors, typed by their defaults."""
    flags = {}
    for registry in NAMES.values():
        for name in names:
            if name not in registry:
                continue
            for param in inspect.signature(registry.get(name).build).parameters.values():
                if param.name in FILLED_IN or param.default is inspect.Parameter.empty:
                    continue
                kind = type(param.default) if param.default is not None else str
                flags["--" + param.name.replace("_", "-")] = value_for(kind)
    return flags


@st.composite
def command_lines(draw) -> list[str]:
    argv = []
    for key, registry in NAMES.items():
        if draw(st.booleans()) or key == "model":
            pool = package_names(registry) + ["bogus", ""]
            weights = st.sampled_from(["gcn", "graphsage"]) if key == "model" else st.nothing()
            argv += [f"--{key}", draw(st.one_of(weights, weights, st.sampled_from(pool)))]
    argv += ["--fast-dev-run"] if draw(st.integers(0, 4)) else []
    flags = own_flags()
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=3, unique=True)):
        argv += [flag] if flags[flag] is None else [flag, draw(flags[flag])]
    extra = constructor_flags([argv[i + 1] for i, a in enumerate(argv[:-1]) if a.lstrip("-") in NAMES])
    extra["--no-such-flag"] = value_for(str)
    for flag in draw(st.lists(st.sampled_from(sorted(extra)), max_size=2, unique=True)):
        argv += [flag, draw(extra[flag])]
    return argv


yaml_scalars = st.one_of(
    st.none(), st.booleans(), small_int, any_float, st.text(max_size=6), st.sampled_from(["gcn", "mpi", "1e-3"])
)
yaml_values = st.one_of(
    yaml_scalars, st.lists(yaml_scalars, max_size=2), st.dictionaries(st.text(max_size=3), yaml_scalars, max_size=2)
)


@st.composite
def config_files(draw) -> str:
    """The text of a config file: mostly a mapping of flag names (known or not) to YAML values."""
    form = draw(st.integers(0, 9))
    if form == 0:
        return draw(st.sampled_from(["{", "a: [1,", "- 1\n- 2\n", "just text", "", "key: value: other", "\t- x"]))
    keys = [flag.lstrip("-") for flag in own_flags()] + ["hidden-channels", "hidden_channels", "lr", "nope"]
    chosen = draw(st.lists(st.sampled_from(keys), max_size=4, unique=True))
    mapping = {key if draw(st.booleans()) else key.replace("-", "_"): draw(yaml_values) for key in chosen}
    return yaml.safe_dump(mapping)


class WouldStartJob(Exception):
    """Raised instead of starting mpirun: every check before the job passed."""


@pytest.fixture
def fuzz_env(tiny_data, monkeypatch):
    from lightning_xd.fault_tolerance.supervisor import Supervisor

    def instead_of_mpirun(self, env):
        raise WouldStartJob

    monkeypatch.setattr(Supervisor, "_command", instead_of_mpirun)
    monkeypatch.setenv("XD_DOWNLOAD", "0")
    return tiny_data


def run_train(argv: list[str], capsys) -> tuple[int | None, str]:
    """train.main(ARGV): (exit code, or None when the job would start; what it wrote to stderr)."""
    capsys.readouterr()
    try:
        code = train_script.main(argv)
    except WouldStartJob:
        code = None
    return code, capsys.readouterr().err


def check_outcome(argv: list[str], code: int | None, err: str, run_dir: Path) -> None:
    shown = " ".join(argv)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"train.py {shown}\n{err}"
    elif code == 0:
        assert "--fast-dev-run" not in argv or (run_dir / "COMPLETED").exists(), f"train.py {shown}: not completed"
    else:
        assert code is None, f"train.py {shown} exited {code}\n{err}"


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(argv=command_lines())
def test_generated_command_lines_run_or_give_one_line(fuzz_env, capsys, argv):
    with tempfile.TemporaryDirectory() as tmp:
        where = ["--data-dir", str(fuzz_env), "--cache-dir", f"{tmp}/cache", "--run-dir", f"{tmp}/run"]
        if "--fast-dev-run" not in argv:
            where += ["--max-steps", "2", "--max-epochs", "1"]  # given first: the generated ones win
        code, err = run_train(where + argv, capsys)
        check_outcome(argv, code, err, Path(tmp) / "run")


@FUZZ
@given(text=config_files(), argv=command_lines())
def test_generated_config_files_run_or_give_one_line(fuzz_env, capsys, text, argv):
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(text)
        where = ["--data-dir", str(fuzz_env), "--cache-dir", f"{tmp}/cache", "--run-dir", f"{tmp}/run"]
        code, err = run_train(["--config", str(config), "--fast-dev-run", *where, *argv], capsys)
        check_outcome(argv, code, err, Path(tmp) / "run")
