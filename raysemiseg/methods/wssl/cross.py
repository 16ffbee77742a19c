"""Cross-dataset training of WSSL (Papandreou et al., ICCV 2015, Sec. 4.5).

* **Cross-Pretrain**: train on dataset A (e.g. COCO with the ``coco80`` space), then start the
  target run from that checkpoint with the classifier replaced: ``method.params.init_from:
  PATH`` in the target config, implemented by :func:`load_cross_pretrain`. Every tensor whose
  name and shape match is loaded; the classifier (the head's last layer, whose output channels
  are the number of classes) is always left at its fresh initialisation, even when the two
  spaces happen to have the same size.
* **Cross-Joint**: one network over the *union* label space of A and B, trained on rows of
  both (strong, or semi with weak rows). :func:`union_label_space` forms the union: B's names
  first (ids kept, so B's masks need no remapping), then A's classes that have no counterpart in
  B after the COCO->VOC renames (``airplane``->``aeroplane`` ...), in A's order. Classes present
  in both map to the same id, so they share one classifier row (the paper's "shared weights
  for shared classes"). Each dataset's masks are converted with
  ``space.mapping_to(union)`` (:meth:`raysemiseg.labels.LabelSpace.mapping_to`); write the union
  with :func:`write_label_space_yaml` and point ``label_space:`` of the run config and the store
  builder at that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import yaml
from torch import Tensor, nn

from raysemiseg.labels import COCO_TO_VOC_RENAME, LabelSpace, _generated_palette

#: file names searched (in order) inside a checkpoint directory
CHECKPOINT_FILES = ("model.pt", "state_dict.pt", "checkpoint.pt", "model.pth")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The model ``state_dict`` stored at ``path`` (``torch.load(weights_only=True)``).

    Args:
        path: a ``.pt``/``.pth`` file or a (Ray) checkpoint directory holding one of
            :data:`CHECKPOINT_FILES`. The file may hold the state dict itself or a dict with a
            ``"model"`` / ``"state_dict"`` entry. A DDP ``module.`` prefix is stripped.

    Raises:
        FileNotFoundError: naming the path (and the file names looked for in a directory).
        ValueError: the file holds no state dict.
    """
    p = Path(path)
    if p.is_dir():
        hits = [p / f for f in CHECKPOINT_FILES if (p / f).is_file()]
        if not hits:
            raise FileNotFoundError(f"checkpoint directory {p} holds none of {list(CHECKPOINT_FILES)}")
        p = hits[0]
    if not p.is_file():
        raise FileNotFoundError(f"Cross-Pretrain checkpoint {p} does not exist")
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{p}: expected a model state_dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def classifier_names(module: nn.Module, num_classes: int) -> list[str]:
    """Parameter/buffer names of the classifier: the last ``Conv2d``/``Linear`` under ``module``
    whose output size is ``num_classes`` (the head's final layer)."""
    last = None
    for name, m in module.named_modules():
        out = getattr(m, "out_channels", getattr(m, "out_features", None))
        if isinstance(m, (nn.Conv2d, nn.Linear)) and out == num_classes:
            last = name
    if last is None:
        return []
    prefix = f"{last}." if last else ""
    return [n for n, _ in module.state_dict().items() if n.startswith(prefix) and "." not in n[len(prefix):]]


def load_cross_pretrain(method: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Cross-Pretrain: load ``path`` into ``method`` except its classifier (Sec. 4.5).

    Args:
        method: a method with ``num_classes`` (any registered method).
        path: checkpoint file or directory (see :func:`read_state_dict`).

    Returns:
        ``{"loaded": [...], "replaced": [...], "skipped": [...]}``: names loaded, the classifier
        names kept fresh, and names skipped for a missing/mismatched tensor.

    Raises:
        ValueError: when nothing besides the classifier could be loaded (wrong checkpoint).
    """
    src = read_state_dict(path)
    own = method.state_dict()
    replaced = set(classifier_names(method, int(getattr(method, "num_classes"))))
    loaded, skipped = [], []
    new = {}
    for name, t in own.items():
        if name in replaced:
            continue
        s = src.get(name)
        if s is not None and tuple(s.shape) == tuple(t.shape):
            new[name] = s
            loaded.append(name)
        else:
            skipped.append(name)
    if not loaded:
        raise ValueError(f"{path}: no tensor matches the model ({len(own)} tensors); wrong checkpoint?")
    method.load_state_dict(new, strict=False)
    return {"loaded": loaded, "replaced": sorted(replaced), "skipped": skipped}


def union_label_space(a: LabelSpace, b: LabelSpace, name: str | None = None,
                      rename: Mapping[str, str] | None = None) -> LabelSpace:
    """Cross-Joint union space: ``b``'s classes (ids kept) then ``a``'s classes not in ``b``.

    A class of ``a`` is "in ``b``" when its name, or its renamed name (default COCO->VOC renames),
    is one of ``b``'s names. Background (both spaces' background) is ``b``'s background.

    Args:
        a: the auxiliary dataset's space (e.g. ``coco80``).
        b: the target dataset's space (e.g. ``voc21``); its ids are preserved.
        name: name of the union (default ``"{b}+{a}"``).

    Returns:
        The union :class:`LabelSpace`; convert masks with ``a.mapping_to(union)`` and
        ``b.mapping_to(union)`` (both exact: every class has a counterpart).
    """
    rename = COCO_TO_VOC_RENAME if rename is None else rename
    names = list(b.names)
    for n in a.names:
        if n == a.background:
            continue
        if n in b or rename.get(n, n) in b:
            continue
        names.append(n)
    pal = _generated_palette(len(names))
    pal[: b.num_classes] = b.palette
    return LabelSpace(name or f"{b.name}+{a.name}", tuple(names), pal, ignore_index=b.ignore_index,
                      background=b.background)


def write_label_space_yaml(space: LabelSpace, path: str | Path) -> Path:
    """Write ``space`` as a label-space YAML readable by :func:`raysemiseg.labels.load_label_space`."""
    p = Path(path)
    p.write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    return p


__all__ = ["classifier_names", "load_cross_pretrain", "read_state_dict", "union_label_space",
           "write_label_space_yaml"]
