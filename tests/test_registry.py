"""The loss registry: register, create, list, helpful errors, and third-party plug-ins."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import timm_kd
from timm_kd.losses import (
    ENTRY_POINT_GROUP,
    DistillLoss,
    LossCard,
    create_loss,
    get_loss_card,
    is_loss,
    list_losses,
    register_loss,
)
from timm_kd.losses._registry import _loss_cards, _loss_entrypoints, _loss_to_module

BUILTIN = {"kd", "ats", "isats", "dtkd", "dkd", "dist", "lskd"}
#: each built-in loss's own paper: the first BibTeX key of its card
PRIMARY_KEY = {
    "kd": "hinton2015distilling",
    "ats": "li2022ats",
    "isats": "fan2024isats",
    "dtkd": "wei2024dtkd",
    "dkd": "zhao2022dkd",
    "dist": "huang2022dist",
    "lskd": "sun2024lskd",
}
CITATIONS = Path(__file__).resolve().parents[1] / "model_cards" / "citations.bib"


def test_builtins_registered_and_created_by_name():
    assert BUILTIN <= set(list_losses())
    for name in BUILTIN:
        loss = create_loss(name)
        assert isinstance(loss, torch.nn.Module)
        assert is_loss(name)


def test_top_level_exports():
    assert timm_kd.create_loss is create_loss
    assert timm_kd.list_losses is list_losses
    assert timm_kd.register_loss is register_loss


def test_list_filter():
    assert list_losses("*kd") == sorted(n for n in list_losses() if n.endswith("kd"))
    assert "kd" in list_losses("*kd")


def test_unknown_name_lists_known_and_suggests_close_match():
    with pytest.raises(ValueError) as e:
        create_loss("atss")
    msg = str(e.value)
    assert "unknown loss 'atss'" in msg
    assert "Did you mean 'ats'" in msg
    for name in BUILTIN:
        assert name in msg
    assert ENTRY_POINT_GROUP in msg


def test_kwargs_reach_the_loss():
    loss = create_loss("kd", tau=2.0, ce_weight=0.3, kd_weight=0.7)
    assert (loss.tau, loss.ce_weight, loss.kd_weight) == (2.0, 0.3, 0.7)


def test_unknown_keyword_names_the_loss_and_its_parameters():
    with pytest.raises(ValueError) as e:
        create_loss("ats", tau_wrnog=2.0, compile=True)
    msg = str(e.value)
    assert "'ats'" in msg and "'tau_wrnog'" in msg and "did you mean 'tau_wrong'" in msg
    for param in ("tau_correct", "tau_wrong", "student_tau", "kd_weight", "logit_standardize"):
        assert param in msg


def test_every_builtin_has_a_card_citing_known_keys():
    known = set(re.findall(r"^@\w+\{([^,\s]+),", CITATIONS.read_text(), flags=re.M))
    for name in BUILTIN:
        card = get_loss_card(name)
        assert isinstance(card, LossCard), name
        assert card.title and card.paper and card.summary and card.arxiv, name
        assert card.cites[0] == PRIMARY_KEY[name], name
        assert set(card.cites) <= known, (name, set(card.cites) - known)
    with pytest.raises(ValueError, match="unknown loss 'atss'"):
        get_loss_card("atss")


def test_card_given_at_registration_is_returned():
    def factory(**kwargs):
        return create_loss("kd", **kwargs)

    facts = {"title": "Test KD", "paper": "Nobody, 2099", "summary": "The student was tested.",
             "cites": ["nobody2099test"], "bibtex": "@misc{nobody2099test, title={Test}}"}
    try:
        register_loss("_test_with_card", card=facts)(factory)
        register_loss("_test_without_card")(factory)
        card = get_loss_card("_test_with_card")
        assert card == LossCard(**{**facts, "cites": ("nobody2099test",)})
        assert get_loss_card("_test_without_card") is None
        with pytest.raises(ValueError, match="unknown LossCard field"):
            register_loss("_test_bad_card", card={**facts, "venue": "x"})
        with pytest.raises(ValueError, match="title"):
            LossCard(title="", paper="p", summary="s")
    finally:
        for key in ("_test_with_card", "_test_without_card"):
            for table in (_loss_entrypoints, _loss_to_module, _loss_cards):
                table.pop(key, None)


def test_register_decorator_and_duplicate_name():
    @register_loss("_test_twice_ce")
    class TwiceCE(DistillLoss):
        name = "_test_twice_ce"

        def forward(self, student_logits, teacher_logits, target, *, epoch=None):
            x = self.prepare(student_logits, teacher_logits, target)
            ce = torch.nn.functional.cross_entropy(x.student, x.target)
            return {"loss": 2 * ce, "ce": ce.detach()}

    try:
        loss = create_loss("_test_twice_ce")
        s, t, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 4])
        out = loss(s, t, y)
        assert torch.allclose(out["loss"], 2 * torch.nn.functional.cross_entropy(s, y))
        with pytest.raises(ValueError, match="already registered"):
            register_loss("_test_twice_ce")(type("Other", (DistillLoss,), {}))
        register_loss("_test_twice_ce", overwrite=True)(TwiceCE)  # explicit replacement is allowed
    finally:
        for table in (_loss_entrypoints, _loss_to_module, _loss_cards):
            table.pop("_test_twice_ce", None)


@pytest.mark.slow
def test_entry_point_plugin_from_installed_package(tmp_path):
    """A real package, installed with pip into a target folder, adds a loss through the entry-point group."""
    src = tmp_path / "src"
    (src / "kd_plugin_demo").mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=64"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "kd-plugin-demo"
            version = "0.0.1"

            [project.entry-points."{ENTRY_POINT_GROUP}"]
            plugin_kd = "kd_plugin_demo:PluginKD"
            """
        )
    )
    (src / "kd_plugin_demo" / "__init__.py").write_text(
        textwrap.dedent(
            """
            import torch
            from timm_kd.losses import DistillLoss

            class PluginKD(DistillLoss):
                name = "plugin_kd"

                def __init__(self, scale=1.0, **kw):
                    super().__init__(**kw)
                    self.scale = scale

                def forward(self, student_logits, teacher_logits, target, *, epoch=None):
                    x = self.prepare(student_logits, teacher_logits, target)
                    mse = (x.student - x.teacher).pow(2).mean() * self.scale
                    return {"loss": mse, "mse": mse.detach()}
            """
        )
    )
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(src)],
        check=True,
    )
    code = textwrap.dedent(
        """
        import torch, timm_kd
        assert "plugin_kd" in timm_kd.list_losses(), timm_kd.list_losses()
        loss = timm_kd.create_loss("plugin_kd", scale=3.0)
        s, t = torch.ones(2, 4), torch.zeros(2, 4)
        out = loss(s, t, torch.tensor([0, 1]))
        print(type(loss).__module__, float(out["loss"]))
        """
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["kd_plugin_demo", "3.0"]
