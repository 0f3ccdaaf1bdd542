"""Publishing students: timm's Hub format, the model card, push through a stand-in Hub, the CLI.

The Hub itself cannot run here, so ``_hub_server.StandInHub`` serves its HTTP API on 127.0.0.1 and
the real huggingface_hub client talks to it (``HF_ENDPOINT`` in subprocesses, a patched
``huggingface_hub.constants`` in this process). Loading is checked in fresh processes that
import only timm.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import textwrap
import time
import traceback
import uuid
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from _hub_server import StandInHub, git_blob_oid
from huggingface_hub import ModelCard
from huggingface_hub.utils import _http as hf_http
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

import timm_kd
from timm_kd import hub as kd_hub
from timm_kd import models as kd_models
from timm_kd.cli import main as cli_main
from timm_kd.hub import HubPushError, create_model_card, push_to_hub, save_pretrained, validate_repo_id
from timm_kd.hub import push as kd_push
from timm_kd.losses import LossCard, create_loss, get_loss_card, register_loss
from timm_kd.losses._registry import _loss_cards, _loss_entrypoints, _loss_to_module

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_" + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")
LABELS = ["cat", "dog", "fox", "owl", "yak"]
META = dict(
    teacher="hf-hub:org/teacher-net",
    teacher_revision="0123456789abcdef0123456789abcdef01234567",
    method="ats",
    loss_kwargs={"tau_correct": 4.0, "tau_wrong": 2.0},
    epochs=3,
    global_batch_size=256,
    seed=7,
    hardware="2x CPU processes",
    dataset="org/pets",
    eval_split="validation",
    metrics={"top1": 61.25, "top5": 93.5, "num_samples": 400},
    teacher_metrics={"top1": 72.5, "top5": 97.0},
    student_alone_metrics={"top1": 55.0, "top5": 90.25},
    label_names=LABELS,
    license="apache-2.0",
    data_config={"input_size": (3, 64, 64), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
                 "crop_pct": 0.9, "interpolation": "bilinear"},
)


def _student(name: str = "test_resnet", **kwargs) -> torch.nn.Module:
    """A tiny timm student with non-trivial BatchNorm statistics (buffers must travel too)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=len(LABELS), **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _assert_same_weights(a: torch.nn.Module | dict, b: torch.nn.Module) -> None:
    """Bit-identical state dicts (the weights travel unchanged); outputs are compared at float32
    tolerance, since CPU kernels may sum in another order with another thread count."""
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _repo() -> str:
    return f"org/student-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def hub():
    with StandInHub() as server:
        yield server


@pytest.fixture
def online(hub, monkeypatch):
    """This process talks to the stand-in Hub (conftest switches the real one off)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.fail.clear()
    yield hub
    assert hub.unhandled == [], f"the client used endpoints the stand-in Hub lacks: {hub.unhandled}"


def _timm_only(script: str, env: dict, *args, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that imports timm but never timm_kd."""
    code = script + "\nassert 'timm_kd' not in sys.modules, 'timm_kd was imported'\n"
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


_LOAD_SCRIPT = textwrap.dedent("""
    import io, sys, urllib.request
    import timm, torch
    from PIL import Image
    from safetensors.torch import load_file, save_file

    model = timm.create_model(sys.argv[1], pretrained=True).eval()
    with torch.no_grad():
        out = model(load_file(sys.argv[2])["x"])
    save_file({"out": out.contiguous()}, sys.argv[3])
    print("CFG", model.pretrained_cfg["input_size"], model.pretrained_cfg.get("label_names"))
    if len(sys.argv) > 4:  # run the card's usage code, with its example image served locally
        buf = io.BytesIO()
        Image.new("RGB", (120, 90), (200, 80, 40)).save(buf, "PNG")
        urllib.request.urlopen = lambda url, *a, **k: io.BytesIO(buf.getvalue())
        exec(open(sys.argv[4]).read())
""")


def _usage_code(card_text: str) -> str:
    return re.search(r"### Image classification\s+```python\n(.*?)```", card_text, re.S).group(1)


# --------------------------------------------------------------------------------------------------
# repo ids
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["org/name", "user-1/resnet18.ats_in1k", "A/b_c-d.e"])
def test_validate_repo_id_accepts(repo_id):
    assert validate_repo_id(repo_id) == repo_id


@pytest.mark.parametrize(
    "repo_id, hint",
    [
        ("resnet18-ats", "your-username/resnet18-ats"),  # no namespace
        ("hf-hub:org/name", "'org/name'"),
        ("https://huggingface.co/org/name", "'org/name'"),
        ("org/name@main", "push to 'org/name'"),
        ("org/na me", "letters, digits"),
        ("org/a--b", "without '--'"),
        ("org/name.git", ".git"),
        ("a/b/c", "namespace/name"),
        (" org/name", "spaces"),
        ("", "empty"),
        (None, "must be a string"),
    ],
)
def test_validate_repo_id_names_problem_and_fix(repo_id, hint):
    with pytest.raises(ValueError) as e:
        validate_repo_id(repo_id)
    assert hint in str(e.value)


