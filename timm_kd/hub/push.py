"""Saving a student as a timm model folder and pushing it to the Hugging Face Hub.

A saved folder, and the Hub repository a push creates, hold exactly what plain ``timm`` reads:
``config.json`` (``hub.config``), ``model.safetensors`` (the student's state dict) and
``README.md`` (the model card, ``hub.card``). The folder is written atomically.

A push uploads the whole folder in one commit (``HfApi.create_repo(exist_ok=True)`` then
``HfApi.upload_folder``) and always writes a fresh card, so later pushes of the same repository
update it (timm's ``push_to_hf_hub`` keeps an existing README). The token comes from the ``token``
argument or the usual Hugging Face sources (``HF_TOKEN``, ``hf auth login``); it is passed to
``HfApi`` only, never written, logged or put in an error message.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id
from safetensors import safe_open
from safetensors.torch import save_file

from ..models import unwrap_model
from ..teacher import Teacher
from ..version import __version__
from .card import PLAIN_TRAINING, _check_meta, create_model_card
from .config import CONFIG_NAME, _check_rebuild, _num_params, _state_dict, student_config
from .provenance import describe_teacher

__all__ = [
    "WEIGHTS_NAME",
    "CARD_NAME",
    "FOLDER_FILES",
    "HubPushError",
    "validate_repo_id",
    "check_push_ready",
    "save_pretrained",
    "push_to_hub",
    "push_report",
]

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message says why and what to do. The local files are intact."""


_ID_PREFIXES = (
    "hf-hub:",
    "hf_hub:",
    "https://huggingface.co/",
    "http://huggingface.co/",
    "https://hf.co/",
    "huggingface.co/",
    "hf.co/",
)


def validate_repo_id(repo_id: str) -> str:
    """Check that ``repo_id`` is a Hub model repository id of the form ``"namespace/name"``.

    Uses huggingface_hub's own validator, and also requires the namespace (a user or an
    organization): ``timm.create_model("hf-hub:<namespace>/<name>")`` needs it to find the model.
    No network access. Returns ``repo_id``; raises ``ValueError`` naming the problem and the fix.
    """
    example = "'your-username/resnet18-ats' or 'your-org/resnet18-ats'"
    if not isinstance(repo_id, str):
        raise ValueError(f"Hub repo id must be a string such as {example}, got {type(repo_id).__name__}")
    if repo_id != repo_id.strip() or not repo_id:
        raise ValueError(f"Hub repo id {repo_id!r} is empty or has surrounding spaces; use e.g. {example}")
    for prefix in _ID_PREFIXES:
        if repo_id.lower().startswith(prefix):
            bare = repo_id[len(prefix) :].strip("/")
            raise ValueError(
                f"Hub repo id {repo_id!r} starts with {prefix!r}; pass the bare id {bare!r} instead"
            )
    if "@" in repo_id:
        raise ValueError(
            f"Hub repo id {repo_id!r} contains '@': a revision is not part of the id; "
            f"push to {repo_id.split('@')[0]!r}"
        )
    if "/" not in repo_id:
        raise ValueError(
            f"Hub repo id {repo_id!r} has no namespace; use 'your-username/{repo_id}' or "
            f"'your-org/{repo_id}' so that timm.create_model('hf-hub:<namespace>/{repo_id}') can find it"
        )
    try:
        _hf_validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(
            f"invalid Hub repo id {repo_id!r} ({e}) Use 'namespace/name' made of letters, digits, '-', '_' "
            f"and '.', at most 96 characters, without '--' or '..' and not ending in '.git'; e.g. {example}"
        ) from None
    return repo_id


