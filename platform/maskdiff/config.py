"""Run configuration: a typed OmegaConf schema, YAML loading and ``key=value`` overrides.

A run is described by one YAML file (optionally naming a ``base`` file it
extends, relative to itself) plus command-line overrides in OmegaConf dotlist
form (``train.steps=500``). Everything is merged onto the structured schema
below, so an unknown key or a value of the wrong type fails at load time with
a :class:`ConfigError` naming the key; :func:`validate` then checks what types
cannot (known schedule kinds, a source per modality, ranges).
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maskdiff.core import modalities
from .errors import ConfigError

SCHEDULE_KINDS = re.compile(r"^(linear|cosine|geometric|genmd4|poly\d+(\.\d+)?)$")
LR_DECAYS = ("cosine", "linear", "constant")


@dataclass
class SourceConfig:
    """One modality's training data: shard directories and its mixing weight."""

    dirs: List[str] = field(default_factory=list)
    weight: float = 1.0


@dataclass
class BuildConfig:
    """How to build a shard directory from raw files when it does not exist yet."""

    modality: str = "???"
    inputs: List[str] = field(default_factory=list)
    options: Dict[str, Any] = field(default_factory=dict)  # adapter options, as for tools/shard.py


@dataclass
class DataConfig:
    sources: Dict[str, SourceConfig] = field(default_factory=dict)  # modality -> source
    build: Dict[str, BuildConfig] = field(default_factory=dict)  # shard dir (as in sources) -> recipe
    shard_root: str = "shards"  # relative shard dirs are taken under it
    # A micro-batch (per process) holds records until either limit is reached: its padded size
    # (records x longest record) would exceed batch_tokens, or it holds batch_size records.
    # Measured in tokens, a batch holds many table rows (10-30 tokens) and few images (~200)
    # for the same work per step. null turns a limit off; at least one must be set.
    batch_tokens: Optional[int] = 4096
    batch_size: Optional[int] = None  # records
    max_len: Optional[int] = None  # longest record allowed (tokens); null = no limit
    shuffle_buffer: int = 256  # records
    bucket: int = 4  # micro-batches whose records are sorted by length together (1 = off)
    # Pack several records into each row (segment ids, block-diagonal attention, positions and ELBO
    # time per record): the same per-record ELBO with almost no padding. Rows are as long as the
    # batch's longest record; needs batch_tokens. See docs/training.md, "Packing".
    pack: bool = True
    workers: int = 0  # DataLoader worker processes per rank
    heldout: float = 0.05  # fraction of records (by key hash) held out for evaluation
    bad_shards: str = "stop"  # a corrupt, truncated or unreachable shard: stop the run, or skip (and report) it

    def shard_dir(self, name: str) -> Path:
        """Where a shard directory named in ``sources``/``build`` lives."""
        p = Path(name)
        return p if p.is_absolute() else Path(self.shard_root) / p

    def shard_source(self, name: str) -> Path | str:
        """:meth:`shard_dir`, or the name itself when it is a URL (``https://``, ``s3://``, ``pipe:`` ...)."""
        return name if "://" in name or name.startswith("pipe:") else self.shard_dir(name)


@dataclass
class ModelConfig:
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 8 / 3
    dropout: float = 0.0
    time_conditioning: Optional[bool] = None  # null = on exactly when a schedule is genmd4
    # train.condition_fields also modulate every block of their record (adaLN from the field's
    # token), not only through attention: a stronger pathway for a label to steer a whole image
    condition_modulation: bool = False


@dataclass
class ScheduleConfig:
    kind: str = "linear"  # linear | cosine | polyK | geometric | genmd4
    init: float = 1.0  # genmd4: initial w of every value
    draws: int = 2  # genmd4: K draws of x_t per example for the RLOO gradient
    b_min: float = 1e-5  # geometric
    b_max: float = 20.0  # geometric


