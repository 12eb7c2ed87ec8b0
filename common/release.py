"""The released model of a run: ``RUN_DIR/model.npz``, the weights with their model card.

A run's round checkpoints hold weights only. At its end the run also writes the model a
consortium releases: the last global weights plus a :class:`ModelCard` (stored as one JSON
entry of the ``.npz``, :data:`CARD`), which says what the weights are (model name,
options, kind, input layout), what features they expect (the encoder, its weights hash
and the ``pathfed prepare`` settings the sites' features were made with) and the
decision threshold calibrated on the run's pooled validation data. ``pathfed predict``
reads it and refuses features made otherwise. Sealed (``model.npz.enc``, AES-GCM) when
the run's checkpoints are; the file's SHA-256 is in the run's signed summary.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError

RELEASE = "model.npz"
MATCHED = ("encoder", "weights", "patch", "mpp", "stain")
"""The settings a model's features and new features must agree on."""
CARD = "__pathfed_model_card__"
FORMAT = 1


@dataclass(frozen=True)
class ModelCard:
    """What a released model is and what it expects."""

    model: str
    model_options: str
    kind: str
    """``bags``, ``multiscale`` or ``patches`` (see :mod:`common.models.base`)."""
    in_dim: int
    """Feature size per patch (bag models); 0 for patch models."""
    children: int
    """High-power patches per region (multi-scale models); 0 else."""
    features: str
    """How the sites' features were made: a ``pathfed prepare`` settings key
    (``mpp=...;patch=...;encoder=...;weights=...;...``), ``images;...`` for image folders
    embedded on the fly, ``synthetic`` for the embedded default."""
    threshold: float
    """Logit threshold calibrated on the last round's pooled validation data."""
    round: int
    run_id: str
    val_auc: float | None = None
    format: int = FORMAT

    def setting(self, name: str) -> str | None:
        """One ``name=value`` field of :attr:`features` (e.g. ``encoder``), or None."""
        from common.data.featurefile import settings_fields

        return settings_fields(self.features).get(name)

    def mismatch(self, made: str) -> tuple[str, str] | None:
        """How features made as ``made`` (a settings key or a site's provenance) differ
        from the model's: ``("encoder=a, mpp=2", "encoder=b, mpp=1")`` (theirs, the
        model's); None when they agree on :data:`MATCHED`."""
        from common.data.featurefile import settings_fields

        want, got = settings_fields(self.features), settings_fields(made)
        differ = [k for k in MATCHED if want.get(k) != got.get(k)]
        if self.features.startswith("images;") != made.startswith("images;"):
            want["kind"], got["kind"] = (("images" if t.startswith("images;") else "features")
                                         for t in (self.features, made))
            differ.insert(0, "kind")
        if not differ:
            return None
        return (", ".join(f"{k}={got.get(k)}" for k in differ),
                ", ".join(f"{k}={want.get(k)}" for k in differ))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> ModelCard:
        try:
            data = json.loads(text)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as err:
            raise DataError(f"{where}: damaged model card ({err})") from None


def release_bytes(names: list[str], weights: list[np.ndarray], card: ModelCard) -> bytes:
    """The ``.npz`` bytes of a released model."""
    buf = io.BytesIO()
    np.savez(buf, **dict(zip(names, weights)), **{CARD: np.array(card.to_json())})  # type: ignore[arg-type]
    return buf.getvalue()


def split_card(arrays: dict[str, np.ndarray], where: str) -> tuple[dict[str, np.ndarray],
                                                                    ModelCard | None]:
    """A checkpoint's weights and its model card (None for a round checkpoint)."""
    if CARD not in arrays:
        return arrays, None
    card = ModelCard.from_json(str(arrays[CARD]), where)
    return {k: v for k, v in arrays.items() if k != CARD}, card


def load_model(path: str | Path, key: bytes | None = None
               ) -> tuple[dict[str, np.ndarray], ModelCard | None, Path]:
    """A released model (a run folder, its ``model.npz[.enc]``, or a round checkpoint):
    ``(weights by name, card or None, the file read)``."""
    from common.crypto.sealed import SUFFIX
    from common.runs import load_checkpoint

    path = Path(path)
    if path.is_dir():
        for name in (RELEASE, RELEASE + SUFFIX):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise DataError(f"{path}: no {RELEASE} in this run folder; a run writes it when "
                            "it ends (re-run, or resume it, to finish)")
    arrays, card = split_card(load_checkpoint(path, key), str(path))
    return arrays, card, path


def card_for_round(cfg: Any, kind: str, in_dim: int, children: int, features: str,
                   threshold: float, server_round: int, val_auc: float | None) -> ModelCard:
    """The card of the global model of ``server_round`` of the run ``cfg``."""
    return ModelCard(model=cfg.model, model_options=cfg.model_options, kind=kind,
                     in_dim=in_dim, children=children, features=features,
                     threshold=float(threshold), round=server_round, run_id=cfg.run_id,
                     val_auc=val_auc)


__all__ = ["CARD", "RELEASE", "ModelCard", "card_for_round", "load_model", "release_bytes",
           "split_card"]
