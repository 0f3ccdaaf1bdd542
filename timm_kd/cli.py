"""The ``timm-kd`` command line: one subcommand per function, calling what the recipes call.

    timm-kd train [--recipe imagenet_ats|imagenet_dtkd|cifar100] <training flags>
    timm-kd diagnose --teacher MODEL --dataset DATA [--num-samples N] [--output-dir DIR]
    timm-kd rank-teachers --teachers A B ... --dataset DATA [--num-samples N] [--num-heldout N] [--tau T]
    timm-kd push RUN_DIR REPO [--private] [--token TOKEN] [--commit-message MSG] [--model-name NAME]
    timm-kd list-losses [-v] [FILTER]
    timm-kd cache-teacher --cache-dir DIR [--num-views N] [--top-k K] [--shard-size S] <training flags>

``train`` runs on many processes as ``accelerate launch -m timm_kd.cli train ...`` (or
``accelerate launch -m timm_kd train ...``). Building the parser imports no torch, timm or datasets
(``timm_kd.engine.config``/``args`` do not): ``--help`` answers at once, and each subcommand imports
what it needs when it runs.

To add a subcommand, write ``_add_<name>(subparsers, argv)`` that registers its parser with
``set_defaults(func=<function taking the parsed args, returning an exit code>)`` and append it to
``SUBCOMMANDS``. Errors that mean bad input or a stopped run (``USER_ERRORS``: ``ValueError``,
missing files, a diverged run, a broken teacher, a failed push...) print one line,
``timm-kd COMMAND: error: ...``, without a traceback, and exit with status 2; any other exception
keeps its traceback (a bug to report). ``exit_on_error`` gives the recipes the same behaviour.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .engine.args import HelpFormatter, add_train_args
from .engine.cache_args import add_cache_args
from .engine.recipes import RECIPES, recipe_defaults
from .version import __version__

__all__ = ["main", "build_parser", "SUBCOMMANDS", "exit_on_error", "is_user_error", "USER_ERRORS"]

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


def _add_push(subparsers: argparse._SubParsersAction, argv: Sequence[str]) -> None:
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


def _loss_line(name: str) -> str:
    """``name  Title (Paper, arXiv:id)`` and, indented, its defaults (``-v``)."""
    from .losses import get_loss_card, get_loss_entrypoint

    card = get_loss_card(name)
    title = "(no card)" if card is None else f"{card.title} ({card.paper}" + (
        f", arXiv:{card.arxiv})" if card.arxiv else ")"
    )
    params = inspect.signature(get_loss_entrypoint(name)).parameters.values()
    defaults = " ".join(
        f"{p.name}={p.default!r}"
        for p in params
        if p.default is not inspect.Parameter.empty and p.name != "check_inputs"
    )
    return f"{name:<8} {title}\n{'':<8} defaults: {defaults or '(none)'}"


def cmd_list_losses(args: argparse.Namespace) -> int:
    from .losses import list_losses

    for name in list_losses(args.filter):
        print(_loss_line(name) if args.verbose else name)
    return 0


def _add_list_losses(subparsers: argparse._SubParsersAction, argv: Sequence[str]) -> None:
    p = subparsers.add_parser(
        "list-losses",
        help="list the registered distillation losses (-v: papers and defaults)",
        description="Print the names create_loss() and --method accept, built-in and plug-in, one per "
        "line; with -v also each loss's paper and its hyper-parameters' defaults (--loss-arg KEY=VALUE).",
    )
    p.add_argument("filter", nargs="?", default="", help="wildcard filter, e.g. '*kd'")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each loss's paper and defaults")
    p.set_defaults(func=cmd_list_losses)


# --------------------------------------------------------------------------------------------------
# cache-teacher
# --------------------------------------------------------------------------------------------------


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from .engine import build_cache_from_args, config_from_args

    build_cache_from_args(config_from_args(args), args)  # prints what the cache holds
    return 0


def _add_cache_teacher(subparsers: argparse._SubParsersAction, argv: Sequence[str]) -> None:
    from .engine import HelpFormatter, add_cache_args, add_train_args

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
            "resumes it, and rerunning any verifies every shard (size, SHA-256) and rebuilds the damaged "
            "ones. Then train with --teacher-cache DIR: no teacher in memory. The defaults here are the "
            "engine's: to build the cache of a recipe with exactly its flags, run the recipe with "
            "--build-teacher-cache DIR."
        ),
    )
    add_cache_args(p, dir_flag="--cache-dir")  # --cache-dir, --num-views, --top-k, --shard-size, --overwrite
    add_train_args(p)
    p.set_defaults(func=cmd_cache_teacher)


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


def _train_defaults(argv: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """The recipe and the defaults ``train``'s flags show: ``--recipe`` and ``--method`` are read
    first (from the words after ``train``), because they choose the defaults of the others."""
    words = list(argv)
    words = words[words.index("train") + 1 :] if "train" in words else []
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None, choices=list(RECIPES))
    pre.add_argument("--method", default=None)
    known, _ = pre.parse_known_args(words)
    if known.recipe is None:
        return None, {} if known.method is None else {"method": known.method}
    return known.recipe, recipe_defaults(known.recipe, known.method)


def add_teacher_stage_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the teacher a recipe without one trains first (``timm_kd.engine.teacher_stage``)."""
    group = parser.add_argument_group("teacher training (when no trained teacher is given)")
    group.add_argument("--teacher-arch", default="resnet50", help="timm architecture of the teacher to train")
    group.add_argument("--teacher-epochs", type=int, default=240, help="epochs of the teacher's CE training")


