"""Every training option once: the parsers generated from ``TrainConfig`` keep each recipe's flags.

``tests/data/help_golden.json`` holds, for every recipe and for ``timm-kd cache-teacher``, each flag
with its destination, default, choices, action kind, group and metavar, as the hand-written parsers
produced them before the parser was generated from the dataclass. Regenerate it only on purpose::

    python tests/test_options.py --write
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "help_golden.json"
RECIPES = ["quickstart.py", "imagenet_ats.py", "imagenet_dtkd.py", "cifar100.py", "capacity_study.py"]
# (name in the golden file, recipe file, extra argv): cifar100 picks its defaults from --method
PARSERS = [(name, name, []) for name in RECIPES] + [
    ("cifar100.py --method dtkd", "cifar100.py", ["--method", "dtkd"])
]


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _jsonable(value):
    """Defaults as JSON (tuples become lists), a function as its name, anything else as its repr."""
    if callable(value):
        return getattr(value, "__name__", repr(value))
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    try:
        return json.loads(json.dumps(value))
    except TypeError:
        return repr(value)


def describe(parser: argparse.ArgumentParser) -> dict:
    """Flags (by their first option string) -> what the user sees of them, plus ``set_defaults``."""
    group_of = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            group_of[id(action)] = group.title
    flags = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        key = action.option_strings[0] if action.option_strings else action.dest
        flags[key] = {
            "option_strings": list(action.option_strings),
            "dest": action.dest,
            "default": _jsonable(action.default),
            "choices": None if action.choices is None else _jsonable(list(action.choices)),
            "action": type(action).__name__,
            "nargs": action.nargs,
            "required": action.required,
            "metavar": action.metavar,
            "group": group_of.get(id(action)),
        }
    return {"flags": flags, "set_defaults": _jsonable(dict(sorted(parser._defaults.items())))}


def recipe_parser(script: str, argv: list[str]) -> argparse.ArgumentParser:
    """The parser ``recipes/<script>``'s ``main()`` builds, captured at its ``parse_args``."""
    spec = importlib.util.spec_from_file_location(f"_recipe_{script[:-3]}", ROOT / "recipes" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    with (
        mock.patch.object(sys, "argv", [script, *argv]),
        mock.patch.object(argparse.ArgumentParser, "parse_args", capture),
    ):
        try:
            module.main()
        except _Captured as c:
            return c.parser
    raise AssertionError(f"recipes/{script} did not parse arguments")


def cli_parser(command: str) -> argparse.ArgumentParser:
    from timm_kd.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {name: recipe_parser(script, argv) for name, script, argv in PARSERS}
    parsers["timm-kd cache-teacher"] = cli_parser("cache-teacher")
    return parsers


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def current():
    return {name: describe(p) for name, p in all_parsers().items()}


@pytest.mark.parametrize("name", [p[0] for p in PARSERS] + ["timm-kd cache-teacher"])
def test_same_flags_defaults_and_choices(name, golden, current):
    want, got = golden[name], current[name]
    assert list(got["flags"]) == list(want["flags"]), "flags added, removed or reordered"
    for flag, w in want["flags"].items():
        assert got["flags"][flag] == w, flag
    assert got["set_defaults"] == want["set_defaults"]


# --------------------------------------------------------------------------------------------------
# one declaration per option: the dataclass metadata feeds the parser and check_config


def test_every_field_is_an_option_with_group_and_help():
    from timm_kd.engine import TrainConfig

    parser = cli_parser("cache-teacher")
    text = parser.format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("group") and f.metadata.get("help"), f.name
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert flag in text, flag
    for title in ("models", "distillation method", "data", "optimization (timm factories)", "publishing"):
        assert f"\n{title}:" in text, title


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("teacher_check", "maybe", ["--teacher-check must be 'auto' (default), 'error', 'warn' or 'off'"]),
        ("teacher_cache_tail", "shaped", ["--teacher-cache-tail must be 'prior' (default) or 'flat'"]),
        ("mixed_precision", "fp32", ["--mixed-precision must be 'no', 'fp16' or 'bf16', got 'fp32'"]),
        ("clip_mode", "max", ["--clip-mode must be"]),
    ],
)
def test_check_config_reads_the_choices_from_the_fields(field, value, words):
    from timm_kd.engine import TrainConfig, check_config

    config = TrainConfig(method="ce", student="test_resnet")
    check_config(config)  # the defaults (None for mixed precision) pass
    with pytest.raises(ValueError) as info:
        check_config(TrainConfig(method="ce", student="test_resnet", **{field: value}))
    for w in words:
        assert w in str(info.value), str(info.value)


def test_a_loss_arg_typo_fails_before_any_data_is_read(monkeypatch, tmp_path):
    """--loss-arg goes to create_loss in check_config: a typo names the loss's parameters before
    the dataset is opened (here opening it would fail the test)."""
    import timm_kd.data
    from timm_kd import engine

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was read before the loss arguments were checked")

    monkeypatch.setattr(timm_kd.data, "load_image_dataset", no_data)
    parser = engine.add_train_args(argparse.ArgumentParser(), method="ats", loss_kwargs={"tau_correct": 4.0})
    args = parser.parse_args(
        [
            "--loss-arg",
            "tau_wrongg=2",
            "--teacher",
            "test_resnet",
            "--student",
            "test_resnet",
            "--dataset",
            "embedded",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    with pytest.raises(ValueError) as info:
        engine.fit(args)
    msg = str(info.value)
    assert "'ats'" in msg and "tau_wrongg" in msg and "tau_correct" in msg, msg
    assert not (tmp_path / "run").exists()
    # a good argument passes the same check, and the recipe's defaults are kept under the flags
    config = engine.config_from_args(parser.parse_args(["--loss-arg", "tau_wrong=2"]))
    assert config.loss_kwargs == {"tau_correct": 4.0, "tau_wrong": 2}
    engine.check_config(dataclasses.replace(config, teacher="test_resnet", student="test_resnet"))


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("pass --write to overwrite tests/data/help_golden.json")
    sys.path.insert(0, str(ROOT))
    out = {name: describe(p) for name, p in all_parsers().items()}
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}: " + ", ".join(f"{k} ({len(v['flags'])} flags)" for k, v in out.items()))
