"""Bag containers, per-site splits and site files."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from common.data.multiscale import Layout
from common.errors import DataError

if TYPE_CHECKING:  # torch loads when a dataset is made, not when data is checked
    from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BagSet:
    """Bags of instance features with one binary label each."""

    bags: tuple[np.ndarray, ...]
    """One ``float32[N_i, D]`` array per bag."""
    labels: np.ndarray
    """``int64[n]`` bag labels in {0, 1}."""
    names: tuple[str, ...]
    patients: tuple[str, ...] | None = None
    """Patient of each bag, when the data has a patient column; None otherwise."""
    instance_labels: tuple[np.ndarray, ...] | None = None
    """Per-instance (patch) labels from annotations, ``int64[N_i]`` per bag; None when the
    slide label is all there is."""
    children: int = 0
    """High-power patches per region of multi-scale bags (:mod:`common.data.multiscale`),
    whose instances are regions; 0 for single-scale bags."""
    instance_masks: tuple[np.ndarray, ...] | None = None
    """Bags of image patches only: each patch's piece of the annotation mask,
    ``uint8[N_i, P, P]`` in {0, 1} per bag (a segmentation model's targets); None when
    unannotated."""

    def __len__(self) -> int:
        return len(self.bags)

    @property
    def privacy_unit(self) -> Literal["slide", "patient"]:
        """What one DP sample protects: a patient when patients are known, else a slide."""
        return "patient" if self.patients is not None else "slide"

    def by_patient(self) -> BagSet:
        """One bag per patient: the instances of all the patient's slides, concatenated.

        DP-SGD over these bags clips and noises each *patient's* gradient, so epsilon
        bounds what the model reveals about a patient, however many slides they have.
        The label is positive when any of the patient's slides is. Without patients,
        return the bags unchanged (one sample = one slide).
        """
        if self.patients is None:
            return self
        if len(self.patients) != len(self.bags):
            raise DataError(f"{len(self.patients)} patient ids for {len(self.bags)} bags")
        groups: dict[str, list[int]] = {}
        for i, patient in enumerate(self.patients):
            groups.setdefault(patient, []).append(i)
        ids = tuple(groups)

        def joined(per_bag: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, ...] | None:
            return (None if per_bag is None else
                    tuple(np.concatenate([per_bag[i] for i in groups[p]]) for p in ids))

        return BagSet(
            bags=joined(self.bags) or (),
            labels=np.array([self.labels[groups[p]].max() for p in ids], dtype=np.int64),
            names=ids, patients=ids, instance_labels=joined(self.instance_labels),
            children=self.children, instance_masks=joined(self.instance_masks),
        )

    @property
    def dim(self) -> int:
        """Columns of an instance's row (the feature size of single-scale bags)."""
        return int(self.bags[0].shape[1]) if self.bags else 0

    @property
    def layout(self) -> Layout:
        """Feature size per patch and children per region."""
        return Layout.of_width(self.dim, self.children)

    def high_power(self) -> BagSet:
        """The single-scale bags of multi-scale ones: each slide's high-power patches."""
        if not self.children:
            return self
        from common.data.multiscale import high_power

        layout = self.layout
        return BagSet(tuple(high_power(bag, layout) for bag in self.bags), self.labels,
                      self.names, self.patients)

    def to_dataset(self, max_instances: int | None = None) -> TensorDataset:
        """Pad every bag to one length: ``(features[n, N, D], mask[n, N], labels[n])``.

        A fixed shape keeps Opacus' Poisson loader (which can yield empty batches) simple.
        """
        import torch
        from torch.utils.data import TensorDataset

        n_max = max_instances or max((b.shape[0] for b in self.bags), default=1)
        features = np.zeros((len(self.bags), n_max, self.dim), dtype=np.float32)
        mask = np.zeros((len(self.bags), n_max), dtype=bool)
        for i, bag in enumerate(self.bags):
            features[i, : bag.shape[0]] = bag[:n_max]
            mask[i, : bag.shape[0]] = True
        return TensorDataset(
            torch.from_numpy(features),
            torch.from_numpy(mask),
            torch.from_numpy(self.labels.astype(np.float32)),
        )

    def to_patch_dataset(self, k: int, seed: int, stain_augment: float = 0.0,
                         patch_labels: bool = True, masks: bool = False) -> TensorDataset:
        """``(patches[n, k, 3, P, P], labels[n])`` from bags of image patches ``[N, P, P, 3]``.

        ``k`` patches of each slide, drawn without replacement (with replacement when the
        slide has fewer), optionally with HED stain augmentation of strength
        ``stain_augment`` (one draw per patch), scaled as the torch encoders scale them.
        Labels are ``[n, k]`` patch labels when the bags are annotated and ``patch_labels``,
        else the slide labels ``[n]``; with ``masks``, the patches' annotation masks
        ``[n, k, P, P]`` (a segmentation model's targets; :class:`DataError` when the bags
        have none).
        """
        rng = np.random.default_rng(seed)
        chosen = [rng.choice(len(bag), size=k, replace=len(bag) < k) for bag in self.bags]
        picked = (np.stack([bag[i] for bag, i in zip(self.bags, chosen)]) if self.bags
                  else np.zeros((0, k, 1, 1, 3), np.uint8))
        if masks:
            if self.instance_masks is None:
                raise DataError("these slides have no annotation masks; a segmentation "
                                "model needs an image folder whose labels.csv has a mask "
                                "column for every image")
            labels = (np.stack([m[i] for m, i in zip(self.instance_masks, chosen)])
                      if self.bags else np.zeros((0, k, 1, 1), np.uint8))
        elif patch_labels and self.instance_labels is not None:  # annotated: patch labels
            labels = np.stack([lab[i] for lab, i in zip(self.instance_labels, chosen)]) \
                if self.bags else np.zeros((0, k))
        else:  # weak labels: every patch takes its slide's label
            labels = self.labels
        return patch_tensor(picked, labels, rng, stain_augment)


def patch_tensor(picked: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 stain_augment: float = 0.0) -> TensorDataset:
    """``(patches[n, k, 3, P, P], labels)`` from ``uint8[n, k, P, P, 3]`` patches: HED stain
    augmentation of strength ``stain_augment`` (one draw per patch, from ``rng``), then
    scaled as the torch encoders scale them."""
    import torch
    from torch.utils.data import TensorDataset

    from common.features import IMAGENET_MEAN, IMAGENET_STD

    if stain_augment > 0 and len(picked):
        from common.wsi.stain import hed_augment

        picked = hed_augment(picked, rng, scale=stain_augment, shift=stain_augment)
    x = torch.from_numpy(picked).float().div_(255.0).permute(0, 1, 4, 2, 3)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    return TensorDataset((x - mean) / std, torch.from_numpy(labels.astype(np.float32)))


@dataclass(frozen=True)
class SiteData:
    """One hospital's training and validation bags."""

    name: str
    train: BagSet
    val: BagSet

    @property
    def max_instances(self) -> int:
        return max((b.shape[0] for b in self.train.bags + self.val.bags), default=1)

    def high_power(self) -> SiteData:
        """The site with single-scale bags (see :meth:`BagSet.high_power`)."""
        return SiteData(self.name, self.train.high_power(), self.val.high_power())


def stratified_split(
    labels: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean validation mask with about ``val_fraction`` of each class (one at least)."""
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx)))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        is_val[idx[:n_val]] = True
    return is_val


def split_bags(
    name: str, bags: list[np.ndarray], labels: np.ndarray, names: list[str],
    val_fraction: float, seed: int, patients: list[str] | None = None,
    instance_labels: list[np.ndarray] | None = None, children: int = 0,
    instance_masks: list[np.ndarray] | None = None,
) -> SiteData:
    """Split one site's bags into train and validation, stratified by label.

    With ``patients``, whole patients go to one side (a patient's label is positive when
    any of its slides is), and the bags keep their patient ids, so that DP training can
    take one patient as one sample.
    """
    rng = np.random.default_rng(seed)
    if patients is None:
        is_val = stratified_split(labels, val_fraction, rng)
    else:
        ids = sorted(set(patients))
        positive = {p: 0 for p in ids}
        for p, label in zip(patients, labels):
            positive[p] = max(positive[p], int(label))
        val_ids = np.array(ids)[stratified_split(np.array([positive[p] for p in ids]),
                                                 val_fraction, rng)]
        is_val = np.isin(np.array(patients), val_ids)

    def pick(sel: np.ndarray) -> BagSet:
        idx = np.flatnonzero(sel)
        return BagSet(tuple(bags[i] for i in idx), labels[idx].astype(np.int64),
                      tuple(names[i] for i in idx),
                      tuple(patients[i] for i in idx) if patients is not None else None,
                      tuple(instance_labels[i] for i in idx)
                      if instance_labels is not None else None, children,
                      tuple(instance_masks[i] for i in idx)
                      if instance_masks is not None else None)

    return SiteData(name=name, train=pick(~is_val), val=pick(is_val))


def save_site_file(site: SiteData, path: str | Path) -> Path:
    """Write a site's bags to one ``.npz`` file (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"name": np.array(site.name),
                                     "children": np.array(site.train.children)}
    for split, bagset in (("train", site.train), ("val", site.val)):
        lengths = np.array([b.shape[0] for b in bagset.bags], dtype=np.int64)
        arrays[f"{split}_features"] = (
            np.concatenate(bagset.bags) if bagset.bags else np.zeros((0, 0), np.float32)
        )
        arrays[f"{split}_lengths"] = lengths
        arrays[f"{split}_labels"] = bagset.labels
        arrays[f"{split}_names"] = np.array(bagset.names, dtype=str)
        if bagset.patients is not None:
            arrays[f"{split}_patients"] = np.array(bagset.patients, dtype=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)
    return path


def load_site_file(path: str | Path) -> SiteData:
    """Read a site file written by :func:`save_site_file`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            parts = {}
            children = int(z["children"]) if "children" in z.files else 0
            for split in ("train", "val"):
                lengths = z[f"{split}_lengths"]
                feats = z[f"{split}_features"]
                if feats.dtype != np.uint8:  # image patches keep their pixels' type
                    feats = feats.astype(np.float32)
                bags = tuple(np.split(feats, np.cumsum(lengths)[:-1])) if len(lengths) else ()
                patients = (tuple(str(p) for p in z[f"{split}_patients"])
                            if f"{split}_patients" in z.files else None)
                parts[split] = BagSet(bags, z[f"{split}_labels"].astype(np.int64),
                                      tuple(str(n) for n in z[f"{split}_names"]), patients,
                                      children=children)
            return SiteData(name=str(z["name"]), train=parts["train"], val=parts["val"])
    except FileNotFoundError:
        raise DataError(f"{path}: site data file not found") from None
    except (KeyError, ValueError, OSError) as err:
        raise DataError(
            f"{path}: not a PathFed site file ({err}); re-create it with `pathfed simulate`"
        ) from None
