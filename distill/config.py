"""The recipe schema: typed sections merged with a YAML file and ``key=value`` overrides.

``load_recipe(path, overrides)`` returns a validated ``omegaconf.DictConfig`` whose structure is
``RecipeConfig``. Unknown keys, wrong types and missing required values raise ``UserError``
with one line naming the key. The caller's objects are never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    GrammarParseError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from distill.errors import UserError


@dataclass
class DataConfig:
    """Data module. ``name`` picks a built-in one; ``_target_`` names a user class."""

    name: str = "digits"  # digits | cifar10 | image_folder
    _target_: Optional[str] = None
    root: Optional[str] = None  # cifar10 / image_folder: local path (never downloaded)
    batch_size: int = 64
    num_workers: int = 0
    image_size: int = 32  # digits are 8x8; upsampled so convolutions do real work
    train_fraction: float = 1.0  # share of the training split used (reduced-data KD)
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """A model: a registered reference ``name`` or a user class by ``_target_``."""

    name: Optional[str] = "resnet_student"
    _target_: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: loaded from ``checkpoint`` or trained first and cached in ``cache_dir``."""

    name: Optional[str] = "resnet_teacher"
    checkpoint: Optional[str] = None  # Lightning .ckpt, state_dict .pt, or .onnx
    train_epochs: int = 12
    lr: float = 0.003
    seed: int = 0  # the teacher's own seed: student seeds share one teacher
    train_fraction: float = 1.0  # of the training split; the student's is data.train_fraction
    cache_dir: str = "runs/_teachers"


@dataclass
class KDTerm:
    weight: float = 0.0
    temperature: float = 4.0


@dataclass
class DKDTerm:
    weight: float = 0.0
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0


@dataclass
class LayerPair:
    student: str = MISSING
    teacher: str = MISSING


@dataclass
class FeatureTerm:
    weight: float = 0.0
    pairs: list[LayerPair] = field(default_factory=list)


@dataclass
class DistillConfig:
    """Loss terms: ``task_weight * CE + sum(weight_i * term_i)``."""

    task_weight: float = 1.0
    kd: KDTerm = field(default_factory=lambda: KDTerm(weight=1.0))
    feature: FeatureTerm = field(default_factory=FeatureTerm)
    attention: FeatureTerm = field(default_factory=FeatureTerm)
    dkd: DKDTerm = field(default_factory=DKDTerm)
    cache_teacher: bool = False  # offline KD: teacher logits computed once per sample


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 0.003
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "cosine"  # cosine | none


@dataclass
class TrainerConfig:
    """Passed to ``lightning.pytorch.Trainer`` (only these keys: a typo is an error)."""

    max_epochs: int = 10
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    deterministic: bool = False
    enable_progress_bar: bool = True
    log_every_n_steps: int = 10
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1


@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "distill"
    mode: str = "offline"  # offline | online | disabled
    csv: bool = True


@dataclass
class ExportConfig:
    """Per-epoch export of the student and its latency in ONNX Runtime."""

    enabled: bool = True
    every_n_epochs: int = 1
    opset: int = 20
    # auto: the fast legacy tracer for ordinary modules, dynamo for torch.export graphs (QAT)
    exporter: str = "auto"  # auto | dynamo | torchscript
    provider: str = "cpu"  # cpu | cuda | tensorrt
    threads: int = 1
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    warmup: int = 20
    iters: int = 200
    subprocess: bool = False
    parity_atol: float = 1e-3
    tensorrt: bool = False


@dataclass
class TargetsConfig:
    """Stop as soon as the exported student meets every target that is set."""

    accuracy: Optional[float] = None  # absolute, in [0, 1]
    max_accuracy_drop: Optional[float] = None  # points below the teacher
    p99_ms: Optional[float] = None
    size_mb: Optional[float] = None
    confirm_margin: float = 0.1  # re-measure when p99 is within this share of the target


@dataclass
class PruneConfig:
    method: str = "none"  # none | structured | unstructured
    schedule: str = "cubic"  # constant | linear | cubic | exponential
    start_epoch: int = 0
    end_epoch: int = 3
    initial_sparsity: float = 0.0
    target_sparsity: float = 0.5  # channel ratio (structured) or weight share (unstructured)
    target_macs_reduction: Optional[float] = None
    importance: str = "l1"  # l1 | l2 | bn_scale | taylor
    global_pruning: bool = False
    round_to: Optional[int] = None
    ignore_layers: list[str] = field(default_factory=list)
    granularity: str = "epoch"  # epoch | batch
    pattern: str = "unstructured"  # unstructured | 2:4 (unstructured method only)


