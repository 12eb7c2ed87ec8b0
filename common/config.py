"""Validated federation configuration.

One frozen pydantic model, :class:`FederationConfig`, holds every setting of a federated
run. Flower's run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, ``--run-config``),
a ``--config FILE`` (TOML) and the ``pathfed simulate`` flags all use the same kebab-case
keys and are validated here, once, at the edge.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import ConfigError, DataError


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class FederationConfig(BaseModel):
    """Settings of one federated run, shared by the server and every site."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=_kebab, populate_by_name=True,
        allow_inf_nan=False,
    )

    # Federation
    sites: int = Field(3, ge=2, le=1000, description="Number of hospitals (simulation).")
    rounds: int = Field(8, ge=1, le=10_000, description="Federated rounds.")
    fraction_fit: float = Field(
        1.0, gt=0.0, le=1.0, description="Fraction of sites asked to train each round."
    )
    seed: int = Field(0, ge=0, le=2**63 - 1,
                      description="Seed of data splits, initial model and sampling.")
    out: str = Field("", description="Run folder; empty means runs/<timestamp>.")
    run_id: str = Field(
        "", description="Name of the federation; deployed sites keep their privacy state by it."
    )
    resume: bool = Field(
        False, description="Continue the run in `out` from its last checkpoint."
    )
    keys: str = Field(
        "",
        description="Ledger key folder (server.key, public/NAME.pub.pem); empty: simulations "
        "make one beside the run folder, other runs keep no ledger.",
    )
    deterministic: bool = Field(
        True,
        description="Seed DP noise and sampling from `seed` (reproducible simulations); "
        "false draws them from the OS, as a deployment must.",
    )

    # Data
    data: str = Field(
        "", description="Folder of labelled images (labels.csv), of prepared features, a site "
        "file or a folder of site files (site-N.npz); empty means synthetic bags."
    )
    val_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="Validation share per site.")
    synthetic_bags: int = Field(
        300, ge=8, le=100_000, description="Synthetic bags per site (train + validation)."
    )
    patch_size: int = Field(32, ge=8, le=1024, description="Patch size in pixels (images).")
    encoder: str = Field("color-texture", description="Patch encoder for image folders.")
    patches_per_slide: int = Field(
        16, ge=1, le=4096,
        description="Patches drawn from each slide per round when training a patch model.",
    )
    stain_augment: float = Field(
        0.05, ge=0.0, le=0.5,
        description="HED stain augmentation strength for patch-model training (0: off).",
    )
    mixpatch: bool = Field(
        False, description="MixPatch (Park et al. 2022) for patch models: part of each "
        "sample's patches are mosaics of cells from several slides of one mixing group, "
        "labelled with their positive share. One DP sample becomes one mixing group, "
        "accounted as a substitution so that epsilon still protects a slide "
        "(docs/privacy.md, about twice the noise).")
    mixpatch_grid: int = Field(2, ge=2, le=8,
                               description="MixPatch: cells per side of a mixed patch.")
    mixpatch_ratio: float = Field(0.5, gt=0.0, le=1.0,
                                  description="MixPatch: share of a sample's patches that "
                                  "are mixed (the rest are plain patches).")
    mixpatch_group: int = Field(2, ge=1, le=64,
                                description="MixPatch: slides (or patients) per mixing "
                                "group on average; 1 mixes a slide with itself only.")
    stain_normalize: Literal["none", "macenko", "reinhard"] = Field(
        "none", description="Stain normalisation of image-folder patches before the encoder, "
        "to PathFed's reference tile (prepared features record their own, from `pathfed "
        "prepare --stain-normalize`).",
    )

    # Model and local training
    model: str = Field("gated-attention-mil", description="Model name in the registry.")
    init: str = Field(
        "", description="Start from a released model (a run folder or its model.npz) instead "
        "of a fresh initialisation; it must be a model of the same name and shape.")
    freeze: str = Field(
        "", description="Parameters kept fixed in local training, as comma-separated name "
        "prefixes (e.g. 'embed,attention_v' trains a gated attention-MIL's remaining "
        "layers; `pathfed finetune --freeze`): their update is zero and DP-SGD clips and "
        "noises only the rest.")
    model_options: str = Field(
        "", description="The model's options as 'name=value,...' (e.g. 'hidden_dim=64,"
        "kernel=rbf'); `pathfed models` lists each model's options and defaults.")
    local_epochs: int = Field(1, ge=1, le=1000, description="Local epochs per round.")
    batch_size: int = Field(
        32, ge=1, le=100_000, description="Expected (Poisson) batch size in slides."
    )
    lr: float = Field(0.5, gt=0.0, le=10.0, description="Learning rate.")
    optimizer: Literal["adam", "sgd"] = Field("sgd", description="Local optimizer.")
    prox_mu: float = Field(
        0.0, ge=0.0, le=100.0,
        description="FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2 in "
        "local training (0: plain FedAvg). Its gradient is data-independent, so DP-SGD "
        "clips and noises only the data's gradient.")
    scaffold: bool = Field(
        False, description="SCAFFOLD drift control (Karimireddy et al. 2020, option II): "
        "every local step is corrected by the server's control variate minus the site's; "
        "the server derives its variate from the aggregate, so the SecAgg+ vector does "
        "not grow. Post-processing of the DP gradient: no privacy cost (local DP only).")

    # Server optimiser (post-processing of the aggregate: no privacy cost)
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = Field(
        "fedavg", description="How the server steps with the round's aggregate update "
        "(Reddi et al. 2021, Flower's arithmetic).")
    server_lr: float = Field(
        0.0, ge=0.0, le=100.0,
        description="Server learning rate; 0 takes Flower's default (1 for fedavg and "
        "fedavgm, 0.1 for the adaptive ones).")
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="FedAvgM's momentum.")
    server_beta1: float = Field(0.9, ge=0.0, lt=1.0,
                                description="First-moment decay of fedadam/fedyogi.")
    server_beta2: float = Field(0.99, ge=0.0, lt=1.0,
                                description="Second-moment decay of fedadam/fedyogi.")
    server_tau: float = Field(1e-9, gt=0.0, le=1.0,
                              description="Adaptive optimisers' denominator constant.")

    # Differential privacy
    dp: bool = Field(True, description="Train every site with DP-SGD (Opacus).")
    epsilon: float = Field(8.0, gt=0.0, le=1000.0, description="Per-site epsilon budget.")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="Per-site delta.")
    site_epsilon: str = Field(
        "",
        description="Per-site epsilon overrides, 'site-0=1.0,site-2=3'.",
    )
    max_grad_norm: float = Field(
        1.0, gt=0.0, le=1e6,
        description="Gradient clipping norm: per slide with DP, per batch without.")
    max_noise_multiplier: float = Field(
        20.0,
        gt=0.0,
        description="Largest noise multiplier a site accepts; a budget that needs more "
        "runs out before the planned rounds.",
    )
    accountant: Literal["rdp", "prv"] = Field(
        "prv", description="Opacus accountant of local DP: prv (the tightest; a site whose "
        "schedule PRV cannot compose stably falls back to rdp) or rdp.")
    dp_mode: Literal["local", "distributed"] = Field(
        "local", description="local: every site adds its own full DP-SGD noise; "
        "distributed: each site takes one full-batch clipped step per round and adds a "
        "share of Skellam noise that only SecAgg+'s sum completes (needs secagg; "
        "docs/privacy.md).")
    release_train_loss: bool = Field(
        False,
        description="Sites also send their mean training loss each round: an un-noised "
        "statistic of their data that DP does not cover (off by default).",
    )

    # Secure aggregation
    secagg: bool = Field(True, description="Aggregate through Flower's SecAgg+ workflow.")
    secagg_dropout: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="Fraction of a round's sites that may drop out after SecAgg+ setup, "
        "anywhere, with the round still aggregated; sets the shares when "
        "secagg-num-shares is 0.",
    )
    secagg_num_shares: float = Field(
        0.0,
        ge=0.0,
        description="Sites holding each site's key shares (itself included): 0 chooses the "
        "fewest that survive secagg-dropout; an int > 2; or a fraction of the sites.",
    )
    secagg_threshold: float = Field(
        0.0,
        ge=0.0,
        description="Shares needed to recover a key: 0 is a majority of the shares; an int, "
        "or a fraction of them.",
    )
    secagg_max_weight: int = Field(
        1000, ge=1, description="Largest number of training slides at one site."
    )
    secagg_quantization_range: int = Field(
        2**22, ge=2**8, le=2**28, description="Quantisation levels of SecAgg+."
    )
    secagg_clipping_range: float = Field(
        0.0,
        ge=0.0,
        description="SecAgg+ clipping range of update values; 0 derives it from lr and steps.",
    )
    timeout: float = Field(600.0, gt=0.0, description="Seconds to wait for site replies.")

    @field_validator("run_id")
    @classmethod
    def _check_run_id(cls, value: str) -> str:
        if value and not RUN_ID.match(value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (at most 128; no path "
                             "separators or '..')")
        return value

    @field_validator("site_epsilon")
    @classmethod
    def _check_site_epsilon(cls, value: str) -> str:
        parse_site_values(value)
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> FederationConfig:
        from common.models import MODELS

        if self.model not in MODELS:
            raise ValueError(f"model: unknown model {self.model!r}; known: {', '.join(MODELS)}")
        from common.models import parse_model_options

        parse_model_options(self.model, self.model_options)
        if MODELS[self.model].trains == "adversarial":
            clash = [name for name, on in (
                ("mixpatch", self.mixpatch), ("scaffold", self.scaffold),
                ("prox-mu", self.prox_mu > 0), ("dp-mode", self.dp_mode == "distributed"),
                ("optimizer", self.optimizer != "adam")) if on]
            if clash:
                raise ValueError(f"{clash[0]}: model {self.model!r} trains a generator and a "
                                 "discriminator with Adam, in local DP, without mixpatch, "
                                 "scaffold or prox-mu; set optimizer = \"adam\" and leave "
                                 "the others at their defaults")
        if self.mixpatch and MODELS[self.model].trains == "segmenter":
            raise ValueError(f"mixpatch: mixes slide labels into soft patch labels, and "
                             f"model {self.model!r} learns annotation masks; leave mixpatch "
                             "off")
        if self.mixpatch and MODELS[self.model].kind != "patches":
            raise ValueError(f"mixpatch: mixes image patches, and model {self.model!r} "
                             "trains on features; use a patch model (residual-patch-cnn)")
        if self.mixpatch and self.patch_size % self.mixpatch_grid:
            raise ValueError(f"mixpatch-grid: {self.mixpatch_grid} must divide patch-size "
                             f"{self.patch_size}")
        if self.dp_mode == "distributed":
            if not (self.dp and self.secagg):
                raise ValueError("dp-mode: distributed DP needs dp = true and secagg = true "
                                 "(the noise is complete only in SecAgg+'s sum)")
            if self.mixpatch:
                raise ValueError("mixpatch: its mixing groups are accounted in local DP "
                                 "only; use dp-mode = \"local\"")
            if self.scaffold:
                raise ValueError("scaffold: with distributed DP a site's update is private "
                                 "only in the sum, so its control variate would not be; "
                                 "use dp-mode = \"local\" (one full-batch step per round "
                                 "has no client drift to correct)")
            if self.site_epsilon:
                raise ValueError("site-epsilon: every site shares the one noise of a "
                                 "distributed-DP sum; give one epsilon, or use dp-mode = "
                                 "\"local\" for per-site budgets")
        if self.secagg:
            shares, threshold = self.secagg_num_shares, self.secagg_threshold
            if shares > 1 and (shares != int(shares) or shares <= 2):
                raise ValueError("secagg-num-shares: must be 0 (chosen from secagg-dropout), "
                                 "a fraction in (0, 1] or an int > 2")
            if threshold > 1 and threshold != int(threshold):
                raise ValueError("secagg-threshold: must be a fraction in (0, 1] or an int")
            if shares > 1 and threshold > 1 and threshold >= shares:
                raise ValueError("secagg-threshold: must be below secagg-num-shares")
        return self

    @property
    def epsilon_overrides(self) -> dict[str, float]:
        """Per-site epsilon budgets given by ``site-epsilon``."""
        return parse_site_values(self.site_epsilon)

    def site_budget(self, site: str) -> float:
        """The epsilon budget of ``site``."""
        return self.epsilon_overrides.get(site, self.epsilon)

    def to_run_config(self) -> dict[str, Any]:
        """Flat kebab-case mapping, the shape of Flower's run config."""
        return self.model_dump(by_alias=True)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> FederationConfig:
        """Validate ``values`` (kebab- or snake-case keys); raise :class:`ConfigError`."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as err:
            raise ConfigError(_describe(err, source)) from None


RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

SMALL_DATA_DEFAULTS: dict[str, Any] = {
    "rounds": 20, "local-epochs": 2, "batch-size": 4, "optimizer": "adam", "lr": 0.005,
}
"""Defaults for a folder of labelled images or prepared features (tens of slides per site,
as in the UCSB set): small Poisson batches, Adam, more rounds. The synthetic default keeps
the fields' own defaults. Tuned on UCSB (simulations/configs/ucsb.toml)."""


def data_defaults(data: str | None) -> dict[str, Any]:
    """The defaults that learn on ``data``'s kind (below any --config, --set or flag)."""
    from common.data.sources import detect_source

    try:
        small = detect_source(data).small
    except DataError:
        return {}  # the data check names the problem
    return dict(SMALL_DATA_DEFAULTS) if small else {}


def parse_site_values(text: str) -> dict[str, float]:
    """Parse ``'site-0=1.5,site-2=3'`` into ``{'site-0': 1.5, 'site-2': 3.0}``."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or not name.strip() or not math.isfinite(number) or number <= 0:
            raise ValueError(
                f"site-epsilon: {item!r} is not NAME=POSITIVE_NUMBER (e.g. 'site-0=1.5')"
            )
        out[name.strip()] = number
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a flat mapping (no validation yet)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; --config takes a TOML file")
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    # Accept either a flat file or the pyproject-style [tool.flwr.app.config] table.
    table = raw.get("tool", {}).get("flwr", {}).get("app", {}).get("config", raw)
    return dict(table)


def _describe(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: field: what is wrong (allowed: ...)``."""
    lines = []
    for problem in err.errors():
        loc = ".".join(str(part) for part in problem["loc"])
        msg = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            schema = FederationConfig.model_json_schema(by_alias=True)
            known = ", ".join(sorted(schema["properties"]))
            msg = f"unknown setting (known: {known})"
        elif "input" in problem and loc:
            msg = f"{msg} (got {problem['input']!r})"
        if msg.startswith(f"{loc}:") or not loc:
            lines.append(f"{source}: {msg}")
        else:
            lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)
