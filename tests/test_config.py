"""Config validation, derived fields and serialisation."""

from __future__ import annotations

import json
import math

import pytest

from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.errors import ConfigError
from loopformer.presets import PRESETS


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"dim": 64, "n_heads": 7}, ["n_heads=7", "divide dim (64)", "head_dim"]),
        ({"n_heads": 4, "n_kv_heads": 3}, ["n_kv_heads=3", "divide n_heads (4)"]),
        ({"sliding_window": 0}, ["sliding_window=0", ">= 1"]),
        ({"n_core": 0}, ["n_core=0", ">= 1"]),
        ({"injection": "mul"}, ["injection='mul'", "'concat'", "'add'", "'lti'"]),
        ({"norm_layout": "post"}, ["norm_layout='post'", "'sandwich'", "'pre'"]),
        ({"rope_style": "neox"}, ["rope_style='neox'", "'half'", "'interleaved'"]),
        ({"loop_overflow": "wrap"}, ["loop_overflow='wrap'", "'reuse-last'", "'cycle'", "'off'"]),
        ({"head_dim": 7, "n_heads": 4}, ["head_dim=7", "even"]),
        ({"lti_eps": 1.5}, ["lti_eps=1.5", "(0, 1)"]),
        ({"dim": "64"}, ["dim='64'", "expected int"]),
        ({"qk_bias": 1}, ["qk_bias=1", "expected bool"]),
        ({"vocab_size": True}, ["vocab_size=True", "expected int"]),
    ],
)
def test_invalid_model_config_names_field_value_and_rule(changes: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(**changes)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert message.count(".") >= 1 and "\n" not in message


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"mean_loops": 0}, "mean_loops=0"),
        ({"sampler": "beta"}, "sampler='beta'"),
        ({"backprop_loops": 0}, "backprop_loops=0"),
        ({"mean_loops": 8, "max_loops": 4}, "max_loops=4"),
        ({"sigma": 0.0}, "sigma=0.0"),
    ],
)
def test_invalid_recurrence_config(changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match="RecurrenceConfig." + fragment.replace("(", r"\(")):
        RecurrenceConfig(**changes)


def test_defaults_are_resolved_to_concrete_values() -> None:
    config = ModelConfig(dim=96, n_heads=6)
    assert config.head_dim == 16
    assert config.n_kv_heads == 6
    assert config.mlp_hidden == 256  # 8/3 * 96 rounded up to a multiple of 32
    assert config.init_std == pytest.approx(math.sqrt(2 / (5 * 96)))
    assert config.per_loop_slots == 2 * config.recurrence.mean_loops


def test_explicit_head_dim_allows_heads_that_do_not_divide_dim() -> None:
    config = ModelConfig(dim=1024, n_heads=12, head_dim=80)
    assert config.head_dim == 80


def test_effective_depth() -> None:
    config = ModelConfig(n_prelude=2, n_core=4, n_coda=2, recurrence=RecurrenceConfig(mean_loops=32))
    assert config.effective_depth() == 132  # Huginn's L
    assert config.effective_depth(1) == 8


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip_of_every_preset(name: str) -> None:
    config = PRESETS[name]
    assert ModelConfig.from_json(config.to_json()) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_save_and_load_json_and_yaml(tmp_path) -> None:
    config = ModelConfig(dim=48, n_heads=3, injection="lti", recurrence=RecurrenceConfig(mean_loops=5))
    path = tmp_path / "sub" / "config.json"
    config.save(path)
    assert ModelConfig.load(path) == config
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp file left behind
    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_text("dim: 48\nn_heads: 3\ninjection: lti\nrecurrence:\n  mean_loops: 5\n")
    assert ModelConfig.load(yaml_path) == config


def test_load_errors_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot be read as UTF-8"):
        ModelConfig.load(binary)
    with pytest.raises(ConfigError, match="Unknown ModelConfig field"):
        ModelConfig.from_dict({"dim": 64, "width": 3})
    with pytest.raises(ConfigError, match="Unknown RecurrenceConfig field"):
        ModelConfig.from_dict({"recurrence": {"loops": 3}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        ModelConfig.from_dict([1, 2])


def test_replace_validates_and_merges_recurrence() -> None:
    config = ModelConfig()
    changed = config.replace(dim=128, recurrence={"mean_loops": 16})
    assert changed.dim == 128 and changed.recurrence.mean_loops == 16
    assert changed.recurrence.sampler == config.recurrence.sampler
    with pytest.raises(ConfigError, match="n_heads"):
        config.replace(n_heads=5)


def test_config_is_frozen() -> None:
    config = ModelConfig()
    with pytest.raises(AttributeError):
        config.dim = 3  # type: ignore[misc]


def test_replace_rederives_fields_left_at_their_default() -> None:
    config = ModelConfig(dim=64, n_heads=4)
    wider = config.replace(dim=128)
    assert wider.head_dim == 32 and wider.mlp_hidden == ModelConfig(dim=128).mlp_hidden
    assert wider.init_std == pytest.approx(math.sqrt(2 / (5 * 128)))
    pinned = ModelConfig(dim=64, n_heads=4, mlp_hidden=100).replace(dim=128)
    assert pinned.mlp_hidden == 100  # an explicit value is kept
    assert config.replace(recurrence={"mean_loops": 5}).per_loop_slots == 10
