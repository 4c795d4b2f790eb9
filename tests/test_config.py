"""The shared config system: help from field docstrings, preset < flag precedence, clear errors, and every
preset under jobs/ parses into the config class its ``kind`` names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from visalign.config import ConfigError, build_parser, field_docs, parse, resolve, write_resolved
from visalign.registry import Registry, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    """learning rate of the inner thing"""
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])
    """a list"""


@dataclasses.dataclass
class Outer:
    shards: str
    """where the shards are"""
    top_k: int = 10
    """labels kept per patch"""
    score: str = "cos"
    """score sign"""
    resume: bool = False
    """continue the last run"""
    limit: int | None = None
    """optional cap"""
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_field_docs_become_help():
    assert field_docs(Outer)["top_k"] == "labels kept per patch"
    text = build_parser(Outer).format_help()
    assert "labels kept per patch" in text and "--inner.lr" in text and "--top-k" in text


def test_precedence_defaults_preset_flags(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"shards": "from-preset", "top_k": 5, "inner": {"lr": 0.5}}))
    cfg = parse(Outer, ["--config", str(preset), "--top-k", "7", "--resume", "true", "--inner.names", "x,y"])
    assert cfg.shards == "from-preset"  # preset fills what flags leave alone
    assert cfg.top_k == 7  # flag beats preset
    assert cfg.inner.lr == 0.5 and cfg.inner.names == ["x", "y"]
    assert cfg.resume is True and cfg.limit is None and cfg.score == "cos"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="missing required setting.*--shards"):
        parse(Outer, [])
    with pytest.raises(ConfigError, match="top_k: cannot read 'many' as int"):
        parse(Outer, ["--shards", "x", "--top-k", "many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"shards": "x", "topk": 3}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['topk'\].*valid keys: shards, top_k"):
        resolve(Outer, {"config": str(bad)})


def test_write_resolved_round_trips(tmp_path):
    cfg = parse(Outer, ["--shards", "s", "--limit", "3"])
    path = write_resolved(cfg, tmp_path / "out" / "config.yaml")
    back = resolve(Outer, {"config": str(path)})
    assert back == cfg


def test_registry_lists_valid_names():
    reg = Registry("widget")
    reg["b"] = object
    reg["a"] = object
    with pytest.raises(UnknownNameError) as err:
        reg["c"]
    assert str(err.value) == "unknown widget 'c'; valid names: a, b"


def _preset_kinds():
    """The labelling presets (training presets: test_trainer_run.py checks them against the papers)."""
    return sorted(p for p in (ROOT / "jobs").glob("label-*.yaml"))


@pytest.mark.parametrize("preset", _preset_kinds(), ids=lambda p: p.name)
def test_every_preset_parses(preset):
    """Each labelling preset loads into LabelConfig without unknown keys or bad types."""
    from pipeline.config import LabelConfig as cls
    from visalign.config import load_yaml

    data = load_yaml(preset)
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    filled = {name: data.get(name, "PLACEHOLDER") for name in required}
    resolve(cls, {"config": str(preset), **{k: v for k, v in filled.items() if k not in data}})


def test_configs_recorded_with_data_format_are_read_as_conv_template():
    from trainer.config import TrainConfig, upgrade_recorded
    from visalign.config import from_dict, to_dict

    current = to_dict(TrainConfig(shards="s", output="o"))
    for old, new in (("plain", "plain"), ("chat", "tokenizer"), ("auto", "auto")):
        recorded = {**current, "data": {k: v for k, v in current["data"].items() if k != "conv_template"}}
        recorded["data"]["format"] = old
        cfg = from_dict(TrainConfig, upgrade_recorded(recorded))
        assert cfg.data.conv_template == new
    assert upgrade_recorded(current) is current