def cmd_train(args: argparse.Namespace) -> int:
    from . import engine, hub

    config = engine.config_from_args(args)
    if args.build_teacher_cache:  # the teacher cache this run would train from, then stop
        engine.build_cache_from_args(config, args)
        return 0
    if args.push_to_hub:
        hub.check_push_ready(args.push_to_hub)  # fails now, not after training
    teacher_config, config = engine.teacher_stage(
        config, getattr(args, "teacher_arch", None), getattr(args, "teacher_epochs", None)
    )
    if teacher_config is not None:
        engine.fit(teacher_config)
    result = engine.fit(config)
    if args.push_to_hub:
        engine.publish(result, args.push_to_hub, private=args.hub_private)
    return 0


def _add_train(subparsers: argparse._SubParsersAction, argv: Sequence[str]) -> None:
    recipe, defaults = _train_defaults(argv)
    p = subparsers.add_parser(
        "train",
        help="train a student: distill from a teacher (or --method ce); --recipe picks a paper's defaults",
        formatter_class=HelpFormatter,
        description=(
            "The training engine with every flag of the recipes (timm_kd.engine.fit): checks, the teacher "
            "check, training with per-epoch evaluation and checkpoints (--resume latest continues), the "
            "student saved in timm's format to OUTPUT_DIR/student, optionally pushed to the Hub.\n\n"
            "--recipe chooses the defaults (shown by `timm-kd train --recipe NAME --help`):\n"
            "  imagenet_ats   ImageNet-1k, ResNet-50 -> ResNet-18, ATS (recipes/imagenet_ats.py)\n"
            "  imagenet_dtkd  ImageNet-1k, ResNet-50 -> ResNet-18, DTKD (recipes/imagenet_dtkd.py)\n"
            "  cifar100       CIFAR-100 with the papers' schedule per --method; without a trained teacher it "
            "trains one first (recipes/cifar100.py)\n"
            "Without --recipe the defaults are TrainConfig's. On many GPUs: accelerate launch -m "
            "timm_kd.cli train ..."
        ),
    )
    p.add_argument(
        "--recipe", default=recipe, choices=list(RECIPES), help="the recipe whose defaults the flags take"
    )
    add_train_args(p, **defaults)
    add_cache_args(p)  # --build-teacher-cache DIR, as the recipes have it
    if recipe is not None and defaults.get("teacher") is None:
        add_teacher_stage_args(p)
    p.set_defaults(func=cmd_train)


# --------------------------------------------------------------------------------------------------
# diagnose
# --------------------------------------------------------------------------------------------------

#: the ``TrainConfig`` groups ``diagnose`` takes: what the teacher and its data are
DIAGNOSE_GROUPS = ("models", "data", "transforms and augmentation (timm)")


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .engine import config_from_args
    from .engine.diagnose import diagnose_teacher

    record = diagnose_teacher(
        config_from_args(args), args.output_dir, num_samples=args.num_samples, batch_size=args.batch_size
    )
    print(
        f"teacher {record['teacher']} on {record['num_samples']} images of {record['dataset']}"
        f"[{record['split']}] ({record['num_classes']} classes): top-1 {record['teacher_top1']:.2f}%"
    )
    print(record["table"])
    s = record["suggestion"]
    if s is None:
        print(f"no temperature suggestion: {record['no_suggestion']}")
    else:
        print(
            f"suggested ATS temperatures: tau_correct={s['tau_correct']:g} tau_wrong={s['tau_wrong']:g} "
            f"(label probability {s['label_prob']:.3f}, induced flips {s['induced_flip']:.2%}; the "
            f"authors' 4/3 flip {record['stats_authors']['induced_flip']:.2%})"
        )
        print(f"  {s['reason']}")
        flags = f"--loss-arg tau_correct={s['tau_correct']:g} --loss-arg tau_wrong={s['tau_wrong']:g}"
        print(f"  train with: --method ats {flags}")
    print(f"plot: {record['plot']}\nrecord: {record['json']}")
    return 0


