"""The method interface: one config dataclass and one ``train(ctx)`` per alignment method.

A method is a class with a ``name``, a ``config_class`` (a dataclass derived from MethodConfig whose
fields declare their valid ranges with ``alignbench.config.opt``) and ``train(ctx) -> PolicyArtifact``.
Methods are discovered through the entry-point group ``alignbench.methods``; the built-ins in
``methods/`` (package ``alignbench_methods``) register exactly the way a third-party package does.

Everything a method may use arrives in the RunContext, and everything it spends goes through it:
``ctx.sample`` counts generated tokens, ``ctx.score`` PM calls, ``ctx.charge_step`` and
``ctx.charge_forward`` training and extra forwards, all of them FLOPs (alignbench.cost). Each charged
operation checks ``ctx.budget`` first and raises ``BudgetExceeded`` once it is spent: a method's loop
catches it, stops, and still logs its end point and saves its policy. ``ctx.check_budget()`` is the
same check, for a method to call before each optimiser step. ``ctx.log_point`` measures (proxy
reward, KL(π‖π0) k1/k3, judge reward) on the fixed held-out prompts without charging the method for
the measurement (its seconds go to ``measure_s``, not ``wall_s``); ``ctx.log_step`` sends one
optimiser step's losses and learning rate to the trackers (train.report_to). Encoders take
``fmt=ctx.fmt`` (data.format: raw transcripts or the chat template, alignbench.formats).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from omegaconf import OmegaConf

from alignbench.config import ConfigError, check, opt
from alignbench.cost import Budget, BudgetExceeded, Cost  # noqa: F401 - re-exported for methods and plugins

if TYPE_CHECKING:  # annotations only
    from alignbench.context import RunContext

log = logging.getLogger(__name__)
GROUP = "alignbench.methods"


@dataclass
class MethodConfig:
    name: str = ""
    lr: Optional[float] = opt(None, gt=0)  # None: the shared default train.lr
    batch_size: Optional[int] = opt(None, gt=0)  # None: train.batch_size
    # optimiser steps between (KL, reward) points; None: train.log_points points spread evenly over
    # the planned steps (``log_steps``)
    eval_every: Optional[int] = opt(None, gt=0)

    def global_batches(self, train) -> dict[str, int]:
        """The batches a multi-process run splits over its processes, by config key (each must
        divide evenly); ``train`` is the shared TrainConfig. Asked before training, only under a
        multi-process launch: raise ConfigError for a setting that cannot run there."""
        return {"method.batch_size": self.batch_size} if self.batch_size else {"train.batch_size": train.batch_size}


@dataclass
class PolicyArtifact:
    """A trained policy (``path``: a save_pretrained directory) or an inference-time policy
    (``sampler``: (prompts, seed) -> responses, e.g. best-of-n over π0; a SampleBatch, so that they
    are scored by their sampled ids and their truncation rate is known, or bare texts). A sampler
    that also takes ``temperature=`` (a measurement draw at that temperature, not charged) takes part
    in the temperature, diversity and selection evaluations; one without it is skipped there."""
    path: Optional[Path] = None
    sampler: Optional[Callable[[list[str], int], Any]] = None
    info: dict = field(default_factory=dict)  # method-specific facts for metrics.json (e.g. analytic KL)


class Method:
    name: ClassVar[str] = ""
    config_class: ClassVar[type] = MethodConfig
    # True when train() shards its global batch with ctx.dist and trains through
    # ctx.for_training(policy), so it may run under a multi-process launch (alignbench.distributed)
    supports_distributed: ClassVar[bool] = False

    def train(self, ctx: "RunContext") -> PolicyArtifact:  # pragma: no cover - interface
        raise NotImplementedError

    def point_hooks(self, ctx: "RunContext") -> list:
        """Measurement hooks ``hook(ctx, model, samples) -> dict`` the runner adds to ``ctx.point_hooks``
        before π0's point, so that every point of the run carries what they measure (none by default)."""
        return []


# --------------------------------------------------------------------------- registry
_BROKEN: dict[str, str] = {}  # entry points that failed to load: name -> error (reported on use)


def registry() -> dict[str, type]:
    """Every method registered under the entry-point group, built-in or installed. A plugin that
    fails to import is left out with a warning, so one broken package cannot hide the others."""
    found = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 - reported, and raised if the method is asked for
            _BROKEN[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
            log.warning("method plugin %s could not be loaded (%s)", ep.name, _BROKEN[ep.name])
            continue
        if not (isinstance(cls, type) and issubclass(cls, Method) and dataclasses.is_dataclass(cls.config_class)):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not an alignbench Method")
        if cls.name != ep.name:
            raise TypeError(f"entry point {ep.name} = {ep.value}: its name attribute is {cls.name!r}")
        found[ep.name] = cls
    return found


def get_method(name: str) -> type:
    methods = registry()
    if name in _BROKEN:
        raise ConfigError(f"method.name: plugin {name!r} failed to load: {_BROKEN[name]}")
    if name not in methods:
        raise ConfigError(f"method.name: unknown method {name!r}; registered: {sorted(methods)}")
    return methods[name]


def method_config(method_cls: type, raw: Any) -> Any:
    """Validate the ``method`` config node against the method's dataclass: unknown keys and
    out-of-range values fail here, before any training, with the key named."""
    node = OmegaConf.create(raw if not OmegaConf.is_config(raw) else OmegaConf.to_container(raw, resolve=True))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(method_cls.config_class), node)
        obj = OmegaConf.to_object(merged)
    except Exception as e:  # OmegaConf's message: its first line, at the key it names
        key = getattr(e, "full_key", None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"method.{key}" if key else "method"
        raise ConfigError(f"{where}: {first} (method {method_cls.name})") from e
    check(obj, "method")
    return obj


def nested_method_config(method_cls: type, node: dict, key: str, *defaults: dict,
                         settable: Optional[set] = None) -> Any:
    """A method's config written inside another config (a chain's stage, iterated RLHF's inner
    method): ``defaults`` then ``node`` over the method's dataclass, validated like ``method_config``.
    A key outside ``settable`` (default: every field) fails as ``<key>.<name>: unknown key``; a bad
    value names ``<key>.<field>``."""
    settable = settable if settable is not None else {f.name for f in dataclasses.fields(method_cls.config_class)}
    for name in node:
        if name not in settable:
            raise ConfigError(f"{key}.{name}: unknown key for method {method_cls.name}; valid: {sorted(settable)}")
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(method_cls.config_class), *defaults, node))
    except Exception as e:  # a mistyped value: OmegaConf names it
        raise ConfigError(f"{key}: {e}".replace("\n", " ")) from e
    check(obj, key)
    return obj


def register_method_configs() -> None:
    """Make ``method=<name>`` work for installed plugins that ship no YAML in conf/method/."""
    from importlib.resources import files

    from hydra.core.config_store import ConfigStore
    shipped = files("alignbench_conf").joinpath("method")
    for name, cls in registry().items():
        if not shipped.joinpath(f"{name}.yaml").is_file():
            ConfigStore.instance().store(group="method", name=name, node=cls.config_class(name=name))


def describe() -> list[dict]:
    rows = []
    for name, cls in sorted(registry().items()):
        ep = next(e for e in entry_points(group=GROUP) if e.name == name)
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append({"name": name, "target": ep.value, "package": ep.dist.name if ep.dist else "?",
                     "summary": doc[0] if doc else ""})
    return rows
