"""The training command line: flags, ``--set`` overrides, ``--resume``, seed and data root.

:func:`build_parser` and :func:`config_from_args` make ``tools.get_yaml_args``; the flags of the
original driver (``FLAG_KEYS``) map to configuration keys and are validated like YAML values.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deepmil.config import (
    METHOD_NAMES,
    MODEL_NAMES,
    SCHEMA,
    SEED_LIMIT,
    ConfigError,
    check_value,
    display_path,
    load_config,
    override_values,
    parse_cudaid_text,
    parse_value,
    resolve_yaml_path,
)

logger = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = "./data"
DATA_ROOT_ENV = "DEEPMIL_DATA_ROOT"
SEED_ENV = "MYSEED"
# The sets --evaluate can score, in the order they are evaluated (``train``: the training set
# seen with evaluation transforms).
EVALUATION_SETS = ("valid", "test", "train")

# Command-line flags of the original driver, and --method: flag -> (dotted key, value type).
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "method": ("method", "str"),
    "bsize": ("batch_size", "int"),
    "lr": ("optimizer.lr", "float"),
    "momentum": ("optimizer.momentum", "float"),
    "wdecay": ("optimizer.weight_decay", "float"),
    "stepsize": ("optimizer.lr_scheduler.step_size", "int"),
    "epoch": ("max_epochs", "int"),
    "fold": ("fold", "int"),
    "split": ("split", "int"),
    "alpha": ("model.alpha", "float"),
    "kmax": ("model.kmax", "float"),
    "kmin": ("model.kmin", "float"),
    "dout": ("model.dropout", "float"),
    "modalities": ("model.modalities", "int"),
    "pretrained": ("model.pretrained", "bool"),
    "w": ("model.w", "float"),
    "modelname": ("model.name", "str"),
    "nbrerase": ("nbr_times_erase", "int"),
    "epocherase": ("epoch_start_erasing", "int"),
    "path_pre_trained": ("path_pre_trained", "str"),
    "strict": ("strict", "bool"),
}


# ----------------------------------------------------------------------------- run values


def environment_seed() -> int | None:
    """The seed in the environment variable ``MYSEED``, or None; an invalid value is an error."""
    raw = os.environ.get(SEED_ENV)
    if raw is None:
        return None
    if not re.fullmatch(r"[0-9]+", raw.strip()) or int(raw) >= SEED_LIMIT:
        raise ConfigError(
            f"environment variable {SEED_ENV} = {raw!r} is not a valid seed "
            f"(expected an integer in [0, 2**32))"
        )
    return int(raw)


def resolve_seed(config: dict, cli_seed: int | None = None) -> int:
    """Seed of the run: ``--seed`` if given, else env ``MYSEED`` if set, else
    ``config['MYSEED']`` (default 0). It is stored in ``config['MYSEED']``, logged with where it
    came from, and returned."""
    env_seed = environment_seed()
    if cli_seed is not None:
        seed, origin = cli_seed, "--seed"
        if env_seed is not None and env_seed != cli_seed:
            origin += f", which overrides {SEED_ENV} = {env_seed}"
    elif env_seed is not None:
        seed, origin = env_seed, f"environment variable {SEED_ENV}"
    else:
        seed, origin = config["MYSEED"], "the configuration's MYSEED"
    logger.info("seed %d (%s)", seed, origin)
    config["MYSEED"] = seed
    return seed


def resolve_data_root(config: Mapping[str, Any], cli_value: str | None) -> str:
    """``--data-root`` > env ``DEEPMIL_DATA_ROOT`` > ``config['data_root']`` > ``./data``."""
    for value in (cli_value, os.environ.get(DATA_ROOT_ENV), config.get("data_root")):
        if value:
            return str(value)
    return DEFAULT_DATA_ROOT


# ----------------------------------------------------------------------------- command line


def parse_bool(value: str) -> bool:
    """``true/false/1/0/yes/no`` (any case) for argparse."""
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(
        f"invalid boolean {value!r} (expected true/false, 1/0, yes/no)"
    )


def parse_cudaid(value: str) -> str:
    """``cpu``, a GPU index or a comma-separated list of GPU indices, for argparse."""
    parsed = parse_cudaid_text(value)
    if parsed is None:
        raise argparse.ArgumentTypeError(
            f"invalid device {value!r} (expected cpu, a GPU index or a comma list such as 0,1)"
        )
    return parsed


def parse_seed(value: str) -> int:
    """A seed in [0, 2**32), for argparse."""
    if not re.fullmatch(r"[0-9]+", value.strip()) or int(value) >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"invalid seed {value!r} (expected an integer in [0, 2**32))"
        )
    return int(value)


def parse_assignment(value: str) -> tuple[str, str]:
    """``section.key=value`` -> ``("section.key", "value")``, for argparse."""
    key, sep, raw = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"invalid --set {value!r} (expected section.key=value)")
    return key.strip(), raw


FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": parse_bool,
}


FLAG_CHOICES = {"method": METHOD_NAMES, "modelname": MODEL_NAMES}
EPILOG = """examples:
  python train_deepmil.py --yaml synthetic-no-erasing.yaml --cudaid cpu --seed 1
  python train_deepmil.py --yaml synthetic-transfer-no-erasing.yaml --kmax 0.2 --kmin 0.2 --epoch 4
  python train_deepmil.py --resume exps/RUN --crf
