"""The command-line flags of a teacher-cache build, shared by ``timm-kd cache-teacher`` and the recipes.

    parser = argparse.ArgumentParser()
    add_train_args(parser, **defaults)
    add_cache_args(parser)                       # --build-teacher-cache DIR, --num-views, --top-k, ...
    args = parser.parse_args()
    if args.build_teacher_cache:                 # build the cache this run would train from, then stop
        build_cache_from_args(config_from_args(args), args)

A recipe that builds its own cache gives the build exactly the data, transform, teacher and seed
defaults its training run uses, so the run accepts the cache (``--teacher-cache DIR`` with the same
flags). Like ``config`` and ``args``, this module imports no torch.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_cache_args", "cache_build_kwargs"]


def add_cache_args(parser: argparse.ArgumentParser, *, dir_flag: str = "--build-teacher-cache") -> None:
    """Add the build flags: the cache folder (``dir_flag``: a recipe's optional
    ``--build-teacher-cache DIR``, or ``--cache-dir`` required, as ``timm-kd cache-teacher`` has
    it), ``--num-views``, ``--top-k``, ``--shard-size`` and ``--overwrite``."""
    g = parser.add_argument_group("cache" if dir_flag == "--cache-dir" else "teacher cache (build)")
    if dir_flag == "--cache-dir":
        g.add_argument("--cache-dir", required=True, help="folder to write the cache to (created)")
    else:
        g.add_argument(
            dir_flag,
            metavar="DIR",
            default=None,
            help="build the teacher cache this run would train from (the run's teacher, data, transform "
            "and seed flags) into DIR, then exit without training; then train with --teacher-cache DIR "
            "and the same flags. Rerunning it resumes an interrupted build and rebuilds damaged shards",
        )
    g.add_argument("--num-views", type=int, default=10, help="augmented views per image (>= the epochs)")
    g.add_argument("--top-k", type=int, default=10, help="teacher logits kept per view")
    g.add_argument("--shard-size", type=int, default=10_000, help="images per parquet shard")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a teacher cache built with other settings in the folder (its files only) instead of "
        "refusing it",
    )


def cache_build_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``build_teacher_cache`` keyword arguments of parsed ``add_cache_args`` flags."""
    return {
        "num_views": args.num_views,
        "top_k": args.top_k,
        "shard_size": args.shard_size,
        "overwrite": bool(getattr(args, "overwrite", False)),
    }
