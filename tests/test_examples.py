"""Every ``examples/*/config.yaml`` states what it shows and names registered things with flags they
take. That each one runs with ``--fast-dev-run`` on generated data is tested in test_every_pair.py,
in the one process that runs every pair at world size 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "examples").glob("*/config.yaml"))
NUM_EXAMPLES = 8


def _settings(config: Path) -> dict:
    return {key.replace("-", "_"): value for key, value in yaml.safe_load(config.read_text()).items()}


def test_there_are_eight_numbered_examples():
    names = [config.parent.name for config in CONFIGS]
    assert len(names) == NUM_EXAMPLES, names
    assert [name[:3] for name in names] == [f"{i:02d}_" for i in range(1, NUM_EXAMPLES + 1)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.parent.name)
def test_config_states_what_it_shows_and_names_registered_things(config):
    import lightning_xd.datamodules  # noqa: F401  (registers the names)
    import lightning_xd.models  # noqa: F401
    import lightning_xd.strategies  # noqa: F401
    from lightning_xd.contract import declared
    from lightning_xd.launch import cli, runner
    from lightning_xd.launch.registry import STRATEGIES, accepted_settings

    assert config.read_text().startswith("# "), "the first line says what the example shows"
    settings = _settings(config)
    assert {"model", "data", "strategy", "nprocs"} <= set(settings)
    assert not {"data_dir", "cache_dir", "run_dir"} & set(settings), "paths come from the environment"
    args = cli.parse_args(["--config", str(config)])
    resolved = runner.resolve(args)  # a one-line UserError for an unknown name or a flag nothing takes
    # the strategy's own checks, e.g. hybrid: processes a multiple of the pipeline stages (no model: that needs data)
    check_settings = declared(STRATEGIES.get(args.strategy).build).check_settings
    fixed = {"nprocs": args.nprocs}
    check_settings(**fixed, **accepted_settings(check_settings, resolved, exclude={**fixed, "model": None}))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.parent.name)
def test_readme_gives_the_command_the_measurements_and_the_dashboard(config):
    """Each example's README: the concept first, the command that shows it, what was measured, and
    the dashboard picture, which is in the folder."""
    folder = config.parent
    readme = folder / "README.md"
    assert readme.is_file(), f"{folder.name} has no README.md"
    text = readme.read_text()
    assert text.startswith(f"# {int(folder.name[:2])}. "), "the title is the example's number and concept"
    assert f"python train.py --config examples/{folder.name}/config.yaml" in text
    assert "## Measured here" in text
    assert "](dashboard.png)" in text and (folder / "dashboard.png").is_file()