@dataclass
class QATConfig:
    mode: str = "none"  # none | qat | ptq_static | ptq_dynamic
    start_epoch: int = 0
    calib_batches: int = 8
    freeze_bn_epoch: Optional[int] = None
    freeze_observer_epoch: Optional[int] = None
    target: str = "onnxruntime"  # onnxruntime | tensorrt
    lr_scale: float = 0.1
    float_fan_in_below: int = 0  # input convs with a smaller fan-in stay float (0: none)


@dataclass
class ServingConfig:
    """Serving check of the delivered student (``distill.export.serving.serving_report``).

    Open-loop Poisson load at ``qps`` for ``duration_s`` per strategy (no batching, static,
    dynamic with ``max_batch`` / ``max_wait_ms``), with ``export.threads`` ORT threads; the
    p99 objective is ``slo_p99_ms``.
    """

    enabled: bool = False
    qps: float = 200.0
    duration_s: float = 5.0
    slo_p99_ms: float = 10.0
    max_batch: int = 16
    max_wait_ms: float = 2.0


@dataclass
class RecipeConfig:
    name: str = "digits_kd"
    description: str = ""
    seed: int = 0
    output_dir: Optional[str] = None  # default: runs/<name>/<timestamp>
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "digits_kd"

_CHOICES = {
    "data.name": ("digits", "cifar10", "image_folder"),
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.scheduler": ("cosine", "none"),
    "logger.mode": ("offline", "online", "disabled"),
    "export.provider": ("cpu", "cuda", "tensorrt"),
    "export.exporter": ("auto", "dynamo", "torchscript"),
    "prune.method": ("none", "structured", "unstructured"),
    "prune.schedule": ("constant", "linear", "cubic", "exponential"),
    "prune.importance": ("l1", "l2", "bn_scale", "taylor"),
    "prune.granularity": ("epoch", "batch"),
    "prune.pattern": ("unstructured", "2:4"),
    "qat.mode": ("none", "qat", "ptq_static", "ptq_dynamic"),
    "qat.target": ("onnxruntime", "tensorrt"),
}


