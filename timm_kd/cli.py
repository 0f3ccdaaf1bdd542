"""The ``timm-kd`` command line: one subcommand per function, calling what the recipes call.

    timm-kd push RUN_DIR REPO [--private] [--token TOKEN] [--commit-message MSG] [--model-name NAME]
    timm-kd list-losses [FILTER]
    timm-kd cache-teacher --cache-dir DIR [--num-views N] [--top-k K] [--shard-size S] <training flags>

To add a subcommand, write ``_add_<name>(subparsers)`` that registers its parser with
``set_defaults(func=<function taking the parsed args, returning an exit code>)`` and append it to
``SUBCOMMANDS``. Errors that mean bad input (``ValueError``, ``FileNotFoundError``,
:class:`~timm_kd.hub.HubPushError`) are printed as one line, without a traceback, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

RUN_STUDENT_DIR = "student"
RUN_SUMMARY_FILE = "run_summary.json"


# --------------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------------


def _read_run(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The run's ``student/`` folder and its card metadata from ``run_summary.json``."""
    from .hub import META_KEYS

    expected = f"a finished training run's output folder, holding {RUN_STUDENT_DIR}/ and {RUN_SUMMARY_FILE}"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; pass {expected}")
    student = run_dir / RUN_STUDENT_DIR
    summary_file = run_dir / RUN_SUMMARY_FILE
    missing = [p.name + ("/" if p == student else "") for p in (student, summary_file) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} has no {' and no '.join(missing)}: expected {expected}. A run writes them when it "
            "finishes; resume an interrupted run to completion first"
        )
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{summary_file} is not valid JSON ({e}); it is written by the training run"
        ) from None
    if not isinstance(summary, dict):
        raise ValueError(f"{summary_file} must hold a JSON object with the run's metadata")
    # the summary also holds run details (history, timings...) that are not card metadata
    meta = {k: summary[k] for k in META_KEYS if summary.get(k) is not None}
    return student, meta


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub, validate_repo_id

    validate_repo_id(args.repo)  # before reading anything
    student, meta = _read_run(Path(args.run_dir))
    meta["model_name"] = args.model_name or args.repo.split("/")[-1]
    info = push_to_hub(
        student,
        args.repo,
        token=args.token,
        private=args.private,
        commit_message=args.commit_message,
        **meta,
    )
    print(f"pushed {student} to {args.repo}: {getattr(info, 'commit_url', info)}")
    print(f'load it with: timm.create_model("hf-hub:{args.repo}", pretrained=True)')
    if not meta.get("metrics"):
        print("note: the run reported no evaluation; the card says the model was not evaluated")
    return 0


def _add_push(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="publish a finished run's student to the Hugging Face Hub",
        description=(
            "Upload RUN_DIR/student/ (timm format: config.json, model.safetensors) with a model card "
            "rendered from RUN_DIR/run_summary.json to the Hub repository REPO, in one commit. The "
            "repository is created if needed; a later push updates it, card included. Afterwards "
            'anyone with timm can run timm.create_model("hf-hub:REPO", pretrained=True).'
        ),
        epilog=(
            "The token comes from --token, else HF_TOKEN, else `hf auth login`; it is never printed or "
            "written. HF_ENDPOINT selects another Hub."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of a finished training run")
    p.add_argument("repo", metavar="REPO", help="Hub repository id, 'namespace/name'")
    p.add_argument("--private", action="store_true", help="create the repository as private (new repos only)")
    p.add_argument(
        "--token",
        default=None,
        help="Hub token with write access (default: HF_TOKEN or the `hf auth login` token; prefer those, "
        "a token on the command line lands in your shell history)",
    )
    p.add_argument("--commit-message", default=None, help="commit message (default: 'Upload NAME ...')")
    p.add_argument(
        "--model-name", default=None, help="name in the card and its model-index (default: REPO's name)"
    )
    p.set_defaults(func=cmd_push)


# --------------------------------------------------------------------------------------------------
# list-losses
# --------------------------------------------------------------------------------------------------


def cmd_list_losses(args: argparse.Namespace) -> int:
    from .losses import list_losses

    for name in list_losses(args.filter):
        print(name)
    return 0


def _add_list_losses(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "list-losses",
        help="list the registered distillation losses",
        description="Print the names create_loss() accepts, built-in and plug-in, one per line.",
    )
    p.add_argument("filter", nargs="?", default="", help="wildcard filter, e.g. '*kd'")
    p.set_defaults(func=cmd_list_losses)


# --------------------------------------------------------------------------------------------------
# cache-teacher
# --------------------------------------------------------------------------------------------------


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from .engine import build_teacher_cache, config_from_args

    manifest = build_teacher_cache(
        config_from_args(args),
        args.cache_dir,
        num_views=args.num_views,
        top_k=args.top_k,
        shard_size=args.shard_size,
    )
    if manifest.get("complete"):
        print(
            f"teacher cache {args.cache_dir}: {manifest['num_rows']} views ({manifest['num_images']} "
            f"images x {manifest['num_views']}), top-{manifest['top_k']} logits, "
            f"{manifest['bytes_per_view']:.1f} bytes "
            f"per view, teacher top-1 on the views {manifest['teacher_view_top1']:.2f}%"
        )
        print(f"train from it with: --teacher-cache {args.cache_dir} (and the same data/transform flags)")
    return 0


def _add_cache_teacher(subparsers: argparse._SubParsersAction) -> None:
    from .engine import HelpFormatter, add_train_args

    p = subparsers.add_parser(
        "cache-teacher",
        help="run the teacher once over N augmented views per image and store its top-k logits",
        formatter_class=HelpFormatter,
        description=(
            "FKD-style teacher-output cache (docs/cache.md). Give the flags of the training run that will "
            "use it (teacher, dataset, transform, seed); the cache stores, per view, the crop/flip/jitter "
            "parameters and the teacher's top-k logits (fp16) in parquet shards loadable with "
            "datasets.load_dataset(DIR). View v is the view online training draws in epoch v. Under "
            "`accelerate launch` each process writes its own shards; rerunning an interrupted command "
            "resumes it. Then train with --teacher-cache DIR: no teacher in memory."
        ),
    )
    g = p.add_argument_group("cache")
    g.add_argument("--cache-dir", required=True, help="folder to write the cache to (created)")
    g.add_argument("--num-views", type=int, default=10, help="augmented views per image (>= the epochs)")
    g.add_argument("--top-k", type=int, default=10, help="teacher logits kept per view")
    g.add_argument("--shard-size", type=int, default=10_000, help="images per parquet shard")
    add_train_args(p)
    p.set_defaults(func=cmd_cache_teacher)


# --------------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_push,
    _add_list_losses,
    _add_cache_teacher,
]


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="timm-kd",
        description="Knowledge distillation for timm models: publish students, inspect the loss registry.",
    )
    parser.add_argument("--version", action="version", version=f"timm-kd {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .hub import HubPushError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, HubPushError) as e:
        print(f"timm-kd {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
