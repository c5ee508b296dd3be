"""Façade of the training driver: the command line (:func:`get_yaml_args`) and the dense CRF
(:class:`CRF`, from :mod:`deepmil.crf`)."""

from __future__ import annotations

import argparse

from deepmil.cli import build_parser, config_from_args
from deepmil.crf import CRF

__all__ = ["CRF", "get_yaml_args"]


def get_yaml_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """Parse the command line and return ``(config, args)``: the flags are those of
    :func:`deepmil.cli.build_parser`, the resolution that of :func:`deepmil.cli.config_from_args`."""
    args = build_parser().parse_args(argv)
    return config_from_args(args), args