def test_invalid_repo_id_refused_before_any_work(online, monkeypatch, tmp_path, capfd):
    calls = []
    monkeypatch.setattr(kd_push, "save_pretrained", lambda *a, **k: calls.append(a))
    n = len(online.requests)
    with pytest.raises(ValueError, match="no namespace"):
        push_to_hub(_student(), "just-a-name", token=TOKEN)
    # the CLI checks the id before it looks at the run folder
    assert cli_main(["push", str(tmp_path / "missing"), "org/bad--id"]) == 2  # a user error: status 2
    assert "org/bad--id" in capfd.readouterr().err
    assert calls == [] and len(online.requests) == n


def test_check_push_ready(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert kd_hub.check_push_ready("org/name", token=TOKEN) == "org/name"
    with pytest.raises(ValueError, match="hf auth login"):
        kd_hub.check_push_ready("org/name")  # conftest removed HF_TOKEN; HF_HOME has no login
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        kd_hub.check_push_ready("org/name", token=TOKEN)


# --------------------------------------------------------------------------------------------------
# the folder: config.json in timm's format, weights, atomic writes
# --------------------------------------------------------------------------------------------------


def test_config_is_timms_format_without_default_tag_leftovers(tmp_path):
    student = _student("resnet18")
    src = student.pretrained_cfg  # resnet18's default tag: a1_in1k, with its Hub id, paper...
    assert {"hf_hub_id", "tag", "origin_url", "paper_ids", "test_input_size"} <= set(src)
    folder = save_pretrained(student, tmp_path / "student", **META)
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18"
    assert config["num_classes"] == 5 and config["num_features"] == 512 and config["global_pool"] == "avg"
    assert config["label_names"] == LABELS
    assert config["model_args"] == {"num_classes": 5, "in_chans": 3, "global_pool": "avg"}
    cfg = config["pretrained_cfg"]
    assert set(cfg) == {"input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean",
                        "std", "num_classes", "pool_size", "first_conv", "classifier", "custom_load",
                        "license"}
    assert cfg["input_size"] == [3, 64, 64]
    assert cfg["mean"] == [0.5, 0.4, 0.3] and cfg["std"] == [0.2, 0.25, 0.3]
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bilinear" and cfg["num_classes"] == 5
    assert cfg["pool_size"] is None  # resnet18's (7, 7) was for 224 px
    assert cfg["license"] == "apache-2.0"
    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == student.state_dict().keys()  # BatchNorm buffers included

    # plain timm rebuilds the same network from the folder, with the real preprocessing
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    _assert_same_weights(loaded, student)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x), rtol=1e-5, atol=1e-5)
    data = timm.data.resolve_model_data_config(loaded)
    assert data["input_size"] == (3, 64, 64) and data["interpolation"] == "bilinear"
    assert tuple(data["mean"]) == (0.5, 0.4, 0.3) and data["crop_pct"] == 0.9
    assert loaded.pretrained_cfg["label_names"] == LABELS


def test_model_args_recreate_a_resized_vit(tmp_path):
    student = _student("test_vit", img_size=64)
    folder = save_pretrained(student, tmp_path / "vit")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"]["img_size"] == [64, 64] and config["global_pool"] == "token"
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]  # the size it runs at, not the tag's 160
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    _assert_same_weights(loaded, student)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x), rtol=1e-5, atol=1e-5)


def test_wrapped_student_is_unwrapped(tmp_path):
    student = _student()
    folder = save_pretrained(torch.nn.DataParallel(student), tmp_path / "dp")
    assert load_file(folder / "model.safetensors").keys() == student.state_dict().keys()  # no "module."


