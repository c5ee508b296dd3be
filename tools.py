"""Command-line helpers of the training driver."""
from __future__ import annotations

import argparse

from deepmil.config import build_parser, config_from_args


def get_yaml_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """Parse the command line and return ``(config, args)``.

    ``--yaml NAME`` (required) is a file name in ``config_yaml/`` or a path. The original
    override flags are kept: ``--bsize --lr --momentum --wdecay --stepsize --epoch --fold --split
    --alpha --kmax --kmin --dout --modalities --pretrained --w --modelname --nbrerase --epocherase
    --path_pre_trained --strict`` (booleans accept true/false, 1/0, yes/no), and
    ``--set section.key=value`` (repeatable, value read as YAML) overrides any key.
    ``--cudaid`` is ``cpu``, a GPU index or a comma list (default: automatic).

    The returned config is validated and resolved: overrides applied (each logged as
    ``key: old -> new``), ``strict`` true unless ``--strict`` says otherwise, ``MYSEED`` from the
    environment variable (else the config value, 0), ``data_root`` from ``--data-root`` >
    ``$DEEPMIL_DATA_ROOT`` > the config key > ``./data``, ``exp_root`` from ``--exp-root`` if
    given, ``cudaid`` and ``yaml`` as given on the command line. ``args`` also carries the run
    options ``data_root``, ``exp_root``, ``quiet``, ``overwrite`` and ``resume`` (as typed).
    Invalid values raise ``deepmil.config.ConfigError`` (a ``ValueError``); malformed flags exit
    through argparse.
    """
    args = build_parser().parse_args(argv)
    return config_from_args(args), args