evaluate the selected model of a run again (no training), here with the CRF:
  python train_deepmil.py --evaluate exps/RUN --sets test --crf
evaluate weights trained elsewhere:
  python train_deepmil.py --yaml synthetic-cam.yaml --epoch -1 --path_pre_trained FILE
"""


def flag_help(flag: str, dotted: str, kind: str) -> str:
    """Help text of an override flag, with its allowed values when they are a list."""
    choices = FLAG_CHOICES.get(flag)
    return f"overrides {dotted} ({kind})" + (f": {', '.join(choices)}" if choices else "")


def build_parser() -> argparse.ArgumentParser:
    """The training command line: ``--yaml``, ``--cudaid``, the original override flags, ``--set``
    and the run options ``--seed --data-root --exp-root --exp-name --crf --quiet --overwrite
    --resume``, in three groups, with examples."""
    parser = argparse.ArgumentParser(
        description="Train and evaluate the min-max entropy model (or a baseline).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    overrides = parser.add_argument_group(
        "configuration overrides", "each is validated like the YAML value it replaces"
    )
    run = parser.add_argument_group("run options", "seed, devices, folders and outputs")
    parser.add_argument(
        "--yaml",
        default=None,
        help="config file name in config_yaml/ (or a path to a YAML file); "
        "required unless --resume is given",
    )
    run.add_argument(
        "--cudaid",
        type=parse_cudaid,
        default=None,
        help="cpu, a GPU index or a comma list (default: first GPU, else cpu)",
    )
    for flag, (dotted, kind) in FLAG_KEYS.items():
        overrides.add_argument(
            f"--{flag}", type=FLAG_TYPES[kind], default=None, help=flag_help(flag, dotted, kind)
        )
    overrides.add_argument(
        "--set",
        action="append",
        type=parse_assignment,
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key (value read as YAML); repeatable",
    )
    run.add_argument(
        "--seed",
        type=parse_seed,
        default=None,
        help=f"seed of the run (else ${SEED_ENV}, then the config key MYSEED, default 0)",
    )
    run.add_argument(
        "--data-root",
        default=None,
        help=f"parent folder of the datasets (else ${DATA_ROOT_ENV}, the config "
        f"key data_root, then {DEFAULT_DATA_ROOT})",
    )
    run.add_argument("--exp-root", default=None, help="overrides the config key exp_root")
    run.add_argument(
        "--exp-name",
        default=None,
        metavar="NAME",
        help="name of the experiment folder (default: config, model, fold, "
        "erasing, seed and start time)",
    )
    run.add_argument(
        "--crf",
        action="store_true",
        help="also score CRF-refined masks in the final evaluation (key crf)",
    )
    run.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an existing experiment folder",
    )
    run.add_argument(
        "--resume", default=None, metavar="EXP_DIR", help="resume the experiment stored in EXP_DIR"
    )
    run.add_argument(
        "--evaluate",
        default=None,
        metavar="EXP_DIR",
        help="evaluate the selected model of EXP_DIR again, without training; results in "
        "EXP_DIR/evaluation/",
    )
    run.add_argument(
        "--sets",
        type=set_list,
        default=None,
        help=f"with --evaluate: comma list of {','.join(EVALUATION_SETS)} (default test)",
    )
    return parser


def set_list(text: str) -> tuple[str, ...]:
    """``"test,valid"`` -> the evaluation sets in their fixed order, checked, for argparse."""
    names = {item.strip() for item in text.split(",") if item.strip()}
    unknown = sorted(names - set(EVALUATION_SETS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown sets {unknown}; expected some of {','.join(EVALUATION_SETS)}"
        )
    return tuple(name for name in EVALUATION_SETS if name in names)


def saved_config(args: argparse.Namespace) -> dict:
    """The configuration saved in the experiment folder of ``--resume`` or ``--evaluate``.

    Only the run options (``--cudaid``, ``--data-root``, ``--quiet``, ``--crf``) may change;
    the seed must stay the one the run started with.
    """
    flag, folder = ("--resume", args.resume) if args.resume else ("--evaluate", args.evaluate)
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{flag} {folder}: {path} not found; is it an experiment folder?")
    changed = [f"--{name}" for name in FLAG_KEYS if getattr(args, name) is not None]
    if args.yaml or args.set or args.exp_root or changed:
        raise ConfigError(
            f"{flag} reads the run's saved configuration; drop "
            + ", ".join(
                changed
                + ["--yaml"] * bool(args.yaml)
                + ["--set"] * bool(args.set)
                + ["--exp-root"] * bool(args.exp_root)
            )
        )
    config = load_config(path)
    saved_seed = config["MYSEED"]
    if resolve_seed(config, args.seed) != saved_seed:
        given = "--seed" if args.seed is not None else SEED_ENV
        raise ConfigError(
            f"{flag} {folder}: the run used seed {saved_seed} but "
            f"{given} = {config['MYSEED']}; drop it or set it to {saved_seed}"
        )
    config["data_root"] = resolve_data_root(config, args.data_root)
    config["cudaid"] = args.cudaid
    if args.crf:
        config["crf"] = True
    return config


def config_from_args(args: argparse.Namespace) -> dict:
    """The fully resolved configuration of a parsed command line (:func:`build_parser`).

    With ``--resume`` or ``--evaluate``: :func:`saved_config`. Otherwise the ``--yaml`` file with the flag and
    ``--set`` overrides applied (each logged as ``key: old -> new``), ``strict`` true unless
    ``--strict`` says otherwise, ``MYSEED`` by :func:`resolve_seed`, ``data_root`` by
    :func:`resolve_data_root`, ``exp_root`` from ``--exp-root`` if given, ``cudaid`` and
    ``yaml`` as given. Invalid values raise ``ConfigError`` (a ``ValueError``).
    """
    if args.resume and args.evaluate:
        raise ConfigError("--resume and --evaluate exclude each other; give one")
    if args.sets and not args.evaluate:
        raise ConfigError("--sets chooses the sets of --evaluate EXP_DIR; give --evaluate too")
    if args.resume or args.evaluate:
        return saved_config(args)
    if not args.yaml:
        raise ConfigError("--yaml NAME is required (a file of config_yaml/ or a path)")
    path = resolve_yaml_path(args.yaml)
    config = load_config(path)
    changes = [
        (dotted, getattr(args, flag), f"command line (--{flag})")
        for flag, (dotted, _) in FLAG_KEYS.items()
        if getattr(args, flag) is not None
    ]
    if args.crf:
        changes.append(("crf", True, "command line (--crf)"))
    origin = "command line (--set)"
    changes += [(dotted, parse_value(dotted, raw, origin), origin) for dotted, raw in args.set]
    source = display_path(path)
    config = override_values(config, changes, f"{source} with command-line overrides")
    if args.strict is None:
        if not config["strict"]:
            logger.warning(
                "strict = false in %s is ignored: checkpoints load strictly unless "
                "--strict false is given",
                source,
            )
        config["strict"] = True
    if args.exp_root is not None:
        config["exp_root"] = check_value(
            "exp_root", args.exp_root, SCHEMA["exp_root"].check, "command line (--exp-root)"
        )
    config["data_root"] = resolve_data_root(config, args.data_root)
    config["cudaid"] = args.cudaid
    config["yaml"] = args.yaml
    resolve_seed(config, args.seed)
    return config
