"""A hospital in the federation: its data, its privacy accountant and its local rounds.

:class:`Site` is the one entry into local private training. The Flower client only
translates messages into calls of :meth:`Site.train` and :meth:`Site.evaluate` and keeps
:meth:`Site.state` between rounds, so the site's accountant is never re-created.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.checks import update_bound, update_problem
from common.config import FederationConfig
from common.data import SiteData, load_site
from common.data.multiscale import Layout
from common.errors import ConfigError, PathFedError, PrivacyBudgetExhausted
from common.metrics import EvalCounts
from common.models import build_model
from common.privacy import DPPlan, SiteAccountant, plan_distributed, plan_site, restore_plan
from common.training import NDArrays, adversarial_train, evaluate, local_train, set_weights

log = logging.getLogger(__name__)


def model_kind(cfg: FederationConfig) -> str:
    """The declared kind of ``cfg.model`` (``bags``, ``multiscale`` or ``patches``): it
    picks the data path."""
    from common.models import model_spec

    return model_spec(cfg.model).kind


def feature_layout(cfg: FederationConfig) -> Layout:
    """Instance feature size (and children per region, for a multi-scale model) of the
    configured data, for building the model."""
    from common.data.sources import feature_layout as source_layout

    return source_layout(cfg.data, cfg.patch_size, cfg.encoder,
                         multiscale=model_kind(cfg) == "multiscale")


def initial_model(cfg: FederationConfig) -> torch.nn.Module:
    """The federation's initial global model: deterministic in ``cfg.seed``, or the weights
    of the released model ``cfg.init`` (the same model, options and shapes)."""
    torch.manual_seed(cfg.seed)
    kwargs = model_kwargs(cfg)
    try:
        model = build_model(cfg.model, **kwargs)
    except (ValueError, TypeError) as err:  # an option value the model refuses
        raise ConfigError(f"model-options of {cfg.model!r}: {err}") from None
    if cfg.init:
        from common.release import load_model

        weights, card, path = load_model(cfg.init)
        if card is not None and (card.model, card.model_options) != (cfg.model,
                                                                     cfg.model_options):
            theirs = card.model_options or "no options"
            raise ConfigError(f"init: {path} is a {card.model} ({theirs}); this run trains "
                              f"{cfg.model} ({cfg.model_options or 'no options'}): set model "
                              "and model-options to match")
        own = model.state_dict()
        if list(own) != list(weights) or any(tuple(own[k].shape) != weights[k].shape
                                             for k in own):
            raise ConfigError(f"init: {path} does not fit this run's {cfg.model} (its data "
                              "has another feature size or layout)")
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
        log.info("initial model: %s (round %s of run %s)", path,
                 card.round if card else "?", card.run_id if card else "?")
    frozen = frozen_names(model, cfg.freeze, cfg.model)  # a wrong prefix fails before round 1
    if frozen:
        log.info("frozen in local training: %d of %d parameter tensors (%s)", len(frozen),
                 len(list(model.parameters())), cfg.freeze)
    return model


def model_kwargs(cfg: FederationConfig, layout: Layout | int | None = None) -> dict[str, Any]:
    """Constructor arguments of ``cfg.model`` for data of ``layout`` (a feature size for
    single-scale data; the configured data's by default)."""
    from common.models import parse_model_options

    options = parse_model_options(cfg.model, cfg.model_options)
    kind = model_kind(cfg)
    if kind == "patches":
        return {"patch_size": cfg.patch_size, **options}
    if layout is None:
        layout = feature_layout(cfg)
    elif isinstance(layout, int):
        layout = Layout(layout)
    if kind == "multiscale":
        return {"in_dim": layout.dim, "children": layout.children, **options}
    return {"in_dim": layout.dim, **options}


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class SiteReport:
    """What a site sends after a round: an update, a weight and scalar metrics."""

    update: NDArrays
    n_samples: int
    metrics: dict[str, Any]
    noise_share: Any = None
    """Distributed DP: the :class:`common.privacy.distributed.NoiseShare` the secure sum
    must add to this update's quantised vector (never sent; None in local mode)."""


def freeze(model: torch.nn.Module, prefixes: str, name: str) -> list[str]:
    """Keep the parameters under the comma-separated ``prefixes`` fixed (no gradient);
    return their names. A prefix that names no parameter, or freezing every parameter, is
    a :class:`ConfigError` listing the model's parameter groups."""
    frozen = frozen_names(model, prefixes, name)
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return frozen


def frozen_names(model: torch.nn.Module, prefixes: str, name: str) -> list[str]:
    """The parameters :func:`freeze` would fix (checked, without changing ``model``)."""
    wanted = [p.strip() for p in prefixes.split(",") if p.strip()]
    if not wanted:
        return []
    names = [n for n, _ in model.named_parameters()]
    groups = sorted({n.rsplit(".", 1)[0] for n in names})

    def under(n: str, prefix: str) -> bool:
        return n == prefix or n.startswith(prefix + ".")

    unknown = [p for p in wanted if not any(under(n, p) for n in names)]
    if unknown:
        raise ConfigError(f"freeze: {name} has no parameters under {', '.join(unknown)}; its "
                          f"parameter groups are {', '.join(groups)}")
    frozen = [n for n in names if any(under(n, p) for p in wanted)]
    if len(frozen) == len(names):
        raise ConfigError(f"freeze: {prefixes!r} freezes every parameter of {name}; leave "
                          "some of its groups to train")
    return frozen


class Site:
    """One hospital: its bags, DP plan and persistent accountant.

    Args:
        cfg: the federation's configuration (as sent by the server).
        index: the site's position in the federation (simulation partition id).
        name: the site's name; ``site-<index>`` by default.
        data: the site's own data (a deployed hospital): empty or a path, see
            :func:`common.data.load_site`; all of it belongs to this site. Without it, the
            site takes its share ``index`` of ``cfg.data`` (a simulation).
        state: what :meth:`state` returned after the previous round, if any (default: the
            run's state in ``store``).
        store: the site's privacy state across all its runs
            (:class:`common.privacy.store.SiteStore`); it gives the accountant of this run,
            the spend of earlier runs (for ``lifetime_budget``) and replays.
        lifetime_budget: the most epsilon the site spends over all its runs together.
        noise: ``"seeded"`` (noise and sampling from ``cfg.seed``, reproducible) or
            ``"csprng"`` (noise from a CSPRNG keyed by the OS, sampling OS-seeded); by
            default ``cfg.deterministic`` decides. Deployed sites decide this themselves.
    """

    def __init__(self, cfg: FederationConfig, index: int, name: str | None = None,
                 data: str | None = None, state: dict[str, Any] | None = None,
                 store: Any | None = None, lifetime_budget: float = math.inf,
                 noise: str | None = None) -> None:
        from common.privacy.store import run_key

        self.cfg = cfg
        self.index = index
        self.name = name or f"site-{index}"
        self.run = run_key(cfg.run_id)
        self.store = store
        self.lifetime_budget = lifetime_budget
        self.noise = noise or ("seeded" if cfg.deterministic else "csprng")
        if state is None and store is not None:
            state = store.run_state(self.run)
        share, shares, source = (index, cfg.sites, cfg.data) if data is None else (0, 1, data)
        self.patches = model_kind(cfg) == "patches"
        if self.patches and not source:
            raise ConfigError(f"model {cfg.model}: a patch model needs image data (--data "
                              "with labels.csv)")
        self.data: SiteData = load_site(
            share, shares, source, cfg.seed, cfg.val_fraction,
            cfg.synthetic_bags, cfg.patch_size, "" if self.patches else cfg.encoder,
            model_kind(cfg) == "multiscale", cfg.stain_normalize,
        )
        from common.models import model_spec

        self.segments = model_spec(cfg.model).trains == "segmenter"
        """The model learns annotation masks (its training targets are pixels)."""
        self._check_data(source)
        from common.data.sources import feature_provenance

        self.features = feature_provenance(source, cfg.patch_size,
                                           "" if self.patches else cfg.encoder,
                                           cfg.stain_normalize)
        """How this site's features were made (reported with its evaluation, for the
        released model's card)."""
        # One DP sample is one patient when the data names patients, else one slide.
        self.train_set = self.data.train.by_patient()
        self.max_instances = max([self.data.max_instances]
                                 + [b.shape[0] for b in self.train_set.bags])
        self.mix_groups: list[list[int]] | None = None
        """MixPatch: the training units (indices into ``train_set``) of each mixing group,
        one DP sample each (:mod:`common.data.mixpatch`)."""
        if cfg.mixpatch:
            from common.data.mixpatch import group_count, mixing_groups

            self.mix_groups = mixing_groups(
                self.train_set.names, group_count(len(self.train_set), cfg.mixpatch_group),
                cfg.seed)
        self.ledger_prev: str | None = (state or {}).get("ledger_prev")
        self.control: NDArrays | None = None
        """SCAFFOLD's control variate ``c_i`` of this site (kept in its state)."""
        saved_control = (state or {}).get("scaffold")
        if cfg.scaffold and saved_control:
            from common.scaffold import decode

            self.control = decode(bytes.fromhex(saved_control), None,
                                  f"{self.name}'s saved scaffold state")
        self.plan: DPPlan | None = None
        self._plan_inputs: dict[str, Any] = {}
        if cfg.dp:
            self._plan_inputs = dict(
                batch_size=cfg.batch_size, local_epochs=cfg.local_epochs, rounds=cfg.rounds,
                epsilon=cfg.site_budget(self.name), delta=cfg.delta,
                max_grad_norm=cfg.max_grad_norm, max_noise_multiplier=cfg.max_noise_multiplier,
                accountant=cfg.accountant)
            planner: Any = plan_site
            if cfg.mixpatch:
                self._plan_inputs["substitution"] = True
            if cfg.dp_mode == "distributed":
                self._plan_inputs.update(
                    accountant="skellam", mode="distributed", dim=self.trainable_dim(),
                    lr=cfg.lr, max_weight=float(cfg.secagg_max_weight),
                    quantization_range=cfg.secagg_quantization_range,
                    clipping_range=update_bound(cfg))
                planner = plan_distributed
            # a fresh process per message in deployment: reuse this run's checked plan
            self.plan = (restore_plan((state or {}).get("plan"), self.dp_samples,
                                      **self._plan_inputs)
                         or planner(self.dp_samples, **self._plan_inputs))
        # the plan's accountant: Skellam for distributed DP, RDP where PRV is unstable
        self.accountant = SiteAccountant.from_json(
            (state or {}).get("accountant"),
            self.plan.accountant if self.plan is not None else cfg.accountant)
        if store is not None:
            self.accountant.prior = store.prior_history(self.run)

    @property
    def dp_samples(self) -> int:
        """DP-SGD's samples at this site: its units, or MixPatch's mixing groups."""
        return len(self.mix_groups) if self.mix_groups is not None else len(self.train_set)

    def trainable_dim(self) -> int:
        """Coordinates of the model this site trains (its frozen ones never move)."""
        model = build_model(self.cfg.model, **model_kwargs(self.cfg, self.data.train.layout))
        freeze(model, self.cfg.freeze, self.cfg.model)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def _check_data(self, source: str | None) -> None:
        """A site needs slides of both classes, two at least, with finite features."""
        from common.errors import DataError

        where = f"{self.name} ({source or 'synthetic data'})"
        labels = np.concatenate([self.data.train.labels, self.data.val.labels])
        if len(labels) < 2 or len(self.data.train) < 1:
            raise DataError(f"{where}: {len(labels)} slide(s); a site needs two at least "
                            "(one to train, one to validate)")
        if len(np.unique(labels)) < 2:
            raise DataError(f"{where}: all {len(labels)} slides are labelled {int(labels[0])}; "
                            "a site needs slides of both classes (check labels.csv)")
        if self.segments and self.data.train.instance_masks is None:
            raise DataError(f"{where}: model {self.cfg.model} learns annotation masks and "
                            "these slides have none; give an image folder whose labels.csv "
                            "has a mask column naming each image's mask (nonzero on tumour)")
        for split in (self.data.train, self.data.val):
            for name, bag in zip(split.names, split.bags):
                if bag.dtype.kind == "f" and not np.isfinite(bag).all():
                    raise DataError(f"{where}: slide {name} has NaN or inf features; "
                                    "re-prepare it or remove it from labels.csv")

    def signed_record(self, report: SiteReport, received: NDArrays, server_round: int,
                      key_path: Any, ledger_run: str | None = None) -> str:
        """The round's ledger record, signed with the site's key, encoded as a metric.

        The record (hashes of the received model and of the update, the DP schedule, the
        epsilon claimed, what is sent) is chained to the site's previous record.
        """
        from common.crypto import MASK_GENERATOR
        from common.crypto.signing import SigningKey
        from common.ledger import encode_signed, envelope_hash, sign_record, site_round_record

        record = site_round_record(
            report, received, server_round=server_round, site=self.name, plan=self.plan,
            accountant=self.accountant.mechanism, privacy_unit=cast(Any, self.privacy_unit),
            secagg=self.cfg.secagg, mask_generator=MASK_GENERATOR if self.cfg.secagg else None,
            previous=self.ledger_prev, run=ledger_run, noise=self.noise_source)
        key = key_path if isinstance(key_path, SigningKey) else SigningKey.load(key_path)
        signed = sign_record(record, key, self.name)
        self.ledger_prev = envelope_hash(signed)
        return encode_signed(signed)

    @property
    def noise_source(self) -> str | None:
        """Where this site's DP noise comes from (recorded in the ledger)."""
        if not self.cfg.dp:
            return None
        if self.plan is not None and self.plan.distributed:
            from common.crypto.quantize import SKELLAM_SOURCE

            if self.noise == "csprng":
                return f"distributed: Skellam shares from {SKELLAM_SOURCE}"
            return (f"seeded: distributed Skellam shares from NumPy's generator, seed from "
                    f"{self.cfg.seed} (reproducible, not secret)")
        if self.noise == "csprng":
            from common.crypto.noise import NOISE_SOURCE

            return NOISE_SOURCE
        return f"seeded: torch.Generator from seed {self.cfg.seed} (reproducible, not secret)"

    def round(self, weights: NDArrays, server_round: int, key_path: Any = None,
              ledger_run: str | None = None, sites_in_sum: int | None = None,
              control: NDArrays | None = None) -> SiteReport:
        """One round as the site answers the server: train (or replay the reply already
        released for this round and model), sign the ledger record, and save the
        accountant (fsynced) before anything is returned to be sent. ``control``: the
        server's SCAFFOLD control variate (with ``scaffold``)."""
        from common.ledger import LEDGER_METRIC, hash_arrays

        received = hash_arrays(weights)
        if self.store is not None:
            cached = self.store.replay(self.run, server_round, received)
            if cached is not None and self.plan is not None and self.plan.distributed:
                raise PathFedError(
                    f"{self.name}: round {server_round} was already answered from this "
                    "model; with distributed DP a site never sends a second vector for a "
                    "round (a second sum with other sites' shares could expose the "
                    "difference): it waits for the next round")
            if cached is not None:
                log.info("%s: round %d from the same global model again (the server "
                         "restarted): re-sending the reply already released, no new spend",
                         self.name, server_round)
                return SiteReport(cached["update"], cached["n_samples"], cached["metrics"])
        report = self.train(weights, server_round, sites_in_sum, control)
        if key_path is not None:
            report.metrics[LEDGER_METRIC] = self.signed_record(
                report, weights, server_round, key_path, ledger_run)
        if self.store is not None:
            self.store.save(self.run, self.state(), last={
                "round": server_round, "received": received, "update": report.update,
                "n_samples": report.n_samples, "metrics": report.metrics})
        return report

    def state(self) -> dict[str, Any]:
        """Site state to keep between rounds (the accountant's full history)."""
        state: dict[str, Any] = {"accountant": self.accountant.to_json(),
                                 "ledger_prev": self.ledger_prev}
        if self.plan is not None:
            state["plan"] = {"inputs": {"n_train": self.dp_samples, **self._plan_inputs},
                             "plan": self.plan.to_dict()}
        if self.control is not None:
            from common.scaffold import encode

            state["scaffold"] = encode(self.control).hex()
        return state

    @property
    def privacy_unit(self) -> str:
        """``patient`` or ``slide``: what the site's epsilon protects."""
        return self.train_set.privacy_unit

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(self.cfg.delta) if self.cfg.dp else 0.0

    def can_train(self) -> bool:
        """Whether one more round fits the site's budget."""
        if self.plan is None:
            return True
        try:
            self.accountant.check_next_round(self.plan, self.name, self.lifetime_budget)
        except PrivacyBudgetExhausted:
            return False
        return True

    def _model(self, weights: NDArrays) -> torch.nn.Module:
        kwargs = model_kwargs(self.cfg, self.data.train.layout)
        model = build_model(self.cfg.model, **kwargs)
        own = [tuple(v.shape) for v in model.state_dict().values()]
        got = [tuple(np.shape(w)) for w in weights]
        if own != got:
            size = f"{kwargs['in_dim']} input features" if "in_dim" in kwargs else "its data"
            theirs = (f"{got[0][-1]} input features" if got and got[0] and "in_dim" in kwargs
                      else f"{len(got)} arrays")
            raise ConfigError(
                f"{self.name}: the server's {self.cfg.model} model has {theirs}, this site's "
                f"data has {size}: give the run the same data settings as the sites "
                "(--config with the sites' encoder and data kind)")
        set_weights(model, weights)
        freeze(model, self.cfg.freeze, self.cfg.model)
        return model

    def _dataset(self, split: str, server_round: int) -> TensorDataset:
        bags = self.train_set if split == "train" else self.data.val
        if self.patches and split == "train" and self.mix_groups is not None:
            from common.data.mixpatch import MixPatchOptions, mixpatch_dataset

            options = MixPatchOptions(self.cfg.mixpatch_grid, self.cfg.mixpatch_ratio,
                                      self.cfg.mixpatch_group)
            return mixpatch_dataset(bags, self.mix_groups, self.cfg.patches_per_slide,
                                    _seed(self.cfg.seed, self.name, split, server_round),
                                    options, self.cfg.stain_augment)
        if self.patches:  # a fresh draw of patches each round; a fixed one to validate
            return bags.to_patch_dataset(
                self.cfg.patches_per_slide, _seed(self.cfg.seed, self.name, split, server_round),
                stain_augment=self.cfg.stain_augment if split == "train" else 0.0,
                patch_labels=split == "train",  # annotations train; slides are evaluated
                masks=self.segments and split == "train")
        return bags.to_dataset(self.max_instances)

    def train(self, weights: NDArrays, server_round: int,
              sites_in_sum: int | None = None, control: NDArrays | None = None
              ) -> SiteReport:
        """One local round from the global ``weights``; raise if the budget is spent.
        ``sites_in_sum``: distributed DP, the fewest sites the round's sum holds (the
        server's ``dp-min-sites``); by default all ``sites`` less ``secagg-dropout``.
        ``control``: the server's SCAFFOLD control variate ``c`` (needed with
        ``scaffold``); the site's own ``c_i`` is updated after training."""
        if self.plan is not None:
            self.accountant.check_next_round(self.plan, self.name, self.lifetime_budget)
        if len(self.train_set) > self.cfg.secagg_max_weight:
            raise ConfigError(
                f"secagg-max-weight: {self.name} has {len(self.train_set)} training samples, "
                f"more than {self.cfg.secagg_max_weight}; raise secagg-max-weight (it bounds "
                "every site's weight and update)"
            )
        torch.manual_seed(_seed(self.cfg.seed, self.name, server_round, "init"))
        model = self._model(weights)
        seed = _seed(self.cfg.seed, self.name, server_round) if self.noise == "seeded" else None
        share = None
        if self.plan is not None and self.plan.distributed:
            result, share = self._distributed_step(model, server_round, seed, sites_in_sum)
        elif getattr(model, "adversarial", False):
            result = adversarial_train(
                model, self._dataset("train", server_round), epochs=self.cfg.local_epochs,
                batch_size=self.cfg.batch_size, lr=self.cfg.lr, plan=self.plan,
                accountant=self.accountant, seed=seed, max_grad_norm=self.cfg.max_grad_norm,
                noise=self.noise)
        else:
            # substitution steps are recorded by the plan, not as Opacus' add/remove steps
            substitution = self.plan is not None and self.plan.substitution
            result = local_train(
                model, self._dataset("train", server_round),
                epochs=self.cfg.local_epochs, batch_size=self.cfg.batch_size, lr=self.cfg.lr,
                optimizer=self.cfg.optimizer, plan=self.plan,
                accountant=SiteAccountant() if substitution else self.accountant,
                seed=seed, max_grad_norm=self.cfg.max_grad_norm, noise=self.noise,
                prox_mu=self.cfg.prox_mu, correction=self._correction(model, control),
            )
            if substitution:
                assert self.plan is not None
                self.accountant.record(self.plan, result.steps)
                result = dataclasses.replace(result,
                                             epsilon=self.accountant.epsilon(self.plan.delta))
            if self.cfg.scaffold:
                from common.scaffold import site_control

                assert control is not None  # _correction refused a missing one
                self.control = site_control(self._own_control(weights), control,
                                            result.update, result.steps, self.cfg.lr)
        problem = update_problem(result.update, [tuple(w.shape) for w in weights],
                                 update_bound(self.cfg))
        if problem:
            raise PathFedError(f"{self.name}: refusing to send this round's update: {problem}; "
                               "check the site's data (NaN or extreme features) and settings")
        metrics: dict[str, Any] = {
            "site": self.name, "steps": result.steps,
            "n_train": result.n_samples, "epsilon": result.epsilon, "delta": self.cfg.delta,
            "dp": self.cfg.dp,
        }
        if self.cfg.release_train_loss:  # an un-noised statistic: only when asked for
            metrics["train_loss"] = result.loss
        if self.plan is not None:
            metrics.update(
                noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate,
                max_grad_norm=self.plan.max_grad_norm, epsilon_budget=self.plan.epsilon_budget,
                can_train_next=self.can_train(),
            )
        if share is not None:
            assert self.plan is not None
            metrics.update(dp_mode="distributed", dim=int(self._plan_inputs["dim"]),
                           l2_sensitivity=self.plan.l2_sensitivity,
                           l1_sensitivity=self.plan.l1_sensitivity, noise_sites=share.sites,
                           share_variance=share.variance)
        if self.cfg.secagg:
            limit = update_bound(self.cfg)
            ratio = min(1.0, result.n_samples / self.cfg.secagg_max_weight)
            clipped = int(sum((np.abs(u) * ratio > limit).sum() for u in result.update))
            if clipped:
                log.warning("%s: %d update values exceed the SecAgg+ clipping range %g and "
                            "will be clipped", self.name, clipped, limit)
            metrics["secagg_clipped"] = clipped
        update = result.update
        if self.cfg.secagg:
            # SecAgg+ shifts values by its clipping range before quantising: in float32
            # that shift alone would cost up to half a quantisation step.
            update = [u.astype(np.float64) for u in update]
        return SiteReport(update, result.n_samples, metrics, share)

    def _own_control(self, weights: NDArrays) -> NDArrays:
        return self.control or [np.zeros(np.shape(w), np.float64) for w in weights]

    def _correction(self, model: torch.nn.Module, control: NDArrays | None
                    ) -> NDArrays | None:
        """SCAFFOLD's ``c - c_i`` for each trainable parameter, or None without it."""
        if not self.cfg.scaffold:
            return None
        weights = list(model.state_dict().values())
        if control is None:
            raise PathFedError(f"{self.name}: the run trains with scaffold, but the server "
                               "sent no control variate (scaffold-control) with this round")
        if [np.shape(c) for c in control] != [tuple(w.shape) for w in weights]:
            raise PathFedError(f"{self.name}: the server's control variate does not fit the "
                               "model's shapes")
        own = self._own_control([w.numpy() for w in weights])
        if [np.shape(c) for c in own] != [np.shape(c) for c in control]:
            raise PathFedError(f"{self.name}: its saved control variate belongs to another "
                               "model; start a new run-id for a new model")
        index = {name: i for i, name in enumerate(model.state_dict())}
        return [np.asarray(control[index[n]] - own[index[n]], np.float32)
                for n, p in model.named_parameters() if p.requires_grad]

    def _distributed_step(self, model: torch.nn.Module, server_round: int, seed: int | None,
                          sites_in_sum: int | None) -> tuple[Any, Any]:
        """One distributed-DP round: a full-batch step of clipped slide gradients with no
        noise of its own, recorded in the accountant as one Skellam step of the plan, and
        the Skellam share the secure sum adds (:mod:`common.privacy.distributed`)."""
        from common.crypto.quantize import NoiseShare
        from common.privacy.distributed import min_sites

        plan = self.plan
        assert plan is not None
        data = self._dataset("train", server_round)
        clip_only = dataclasses.replace(plan, noise_multiplier=0.0, mode="local",
                                        accountant="rdp")
        result = local_train(model, data, epochs=1, batch_size=len(data), lr=self.cfg.lr,
                             optimizer="sgd", plan=clip_only, accountant=SiteAccountant(),
                             seed=seed, noise="seeded")
        self.accountant.record(plan)
        result = dataclasses.replace(result, epsilon=self.accountant.epsilon(plan.delta))
        sites = sites_in_sum or min_sites(self.cfg.sites, self.cfg.secagg_dropout)
        if sites < 2:
            raise PathFedError(f"{self.name}: distributed DP needs the sum of two sites at "
                               f"least; this round's sum may hold {sites}")
        share_seed = None if seed is None else _seed(seed, "skellam-share")
        return result, NoiseShare(plan.noise_variance / sites, sites, share_seed)

    def evaluate(self, weights: NDArrays) -> tuple[EvalCounts, dict[str, Any]]:
        """Evaluate the global ``weights`` on the site's validation bags."""
        counts = evaluate(self._model(weights), self._dataset("val", 0))
        metrics: dict[str, Any] = {
            "site": self.name, "epsilon": self.epsilon, "can_train_next": self.can_train(),
            "features": self.features, **counts.to_metrics(),
        }
        return counts, metrics


__all__ = ["PrivacyBudgetExhausted", "Site", "SiteReport", "feature_layout", "initial_model"]
