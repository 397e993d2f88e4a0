"""Configs derived from one another (``extends:``): the merge, its errors, and that train.py's
resolved config.yaml of a derived config is its parent's but for the keys it overrides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import yaml

from chunk_store.framework.errors import UserError
from retro.config import load_yaml, merge_config
from retro.train_config import save_resolved
from tests.fixtures.train_db import REPO

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the script at the repository root)

CONFIGS = REPO / "configs"


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_merge_overrides_nested_keys_and_replaces_lists() -> None:
    base = {"lr": 1.0, "betas": [0.9, 0.95], "model": {"dim": 8, "cca_layers": [2, 4], "heads": 2}}
    over = {"betas": [0.8], "model": {"cca_layers": [], "dim": 16}, "seed": 3}
    out = merge_config(base, over)
    assert out == {"lr": 1.0, "betas": [0.8], "model": {"dim": 16, "cca_layers": [], "heads": 2}, "seed": 3}
    assert base["model"] == {"dim": 8, "cca_layers": [2, 4], "heads": 2}  # the parent is not changed
    assert merge_config({"model": {"dim": 8}}, {"model": None}) == {"model": None}  # a non-mapping replaces


def test_extends_reads_the_parent_relative_to_the_child(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "root.yaml", {"seed": 1, "lr": 0.5, "model": {"dim": 8, "cca_layers": [1]}})
    _write(tmp_path / "a" / "mid.yaml", {"extends": "root.yaml", "seed": 2, "model": {"heads": 4}})
    leaf = _write(tmp_path / "b" / "leaf.yaml", {"extends": "../a/mid.yaml", "model": {"cca_layers": []}})
    assert load_yaml(leaf) == {"seed": 2, "lr": 0.5, "model": {"dim": 8, "cca_layers": [], "heads": 4}}


def test_a_missing_parent_is_one_line(tmp_path: Path) -> None:
    child = _write(tmp_path / "child.yaml", {"extends": "nowhere.yaml", "seed": 1})
    with pytest.raises(UserError, match=r"extends nowhere.yaml, but there is no config file") as e:
        load_yaml(child)
    assert "\n" not in str(e.value)
    bad = _write(tmp_path / "bad.yaml", {"extends": 3})
    with pytest.raises(UserError, match="extends must name a config file"):
        load_yaml(bad)


@pytest.mark.parametrize("length", [1, 2, 3])
def test_a_cycle_is_one_line(tmp_path: Path, length: int) -> None:
    names = [f"c{i}.yaml" for i in range(length)]
    for i, name in enumerate(names):
        _write(tmp_path / name, {"extends": names[(i + 1) % length], "seed": i})
    with pytest.raises(UserError, match="extends cycle") as e:
        load_yaml(tmp_path / names[0])
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in names)


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large"])
def test_resolved_baseline_is_its_parent_but_cca_layers(tmp_path: Path, name: str) -> None:
    """What train.py writes to RUN/config.yaml for X-baseline.yaml: X.yaml's, cca_layers: [] apart."""
    def resolved(config: str) -> str:
        args = argparse.Namespace(config=str(CONFIGS / config), out=str(tmp_path / "run"), resume=False, set=[])
        tcfg, _, mdict = train.resolve_config(args)
        save_resolved(tmp_path / "config.yaml", tcfg, mdict)
        return (tmp_path / "config.yaml").read_text()

    parent, baseline = yaml.safe_load(resolved(f"{name}.yaml")), resolved(f"{name}-baseline.yaml")
    parent["model"]["cca_layers"] = []
    assert baseline == yaml.safe_dump(parent, sort_keys=False)