@dataclass
class OptimConfig:
    lr: float = 1e-3
    schedule_lr: Optional[float] = None  # learning rate of GenMD4's w; null = lr
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 20
    decay: str = "cosine"  # cosine | linear | constant, after warmup
    min_lr_ratio: float = 0.1


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0
    bf16: bool = False
    grad_accum: int = 1
    grad_clip: float = 1.0
    extra: Dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed config as is


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    # wall-clock budget of the step loop: the run stops (and exports its bundle) when it is
    # spent, and the learning-rate decay follows whichever of steps and time runs out first
    minutes: Optional[float] = None
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4  # held-out micro-batches per process and evaluation
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    plots: bool = True  # plots/<modality>.png at the end of the run
    tensorboard: bool = True  # the metrics also as TensorBoard event files in RUN/tensorboard/
    # classifier-free guidance: per example, drop each of these conditioning fields (support
    # names, e.g. pixels/label; protein/PE also names protein/<data set>/PE of every FASTA data set)
    # with this probability, so one model learns p(x | c) and p(x)
    condition_dropout: float = 0.0
    condition_fields: List[str] = field(default_factory=list)


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    run_dir: Optional[str] = None  # default runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedules: Dict[str, ScheduleConfig] = field(default_factory=dict)  # modality -> schedule
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def modalities(self) -> list[str]:
        """Modalities with a positive mixing weight, in id order."""
        return [m for m in modalities.names() if m in self.data.sources and self.data.sources[m].weight > 0]

    @property
    def uses_genmd4(self) -> bool:
        return any(self.schedules[m].kind == "genmd4" for m in self.modalities if m in self.schedules)

    @property
    def draws(self) -> int:
        """Draws of x_t per example: the GenMD4 K, else 1."""
        ks = {self.schedules[m].draws for m in self.modalities if self.schedules[m].kind == "genmd4"}
        return ks.pop() if ks else 1

    @property
    def time_conditioning(self) -> bool:
        tc = self.model.time_conditioning
        return self.uses_genmd4 if tc is None else tc


def _error(e: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "not in" in msg and key:
        return ConfigError(f"{where}: unknown config key '{key}'")
    return ConfigError(f"{where}: config key '{key}': {msg}" if key else f"{where}: {msg}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file merged over its ``base`` chain (paths relative to each file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come in several types
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return OmegaConf.merge(_read_yaml(path.parent / str(base), seen + (path,)), raw)  # type: ignore[return-value]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema <- YAML (with its ``base`` chain) <- ``key=value`` overrides, validated."""
    cfg: DictConfig = OmegaConf.structured(RunConfig)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value")
        if item.startswith("+"):
            raise ConfigError(f"override {item!r}: '+key' is not supported; every key must be in the schema")
    if overrides:
        try:
            layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as e:
            raise _error(e, "overrides") from None
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)  # type: ignore[assignment]
        except OmegaConfBaseException as e:
            raise _error(e, where) from None
    _default_schedules(cfg)
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"config key '{sorted(missing)[0]}' needs a value")
    validate(to_run_config(cfg))
    return cfg


def _default_schedules(cfg: DictConfig) -> None:
    """A modality with data but no schedule in the configuration takes its adapter's default."""
    for mod, src in cfg.data.sources.items():
        if src.weight > 0 and mod not in cfg.schedules and modalities.is_known(mod) and modalities.get(mod).schedule:
            cfg.schedules[mod] = ScheduleConfig(kind=modalities.get(mod).schedule)


def to_run_config(cfg: DictConfig) -> RunConfig:
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _check_modality(name: str, key: str) -> None:
    _check(modalities.is_known(name), key, f"unknown modality {name!r}; known: {', '.join(modalities.names())}")