def check_push_ready(repo_id: str, token: str | None = None, *, require_token: bool = True) -> str:
    """Everything that can be checked about a future push without network access, at once.

    Call it before training, so that a long run does not end in a push that cannot work: the repo
    id is valid, the Hub is not switched off with ``HF_HUB_OFFLINE``, and a token is available
    (``token``, ``HF_TOKEN`` or a ``hf auth login`` token). Returns ``repo_id``.
    """
    validate_repo_id(repo_id)
    _check_online()
    if require_token and not (token or _default_token()):
        raise ValueError(
            f"no Hugging Face token found to push to {repo_id!r}: run `hf auth login`, set the HF_TOKEN "
            "environment variable, or pass token=... (it needs write access)"
        )
    return repo_id


def _default_token() -> str | None:
    try:
        return get_token()
    except Exception:
        return None


def _check_online() -> None:
    if constants.HF_HUB_OFFLINE:
        raise HubPushError(
            "HF_HUB_OFFLINE is set, so nothing can be pushed to the Hub; unset it (or set HF_HUB_OFFLINE=0) "
            "in the environment of the process that pushes"
        )


def _write_folder_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Build the folder in a hidden sibling, then rename it into place.

    ``folder`` either holds the complete previous version or the complete new one, never a mix:
    a crash leaves at most a ``.<name>.tmp-*`` sibling behind. An existing folder is replaced only
    if it holds nothing but files this module writes.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder; choose another path")
        extra = sorted(p.name for p in folder.iterdir() if p.name not in FOLDER_FILES)
        if extra:
            raise FileExistsError(
                f"{folder} already exists and holds files save_pretrained did not write "
                f"({', '.join(extra[:5])}); choose a new folder, or remove them to replace the saved model"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # honours the umask, unlike tempfile.mkdtemp
    try:
        write(tmp)
        for p in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _wrapper_meta(student: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    """For a ``DistillWrapper`` given without ``teacher``/``teacher_info``: its live teacher's record
    (from what ``timm_kd.models.resolve_model`` recorded on the network, never from its name alone,
    which may be an architecture loaded from a checkpoint) and its loss as ``method``."""
    teacher = getattr(student, "teacher", None)
    if not isinstance(teacher, Teacher) or "teacher" in meta or "teacher_info" in meta:
        return {}
    out: dict[str, Any] = {"teacher_info": describe_teacher(teacher.model)}
    if getattr(student, "loss_name", None):
        out["method"] = student.loss_name
    return out


def save_pretrained(
    student: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    **meta: Any,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` of ``student`` to ``folder``.

    The folder is written atomically (built beside it, then renamed). ``repo_id``, when known,
    goes into the card's usage code. ``meta`` is the run metadata listed in :data:`META_KEYS`; a
    ``DistillWrapper`` given without ``teacher``/``teacher_info`` records its own teacher network
    (``describe_teacher``) and loss.
    ``timm.create_model(f"local-dir:{folder}", pretrained=True)`` loads the result.
    Returns the folder's path.
    """
    _check_meta(meta)
    if repo_id is not None:
        validate_repo_id(repo_id)
    meta = {**_wrapper_meta(student, meta), **meta}
    model = unwrap_model(student, student=True)
    config = student_config(
        model,
        label_names=meta.get("label_names"),
        data_config=meta.get("data_config") or getattr(student, "student_data_config", None),
        license=meta.get("license"),
        model_args=model_args,
    )
    state_dict = _state_dict(model)
    _check_rebuild(config, {k: tuple(v.shape) for k, v in state_dict.items()})
    card = create_model_card(config, num_params=_num_params(model), repo_id=repo_id, **meta)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(state_dict, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        card.save(tmp / CARD_NAME)

    folder = Path(folder)
    _write_folder_atomically(folder, write)
    _logger.info("saved %s student (%s) to %s", config["architecture"], ", ".join(FOLDER_FILES), folder)
    return folder


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, tuple]]:
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if not folder.is_dir() or missing:
        what = "does not exist" if not folder.is_dir() else f"has no {' or '.join(missing)}"
        raise FileNotFoundError(
            f"{folder} {what}; expected a folder written by timm_kd.save_pretrained "
            f"({CONFIG_NAME}, {WEIGHTS_NAME}, {CARD_NAME})"
        )
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if "architecture" not in config or "num_classes" not in config:
        raise ValueError(f"{folder / CONFIG_NAME} is not a timm config.json (no architecture/num_classes)")
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return config, shapes


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _scrub(text: str, tokens: Sequence[str | None]) -> str:
    for t in tokens:
        if t:
            text = text.replace(t, "hf_***")
    return text


def _push_error(
    err: BaseException, repo_id: str, endpoint: str, local: str, tokens: Sequence
) -> HubPushError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        why = (
            f"the Hub refused the request ({status}): the token is missing, invalid or cannot write to "
            f"'{repo_id.split('/')[0]}'. Log in with `hf auth login`, set HF_TOKEN, or pass a token with "
            "write access"
        )
    elif status is not None:
        why = (
            f"the Hub answered HTTP {status}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        )
    else:
        why = (
            f"could not reach the Hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        )
    msg = (
        f"pushing to {endpoint}/{repo_id} failed: {why}. Nothing is lost: {local}, and a push is a single "
        "commit, so the repository is unchanged; run the same push again to retry."
    )
    return HubPushError(_scrub(msg, tokens))


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for mod, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def push_to_hub(
    student: torch.nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    **meta: Any,
) -> Any:
    """Publish a student to the Hub repository ``repo_id`` in one commit; returns its ``CommitInfo``.

    ``student`` is a timm model or a folder written by :func:`save_pretrained` (its config and
    weights are pushed as they are, never modified). The card is rendered afresh from ``meta``
    with ``repo_id`` in its usage code, and replaces any card the repository had. The repository
    is created if needed (``private`` applies only then). ``token`` defaults to ``HF_TOKEN`` or the
    ``hf auth login`` token. An invalid ``repo_id`` or run metadata is refused before any work.
    On a network or Hub error raises :class:`HubPushError`; nothing local is changed and the same
    call can simply be repeated.
    """
    validate_repo_id(repo_id)
    _check_meta(meta)
    _check_online()
    is_folder = isinstance(student, (str, os.PathLike))
    local = f"{student} is intact" if is_folder else "the student in memory is unchanged"

    with tempfile.TemporaryDirectory(prefix="timm_kd_push_") as tmp:
        stage = Path(tmp) / "model"
        if is_folder:
            config, shapes = _read_folder(Path(student))
            ref = _check_rebuild(config, shapes)
            card = create_model_card(config, num_params=_num_params(ref), repo_id=repo_id, **meta)
            stage.mkdir()
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                _link_or_copy(Path(student) / name, stage / name)
            card.save(stage / CARD_NAME)
        else:
            save_pretrained(student, stage, repo_id=repo_id, model_args=model_args, **meta)

        api = HfApi(token=token, library_name="timm-kd", library_version=__version__)
        how = ""
        if meta.get("method") == PLAIN_TRAINING:
            how = " (trained with cross-entropy, no teacher)"
        elif meta.get("method"):
            how = f" (distilled with {meta['method']})"
        message = commit_message or (
            f"Upload {meta.get('model_name') or repo_id.split('/')[-1]}{how} with timm-kd"
        )
        _logger.info("pushing %s to %s/%s", ", ".join(FOLDER_FILES), api.endpoint, repo_id)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=url.repo_id, folder_path=stage, repo_type="model", commit_message=message
            )
        except _network_errors() as e:
            raise _push_error(e, repo_id, api.endpoint, local, [token, _default_token()]) from None
    _logger.info("pushed %s: %s", repo_id, getattr(info, "commit_url", info))
    return info


def push_report(repo_id: str, info: Any) -> str:
    """What a successful push prints: the repository's URL, the commit, and how to load the model."""
    url = getattr(info, "repo_url", None) or f"{constants.ENDPOINT}/{repo_id}"
    commit = getattr(info, "commit_url", None)
    return (
        f"pushed the student to {url}" + (f" (commit {commit})" if commit else "") + "\n"
        f'load it with: timm.create_model("hf-hub:{repo_id}", pretrained=True)'
    )