def shipped_recipes() -> dict[str, Path]:
    """Recipes shipped in ``recipes/``: name -> path."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def resolve_recipe_path(recipe: str | None) -> Path:
    """A recipe argument (a path, or a shipped recipe's name) to an existing file."""
    if recipe is None:
        recipe = DEFAULT_RECIPE
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if recipe in shipped:
        return shipped[recipe]
    raise UserError(
        f"recipe file not found: '{recipe}' (shipped recipes: {', '.join(shipped) or 'none'})"
    )


def _key_of(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    return str(key) if key else "?"


def _one_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_recipe(recipe: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Load, merge and validate a recipe.

    Args:
        recipe: Path to a YAML file or a shipped recipe's name; ``None`` is the default recipe.
        overrides: ``key=value`` strings (OmegaConf dot-list syntax).

    Raises:
        UserError: missing file, YAML syntax error, unknown key, wrong type, missing value,
            or a value outside its allowed range.
    """
    path = resolve_recipe_path(None if recipe is None else str(recipe))
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
    schema = OmegaConf.structured(RecipeConfig)
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise UserError(f"recipe {path}: cannot parse YAML: {_one_line(exc)}") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"recipe {path}: top level must be a mapping of sections")
    try:
        cfg = OmegaConf.merge(schema, loaded)
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise UserError(f"recipe {path}: unknown key '{_key_of(exc)}'") from None
    except (ValidationError, ConfigTypeError) as exc:
        raise UserError(
            f"recipe {path}: bad value for '{_key_of(exc)}': {_one_line(exc)}"
        ) from None
    # OmegaConf's merge keeps a default over a "???" in the file: find those first.
    required = _missing_keys(OmegaConf.to_container(loaded, resolve=False))
    given = {item.split("=", 1)[0].lstrip("+") for item in overrides}
    for key in required:
        if key not in given:
            raise UserError(f"recipe {path}: missing required value for '{key}' "
                            f"(give it as {key}=...)")
    for item in overrides:  # one at a time, so the error names the override that is wrong
        try:
            OmegaConf.from_dotlist([item])
        except Exception as exc:  # GrammarParseError, yaml.ScannerError, ...
            raise UserError(f"cannot parse override '{item}': {_one_line(exc)}") from None
    try:
        dot = OmegaConf.from_dotlist(overrides)
    except (GrammarParseError, OmegaConfBaseException) as exc:
        raise UserError(f"cannot parse overrides: {_one_line(exc)}") from None
    try:
        cfg = OmegaConf.merge(cfg, dot)
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise UserError(f"unknown key '{_key_of(exc)}' in overrides") from None
    except (ValidationError, ConfigTypeError) as exc:
        raise UserError(f"bad value for '{_key_of(exc)}': {_one_line(exc)}") from None
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise UserError(f"missing required value for '{_key_of(exc)}'") from None
    except OmegaConfBaseException as exc:
        raise UserError(f"recipe {path}: {_one_line(exc)}") from None
    validate(cfg)
    return cfg


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _missing_keys(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _missing_keys(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


def validate(cfg: DictConfig) -> None:
    """Range and choice checks that types alone cannot express."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise UserError(f"'{key}' must be one of {', '.join(choices)}; got '{value}'")
    t = cfg.targets
    if t.accuracy is not None and not 0.0 <= t.accuracy <= 1.0:
        raise UserError(f"'targets.accuracy' must be in [0, 1]; got {t.accuracy}")
    for key in ("p99_ms", "size_mb", "max_accuracy_drop"):
        value = t[key]
        if value is not None and value <= 0:
            raise UserError(f"'targets.{key}' must be > 0; got {value}")
    p = cfg.prune
    for key in ("initial_sparsity", "target_sparsity"):
        if not 0.0 <= p[key] < 1.0:
            raise UserError(f"'prune.{key}' must be in [0, 1); got {p[key]}")
    if p.end_epoch < p.start_epoch:
        raise UserError(
            f"'prune.end_epoch' ({p.end_epoch}) is before 'prune.start_epoch' ({p.start_epoch})"
        )
    if p.method == "structured" and cfg.qat.mode == "qat" and p.end_epoch >= cfg.qat.start_epoch:
        raise UserError(
            f"'prune.end_epoch' ({p.end_epoch}) must be before 'qat.start_epoch' "
            f"({cfg.qat.start_epoch}): prune first, then quantize"
        )
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "export.every_n_epochs": cfg.export.every_n_epochs,
        "export.threads": cfg.export.threads,
        "export.iters": cfg.export.iters,
        "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"'{key}' must be > 0; got {value}")
    for key in ("data.train_fraction", "teacher.train_fraction"):
        value = OmegaConf.select(cfg, key)
        if not 0.0 < value <= 1.0:
            raise UserError(f"'{key}' must be in (0, 1]; got {value}")
    if any(b < 1 for b in cfg.export.batch_sizes):
        raise UserError(f"'export.batch_sizes' must be >= 1; got {list(cfg.export.batch_sizes)}")
    q = cfg.qat
    if q.calib_batches < 1 or q.lr_scale <= 0 or q.float_fan_in_below < 0 or q.start_epoch < 0:
        raise UserError(
            "'qat' needs calib_batches >= 1, lr_scale > 0, float_fan_in_below >= 0 and "
            f"start_epoch >= 0; got {q.calib_batches}, {q.lr_scale}, {q.float_fan_in_below}, "
            f"{q.start_epoch}"
        )
    for key in ("freeze_bn_epoch", "freeze_observer_epoch"):
        if q[key] is not None and q[key] < q.start_epoch:
            raise UserError(f"'qat.{key}' ({q[key]}) is before 'qat.start_epoch' ({q.start_epoch})")
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices == 0:
        raise UserError("'trainer.devices' must be >= 1 or 'auto'; got 0")
    if "/" in cfg.name or "\\" in cfg.name or cfg.name in ("", ".", ".."):
        raise UserError(f"'name' must be a plain name without path separators; got '{cfg.name}'")
    sv = cfg.serving
    for key in ("qps", "duration_s", "slo_p99_ms"):
        if not sv[key] > 0:
            raise UserError(f"'serving.{key}' must be > 0; got {sv[key]}")
    if sv.max_batch < 1:
        raise UserError(f"'serving.max_batch' must be >= 1; got {sv.max_batch}")
    if sv.max_wait_ms < 0:
        raise UserError(f"'serving.max_wait_ms' must be >= 0; got {sv.max_wait_ms}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