def _add_diagnose(subparsers: argparse._SubParsersAction, argv: Sequence[str]) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="a teacher's wrong-class statistics and suggested ATS temperatures, from a sample of the data",
        formatter_class=HelpFormatter,
        description=(
            "Run the teacher (evaluation transform, no augmentation) over a seeded sample of the training "
            "split, then print the ATS paper's wrong-class statistics over a temperature sweep (Figure 7) "
            "and timm_kd.diagnostics.suggest_ats_temperatures' (tau_correct, tau_wrong) with its reason. "
            "Saves OUTPUT_DIR/temperature_sweep.png (the chosen temperatures marked) and "
            "OUTPUT_DIR/diagnose.json. The data and teacher flags are those of `timm-kd train`."
        ),
    )
    g = p.add_argument_group("diagnose")
    g.add_argument("--num-samples", type=int, default=2000, help="training images the teacher sees")
    g.add_argument("--batch-size", type=int, default=64, help="teacher batch size")
    g.add_argument("--output-dir", default="runs/diagnose", help="folder for the plot and the JSON record")
    add_train_args(p, only_groups=DIAGNOSE_GROUPS)
    p.set_defaults(func=cmd_diagnose)


# --------------------------------------------------------------------------------------------------
# rank-teachers
# --------------------------------------------------------------------------------------------------


def _train_with(row: dict[str, Any]) -> str:
    """The ``timm-kd train`` flags of a ranked teacher and its suggested method."""
    if row["method"] == "none":
        return "--method ce (the student alone)"
    flags = f"--teacher {row['teacher']}"
    if row.get("teacher_checkpoint"):
        flags += f" --teacher-checkpoint {row['teacher_checkpoint']}"
    flags += f" --method {row['method']}"
    return flags + "".join(f" --loss-arg {k}={v:g}" for k, v in row["method_kwargs"].items())


def cmd_rank_teachers(args: argparse.Namespace) -> int:
    from .engine import config_from_args
    from .engine.diagnose import RANK_JSON, RANK_PLOT, rank_teacher_candidates
    from .ranking import format_ranking_table

    if args.teacher is not None:
        raise ValueError("rank-teachers takes its candidates from --teachers A B ...; drop --teacher")
    config = config_from_args(args)
    rows = rank_teacher_candidates(
        config,
        args.teachers,
        args.output_dir,
        num_samples=args.num_samples,
        num_heldout=args.num_heldout,
        batch_size=args.batch_size,
        tau=args.tau,
    )
    out = Path(args.output_dir)
    record = json.loads((out / RANK_JSON).read_text(encoding="utf-8"))
    print(
        f"{len(rows)} teachers on {rows[0]['num_train']} images of {config.dataset}[{record['split']}] and "
        f"{rows[0]['num_heldout']} held-out images ({record['heldout_split']}), tau {args.tau:g}"
    )
    print(format_ranking_table(rows))
    for r in rows:
        print(f"{r['rank']}. {r['name']}: {r['method']}: {r['method_reason']}")
        print(f"   train with: {_train_with(r)}")
        if r.get("ats_alternative"):
            alt = {**r, "method": "ats", "method_kwargs": r["ats_alternative"]}
            print(f"   or with ATS at this teacher's suggested temperatures: {_train_with(alt)}")
    print(f"plot: {out / RANK_PLOT}\nrecord: {out / RANK_JSON}")
    return 0


