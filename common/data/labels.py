"""``labels.csv``: the one reader of label files, for image folders and feature folders.

Rows name a slide or image (a path relative to the data folder), its label and optional
``tma_group``/``site``, ``patient`` and ``mask`` columns. Mistakes fail here, naming the
file and line: text that is not UTF-8, a missing column, an unknown label, a path outside
the data folder, a slide listed twice (or with contradictory labels), and a ``patient``
column filled for some rows only (which would silently change the privacy unit).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Protocol, TypeVar

from common.errors import DataError

LABELS = "labels.csv"
"""The labels file of an image folder or a feature folder."""

POSITIVE = {"1", "malignant", "positive", "tumor", "tumour", "cancer", "true"}
NEGATIVE = {"0", "benign", "negative", "normal", "false"}


@dataclass(frozen=True)
class LabelRow:
    """One checked row of a labels file."""

    line: int
    name: str
    """The slide or image as written (a relative path)."""
    label: int
    group: str
    """``tma_group`` or ``site``; the name itself when there is neither."""
    patient: str | None
    mask: str | None


def _inside(name: str) -> bool:
    """Whether a relative path stays inside its folder (no absolute path, no ``..``)."""
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or ".." in pure.parts:
            return False
    return True


def parse_label(raw: str, where: str) -> int:
    value = raw.strip().lower()
    if value in POSITIVE:
        return 1
    if value in NEGATIVE:
        return 0
    raise DataError(f"{where}: label {raw!r} is not one of {sorted(POSITIVE | NEGATIVE)}")


def read_label_rows(path: Path, names: tuple[str, ...] = ("image",)) -> list[LabelRow]:
    """The checked rows of ``path``; ``names`` are the accepted name columns, in order."""
    wanted = f"{'|'.join(names)},label[,tma_group|site][,patient][,mask]"
    if not path.is_file():
        raise DataError(f"{path}: labels file missing; it needs columns {wanted}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            raw_rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else ""
                         for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8 "
                        "CSV") from None
    except csv.Error as err:
        raise DataError(f"{path}: not a CSV file ({err})") from None
    column = next((c for c in names if c in columns), None)
    if column is None or "label" not in columns:
        raise DataError(f"{path}: header is {columns or 'empty'}; expected columns {wanted}")
    if not raw_rows:
        raise DataError(f"{path}: no rows; add one line per slide")
    rows: list[LabelRow] = []
    seen: dict[str, LabelRow] = {}
    for line, row in enumerate(raw_rows, start=2):
        where = f"{path}: line {line}"
        name = row.get(column, "")
        if not name:
            raise DataError(f"{where}: empty {column} name")
        if not _inside(name):
            raise DataError(f"{where}: {name!r} is outside the data folder; list files by "
                            "their path inside it")
        label = parse_label(row.get("label", ""), where)
        key = str(PurePosixPath(name.replace("\\", "/")))
        if key in seen:
            first = seen[key]
            what = ("with contradictory labels" if first.label != label else "twice")
            raise DataError(f"{where}: {name!r} is listed {what} (also line {first.line}); "
                            "list each slide once")
        patient = row.get("patient") or None
        mask = row.get("mask") or None
        if mask is not None and not _inside(mask):
            raise DataError(f"{where}: mask {mask!r} is outside the data folder")
        item = LabelRow(line, name, label, row.get("tma_group") or row.get("site") or name,
                        patient, mask)
        seen[key] = item
        rows.append(item)
    with_patient = [r for r in rows if r.patient]
    if with_patient and len(with_patient) != len(rows):
        missing = next(r for r in rows if not r.patient)
        raise DataError(f"{path}: line {missing.line}: empty patient, but other rows name "
                        "their patient; give every slide's patient, or drop the column for "
                        "slide-level privacy")
    return rows


class Grouped(Protocol):
    @property
    def group(self) -> str: ...


G = TypeVar("G", bound=Grouped)


def assign_sites(items: list[G], n_sites: int) -> list[list[G]]:
    """Whole groups (``tma_group``/``site``) to sites, largest group first to the emptiest
    site (deterministic): images of one group share staining and scanning, so a group never
    spans two hospitals."""
    groups: dict[str, list[G]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    if n_sites > len(groups):
        raise DataError(
            f"{n_sites} sites asked for but the data has only {len(groups)} tma_group "
            f"values; use --sites {len(groups)} or fewer"
        )
    sites: list[list[G]] = [[] for _ in range(n_sites)]
    for group in sorted(groups, key=lambda g: (-len(groups[g]), g)):
        min(sites, key=len).extend(groups[group])
    return sites


__all__ = ["LABELS", "NEGATIVE", "POSITIVE", "LabelRow", "assign_sites", "parse_label",
           "read_label_rows"]