def test_bad_student_or_metadata_is_refused_with_the_fix(tmp_path):
    student = _student()
    cases = [
        (dict(label_names=["a", "b"]), "one name per output"),
        (dict(metrics={"top1": 161.0}), "between 0 and 100"),
        (dict(metrics={"acc": 0.5}), "top1"),
        (dict(metric={"top1": 50.0}), "Did you mean 'metrics'"),
        (dict(token=TOKEN), "push_to_hub argument"),
        (dict(data_config={"input_size": (1, 64, 64)}), "channels"),
        (dict(data_config={"img_size": 64}), "accepted: input_size"),
    ]
    for meta, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            save_pretrained(student, tmp_path / "bad", **meta)
    # a head replaced behind timm's back: config.json would rebuild a different network
    student.fc = torch.nn.Linear(student.num_features, 3)
    with pytest.raises(ValueError, match="builds a different network"):
        save_pretrained(student, tmp_path / "bad")
    with pytest.raises(ValueError, match="timm.create_model"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and os.listdir(tmp_path) == []


def test_folder_is_written_atomically(tmp_path, monkeypatch):
    folder = save_pretrained(_student(), tmp_path / "student", **META)
    before = _digest(folder)

    def crash(tensors, path, metadata=None):  # die halfway through writing the weights
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(kd_push, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(_student("test_resnet"), folder, **{**META, "epochs": 99})
    assert _digest(folder) == before  # the previous save is untouched
    assert os.listdir(tmp_path) == ["student"]  # no temporary sibling left behind
    monkeypatch.undo()

    save_pretrained(_student(), folder, **{**META, "epochs": 99})  # replaced as a whole
    assert "**Epochs:** 99" in (folder / "README.md").read_text()
    assert os.listdir(tmp_path) == ["student"]

    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_pretrained(_student(), folder)
    assert (folder / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------------
# the model card
# --------------------------------------------------------------------------------------------------


def test_card_metadata_parses_back(tmp_path):
    folder = save_pretrained(_student(), tmp_path / "student", repo_id="org/pets-student", **META)
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert {"image-classification", "timm", "knowledge-distillation", "ats"} <= set(data.tags)
    assert data.license == "apache-2.0" and data.datasets == ["org/pets"]
    assert data.base_model is None  # a bare base_model would read as "fine-tuned from the teacher"
    assert data["distillation"] == {
        "teacher": "org/teacher-net",
        "teacher_revision": META["teacher_revision"],
        "teacher_weights": "hf-hub",
        "method": "ats",
        "library": f"timm-kd {timm_kd.__version__}",
    }
    assert data.model_name == "pets-student"
    results = {r.metric_name: r for r in data.eval_results}
    assert set(results) == {"Top 1 Accuracy", "Top 5 Accuracy"}
    assert results["Top 1 Accuracy"].metric_value == META["metrics"]["top1"]
    assert results["Top 5 Accuracy"].metric_value == META["metrics"]["top5"]
    for r in results.values():
        assert (r.task_type, r.dataset_type, r.dataset_split, r.metric_type) == (
            "image-classification", "org/pets", "validation", "accuracy")

    text = card.text
    assert 'timm.create_model("hf-hub:org/pets-student", pretrained=True)' in text
    assert "| **pets-student** (this model) | distilled (ats) | 61.25 | 93.50 |" in text
    assert "| `test_resnet` | same student trained without a teacher | 55.00 | 90.25 |" in text
    assert "| `org/teacher-net` | teacher | 72.50 | 97.00 |" in text
    assert "400 images" in text
    facts = ("**Epochs:** 3", "**Global batch size:** 256", "**Seed:** 7", "**Hardware:** 2x CPU processes")
    for line in (*facts, f"at revision `{META['teacher_revision']}`"):
        assert line in text
    assert "| `tau_correct` | `4.0` |" in text and "| `tau_wrong` | `2.0` |" in text
    assert re.search(r"\| `kd_weight` \| `[0-9.]+` \*default\* \|", text)  # the loss's own default, shown
    assert "@inproceedings{li2022ats," in text and "2210.04427" in text
    assert "hinton2015distilling" not in text  # only the method's papers (and timm)


@pytest.mark.parametrize(
    "method, kwargs, arxiv",
    [
        ("kd", {}, ["1503.02531"]),
        ("ats", {}, ["2210.04427"]),
        ("isats", {}, ["2405.13078", "2210.04427"]),
        ("dtkd", {}, ["2404.12711", "1503.02531"]),
        ("dkd", {}, ["2203.08679"]),
        ("dist", {}, ["2205.10536"]),
        ("lskd", {}, ["2403.01427", "1503.02531"]),
        ("kd", {"logit_standardize": True}, ["1503.02531", "2403.01427"]),
    ],
)
def test_card_cites_the_method(method, kwargs, arxiv):
    config = {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": {"input_size": [3, 64, 64]}}
    text = create_model_card(config, method=method, loss_kwargs=kwargs).text
    bib = re.findall(r"```bibtex\n(.*?)```", text, re.S)
    eprints = [re.search(r"eprint\s*=\s*\{([^}]+)\}", b).group(1) for b in bib if "eprint" in b]
    assert eprints == arxiv
    assert all(b.count("{") == b.count("}") for b in bib)  # well-formed entries
    assert "PyTorch Image Models" in bib[-1]


PLUGIN_BIBTEX = """@article{doe2099pkd,
  title   = {Plug-in Knowledge Distillation},
  author  = {Doe, Jane},
  journal = {Journal of Tests},
  year    = {2099},
  eprint  = {2099.00001}
}"""


def test_card_of_a_plugin_loss_uses_its_registered_card():
    config = {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": {"input_size": [3, 64, 64]}}
    facts = LossCard(
        title="Plug-in Knowledge Distillation (PKD)",
        paper="Doe, J. Tests 2099",
        summary="The student matched a plug-in target.",
        arxiv="2099.00001",
        cites=("doe2099pkd", "hinton2015distilling"),
        bibtex=PLUGIN_BIBTEX,
    )

    def factory(**kwargs):
        return create_loss("kd", **kwargs)

    try:
        register_loss("_test_pkd", card=facts)(factory)
        register_loss("_test_no_card")(factory)
        assert get_loss_card("_test_pkd") is facts
        text = create_model_card(config, method="_test_pkd").text
        method_text = "Plug-in Knowledge Distillation (PKD) (Doe, J. Tests 2099, arXiv:2099.00001)"
        assert f"**Distillation method:** {method_text}" in text
        assert "The student matched a plug-in target." in text
        assert "[arXiv:2099.00001](https://arxiv.org/abs/2099.00001)" in text
        assert "with Plug-in Knowledge Distillation (timm-kd)" in text
        bib = re.findall(r"```bibtex\n(.*?)```", text, re.S)
        assert bib[0].strip() == PLUGIN_BIBTEX  # the plug-in's own entry, first
        assert "@misc{hinton2015distilling," in bib[1] and "PyTorch Image Models" in bib[-1]
        assert len(bib) == 3
        for method in ("_test_no_card", "not_installed_kd"):  # no card, or not registered here
            text = create_model_card(config, method=method).text
            assert f"**Distillation method:** {method}" in text and f"Loss: `{method}`." in text
            assert "arxiv.org" not in text
            bib = re.findall(r"```bibtex\n(.*?)```", text, re.S)
            assert len(bib) == 1 and "PyTorch Image Models" in bib[0]
    finally:
        for key in ("_test_pkd", "_test_no_card"):
            for table in (_loss_entrypoints, _loss_to_module, _loss_cards):
                table.pop(key, None)


@pytest.mark.parametrize(
    "teacher, revision, meta_id, shown",
    [
        ("resnet50.a1_in1k", None, "timm/resnet50.a1_in1k",
         "`resnet50` with the pretrained weights `resnet50.a1_in1k` "
         "([timm/resnet50.a1_in1k](https://huggingface.co/timm/resnet50.a1_in1k)) (revision not recorded)"),
        ("hf-hub:org/big@abc123", None, "org/big",
         "with the weights of [org/big](https://huggingface.co/org/big) at revision `abc123`"),
        ("timm/vit_base", "f" * 40, "timm/vit_base", f"at revision `{'f' * 40}`"),
        ("local-dir:/home/alice/secret/teacher-run", None, "local:teacher-run",
         "weights from a local model folder (`teacher-run`)"),
    ],
)
def test_card_records_the_teacher(teacher, revision, meta_id, shown):
    config = {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": {"input_size": [3, 64, 64]}}
    card = create_model_card(config, teacher=teacher, teacher_revision=revision, method="kd")
    assert card.data["distillation"]["teacher"] == meta_id
    assert shown in card.text
    assert "/home/alice" not in card.content


def _teacher_net(classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("test_resnet", num_classes=classes)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CARD_CONFIG = {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": {"input_size": [3, 64, 64]}}
TEACHER_TOP1 = {"top1": 83.0, "top5": 99.5}


def test_card_of_a_checkpoint_teacher_names_the_file_not_the_public_weights(tmp_path):
    """--teacher-checkpoint: the architecture's name must not credit its public pretrained weights."""
    net = _teacher_net()
    ckpt = tmp_path / "private" / "teacher-weights.safetensors"
    ckpt.parent.mkdir()
    save_file(net.state_dict(), str(ckpt))
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    loaded = kd_models.resolve_model("test_resnet", checkpoint=ckpt, role="teacher")
    by_name = kd_hub.describe_teacher("test_resnet", model=loaded, pretrained=True, checkpoint=ckpt)
    by_module = kd_hub.describe_teacher(loaded)  # a module: what resolve_model recorded on it
    assert by_name == by_module
    card = create_model_card(
        CARD_CONFIG, teacher="test_resnet", teacher_info=by_name, method="kd", teacher_metrics=TEACHER_TOP1,
        eval_split="validation",
    )
    text, dist = card.content, card.data["distillation"]
    assert "huggingface.co/timm/test_resnet" not in text and "r160_in1k" not in text
    assert (dist["teacher"], dist["teacher_architecture"], dist["teacher_params"]) == (
        "test_resnet", "test_resnet", _params(net))
    assert dist["teacher_weights"] == "checkpoint teacher-weights.safetensors"
    assert dist["teacher_sha256"] == sha
    size = f"({_params(net) / 1e6:.2f} M parameters)"
    shown = (f"**Teacher:** `test_resnet` {size}, weights from the checkpoint "
             f"file `teacher-weights.safetensors` (SHA-256 `{sha}`); measured top-1 83.00 % on the "
             "`validation` split by the training run")
    assert shown in text
    assert "| `test_resnet` (checkpoint `teacher-weights.safetensors`) | teacher | 83.00 | 99.50 |" in text
    assert "distilled from `test_resnet` (checkpoint `teacher-weights.safetensors`) with" in text
    assert str(tmp_path) not in text


def test_saving_a_wrapper_records_its_own_teacher(tmp_path):
    """``save_pretrained(wrapper)``: the teacher network the wrapper holds, not its name's weights."""
    ckpt = tmp_path / "t.safetensors"
    save_file(_teacher_net().state_dict(), str(ckpt))
    wrapper = timm_kd.DistillWrapper(_student(), "test_resnet", loss="dkd", teacher_checkpoint=str(ckpt))
    card = ModelCard.load(save_pretrained(wrapper, tmp_path / "student") / "README.md")
    dist = card.data["distillation"]
    assert (dist["method"], dist["teacher_weights"], dist["teacher_architecture"]) == (
        "dkd", "checkpoint t.safetensors", "test_resnet")
    named = save_pretrained(wrapper, tmp_path / "named", teacher="hf-hub:org/t")  # the caller's word wins
    assert ModelCard.load(named / "README.md").data["distillation"]["teacher"] == "org/t"


def test_card_of_a_local_dir_teacher_names_its_architecture(tmp_path):
    """A local-dir: teacher (a timm-kd run's student/ folder) keeps its architecture and run name."""
    folder = save_pretrained(_teacher_net(), tmp_path / "teacher-run" / "student")
    name = f"local-dir:{folder}"
    net = timm.create_model(name, pretrained=True)
    info = kd_hub.describe_teacher(name, model=net)
    assert kd_hub.describe_teacher(kd_models.resolve_model(name, pretrained=True)) == info
    no_model = kd_hub.describe_teacher(name)  # the architecture is read from the folder's config.json
    assert no_model["architecture"] == "test_resnet" and no_model["num_params"] is None
    card = create_model_card(CARD_CONFIG, teacher=name, teacher_info=info, method="dkd")
    dist = card.data["distillation"]
    assert dist["teacher"] == "local:teacher-run/student" and dist["teacher_architecture"] == "test_resnet"
    assert dist["teacher_params"] == _params(net)
    assert dist["teacher_weights"] == "local-dir teacher-run/student"
    size = f"({_params(net) / 1e6:.2f} M parameters)"
    assert f"`test_resnet` {size}, weights from a local model folder (`teacher-run/student`)" in card.text
    assert str(tmp_path) not in card.content


def test_card_of_a_pretrained_tag_and_of_an_unknown_module():
    net = _teacher_net()
    info = kd_hub.describe_teacher("test_resnet.r160_in1k", model=net, pretrained=True)
    assert (info["source"], info["name"], info["hub_id"]) == (
        "pretrained", "test_resnet.r160_in1k", "timm/test_resnet.r160_in1k")
    untagged = kd_hub.describe_teacher("resnet10t", pretrained=True)  # the tag timm loads by default
    assert (untagged["name"], untagged["hub_id"]) == ("resnet10t.c3_in1k", "timm/resnet10t.c3_in1k")
    assert kd_hub.describe_teacher("resnet10t", pretrained=False)["source"] == "random"
    text = create_model_card(CARD_CONFIG, teacher_info=info, method="kd").text
    size = f"({_params(net) / 1e6:.2f} M parameters)"
    assert (f"`test_resnet` {size} with the pretrained weights `test_resnet.r160_in1k` "
            "([timm/test_resnet.r160_in1k](https://huggingface.co/timm/test_resnet.r160_in1k))") in text
    # a module built outside timm-kd: its pretrained_cfg names public weights it may not hold
    plain = kd_hub.describe_teacher(timm.create_model("test_resnet.r160_in1k", pretrained=False))
    assert (plain["source"], plain["hub_id"], plain["architecture"]) == ("module", None, "test_resnet")
    card = create_model_card(CARD_CONFIG, teacher_info=plain, method="kd")
    assert "huggingface.co/timm" not in card.content
    assert "a module given to the trainer (where its weights came from was not recorded)" in card.text
    with pytest.raises(ValueError, match="describe_teacher"):
        create_model_card(CARD_CONFIG, teacher_info="resnet50", method="kd")


def test_card_of_a_cross_entropy_run_names_no_teacher(tmp_path):
    """method="ce": plain training; no teacher, no distillation tag or metadata, even if one is named."""
    meta = {**META, "method": "ce", "loss_kwargs": {}}
    folder = save_pretrained(_student(), tmp_path / "student", repo_id="org/pets-ce", **meta)
    card = ModelCard.load(folder / "README.md")
    assert "knowledge-distillation" not in card.data.tags and "ce" not in card.data.tags
    assert card.data.to_dict().get("distillation") is None
    text = card.text
    assert "trained on its labels with cross-entropy, without a teacher (timm-kd)" in text
    for word in ("distilled from", "teacher-net", "Distillation method", "## Distillation", "**Teacher:**",
                 "72.50", "Loss hyperparameters"):
        assert word not in text, word
    assert "## Training" in text and "**Training:** cross-entropy on the labels" in text
    assert "| **pets-ce** (this model) | cross-entropy on the labels (no teacher) | 61.25 | 93.50 |" in text
    bib = re.findall(r"```bibtex\n(.*?)```", text, re.S)
    assert len(bib) == 1 and "PyTorch Image Models" in bib[0]
    assert create_model_card(CARD_CONFIG, method="ce").data.model_name is None  # not "..._distilled"
    assert "# Model card for test_resnet\n" in create_model_card(CARD_CONFIG, method="ce").text


def test_card_of_a_cached_teacher_says_so():
    info = {**kd_hub.describe_teacher("test_resnet.r160_in1k", pretrained=True), "cache": "cache-in1k",
            "cache_top1": 97.25}
    text = create_model_card(CARD_CONFIG, teacher_info=info, method="kd").text
    assert "read from a teacher cache (`cache-in1k`), top-1 97.25 % on the training views it cached" in text


@pytest.mark.parametrize(
    "dataset, datasets, shown",
    [
        ("hfds/org/pets", ["org/pets"], "[org/pets](https://huggingface.co/datasets/org/pets)"),
        ("/data/alice/imagenet", None, "a local image folder (`imagenet`)"),
        ("embedded", None, "built-in `embedded` dataset"),
    ],
)
def test_card_names_the_dataset(dataset, datasets, shown):
    config = {"architecture": "test_resnet", "num_classes": 5, "pretrained_cfg": {"input_size": [3, 64, 64]}}
    card = create_model_card(config, dataset=dataset, metrics={"top1": 50.0, "top5": 80.0})
    assert card.data.datasets == datasets and shown in card.text and "/data/alice" not in card.content
    assert card.data.eval_results[0].dataset_type == (datasets[0] if datasets else "custom")


def test_card_of_a_run_without_evaluation_says_so(tmp_path):
    meta = {**META, "metrics": None}
    folder = save_pretrained(_student(), tmp_path / "student", **meta)
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert card.data.metrics is None
    assert "**This model was not evaluated.**" in card.text
    assert "It was not evaluated by the run that produced it." in card.text
    assert "this model" not in card.text  # no row with numbers for it
    assert "72.50" in card.text  # the teacher's numbers the run did report are still shown


# --------------------------------------------------------------------------------------------------
# push, then pull with plain timm
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_push_then_plain_timm_loads_from_hub_and_from_offline_cache(online, tmp_path):
    hub = online
    repo = _repo()
    student = _student()
    info = push_to_hub(student, repo, token=TOKEN, private=True, **META)
    r = hub.repos[repo]
    assert r.private and len(r.commits) == 2  # creation + one commit holding the whole folder
    assert info.oid == r.head.oid
    assert sorted(r.head.files) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert f"Bearer {TOKEN}" in hub.auth  # the token was used ...
    assert not any(TOKEN.encode() in data for c in r.commits for data in c.files.values())  # ... not stored

    _assert_same_weights(safetensors_load(r.head.files["model.safetensors"]), student)  # pushed unchanged
    x = torch.randn(4, 3, 64, 64)
    save_file({"x": x}, tmp_path / "x.safetensors")
    with torch.no_grad():
        expected = student(x)
    card_code = tmp_path / "usage.py"
    card_code.write_text(_usage_code(r.head.files["README.md"].decode()))

    # 1. a fresh process with an empty cache, only timm imported, downloads from the Hub
    home = tmp_path / "hf_home"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home),
           "HF_HUB_CACHE": str(home / "hub")}
    res = _timm_only(_LOAD_SCRIPT, env, f"hf-hub:{repo}", tmp_path / "x.safetensors", tmp_path / "out1.st",
                     card_code, cwd=tmp_path)
    torch.testing.assert_close(load_file(tmp_path / "out1.st")["out"], expected, rtol=1e-5, atol=1e-5)
    assert f"CFG (3, 64, 64) {LABELS}" in res.stdout
    top = re.findall(r"^(\w+): ([0-9.]+)%$", res.stdout, re.M)  # the card's usage code printed a top-5
    assert len(top) == 5 and {name for name, _ in top} == set(LABELS)
    assert ("GET", f"/{repo}/resolve/main/model.safetensors") in hub.requests

    # 2. a pre-populated cache, HF_HUB_OFFLINE=1 and an endpoint that does not exist
    cache = tmp_path / "cache_home" / "hub" / f"models--{repo.replace('/', '--')}"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(r.head.oid)
    snap = cache / "snapshots" / r.head.oid
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_bytes(r.head.files[name])
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "cache_home"), "HF_HUB_CACHE": str(tmp_path / "cache_home" / "hub")}
    n = len(hub.requests)
    _timm_only(_LOAD_SCRIPT, env, f"hf-hub:{repo}", tmp_path / "x.safetensors", tmp_path / "out2.st",
               cwd=tmp_path)
    torch.testing.assert_close(load_file(tmp_path / "out2.st")["out"], expected, rtol=1e-5, atol=1e-5)
    assert len(hub.requests) == n


def test_second_push_replaces_the_card_in_one_commit(online):
    hub = online
    repo = _repo()
    student = _student()
    push_to_hub(student, repo, token=TOKEN, **META)
    first = hub.repos[repo].head
    push_to_hub(student, repo, token=TOKEN, **{**META, "metrics": {"top1": 70.5, "top5": 95.5}, "epochs": 9})
    commits = hub.repos[repo].commits
    assert len(commits) == 3  # creation, push 1, push 2: one commit per push
    second = commits[-1]
    assert second.files["README.md"] != first.files["README.md"]
    assert second.files["model.safetensors"] == first.files["model.safetensors"]
    card = ModelCard(second.files["README.md"].decode())
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {
        "Top 1 Accuracy": 70.5, "Top 5 Accuracy": 95.5}
    assert "**Epochs:** 9" in card.text
    # unchanged files are not re-sent: the preupload answer carries the stored file's git oid
    assert git_blob_oid(second.files["config.json"]) == git_blob_oid(first.files["config.json"])


def test_push_of_a_saved_folder_leaves_it_untouched(online, tmp_path):
    folder = save_pretrained(_student(), tmp_path / "student", **META)  # card without a repo id
    before = _digest(folder)
    push_to_hub(folder, "org/from-folder", token=TOKEN, **META)
    assert _digest(folder) == before
    files = online.repos["org/from-folder"].head.files
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert files["config.json"] == (folder / "config.json").read_bytes()
    assert 'timm.create_model("hf-hub:org/from-folder", pretrained=True)' in files["README.md"].decode()
    with pytest.raises(FileNotFoundError, match="expected a folder written by timm_kd.save_pretrained"):
        push_to_hub(tmp_path / "nothing", "org/from-folder", token=TOKEN)


# --------------------------------------------------------------------------------------------------
# network errors, the token
# --------------------------------------------------------------------------------------------------


class _NoSleep:
    """Stands in for the ``time`` module inside huggingface_hub's retry loop."""

    sleep = staticmethod(lambda seconds: None)

    def __getattr__(self, name):
        return getattr(time, name)


def test_hub_error_during_push_then_retry(online, tmp_path, monkeypatch):
    hub = online
    folder = save_pretrained(_student(), tmp_path / "student", **META)
    before = _digest(folder)
    repo = _repo()
    # huggingface_hub retries a 5xx five times with backoff: a Hub that keeps failing, without the waits
    monkeypatch.setattr(hf_http, "time", _NoSleep())
    hub.fail_next(r"POST /api/models/.*/commit/", 500, times=100)
    with pytest.raises(HubPushError) as e:
        push_to_hub(folder, repo, token=TOKEN, **META)
    hub.fail.clear()
    msg = str(e.value)
    assert "HTTP 500" in msg and f"{folder} is intact" in msg and "run the same push again" in msg
    assert len(hub.repos[repo].commits) == 1  # created, but nothing committed
    assert _digest(folder) == before
    push_to_hub(folder, repo, token=TOKEN, **META)  # the retry goes through
    assert len(hub.repos[repo].commits) == 2


def test_hub_down_during_push_then_retry(online, tmp_path):
    hub = online
    run = tmp_path / "run"
    save_pretrained(_student(), run / "student", **META)
    (run / "run_summary.json").write_text(json.dumps(META))
    before = _digest(run / "student")
    repo = _repo()
    hub.stop()
    try:
        with pytest.raises(HubPushError, match="could not reach the Hub") as e:
            push_to_hub(run / "student", repo, token=TOKEN, **META)
        assert "is intact" in str(e.value)
        assert cli_main(["push", str(run), repo, "--token", TOKEN]) == 2
    finally:
        hub.start()  # same port, same repos
    assert _digest(run / "student") == before and repo not in hub.repos
    assert cli_main(["push", str(run), repo, "--token", TOKEN]) == 0
    assert len(hub.repos[repo].commits) == 2


def test_publish_prints_the_url_and_the_load_line(online, tmp_path, capfd):
    """``engine.publish`` (the recipes' --push-to-hub) says where the model went and how to load it."""
    from timm_kd.engine import FitResult, publish

    run, student = tmp_path / "run", _student()
    save_pretrained(student, run / "student", **META)
    result = FitResult(student=student, metrics=META["metrics"], best_metrics=None, best_epoch=None,
                       teacher_metrics=None, summary={**META, "run": {}}, output_dir=run, global_step=1,
                       is_main_process=True)
    repo = _repo()
    info = publish(result, repo, token=TOKEN)
    out = capfd.readouterr().out
    assert f"pushed the student to {online.url}/{repo} (commit {info.commit_url})" in out
    assert f'load it with: timm.create_model("hf-hub:{repo}", pretrained=True)' in out
    assert TOKEN not in out and online.repos[repo].head.files["README.md"]
    assert publish(dataclasses.replace(result, is_main_process=False), repo, token=TOKEN) is None
    assert capfd.readouterr().out == ""  # other processes neither push nor print


def test_token_never_written_logged_or_shown(online, tmp_path, caplog, capfd):
    hub = online
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    run = tmp_path / "run"
    save_pretrained(_student(), run / "student", **META)
    (run / "run_summary.json").write_text(json.dumps({**META, "run": {"history": []}}))
    repo = _repo()
    assert cli_main(["push", str(run), repo, "--token", TOKEN]) == 0
    info = push_to_hub(_student(), repo, token=TOKEN, **META)
    hub.require_token = "hf_the_right_one"  # the Hub refuses ours: 401
    try:
        with pytest.raises(HubPushError) as e:
            push_to_hub(run / "student", repo, token=TOKEN, **META)
    finally:
        hub.require_token = None
    assert "401" in str(e.value) and "hf auth login" in str(e.value)
    shown = "".join(traceback.format_exception(e.value))

    assert f"Bearer {TOKEN}" in hub.auth and info.oid
    out = capfd.readouterr()
    assert caplog.records  # something was logged, at debug level too
    for where, text in [("log", caplog.text), ("stdout", out.out), ("stderr", out.err), ("traceback", shown)]:
        assert TOKEN not in text, where
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    for c in hub.repos[repo].commits:
        for name, data in c.files.items():
            assert TOKEN.encode() not in data, name


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def test_cli_push_bad_run_folders(tmp_path, capfd):
    assert cli_main(["push", str(tmp_path / "nope"), "org/name"]) == 2
    err = capfd.readouterr().err
    assert "does not exist" in err and "student/ and run_summary.json" in err
    (tmp_path / "run" / "student").mkdir(parents=True)
    assert cli_main(["push", str(tmp_path / "run"), "org/name"]) == 2
    err = capfd.readouterr().err
    assert "has no run_summary.json" in err and "Traceback" not in err
    (tmp_path / "run" / "run_summary.json").write_text("{not json")
    assert cli_main(["push", str(tmp_path / "run"), "org/name"]) == 2
    assert "not valid JSON" in capfd.readouterr().err


def test_cli_push_of_a_run_without_evaluation(online, tmp_path, capfd):
    run = tmp_path / "run"
    meta = {**META, "metrics": None}
    save_pretrained(_student(), run / "student", **meta)
    summary = {**meta, "model_name": "test_resnet", "run": {"best_epoch": 2, "history": [{"epoch": 0}]}}
    (run / "run_summary.json").write_text(json.dumps(summary))
    before = _digest(run / "student")
    repo = _repo()
    assert cli_main(["push", str(run), repo, "--private", "--commit-message", "first student"]) == 0
    out = capfd.readouterr().out
    assert f"hf-hub:{repo}" in out and "not evaluated" in out
    r = online.repos[repo]
    assert r.private and r.head.message == "first student" and len(r.commits) == 2
    card = ModelCard(r.head.files["README.md"].decode())
    assert card.data.eval_results is None and "**This model was not evaluated.**" in card.text
    assert card.data["distillation"]["teacher"] == "org/teacher-net"
    assert "# Model card for " + repo.split("/")[1] in card.text  # the repo's name, not the architecture
    assert _digest(run / "student") == before


@pytest.mark.slow
def test_console_script_pushes_with_the_token_from_the_environment(hub, tmp_path):
    run = tmp_path / "run"
    save_pretrained(_student(), run / "student", **META)
    (run / "run_summary.json").write_text(json.dumps(META))
    repo = _repo()
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN}
    exe = Path(sys.executable).with_name("timm-kd")  # the installed entry point
    res = subprocess.run([str(exe), "push", str(run), repo], env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f'timm.create_model("hf-hub:{repo}", pretrained=True)' in res.stdout
    assert hub.auth[-1] == f"Bearer {TOKEN}"  # HF_TOKEN was used ...
    assert TOKEN not in res.stdout + res.stderr  # ... and not shown
    assert len(hub.repos[repo].commits) == 2


def test_cli_list_losses(capsys):
    assert cli_main(["list-losses"]) == 0
    assert capsys.readouterr().out.split() == timm_kd.list_losses()
    assert cli_main(["list-losses", "k*"]) == 0
    assert capsys.readouterr().out.split() == [n for n in timm_kd.list_losses() if n.startswith("k")]


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["push", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "RUN_DIR" in out and "--private" in out and "HF_TOKEN" in out
    assert cli_main([]) == 2 and "push" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# packaging
# --------------------------------------------------------------------------------------------------


def test_packaging_ships_every_subpackage_and_the_card_template():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "timm_kd").rglob("__init__.py")}
    on_disk.add("timm_kd.model_cards")
    assert set(setup["packages"]) == on_disk, "add new timm_kd subpackages to [tool.setuptools] packages"
    assert setup["package-dir"]["timm_kd.model_cards"] == "model_cards"
    from importlib import resources

    installed = resources.files("timm_kd.model_cards")
    for name in ("student_card.md", "citations.bib"):
        assert installed.joinpath(name).read_text() == (ROOT / "model_cards" / name).read_text()
