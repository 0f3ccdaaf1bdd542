"""A recipe's loss defaults belong to its own loss: every ImageNet recipe runs with every loss.

The parsers are the recipes' own (captured at their ``parse_args``, as ``test_options`` does); no
data is read and nothing trains: ``check_config`` creates the loss from the parsed arguments."""

from __future__ import annotations

import pytest
from test_options import recipe_parser

from timm_kd import engine, list_losses

IMAGENET_RECIPES = {"imagenet_ats.py": "ats", "imagenet_dtkd.py": "dtkd"}


def _config(script: str, argv: list[str]) -> engine.TrainConfig:
    return engine.config_from_args(recipe_parser(script, argv).parse_args(argv))


@pytest.mark.parametrize("script", list(IMAGENET_RECIPES))
def test_imagenet_recipe_accepts_every_registered_loss(script):
    own = IMAGENET_RECIPES[script]
    own_defaults = _config(script, []).loss_kwargs
    assert _config(script, []).method == own and own_defaults  # the recipe's loss keeps its defaults
    for method in [*list_losses(), "ce"]:
        config = _config(script, ["--method", method])
        engine.check_config(config)  # creates the loss from the parsed arguments
        assert config.loss_kwargs == (own_defaults if method == own else {}), method


def test_a_users_loss_arguments_still_apply_to_another_method():
    config = _config("imagenet_ats.py", ["--method", "kd", "--loss-arg", "tau=2"])
    assert config.method == "kd" and config.loss_kwargs == {"tau": 2}
    engine.check_config(config)
    config = _config("imagenet_dtkd.py", ["--loss-arg", "tau=2"])  # over the recipe's own defaults
    assert config.loss_kwargs["tau"] == 2 and config.loss_kwargs["dtkd_weight"] == 3.0
