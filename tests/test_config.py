"""Config loading: Python configs, reference YAML files, validation errors naming fields."""

from __future__ import annotations

import pytest
import yaml

from nanodet_jax.config import ConfigError, load_config, load_config_text, nanodet_plus_recipe
from tests.fixtures import REPO_ROOT, fixture_params, load_npz

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_python_configs_load(path):
    cfg = load_config(path)
    arch = cfg.model.arch
    assert arch.head.num_classes == arch.aux_head.num_classes == len(cfg.class_names)
    assert arch.aux_head.input_channel == 2 * arch.fpn.out_channels
    if path.stem == "synthetic":  # 5 shapes, short CPU schedule, trained from scratch
        assert len(cfg.class_names) == 5 and arch.backbone.pretrain is False
        return
    assert len(cfg.class_names) == 80  # the COCO recipes
    assert cfg.schedule.optimizer.lr == 0.001 and cfg.model.arch.detach_epoch == 10


def test_coco_is_m_416():
    a, b = load_config(REPO_ROOT / "configs/coco.py"), load_config(
        REPO_ROOT / "configs/nanodet_plus_m_416.py")
    assert a.model.to_dict() == b.model.to_dict()
    assert list(a.data.train.input_size) == [416, 416]


@pytest.mark.parametrize("path", fixture_params("model_*.npz"))
def test_reference_yaml_from_fixture(path, tmp_path):
    text = str(load_npz(path)["config_yaml"])
    f = tmp_path / "ref.yml"
    f.write_text(text)
    cfg = load_config(f)
    raw = yaml.safe_load(text)
    assert cfg.model.arch.backbone.model_size == raw["model"]["arch"]["backbone"]["model_size"]
    assert list(cfg.data.val.input_size) == raw["data"]["val"]["input_size"]


def test_recipe_matches_reference_yaml_model_tree():
    """Our m_320 recipe builds the same model tree as the reference YAML of the fixture."""
    from tests.fixtures import fixtures_dir

    p = fixtures_dir() / "model_plus_m_320.npz"
    if not p.is_file():
        pytest.fail(f"{p} missing")
    ref = load_config_text(str(load_npz(p)["config_yaml"]))
    ours = load_config(REPO_ROOT / "configs/nanodet_plus_m_320.py")
    a, b = ref.model.arch.to_dict(), ours.model.arch.to_dict()
    a["backbone"].pop("pretrain"), b["backbone"].pop("pretrain")
    assert a == b


def _write(tmp_path, raw):
    f = tmp_path / "c.yml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_unknown_field_is_named(tmp_path):
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["model"]["arch"]["head"]["num_clases"] = 80
    with pytest.raises(ConfigError, match=r"c\.yml: unknown field 'model\.arch\.head\.num_clases'"):
        load_config(_write(tmp_path, raw))


def test_missing_field_is_named(tmp_path):
    raw = nanodet_plus_recipe("1.0x", 320)
    del raw["model"]["arch"]["fpn"]["in_channels"]
    with pytest.raises(ConfigError,
                       match=r"missing required field .model\.arch\.fpn\.in_channels."):
        load_config(_write(tmp_path, raw))


def test_semantic_errors(tmp_path):
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["class_names"] = ["a", "b"]
    with pytest.raises(ConfigError, match="num_classes"):
        load_config(_write(tmp_path, raw))
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["data"]["val"]["input_size"] = 320
    with pytest.raises(ConfigError, match="data.val.input_size"):
        load_config(_write(tmp_path, raw))
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["model"]["arch"]["backbone"]["name"] = "ResNet"
    with pytest.raises(ConfigError, match="backbone.name"):
        load_config(_write(tmp_path, raw))


def test_open_sections_and_defaults(tmp_path):
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["schedule"]["optimizer"]["betas"] = [0.9, 0.99]
    raw["data"]["train"]["pipeline"]["new_aug"] = 1
    cfg = load_config(_write(tmp_path, raw))
    assert list(cfg.schedule.optimizer.betas) == [0.9, 0.99]
    assert cfg.model.arch.fpn.expand == 1 and cfg.model.arch.head.conv_type == "DWConv"


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yml")
    f = tmp_path / "c.toml"
    f.write_text("")
    with pytest.raises(ConfigError, match="unsupported"):
        load_config(f)
    f = tmp_path / "c.py"
    f.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config(f)


def test_head_defaults_are_the_references(tmp_path):
    """Omitted head/aux_head ``strides``/``reg_max`` default to the reference's values
    (spec §5/§6: strides [8, 16, 32, 64], reg_max 7)."""
    raw = nanodet_plus_recipe("1.0x", 320)
    for sec in ("head", "aux_head"):
        del raw["model"]["arch"][sec]["strides"], raw["model"]["arch"][sec]["reg_max"]
    cfg = load_config(_write(tmp_path, raw))
    for sec in ("head", "aux_head"):
        assert list(cfg.model.arch[sec].strides) == [8, 16, 32, 64]
        assert cfg.model.arch[sec].reg_max == 7
    assert cfg.model.arch.backbone.pretrain is True  # reference default (spec §3)


@pytest.mark.parametrize("value", [False, True, "weights/shufflenetv2_x1-5666bf0f80.pth"])
def test_pretrain_accepts_bool_or_path(tmp_path, value):
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["model"]["arch"]["backbone"]["pretrain"] = value
    assert load_config(_write(tmp_path, raw)).model.arch.backbone.pretrain == value


@pytest.mark.parametrize("value", [1, "", None, ["a.pth"]])
def test_pretrain_rejects_other_values(tmp_path, value):
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["model"]["arch"]["backbone"]["pretrain"] = value
    with pytest.raises(ConfigError, match=r"c\.yml: model\.arch\.backbone\.pretrain must be"):
        load_config(_write(tmp_path, raw))
