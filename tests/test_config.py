"""The typed config: documented defaults, clear errors, overrides and YAML round trips."""

import pytest
import yaml

from components.config import ConfigError, TocoadConfig


def test_every_setting_has_a_doc_and_defaults_round_trip(tmp_path):
    cfg = TocoadConfig()
    text = cfg.to_yaml(with_docs=True)
    for section in cfg.model_dump():
        for name, field in type(getattr(cfg, section)).model_fields.items():
            assert field.description, f"{section}.{name} has no doc"
            assert f"{name}:" in text
    path = tmp_path / "c.yaml"
    path.write_text(text)  # the documented YAML is itself a valid config
    assert TocoadConfig.from_yaml(path) == cfg


def test_unknown_and_invalid_settings_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"bank\.coreset_ration: unknown setting"):
        TocoadConfig.from_dict({"bank": {"coreset_ration": 0.1}})
    with pytest.raises(ConfigError, match=r"bank\.coreset_ratio"):
        TocoadConfig.from_dict({"bank": {"coreset_ratio": 2}})
    with pytest.raises(ConfigError, match="opacity_min"):
        TocoadConfig.from_dict({"generator": {"opacity_min": 0.9, "opacity_max": 0.5}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("bank: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TocoadConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        TocoadConfig.from_yaml(tmp_path / "none.yaml")


def test_overrides():
    cfg = TocoadConfig().with_overrides(["bank.coreset_ratio=0.1", "contrastive.enabled=false"])
    assert cfg.bank.coreset_ratio == 0.1 and cfg.contrastive.enabled is False
    with pytest.raises(ConfigError, match="section.key=value"):
        TocoadConfig().with_overrides(["coreset_ratio=0.1"])
    with pytest.raises(ConfigError, match="no setting"):
        TocoadConfig().with_overrides(["bank.nope=1"])
    assert yaml.safe_load(cfg.to_yaml())["bank"]["coreset_ratio"] == 0.1


def test_runtime_precision_default_and_choices():
    assert TocoadConfig().runtime.precision == "auto"
    for value in ("fp32", "bf16", "fp16"):
        assert TocoadConfig().with_overrides([f"runtime.precision={value}"]).runtime.precision == value
    with pytest.raises(ConfigError, match=r"runtime\.precision"):
        TocoadConfig.from_dict({"runtime": {"precision": "fp64"}})


def test_retired_calibration_settings_of_older_bundles_still_load():
    old = {
        "calibration": {"synthetic_per_image": 2, "normal_quantile": 0.98},
        "data": {"holdout_fraction": 0.1},
    }
    cfg = TocoadConfig.from_dict(old)
    assert cfg.calibration.false_alarm_rate == pytest.approx(0.02) and cfg.data.holdout_fraction == 0.1
    both = {"calibration": {"normal_quantile": 0.98, "false_alarm_rate": 0.05}}
    assert TocoadConfig.from_dict(both).calibration.false_alarm_rate == 0.05  # the new key wins
    assert old == {
        "calibration": {"synthetic_per_image": 2, "normal_quantile": 0.98},
        "data": {"holdout_fraction": 0.1},
    }
    with pytest.raises(ConfigError, match="unknown setting"):
        TocoadConfig.from_dict({"calibration": {"normal_quantlie": 0.98}})
