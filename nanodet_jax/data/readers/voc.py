"""Pascal VOC xml reader (``XMLDataset``)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from nanodet_jax.data.readers.base import (
    MALFORMED,
    NO_IMAGE,
    UNKNOWN_CLASS,
    Dataset,
    DropLog,
    files_under,
    image_hw,
    size_reason,
)
from nanodet_jax.data.record import ImageRecord


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = None if node is None else node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def voc_record(root: ET.Element, xml_file: str, img_dir: str, class_names: Sequence[str],
               image_id: int, drops: DropLog) -> ImageRecord | None:
    """One Pascal VOC annotation (parsed ``root``) -> record; ``None`` (counted in ``drops``)
    when it names no image or its size is neither annotated nor readable from the image."""
    file_name = _text(root, "filename")
    if not file_name:
        drops.add(f"{xml_file} (no <filename>)", MALFORMED)
        return None
    file = os.path.abspath(os.path.join(img_dir, file_name))
    size = root.find("size")
    try:
        hw = int(float(_text(size, "height"))), int(float(_text(size, "width")))
    except (TypeError, ValueError):
        hw = (0, 0)
    if min(hw) <= 0:
        hw = image_hw(file)
        if hw is None:
            drops.add(f"{xml_file} (no <size> and {file} unreadable)", NO_IMAGE)
            return None
    names = {n: i for i, n in enumerate(class_names)}
    boxes, labels = [], []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        where = f"{xml_file} (object {k}: {name})"
        if name not in names:
            drops.add(where, UNKNOWN_CLASS)
            continue
        bnd = obj.find("bndbox")
        try:
            x1, y1, x2, y2 = (float(_text(bnd, t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            drops.add(f"{where}, bad <bndbox>", MALFORMED)
            continue
        reason = size_reason(x2 - x1, y2 - y1)
        if reason is not None:
            drops.add(f"{where}, box [{x1:g}, {y1:g}, {x2:g}, {y2:g}]", reason)
            continue
        boxes.append([x1, y1, x2, y2])
        labels.append(names[name])
    return ImageRecord(image_id, file, hw[0], hw[1], boxes, labels)


class XMLDataset(Dataset):
    """Pascal VOC: every ``*.xml`` under ``ann_path`` (recursive, sorted); ``<filename>`` is
    read from ``img_path``; image id = position + 1; category id = class index + 1."""

    def __init__(self, img_path: str, ann_path: str, class_names: Sequence[str]):
        drops, records = DropLog(), []
        for idx, xml_file in enumerate(files_under(ann_path, ".xml")):
            try:
                root = ET.parse(xml_file).getroot()
            except ET.ParseError as e:
                drops.add(f"{xml_file} ({e})", MALFORMED)
                continue
            rec = voc_record(root, str(xml_file), str(img_path), class_names, idx + 1, drops)
            if rec is not None:
                records.append(rec)
        super().__init__(records, class_names, None, drops, str(ann_path))