def validate(rc: RunConfig) -> None:
    """Checks beyond types; raises :class:`ConfigError` naming the offending key."""
    d = rc.data
    _check(bool(d.sources), "data.sources", "no data sources configured")
    for mod, src in d.sources.items():
        key = f"data.sources.{mod}"
        _check_modality(mod, key)
        _check(src.weight >= 0, f"{key}.weight", f"mixing weight must be >= 0, got {src.weight}")
        _check(src.weight == 0 or bool(src.dirs), f"{key}.weight", f"mixing weight {src.weight} for modality {mod!r}, which has no shard directories")
    _check(bool(rc.modalities), "data.sources", "every mixing weight is 0")
    for dir_, recipe in d.build.items():
        key = f"data.build.{dir_}"
        _check_modality(recipe.modality, f"{key}.modality")
        _check(bool(recipe.inputs), f"{key}.inputs", "no input files to build the shards from")
    _check(d.batch_tokens is not None or d.batch_size is not None, "data.batch_tokens", "batch_tokens and batch_size are both null; set at least one")
    for name, value, low in (("batch_tokens", d.batch_tokens, 1), ("batch_size", d.batch_size, 1), ("shuffle_buffer", d.shuffle_buffer, 1),
                             ("bucket", d.bucket, 1), ("workers", d.workers, 0)):
        _check(value is None or value >= low, f"data.{name}", f"must be >= {low}, got {value}")
    _check(d.max_len is None or d.max_len >= 1, "data.max_len", "must be >= 1 or null")
    _check(not d.pack or d.batch_tokens is not None, "data.pack", "packing cuts rows from the token budget: set data.batch_tokens, or data.pack=false")
    _check(0.0 <= d.heldout < 1.0, "data.heldout", f"must be in [0, 1), got {d.heldout}")
    _check(d.bad_shards in ("stop", "skip"), "data.bad_shards", f"must be stop or skip, got {d.bad_shards!r}")
    for mod in rc.modalities:
        _check(mod in rc.schedules, f"schedules.{mod}", f"modality {mod!r} has data but no masking schedule")
    for mod, s in rc.schedules.items():
        key = f"schedules.{mod}"
        _check_modality(mod, key)
        _check(bool(SCHEDULE_KINDS.match(s.kind)), f"{key}.kind", f"unknown schedule {s.kind!r}; expected linear, cosine, polyK (e.g. poly2), geometric or genmd4")
        _check(s.kind != "genmd4" or s.draws >= 2, f"{key}.draws", "genmd4 needs K >= 2 draws for its leave-one-out gradient")
        _check(s.init > 0, f"{key}.init", "initial w must be > 0")
    ks = {rc.schedules[m].draws for m in rc.modalities if rc.schedules[m].kind == "genmd4"}
    _check(len(ks) <= 1, "schedules", f"genmd4 schedules must share one number of draws, got {sorted(ks)}")
    m = rc.model
    _check(m.dim > 0 and m.depth > 0 and m.heads > 0, "model", "dim, depth and heads must be > 0")
    _check(m.dim % m.heads == 0 and (m.dim // m.heads) % 2 == 0, "model.heads", f"dim {m.dim} must split into {m.heads} heads of even width")
    _check(not (rc.uses_genmd4 and m.time_conditioning is False), "model.time_conditioning", "a genmd4 schedule needs a time-conditioned model")
    o = rc.optim
    _check(o.lr > 0, "optim.lr", "must be > 0")
    _check(o.decay in LR_DECAYS, "optim.decay", f"expected one of {', '.join(LR_DECAYS)}, got {o.decay!r}")
    _check(len(o.betas) == 2, "optim.betas", "expected two values")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    ds = rc.deepspeed
    _check(ds.zero_stage in (0, 1, 2), "deepspeed.zero_stage", f"supported stages are 0, 1 and 2, got {ds.zero_stage}")
    _check(ds.grad_accum >= 1, "deepspeed.grad_accum", "must be >= 1")
    t = rc.train
    _check(t.steps >= 1, "train.steps", "must be >= 1")
    _check(t.minutes is None or (math.isfinite(t.minutes) and t.minutes > 0), "train.minutes", f"must be a number > 0, got {t.minutes}")
    for name in ("log_every", "eval_every", "checkpoint_every"):
        _check(getattr(t, name) >= 1, f"train.{name}", "must be >= 1")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(0.0 <= t.condition_dropout < 1.0, "train.condition_dropout", f"must be in [0, 1), got {t.condition_dropout}")
    _check(t.condition_dropout == 0 or bool(t.condition_fields), "train.condition_fields", "condition_dropout needs the fields to drop")
    _check(not t.tensorboard or importlib.util.find_spec("tensorboard") is not None, "train.tensorboard",
           "needs the tensorboard package (pip install tensorboard), or set train.tensorboard=false")


__all__ = [
    "BuildConfig", "ConfigError", "DataConfig", "DeepSpeedSection", "ModelConfig", "OptimConfig", "RunConfig",
    "ScheduleConfig", "SourceConfig", "TrainConfig", "load_config", "save_config", "to_run_config", "validate",
]
