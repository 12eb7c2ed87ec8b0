"""How many sites hold each site's SecAgg+ key shares: chosen from the round's size and
the dropouts it must survive.

In Flower's SecAgg+ every sampled site splits its two secrets (its private-mask seed and
its pairwise-mask key) into ``k`` Shamir shares, one for itself and one for each of the
``k - 1`` sites beside it in a ring shuffled each round; ``t`` shares rebuild a secret.
A site's masked update adds ``k`` masks, so a site's work grows with ``k`` and a round's
with ``n * k``: with every site sharing (``k = n``) a round's cost grows with the square
of the federation.

The round completes only if every sampled site, dropped or not, still has ``t`` share
holders among the survivors of its window of ``k``. Any ``k - t`` sites may therefore drop
out after setup, wherever they sit in the ring, and the round still aggregates. A site's
secrets stay hidden unless ``t`` of its share holders collude with the server, and a
threshold above ``k / 2`` keeps a malicious server from collecting both secrets of one
site (honest sites reveal one or the other, never both).

:func:`choose_shares` takes the smallest odd ``k`` whose majority threshold tolerates the
asked fraction of dropouts: ``D = floor(dropout * n)``, ``k = 2D + 1`` (at least 3),
``t = D + 1``; when that reaches ``n``, every site shares with every other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShareChoice:
    """One round's SecAgg+ share settings."""

    sites: int
    """Sites sampled into the round."""
    shares: int
    """``k``: holders of each site's key shares, the site itself included."""
    threshold: int
    """``t``: shares that rebuild a secret."""
    asked_dropouts: int
    """Dropouts the round was asked to survive (``floor(secagg-dropout * sites)``)."""

    flower_num_shares: int | float = 1.0
    """``num_shares`` as Flower's workflow takes it: an int > 2, or a fraction."""
    flower_threshold: int | float = 0.5
    """``reconstruction_threshold`` as Flower's workflow takes it: an int, or a fraction."""

    @property
    def tolerated_dropouts(self) -> int:
        """Sites that may drop after setup, wherever they are, with the round aggregated."""
        return max(0, min(self.shares, self.sites) - self.threshold)

    def record(self) -> dict[str, Any]:
        """The ledger's view of the choice."""
        return {"sites": self.sites, "shares": self.shares, "threshold": self.threshold,
                "tolerated_dropouts": self.tolerated_dropouts,
                "asked_dropouts": self.asked_dropouts}


def choose_shares(sites: int, dropout: float, num_shares: float = 0.0,
                  threshold: float = 0.0) -> ShareChoice:
    """The shares and threshold of a round of ``sites`` sampled sites.

    Args:
        sites: sites sampled into the round (at least 2).
        dropout: fraction of them that may drop out after setup (``secagg-dropout``).
        num_shares: ``secagg-num-shares``: 0 chooses ``k`` from ``dropout``; a fraction in
            (0, 1] or an int > 2 is used as Flower would (a fraction of the sites, made odd).
        threshold: ``secagg-threshold``: 0 is a majority of the ``k`` shares; a fraction of
            them (Flower's rounding, at least 2) or an int.
    """
    if sites < 2:
        raise ValueError(f"SecAgg+ needs at least 2 sites in a round, got {sites}")
    asked = math.floor(dropout * sites + 1e-9)
    if num_shares == 0:
        k = min(max(3, 2 * asked + 1), sites)
        flower_k: int | float = 1.0 if k >= sites else k
    elif num_shares <= 1:
        flower_k = float(num_shares)
        k = round(num_shares * sites)  # Flower's rule for a fraction
        if k < sites and k % 2 == 0:
            k += 1
        if k <= 2:
            k = sites
    else:
        k = flower_k = int(num_shares)
    k = min(k, sites)
    if threshold == 0:
        t = k // 2 + 1
        flower_t: int | float = t
    elif threshold <= 1:
        t, flower_t = max(2, round(threshold * k)), float(threshold)
    else:
        t = flower_t = int(threshold)
    return ShareChoice(sites=sites, shares=k, threshold=t, asked_dropouts=asked,
                       flower_num_shares=flower_k, flower_threshold=flower_t)
