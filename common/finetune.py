"""Transfer a federated model to a new hospital: fine-tuning under the site's own DP budget.

:func:`finetune` takes a released model (``RUN_DIR/model.npz``) and one hospital's data,
checks that the data's features are made as the model's were (the same encoder, weights,
patch size, scale and stain normalisation, from the model card), measures the model on
the hospital's held-out split, trains it there for ``cfg.rounds`` rounds of DP-SGD at the
hospital's budget ``cfg.epsilon`` (one site through the one engine,
:func:`common.fedavg.run_inprocess`: its accountant, its signed ledger, its checkpoints)
and measures it again. The result is a run folder like any other, whose ``model.npz``
``pathfed predict`` applies and ``pathfed audit`` verifies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import FederationConfig
from common.errors import ConfigError
from common.release import ModelCard, load_model

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class FinetuneResult:
    before: dict[str, float]
    """The released model on the site's held-out split: AUC, accuracy, balanced accuracy."""
    after: dict[str, float]
    epsilon: float
    run: Path
    summary: dict[str, Any]


def check_same_features(card: ModelCard, made: str, where: str) -> None:
    """Refuse data whose features are made otherwise than the model's (one line)."""
    if card.features in ("synthetic", "site file", "unknown") or made in (
            "synthetic", "site file"):
        if card.features != made:
            raise ConfigError(f"{where}: the model was trained on {card.features} data, this "
                              f"is {made}; fine-tune on data made the same way")
        return
    differ = card.mismatch(made)
    if differ:
        raise ConfigError(f"{where}: features made with {differ[0]}, the model's with "
                          f"{differ[1]}; prepare the hospital's slides with the model's "
                          "settings")


def _scores(counts: Any) -> dict[str, float]:
    return {"auc": float(counts.auc), "accuracy": float(counts.accuracy),
            "balanced_accuracy": float(counts.balanced_accuracy)}


def finetune(model_path: str | Path, cfg: FederationConfig, out: str | Path
             ) -> FinetuneResult:
    """Fine-tune the released model at ``model_path`` on ``cfg.data`` (one hospital) with
    ``cfg``'s training and privacy settings; the model, its options and ``init`` come from
    the release. Writes the run folder ``out``."""
    from common.fedavg import run_inprocess
    from common.site import Site
    from common.training import get_weights

    weights, card, path = load_model(model_path)
    if card is None:
        raise ConfigError(f"{path}: a round checkpoint carries no model card; give the run "
                          "folder or its model.npz")
    if not cfg.data:
        raise ConfigError("finetune: --data, the hospital's own slides or features, is needed")
    cfg = cfg.model_copy(update={"model": card.model, "model_options": card.model_options,
                                 "init": str(path), "secagg": False, "out": str(out)})
    site = Site(cfg, 0, name="site-0", data=cfg.data)
    check_same_features(card, site.features, cfg.data)
    from common.site import initial_model

    before, _ = site.evaluate(get_weights(initial_model(cfg)))
    log.info("%s on %s before fine-tuning: AUC %.3f (held-out %d slides)", path, cfg.data,
             before.auc, before.n)
    result = run_inprocess(cfg, [site], run_dir=out)
    after, _ = site.evaluate(result.weights)
    return FinetuneResult(_scores(before), _scores(after), site.epsilon, Path(out),
                          result.summary)


__all__ = ["FinetuneResult", "check_same_features", "finetune"]
