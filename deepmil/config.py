"""Configuration: schema, loading, validation and overrides of YAML configurations.

A configuration is a plain nested dict whose keys are those of the shipped YAML files
(``config["model"]["kmax"]``, ``config["optimizer"]["lr_scheduler"]["step_size"]``...).
Every key has a type, a default and an allowed range; :func:`validate_config` fills the
defaults and rejects anything else with a :class:`ConfigError` naming the file, the dotted key,
the value and what is allowed.

Keys of the upstream configuration files that nothing here reads are accepted (and type
checked) so that those files load unchanged, then ignored: :data:`IGNORED_KEYS` lists them.
Run-specific keys (seed, paths, workers, speed options: ``Field.run_option``) do not change
what a run computes; ``deepmil.report`` groups runs that differ only in them.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deepmil.errors import ConfigError
from deepmil.files import atomic_write
from deepmil.registry import (
    DATASET_NAMES,
    DEEP_STEM_MODELS,
    MASK_NORMALIZATIONS,
    METHOD_NAMES,
    METHODS,
    MODEL_NAMES,
    dataset_spec,
    feature_map_size,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "config_yaml"
CONFIG_ALIASES = {"glas-no-erase.yaml": "glas-no-erasing.yaml"}
SEED_LIMIT = 2**32
REQUIRED = object()


class _Reject(Exception):
    """Raised by a value check; carries what is wrong (the caller adds what is allowed)."""


@dataclass(frozen=True)
class Check:
    """How one value is checked: ``normalise`` returns the accepted value or raises ``_Reject``."""

    expected: str
    normalise: Callable[[Any], Any]


@dataclass(frozen=True)
class Field:
    """One leaf key of the schema: its default and check, whether it only says how a run is
    carried out (``run_option``), and whether nothing reads it (``ignored``)."""

    default: Any
    check: Check
    run_option: bool = False
    ignored: bool = False


# ----------------------------------------------------------------------------- value checks


SHOWN_CHARACTERS = 200


def clip(text_value: str, limit: int = SHOWN_CHARACTERS) -> str:
    """``text_value``, cut to ``limit`` characters (saying how long it was) for a message."""
    if len(text_value) <= limit:
        return text_value
    return f"{text_value[:limit]}... ({len(text_value)} characters)"


def _render(value: Any) -> str:
    """A value as written in YAML (``true``, ``null``, ``[480, 480]``, ``'abc'``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_render(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def _show(value: Any) -> str:
    """A value as written in YAML, at most :data:`SHOWN_CHARACTERS` long (for messages)."""
    return clip(_render(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    return ""


def _in_range(
    value: float, low: float | None, high: float | None, low_open: bool, high_open: bool
) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def _numeric(
    noun: str,
    accepts: Callable[[Any], bool],
    low: float | None,
    high: float | None,
    low_open: bool,
    high_open: bool,
    nullable: bool,
) -> Check:
    expected = noun + _range_text(low, high, low_open, high_open)
    if nullable:
        expected = "null or " + expected

    def normalise(value: Any) -> Any:
        if value is None and nullable:
            return None
        if not accepts(value):
            raise _Reject("has the wrong type")
        if not _in_range(value, low, high, low_open, high_open):
            raise _Reject("is out of range")
        return value

    return Check(expected, normalise)


def integer(low: int | None = None, high: int | None = None, nullable: bool = False) -> Check:
    """An int (not a bool) in ``[low, high]``."""
    return _numeric("an integer", _is_int, low, high, False, False, nullable)


def number(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    nullable: bool = False,
) -> Check:
    """A finite int or float (kept as given: WILDCAT's ``get_k`` tells ``1`` from ``1.0``)."""
    return _numeric("a number", _is_number, low, high, low_open, high_open, nullable)


def boolean() -> Check:
    """``true`` or ``false``."""

    def normalise(value: Any) -> bool:
        if not isinstance(value, bool):
            raise _Reject("has the wrong type")
        return value

    return Check("true or false", normalise)


def choice(*options: Any) -> Check:
    """One of ``options``."""

    def normalise(value: Any) -> Any:
        if not any(value == option and type(value) is type(option) for option in options):
            raise _Reject("is not an allowed value")
        return value

    return Check("one of " + ", ".join(_show(option) for option in options), normalise)


def text(nullable: bool = False) -> Check:
    """A non-empty string."""

    def normalise(value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value:
            raise _Reject("has the wrong type")
        return value

    return Check("null or a non-empty string" if nullable else "a non-empty string", normalise)


def pair(item: Check, names: str, nullable: bool = False) -> Check:
    """A two-element list (a tuple is accepted and turned into a list)."""
    expected = f"a list [{names}], each {item.expected}"
    if nullable:
        expected = "null or " + expected

    def normalise(value: Any) -> list | None:
        if value is None and nullable:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise _Reject("has the wrong type")
        return [item.normalise(element) for element in value]

    return Check(expected, normalise)


def int_list() -> Check:
    """A strictly increasing list of integers >= 0 (scheduler milestones)."""

    def normalise(value: Any) -> list[int] | None:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
            raise _Reject("has the wrong type")
        if any(v < 0 for v in value) or any(a >= b for a, b in zip(value, value[1:])):
            raise _Reject("is out of range")
        return list(value)

    return Check("null or a strictly increasing list of integers >= 0", normalise)


def class_names() -> Check:
    """A mapping class name -> id (ids 0..n-1, each once) or an encoding file name."""

    def normalise(value: Any) -> dict | str:
        if isinstance(value, str) and value:
            return value
        if not isinstance(value, dict) or not value:
            raise _Reject("has the wrong type")
        if not all(_is_int(v) for v in value.values()):
            raise _Reject("has the wrong type")
        if sorted(value.values()) != list(range(len(value))):
            raise _Reject("is not an allowed value")
        return {str(name): index for name, index in value.items()}

    return Check(
        "an encoding file name or a mapping class name -> id using each id 0..n-1 once", normalise
    )


def device_id() -> Check:
    """``cpu``, a GPU index or a comma-separated list of indices (null = automatic)."""

    def normalise(value: Any) -> str | None:
        if value is None:
            return None
        if _is_int(value) and value >= 0:
            return str(value)
        if isinstance(value, str) and parse_cudaid_text(value) is not None:
            return value.strip()
        raise _Reject("is not an allowed value")

    return Check("null, cpu, a GPU index or a comma-separated list of GPU indices", normalise)


def parse_cudaid_text(value: str) -> str | None:
    """``value`` stripped if it is ``cpu`` or a comma list of GPU indices, else ``None``."""
    value = value.strip()
    if value == "cpu" or re.fullmatch(r"[0-9]+(,[0-9]+)*", value):
        return value
    return None


# ----------------------------------------------------------------------------- schema

PROBABILITY = number(0, 1, high_open=True)
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)

MODEL_SCHEMA: dict[str, Any] = {
    "name": Field("resnet101", choice(*MODEL_NAMES)),
    "pretrained": Field(True, choice(True, False, "synthetic")),
    "num_classes": Field(REQUIRED, integer(2)),
    "num_masks": Field(1, choice(1), ignored=True),
    "scale": Field([0.5, 0.5], pair(number(0, 1, low_open=True), "h, w")),
    "modalities": Field(5, integer(1)),
    "kmax": Field(0.09, POSITIVE),
    "kmin": Field(0.09, NON_NEGATIVE),
    "alpha": Field(0.0, NON_NEGATIVE),
    "dropout": Field(0.0, PROBABILITY),
    "sigma": Field(0.5, number(0, 1)),
    "w": Field(8.0, POSITIVE),
    "smooth_out": Field(False, boolean(), ignored=True),
    "mask_normalization": Field("batch", choice(*MASK_NORMALIZATIONS)),
    "apply_min_term": Field(False, boolean()),
    "pretrained_cache": Field(None, text(nullable=True), run_option=True),
}

LR_SCHEDULER_SCHEMA: dict[str, Any] = {
    "name": Field("mystep", choice("mystep", "step", "multistep")),
    "step_size": Field(40, integer(1)),
    "gamma": Field(0.1, POSITIVE),
    "min_lr": Field(1e-7, NON_NEGATIVE),
    "last_epoch": Field(-1, integer(-1), ignored=True),
    "milestones": Field(None, int_list()),
}

OPTIMIZER_SCHEMA: dict[str, Any] = {
    "name": Field("sgd", choice("sgd", "adam")),
    "lr": Field(0.001, POSITIVE),
    "momentum": Field(0.9, PROBABILITY),
    "nesterov": Field(True, boolean()),
    "dampening": Field(0.0, number(0, 1)),
    "weight_decay": Field(1e-5, NON_NEGATIVE),
    "betas": Field([0.9, 0.999], pair(PROBABILITY, "beta1, beta2")),
    "eps": Field(1e-8, POSITIVE),
    "amsgrad": Field(False, boolean()),
    "lr_scheduler": LR_SCHEDULER_SCHEMA,
}

SYNTHETIC_SCHEMA: dict[str, Any] = {
    "num_classes": Field(2, integer(2)),
    "image_size": Field(128, integer(32)),
    "n_train": Field(240, integer(1)),
    "n_test": Field(100, integer(1)),
    "seed": Field(0, integer(0, SEED_LIMIT - 1)),
    "min_objects": Field(1, integer(1)),
    "max_objects": Field(4, integer(1)),
}

PRETRAIN_SCHEMA: dict[str, Any] = {
    "num_classes": Field(30, integer(2, 30)),
    "per_class": Field(64, integer(1)),
    "image_size": Field(128, integer(32)),
    "source_seed": Field(1_000_003, integer(0, SEED_LIMIT - 1)),
    "epochs": Field(12, integer(1)),
    "batch_size": Field(32, integer(1)),
    "lr": Field(0.01, POSITIVE),
    "weight_decay": Field(1e-4, NON_NEGATIVE),
    "seed": Field(0, integer(0, SEED_LIMIT - 1)),
    "amp": Field("auto", choice("auto", None, "bf16")),
}

METRICS_SCHEMA: dict[str, Any] = {
    "empty_dice": Field("one", choice("one", "zero")),
    "cam_curve_interval": Field(0.001, number(1e-5, 0.5)),
}

SCHEMA: dict[str, Any] = {
    "MYSEED": Field(0, integer(0, SEED_LIMIT - 1), run_option=True),
    "method": Field("minmax", choice(*METHOD_NAMES)),
    "dataset": Field(REQUIRED, choice(*DATASET_NAMES)),
    "fold_name": Field(None, text(nullable=True)),
    "data_root": Field(None, text(nullable=True), run_option=True),
    "img_extension": Field(None, text(nullable=True), ignored=True),
    "name_classes": Field(REQUIRED, class_names()),
    "nbr_classes": Field(REQUIRED, integer(2)),
    "split": Field(0, integer(0)),
    "fold": Field(0, integer(0)),
    "fold_folder": Field("./folds", text(), run_option=True),
    "resize": Field(None, choice(None)),
    "crop_size": Field([480, 480], pair(integer(1), "h, w")),
    "up_scale_small_dim_to": Field(None, integer(1, nullable=True)),
    "padding_size": Field(None, pair(PROBABILITY, "h, w", nullable=True)),
    "pad_eval": Field(False, choice(False)),
    "padding_mode": Field("reflect", choice("reflect", "constant", "edge", "symmetric")),
    "preload": Field(True, boolean(), run_option=True),
    "batch_size": Field(8, integer(1)),
    "num_workers": Field(8, integer(0), run_option=True),
    "amp": Field(None, choice(None, "bf16", "fp16")),
    "channels_last": Field(False, boolean(), run_option=True),
    "compile": Field(
        None, choice(None, "inductor", "cudagraphs", "aot_eager", "eager"), run_option=True
    ),
    "eval_batch_size": Field(1, integer(1), run_option=True),
    "max_epochs": Field(400, integer(-1)),
    "nbr_times_erase": Field(0, integer(0)),
    "epoch_start_erasing": Field(1, integer(0)),
    "sigma_erase": Field(10.0, POSITIVE),
    "erase_in_inference": Field(False, boolean(), ignored=True),
    "path_pre_trained": Field(None, text(nullable=True), run_option=True),
    "strict": Field(True, boolean(), run_option=True),
    "exact_eval_crop": Field(False, boolean()),
    "crf": Field(False, boolean()),
    "stain_augmentation": Field(False, boolean()),
    "crf_workers": Field(None, integer(0, nullable=True), run_option=True),
    "save_scoremaps": Field(True, boolean(), run_option=True),
    "normalize": Field(True, boolean(), ignored=True),
    "alpha": Field(128, integer(0, 255), ignored=True),
    "floating": Field(2, integer(0), ignored=True),
    "height_tag": Field(50, integer(0), ignored=True),
    "use_tags": Field(True, boolean(), ignored=True),
    "show_hists": Field(False, boolean(), ignored=True),
    "bins": Field(100, integer(1), ignored=True),
    "rangeh": Field([0, 1], pair(number(), "low, high"), ignored=True),
    "extension": Field(["jpeg", "JPEG"], pair(text(), "file extension, PIL format"), ignored=True),
    "exp_root": Field("exps", text(), run_option=True),
    "cudaid": Field(None, device_id(), run_option=True),
    "yaml": Field(None, text(nullable=True), run_option=True),
    "synthetic": SYNTHETIC_SCHEMA,
    "model": MODEL_SCHEMA,
    "optimizer": OPTIMIZER_SCHEMA,
    "metrics": METRICS_SCHEMA,
    "pretrain": PRETRAIN_SCHEMA,
}


def _flagged_keys(
    flag: str, schema: Mapping[str, Any] = SCHEMA, prefix: str = ""
) -> tuple[str, ...]:
    """Dotted keys of the schema whose field has ``flag`` set."""
    keys: list[str] = []
    for key, entry in schema.items():
        if isinstance(entry, Field):
            keys += [prefix + key] if getattr(entry, flag) else []
        else:
            keys += _flagged_keys(flag, entry, f"{prefix}{key}.")
    return tuple(keys)


IGNORED_KEYS = _flagged_keys("ignored")
RUN_OPTIONS = _flagged_keys("run_option")

# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads exponent floats without a dot (``1e-5``) as floats,
    and refuses anchors and aliases (a few bytes of aliases can expand to gigabytes)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.YAMLError(
                f"anchors and aliases (&name, *name) are not allowed in a "
                f"configuration (line {event.start_mark.line + 1})"
            )
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text_value: str) -> Any:
    """Parse YAML safely (``yaml.safe_load`` semantics, plus ``1e-5`` read as a float)."""
    return yaml.load(text_value, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader


# ----------------------------------------------------------------------------- validation


def _unknown_key_error(
    source: str, prefix: str, key: Any, section: Mapping[str, Any]
) -> ConfigError:
    dotted = prefix + str(key)
    close = difflib.get_close_matches(str(key), list(section), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
    where = f"in {prefix[:-1]}" if prefix else "at the top level"
    return ConfigError(
        f"{source}: unknown key {dotted}{hint}; allowed keys {where}: {', '.join(section)}"
    )


def check_value(dotted: str, value: Any, check: Check, source: str) -> Any:
    try:
        return check.normalise(value)
    except _Reject as reject:
        raise ConfigError(
            f"{source}: {dotted} = {_show(value)} {reject} (expected {check.expected})"
        ) from None


def _normalise_section(raw: Any, schema: Mapping[str, Any], prefix: str, source: str) -> dict:
    if not isinstance(raw, dict):
        name = prefix[:-1] or "the configuration"
        raise ConfigError(
            f"{source}: {name} = {_show(raw)} has the wrong type (expected a mapping)"
        )
    for key in raw:
        if key not in schema:
            raise _unknown_key_error(source, prefix, key, schema)
    section = {}
    for key, spec in schema.items():
        dotted = prefix + key
        if isinstance(spec, dict):
            section[key] = _normalise_section(raw.get(key, {}), spec, dotted + ".", source)
        elif key in raw:
            section[key] = check_value(dotted, raw[key], spec.check, source)
        elif spec.default is REQUIRED:
            raise ConfigError(f"{source}: missing key {dotted} (expected {spec.check.expected})")
        else:
            section[key] = copy.deepcopy(spec.default)
    return section


def _check_class_counts(config: dict, source: str) -> None:
    nbr, model_classes = config["nbr_classes"], config["model"]["num_classes"]
    if nbr != model_classes:
        raise ConfigError(
            f"{source}: nbr_classes = {nbr} and model.num_classes = {model_classes} "
            f"differ (expected the same number)"
        )
    dataset = config["dataset"]
    allowed = dataset_spec(dataset).class_counts
    if dataset == "synthetic":
        allowed = (config["synthetic"]["num_classes"],)
    if allowed is not None and nbr not in allowed:
        expected = " or ".join(str(a) for a in allowed)
        if dataset == "synthetic":
            expected = f"synthetic.num_classes = {expected}"
        raise ConfigError(
            f"{source}: nbr_classes = {nbr} is not allowed for dataset {dataset} "
            f"(expected {expected})"
        )
    names = config["name_classes"]
    if isinstance(names, dict) and len(names) != nbr:
        raise ConfigError(
            f"{source}: name_classes = {_show(names)} has {len(names)} classes "
            f"(expected nbr_classes = {nbr})"
        )


def _classifier_map(crop: list[int], scale: list[float]) -> tuple[list[int], list[int]]:
    """Classifier input size ``int(crop * scale)`` and its layer4 map size, per dimension."""
    size = [int(c * s) for c, s in zip(crop, scale)]
    return size, [feature_map_size(s) for s in size]


def _selected_positions(kmax: float, crop: list[int], scale: list[float]) -> int:
    _, (height, width) = _classifier_map(crop, scale)
    return round(kmax * height * width)


def _check_wildcat_k(config: dict, source: str) -> None:
    """Refuse a crop whose classifier feature map makes ``round(kmax * n)`` zero.

    ``scale <= 1``, so the classifier map is never larger than the localizer's: checking it is
    enough. Counts (ints) and ``1.0`` always select at least one position.
    """
    kmax, scale, crop = config["model"]["kmax"], config["model"]["scale"], config["crop_size"]
    if not isinstance(kmax, float) or kmax >= 1 or _selected_positions(kmax, crop, scale) > 0:
        return
    size, (height, width) = _classifier_map(crop, scale)
    n = height * width
    larger = next(
        (c for c in range(32, 8193, 32) if _selected_positions(kmax, [c, c], scale) > 0), None
    )
    crop_hint = "a larger crop_size"
    if larger:
        crop_hint += f" (e.g. [{larger}, {larger}])"
    kmax_hint = f" or model.kmax > {0.5 / n:g}" if n else ""
    raise ConfigError(
        f"{source}: model.kmax = {kmax} selects no position of the classifier feature map: "
        f"crop_size = {_show(crop)} scaled by model.scale = {_show(scale)} gives a "
        f"{size[0]}x{size[1]} classifier input, a {height}x{width} map (n = {n}) and "
        f"round({kmax} * {n}) = 0, while WILDCAT pooling needs at least one position. "
        f"Use {crop_hint}{kmax_hint}."
    )


def _check_optimizer(config: dict, source: str) -> None:
    optimizer = config["optimizer"]
    if (
        optimizer["name"] == "sgd"
        and optimizer["nesterov"]
        and (optimizer["momentum"] <= 0 or optimizer["dampening"] != 0)
    ):
        raise ConfigError(
            f"{source}: optimizer.nesterov = true needs optimizer.momentum > 0 and "
            f"optimizer.dampening = 0 (got momentum = {optimizer['momentum']}, "
            f"dampening = {optimizer['dampening']})"
        )
    scheduler = optimizer["lr_scheduler"]
    if scheduler["name"] == "multistep" and not scheduler["milestones"]:
        raise ConfigError(
            f"{source}: optimizer.lr_scheduler.milestones = "
            f"{_show(scheduler['milestones'])} is missing (expected a non-empty "
            f"list of epochs when optimizer.lr_scheduler.name = 'multistep')"
        )


def _check_method_rules(config: dict, source: str) -> None:
    """Stain augmentation is for histology; recursive erasing for the methods that erase;
    ``max_epochs = -1`` (evaluate only) needs the weights to evaluate."""
    model = config["model"]
    if model["pretrained"] == "synthetic" and model["name"] not in DEEP_STEM_MODELS:
        raise ConfigError(
            f"{source}: model.pretrained = 'synthetic' is for the deep-stem models "
            f"({', '.join(DEEP_STEM_MODELS)}), not model.name = {model['name']!r}"
        )
    if config["stain_augmentation"] and not dataset_spec(config["dataset"]).histology:
        raise ConfigError(
            f"{source}: stain_augmentation = true is for the GlaS histology images "
            f"only, not dataset {config['dataset']!r}"
        )
    if not METHODS[config["method"]].erases and config["nbr_times_erase"] > 0:
        raise ConfigError(
            f"{source}: nbr_times_erase = {config['nbr_times_erase']} is out of "
            f"range for method {config['method']!r} (expected 0: recursive erasing "
            f"belongs to the min-max entropy model)"
        )
    if config["max_epochs"] == -1 and not config["path_pre_trained"]:
        raise ConfigError(
            f"{source}: max_epochs = -1 evaluates a trained model: give its "
            f"weights with --path_pre_trained FILE"
        )


def _check_synthetic_objects(config: dict, source: str) -> None:
    synthetic = config["synthetic"]
    if synthetic["min_objects"] > synthetic["max_objects"]:
        raise ConfigError(
            f"{source}: synthetic.min_objects = {synthetic['min_objects']} is out "
            f"of range (expected at most synthetic.max_objects = "
            f"{synthetic['max_objects']})"
        )


def _check_synthetic_crop(config: dict, source: str) -> None:
    """The training crop must fit in a (padded) synthetic image, whose size is known."""
    if config["dataset"] != "synthetic":
        return
    size = config["synthetic"]["image_size"]
    ratios = config["padding_size"] or [0, 0]
    padded = [size + 2 * int(ratio * size) for ratio in ratios]
    if any(c > p for c, p in zip(config["crop_size"], padded)):
        raise ConfigError(
            f"{source}: crop_size = {_show(config['crop_size'])} is out of range "
            f"(expected at most the padded synthetic image size {_show(padded)})"
        )


def validate_config(raw: Any, source: str) -> dict:
    """Fill the defaults of ``raw``, check every key and the cross-key rules; return a new dict.

    ``source`` (a file name, ``command line``...) starts every error message.
    """
    config = _normalise_section(raw, SCHEMA, "", source)
    _check_class_counts(config, source)
    _check_wildcat_k(config, source)
    _check_optimizer(config, source)
    _check_method_rules(config, source)
    _check_synthetic_objects(config, source)
    _check_synthetic_crop(config, source)
    return config


# ----------------------------------------------------------------------------- files


def available_configs() -> list[str]:
    """Names of the YAML files shipped in ``config_yaml/``."""
    return sorted(path.name for path in CONFIG_DIR.glob("*.yaml"))


def resolve_yaml_path(name: str) -> Path:
    """Find a configuration: a bare file name is looked up in the repository's ``config_yaml/``
    (``glas-no-erase.yaml`` is an alias of ``glas-no-erasing.yaml``); anything else is a path,
    relative to the working directory or else to the repository."""
    path = Path(name)
    if path.name == name:
        candidates = [CONFIG_DIR / name]
        if name in CONFIG_ALIASES:
            candidates.append(CONFIG_DIR / CONFIG_ALIASES[name])
    else:
        candidates = [path] if path.is_absolute() else [path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            if candidate.name != path.name:
                logger.info("%s is an alias of %s", name, candidate.name)
            return candidate
    raise ConfigError(
        f"configuration {name!r} not found; tried {', '.join(map(str, candidates))}. "
        f"Available in {CONFIG_DIR}: {', '.join(available_configs())}"
    )


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (shorter error messages)."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(REPO_ROOT):
        return str(resolved.relative_to(REPO_ROOT))
    return str(path)


def default_values(schema: Mapping[str, Any] = SCHEMA) -> dict:
    """The schema's default configuration (required keys left out)."""
    defaults = {}
    for key, entry in schema.items():
        if isinstance(entry, Field):
            if entry.default is not REQUIRED:
                defaults[key] = copy.deepcopy(entry.default)
        else:
            defaults[key] = default_values(entry)
    return defaults


def merge_sections(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict:
    """``base`` updated by ``changes``, sections (nested mappings) merged key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_raw_config(path: Path, chain: tuple[Path, ...] = ()) -> tuple[Any, list[Path]]:
    """The YAML content of ``path`` and the base files it was merged over.

    A ``base: FILE`` entry (looked up next to ``path``, then as for ``--yaml``) is read first
    (recursively) and the file's own keys are merged over it.
    """
    source = display_path(path)
    if path.resolve() in chain:
        raise ConfigError(
            f"{source}: base configurations form a cycle "
            f"({' -> '.join(display_path(link) for link in (*chain, path))})"
        )
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{source}: cannot read the configuration ({error})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{source}: the configuration is not UTF-8 text (byte {error.start}: {error.reason})"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML ({error})") from None
    if not isinstance(raw, dict) or "base" not in raw:
        return raw, []
    base_name = raw.pop("base")
    if not isinstance(base_name, str):
        raise ConfigError(f"{source}: base = {_show(base_name)} is not a file name")
    sibling = path.parent / base_name
    base_path = sibling if sibling.is_file() else resolve_yaml_path(base_name)
    base, bases = read_raw_config(base_path, (*chain, path.resolve()))
    if not isinstance(base, dict):
        raise ConfigError(f"{display_path(base_path)}: expected a mapping of config keys")
    return merge_sections(base, raw), [base_path, *bases]


def load_config(path: str | Path) -> dict:
    """Read a YAML configuration file (and its ``base`` files), fill the defaults, validate.

    Error messages name the file and, when it has any, its base files (a bad key or value may
    come from either).
    """
    raw, bases = read_raw_config(Path(path))
    source = display_path(path)
    if bases:
        source += f" (over base {', '.join(display_path(base) for base in bases)})"
    return validate_config({} if raw is None else raw, source)


class _NoAliasDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that writes a value shared by several keys in full each time (the
    loader refuses aliases)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def save_config(config: Mapping[str, Any], path: str | Path) -> None:
    """Write ``config`` as YAML atomically, with the permissions of every other result file."""
    text_value = yaml.dump(
        dict(config), Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None
    )
    atomic_write(Path(path), lambda stream: stream.write(text_value.encode("utf-8")))


def _leaf_field(dotted: str, source: str) -> Field:
    section: Mapping[str, Any] = SCHEMA
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        prefix = "".join(p + "." for p in parts[:depth])
        if part not in section:
            raise _unknown_key_error(source, prefix, part, section)
        section = section[part]
        if isinstance(section, Field) and depth < len(parts) - 1:
            raise ConfigError(f"{source}: {prefix + part} is not a section (cannot set {dotted})")
    if not isinstance(section, Field):
        raise ConfigError(
            f"{source}: {dotted} is a section; set one of its keys "
            f"({', '.join(dotted + '.' + key for key in section)})"
        )
    return section


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _set(config: dict, dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    target = config
    for part in sections:
        target = target[part]
    target[leaf] = value


def override_values(
    config: Mapping[str, Any], changes: list[tuple[str, Any, str]], source: str
) -> dict:
    """Apply already-typed ``(dotted key, value, origin)`` changes and revalidate the result.

    Each value is checked against the schema with ``origin`` in the message; the cross-key rules
    are checked once all changes are applied (with ``source``). Every change is logged as
    ``key: old -> new``. Returns a new dict.
    """
    updated = copy.deepcopy(dict(config))
    for dotted, value, origin in changes:
        field = _leaf_field(dotted, origin)
        new = check_value(dotted, value, field.check, origin)
        logger.info("%s: %s -> %s", dotted, _show(_get(updated, dotted)), _show(new))
        _set(updated, dotted, new)
    return validate_config(updated, source)


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, str], source: str) -> dict:
    """Apply ``{"model.kmax": "0.2", ...}``: values are parsed as YAML, then validated.

    Returns a new, validated dict; each change is logged as ``key: old -> new``.
    """
    changes = [
        (dotted, parse_value(dotted, raw, source), source) for dotted, raw in overrides.items()
    ]
    return override_values(config, changes, source)


def parse_value(dotted: str, raw: str, source: str) -> Any:
    """``raw`` read as YAML, or a :class:`ConfigError` naming ``dotted`` and ``source``."""
    try:
        return parse_yaml(raw)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"{source}: {dotted} = {clip(repr(raw))} is not valid YAML ({error})"
        ) from None