def _add_rank_teachers(subparsers: argparse._SubParsersAction, argv: Sequence[str]) -> None:
    p = subparsers.add_parser(
        "rank-teachers",
        help="rank candidate teachers by a score that predicts how well each teaches, before training",
        formatter_class=HelpFormatter,
        description=(
            "Run each candidate teacher (evaluation transform) once over a seeded sample of the training "
            "split and once over held-out images (--val-split, or --val-fraction of the training split), "
            "then print timm_kd.ranking's statistics (held-out top-1, NLL and calibration error; "
            "training-set max probability, wrong-class spread and dark knowledge at --tau), the score "
            "score = held-out top-1 x dark knowledge (higher predicts a better KD student; "
            "docs/ranking.md), the rank, and a suggested method with the flags to train with it. Saves "
            "OUTPUT_DIR/rank_teachers.json and OUTPUT_DIR/rank_teachers.png (score against held-out "
            "top-1). The data flags are those of `timm-kd train`; the teacher input flags apply to "
            "every candidate."
        ),
    )
    g = p.add_argument_group("rank-teachers")
    g.add_argument(
        "--teachers",
        nargs="+",
        required=True,
        metavar="TEACHER",
        help="the candidates: timm names with their pretrained tag, hf-hub:org/name, local-dir:FOLDER, a "
        "model or run folder, or ARCH=WEIGHTS.safetensors",
    )
    g.add_argument("--num-samples", type=int, default=2000, help="training images each teacher sees")
    g.add_argument("--num-heldout", type=int, default=2000, help="held-out images each teacher sees")
    g.add_argument(
        "--tau", type=float, default=4.0, help="temperature of the training-set statistics (KD's 4)"
    )
    g.add_argument("--batch-size", type=int, default=64, help="teacher batch size")
    g.add_argument(
        "--output-dir", default="runs/rank_teachers", help="folder for the plot and the JSON record"
    )
    add_train_args(p, only_groups=DIAGNOSE_GROUPS, teacher=None)  # the candidates are --teachers
    p.set_defaults(func=cmd_rank_teachers)


# --------------------------------------------------------------------------------------------------
# errors, parser, entry point
# --------------------------------------------------------------------------------------------------

#: exceptions that mean bad input or a run stopped on purpose: one line, exit status 2. By module,
#: so that none is imported for this: an exception of a module never loaded cannot have been raised.
USER_ERRORS: dict[str, tuple[str, ...]] = {
    "builtins": ("ValueError", "FileNotFoundError", "FileExistsError", "NotADirectoryError"),
    "timm_kd.engine.config": ("TrainingDivergedError", "BrokenTeacherError"),
    "timm_kd.engine.checkpoint": ("CheckpointError", "CheckpointWriteError"),
    "timm_kd.engine.processes": ("OutputDirBusyError", "RunStoppedError"),
    "timm_kd.hub.push": ("HubPushError",),
    "timm_kd.offline": ("HubUnreachableError",),
}
USER_ERROR_STATUS = 2


def _raised_by_us(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is timm-kd's code or a recipe script."""
    tb = error.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if Path(__file__).resolve().parent in path.parents:
        return True
    return main is not None and path == Path(main).resolve()


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is one of ``USER_ERRORS`` (its message is the whole story).

    timm-kd's own error classes always are; a builtin ``ValueError`` or missing-file error only when
    timm-kd's code (or the recipe script) raised it: one raised inside torch, timm or datasets is a
    bug to report and keeps its traceback.
    """
    for module_name, names in USER_ERRORS.items():
        module = sys.modules.get(module_name)
        kinds = tuple(k for k in (getattr(module, n, None) for n in names) if isinstance(k, type))
        if kinds and isinstance(error, kinds):
            return module_name != "builtins" or _raised_by_us(error)
    return False


def report_user_error(prog: str, error: BaseException) -> int:
    """Print ``prog: error: message`` on stderr (prefixed with the rank when several processes run);
    returns the exit status."""
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    prefix = f"[rank {rank}] " if rank is not None else ""
    print(f"{prefix}{prog}: error: {error}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def exit_on_error(func: Callable[[], Any], prog: str) -> int:
    """Run ``func()`` (a recipe's ``main``): 0, or a user error's one line and status 2; other
    exceptions propagate with their traceback. ``sys.exit(exit_on_error(main, "cifar100.py"))``."""
    try:
        func()
    except Exception as e:
        if not is_user_error(e):
            raise
        return report_user_error(prog, e)
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction, Sequence[str]], None]] = [
    _add_train,
    _add_diagnose,
    _add_rank_teachers,
    _add_push,
    _add_list_losses,
    _add_cache_teacher,
]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``timm-kd`` parser; ``argv`` (default: none) lets ``train`` show a recipe's defaults."""
    parser = argparse.ArgumentParser(
        prog="timm-kd",
        description="Knowledge distillation for timm models: train students, diagnose and rank teachers, "
        "publish students, inspect the loss registry. `timm-kd COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"timm-kd {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers, list(argv or []))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader left (`timm-kd list-losses -v | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if not is_user_error(e):
            raise
        return report_user_error(f"timm-kd {args.command}", e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
