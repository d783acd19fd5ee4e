"""Configuration: ``ml_collections`` configs whose tree mirrors the reference YAML.

``load_config(path)`` accepts a Python config file (defining ``get_config()``) or a reference
NanoDet ``.yml`` file, fills documented defaults, and rejects unknown or missing fields with
an error naming the field and the file. Field names follow the reference
(``model.arch.backbone.model_size``, ``data.train.input_size`` = ``[width, height]``,
``schedule.optimizer.lr``...).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import ml_collections
import yaml


class ConfigError(ValueError):
    """A config file has an unknown, missing or invalid field."""


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()
OPEN = "__open__"  # marks a sub-tree whose keys are free (passed through unchecked)

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic_light", "fire_hydrant", "stop_sign", "parking_meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports_ball",
    "kite", "baseball_bat", "baseball_glove", "skateboard", "surfboard", "tennis_racket",
    "bottle", "wine_glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot_dog", "pizza", "donut", "cake", "chair",
    "couch", "potted_plant", "bed", "dining_table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell_phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy_bear", "hair_drier",
    "toothbrush",
)

_NORMALIZE = [[103.53, 116.28, 123.675], [57.375, 57.12, 58.395]]


def _loss_defaults() -> dict:
    """NanoDetPlusHead loss settings (reference defaults, also the recipe's values)."""
    return {"loss_qfl": {"name": "QualityFocalLoss", "use_sigmoid": True, "beta": 2.0,
                         "loss_weight": 1.0},
            "loss_dfl": {"name": "DistributionFocalLoss", "loss_weight": 0.25},
            "loss_bbox": {"name": "GIoULoss", "loss_weight": 2.0}}


def _dataset_schema() -> dict:
    return {
        "name": "CocoDataset", "img_path": REQUIRED, "ann_path": REQUIRED,
        "input_size": REQUIRED, "keep_ratio": False, "pipeline": {OPEN: True},
        "multi_scale": None, "class_names": None, "use_instance_mask": False,
        "use_seg_mask": False, "use_keypoint": False, "load_mosaic": False, "mode": None,
        "split": None, "data_dir": None,  # TFDS sources (nanodet_jax.data.readers)
        "max_boxes": None,  # G of the padded GT arrays; None = the dataset's largest count
    }


def _schema() -> dict:
    """Every accepted field, with its default (``REQUIRED`` where the reference has none)."""
    return {
        "save_dir": "workspace/nanodet",
        "class_names": list(COCO_CLASSES),
        "model": {
            "arch": {
                "name": "NanoDetPlus",
                "detach_epoch": 0,
                "backbone": {"name": "ShuffleNetV2", "model_size": "1.5x",
                             "out_stages": [2, 3, 4], "activation": "ReLU",
                             "with_last_conv": False, "kernal_size": 3,
                             # False, True (reference: download ImageNet weights, which
                             # models.init_train_variables refuses) or a torchvision .pth path
                             "pretrain": True},
                "fpn": {"name": "GhostPAN", "in_channels": REQUIRED, "out_channels": REQUIRED,
                        "use_depthwise": False, "kernel_size": 5, "expand": 1,
                        "num_blocks": 1, "use_res": False, "num_extra_level": 0,
                        "activation": "LeakyReLU",
                        "upsample_cfg": {"scale_factor": 2, "mode": "bilinear"},
                        "norm_cfg": {"type": "BN"}},
                "head": {"name": "NanoDetPlusHead", "num_classes": REQUIRED,
                         "input_channel": REQUIRED, "feat_channels": 96, "stacked_convs": 2,
                         "kernel_size": 5, "strides": [8, 16, 32, 64], "conv_type": "DWConv",
                         "norm_cfg": {"type": "BN"}, "reg_max": 7, "activation": "LeakyReLU",
                         "assigner_cfg": {"topk": 13},
                         "share_cls_reg": None,  # accepted and ignored, as in the reference
                         "loss": _loss_defaults()},
                "aux_head": {"name": "SimpleConvHead", "num_classes": REQUIRED,
                             "input_channel": REQUIRED, "feat_channels": 256,
                             "stacked_convs": 4, "strides": [8, 16, 32, 64],
                             "activation": "LeakyReLU", "reg_max": 7, "conv_cfg": None,
                             "norm_cfg": {"type": "GN", "num_groups": 32,
                                          "requires_grad": True}},
            },
            "weight_averager": {"name": "ExpMovingAverager", "decay": 0.9998},
        },
        "data": {"train": _dataset_schema(), "val": _dataset_schema()},
        "device": {"gpu_ids": [0], "workers_per_gpu": 4, "batchsize_per_gpu": 96,
                   "precision": 32,
                   # multi-host start (ours; nanodet_jax.train.sharding): "auto", true, false
                   "distributed": {"enabled": "auto", "coordinator_address": None,
                                   "num_processes": None, "process_id": None}},
        "schedule": {"resume": None, "load_model": None,
                     "optimizer": {OPEN: True, "name": "AdamW", "lr": 0.001,
                                   "weight_decay": 0.05},
                     "warmup": {"name": "linear", "steps": 500, "ratio": 0.0001},
                     "total_epochs": 300,
                     "lr_schedule": {OPEN: True, "name": "CosineAnnealingLR", "T_max": 300,
                                     "eta_min": 0.00005},
                     "val_intervals": 10},
        "grad_clip": 35,
        "evaluator": {"name": "CocoDetectionEvaluator", "save_key": "mAP"},
        "log": {"interval": 50, "keep_checkpoints": 3},  # keep_checkpoints: ours (orbax)
        "test": {OPEN: True},
    }


def _merge(schema: Any, value: Any, path: str, source: str) -> Any:
    """Validate ``value`` against ``schema`` and fill defaults; raise naming the field."""
    if not isinstance(schema, dict):
        return copy.deepcopy(value)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: field '{path}' must be a mapping, got {value!r}")
    is_open = schema.get(OPEN, False)
    out = {}
    for key, sub in schema.items():
        if key == OPEN:
            continue
        child = f"{path}.{key}" if path else key
        if key in value:
            out[key] = _merge(sub, value[key], child, source)
        elif sub is REQUIRED:
            raise ConfigError(f"{source}: missing required field '{child}'")
        else:
            out[key] = _merge(sub, None, child, source) if isinstance(sub, dict) else (
                copy.deepcopy(sub))
    for key, sub in value.items():
        if key not in schema:
            if not is_open:
                child = f"{path}.{key}" if path else key
                raise ConfigError(f"{source}: unknown field '{child}' (check the spelling; "
                                  f"accepted here: {sorted(k for k in schema if k != OPEN)})")
            out[key] = copy.deepcopy(sub)
    return out


def check_pretrain(value: Any, source: str = "<config>") -> None:
    """``model.arch.backbone.pretrain`` must be a bool or a non-empty path string."""
    if not isinstance(value, bool) and not (isinstance(value, str) and value):
        raise ConfigError(f"{source}: model.arch.backbone.pretrain must be false, true or the "
                          f"path of a torchvision ShuffleNetV2 .pth file, got {value!r}")


def check_precision(value: Any, source: str = "<config>") -> int:
    """``device.precision`` as 32 or 16 (the reference's AMP switch, read as bfloat16; see
    ``nanodet_jax.precision``), else a ConfigError naming the field."""
    if isinstance(value, bool) or value not in (16, 32):
        raise ConfigError(f"{source}: device.precision = {value!r} is not supported: use 32 "
                          "(float32) or 16 (bfloat16 activations, float32 parameters and "
                          "losses)")
    return int(value)


def _check_semantics(cfg: dict, source: str) -> None:
    arch = cfg["model"]["arch"]
    if arch["name"] != "NanoDetPlus":
        raise ConfigError(f"{source}: model.arch.name {arch['name']!r} is not supported "
                          "(only 'NanoDetPlus')")
    for sec, name in (("backbone", "ShuffleNetV2"), ("fpn", "GhostPAN"),
                      ("head", "NanoDetPlusHead"), ("aux_head", "SimpleConvHead")):
        if arch[sec]["name"] != name:
            raise ConfigError(f"{source}: model.arch.{sec}.name {arch[sec]['name']!r} is not "
                              f"supported (expected {name!r})")
    for split in ("train", "val"):
        size = cfg["data"][split]["input_size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            raise ConfigError(f"{source}: data.{split}.input_size must be [width, height], "
                              f"got {size!r}")
    check_pretrain(arch["backbone"]["pretrain"], source)
    check_precision(cfg["device"]["precision"], source)
    enabled = cfg["device"]["distributed"]["enabled"]
    if enabled not in (True, False, "auto"):
        raise ConfigError(f"{source}: device.distributed.enabled must be \"auto\", true or "
                          f"false, got {enabled!r}")
    n = len(cfg["class_names"])
    for sec in ("head", "aux_head"):
        if arch[sec]["num_classes"] != n:
            raise ConfigError(f"{source}: model.arch.{sec}.num_classes = "
                              f"{arch[sec]['num_classes']} but class_names has {n} entries")


def validate(raw: dict, source: str = "<config>") -> ml_collections.ConfigDict:
    """Validate a plain nested dict and return a complete ``ConfigDict``."""
    merged = _merge(_schema(), raw, "", source)
    _check_semantics(merged, source)
    return ml_collections.ConfigDict(merged)


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """Load a ``.py`` config (``get_config()``) or a reference ``.yml``/``.yaml`` file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    if p.suffix in (".yml", ".yaml"):
        with open(p) as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        return validate(raw, str(p))
    if p.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"_nanodet_cfg_{p.stem}", p)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if not hasattr(mod, "get_config"):
            raise ConfigError(f"{p}: a Python config must define get_config()")
        cfg = mod.get_config()
        raw = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg
        return validate(raw, str(p))
    raise ConfigError(f"{p}: unsupported config type {p.suffix!r} (use .py, .yml or .yaml)")


def load_config_text(text: str, source: str = "<yaml>") -> ml_collections.ConfigDict:
    """Validate a reference YAML config given as a string (e.g. a fixture's ``config_yaml``)."""
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    return validate(raw, source)


_SIZES = {"1.0x": ([116, 232, 464], 96, 192), "1.5x": ([176, 352, 704], 128, 256)}


def nanodet_plus_recipe(model_size: str = "1.0x", input_size: int = 416,
                        name: str | None = None) -> dict:
    """The reference NanoDet-Plus COCO recipe (``nanodet-plus-m[-1.5x]_{320,416}.yml``).

    Returns the plain dict tree; config files wrap it with ``ml_collections.ConfigDict``.
    """
    in_ch, d, aux = _SIZES[model_size]
    strides = [8, 16, 32, 64]
    tag = name or ("nanodet-plus-m" + ("" if model_size == "1.0x" else "-1.5x")
                   + f"_{input_size}")
    dataset = {"name": "CocoDataset", "input_size": [input_size, input_size],
               "keep_ratio": False}
    return {
        "save_dir": f"workspace/{tag}",
        "class_names": list(COCO_CLASSES),
        "model": {
            "weight_averager": {"name": "ExpMovingAverager", "decay": 0.9998},
            "arch": {
                "name": "NanoDetPlus", "detach_epoch": 10,
                "backbone": {"name": "ShuffleNetV2", "model_size": model_size,
                             "out_stages": [2, 3, 4], "activation": "LeakyReLU"},
                "fpn": {"name": "GhostPAN", "in_channels": in_ch, "out_channels": d,
                        "kernel_size": 5, "num_extra_level": 1, "use_depthwise": True,
                        "activation": "LeakyReLU"},
                "head": {"name": "NanoDetPlusHead", "num_classes": 80, "input_channel": d,
                         "feat_channels": d, "stacked_convs": 2, "kernel_size": 5,
                         "strides": strides, "activation": "LeakyReLU", "reg_max": 7,
                         "norm_cfg": {"type": "BN"},
                         "loss": _loss_defaults()},
                "aux_head": {"name": "SimpleConvHead", "num_classes": 80,
                             "input_channel": 2 * d, "feat_channels": aux,
                             "stacked_convs": 4, "strides": strides,
                             "activation": "LeakyReLU", "reg_max": 7},
            },
        },
        "data": {
            "train": {**dataset,
                      "img_path": "coco/train2017",
                      "ann_path": "coco/annotations/instances_train2017.json",
                      "pipeline": {"perspective": 0.0, "scale": [0.6, 1.4],
                                   "stretch": [[0.8, 1.2], [0.8, 1.2]], "rotation": 0,
                                   "shear": 0, "translate": 0.2, "flip": 0.5,
                                   "brightness": 0.2, "contrast": [0.6, 1.4],
                                   "saturation": [0.5, 1.2], "normalize": _NORMALIZE}},
            "val": {**dataset,
                    "img_path": "coco/val2017",
                    "ann_path": "coco/annotations/instances_val2017.json",
                    "pipeline": {"normalize": _NORMALIZE}},
        },
        "device": {"gpu_ids": [0], "workers_per_gpu": 10, "batchsize_per_gpu": 96,
                   "precision": 32},
        "schedule": {"optimizer": {"name": "AdamW", "lr": 0.001, "weight_decay": 0.05},
                     "warmup": {"name": "linear", "steps": 500, "ratio": 0.0001},
                     "total_epochs": 300,
                     "lr_schedule": {"name": "CosineAnnealingLR", "T_max": 300,
                                     "eta_min": 0.00005},
                     "val_intervals": 10},
        "grad_clip": 35,
        "evaluator": {"name": "CocoDetectionEvaluator", "save_key": "mAP"},
        "log": {"interval": 50},
    }


def nanodet_plus_tiny(input_size: int, class_names: list[str] | tuple[str, ...]) -> dict:
    """A narrow NanoDet-Plus for smoke tests and quick CPU experiments (not a reference
    recipe): ShuffleNetV2 0.5x, GhostPAN/head width 32, aux head width 64, trained from
    scratch; everything else as :func:`nanodet_plus_recipe`. Returns the plain dict tree."""
    raw = nanodet_plus_recipe("1.0x", input_size, name=f"nanodet-plus-tiny_{input_size}")
    raw["class_names"] = list(class_names)
    arch = raw["model"]["arch"]
    arch["backbone"].update(model_size="0.5x", pretrain=False)
    arch["fpn"].update(in_channels=[48, 96, 192], out_channels=32)
    arch["head"].update(num_classes=len(class_names), input_channel=32, feat_channels=32)
    arch["aux_head"].update(num_classes=len(class_names), input_channel=64, feat_channels=64)
    return raw
