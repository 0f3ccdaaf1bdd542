"""Without the Hub: named teachers and Hub datasets fail in seconds, naming what and how to fix it.

Hugging Face libraries read ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` at import, so each case runs in
a subprocess with its own environment; the subprocess times the failing call itself (imports
excluded) and prints the error.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

_CALL = textwrap.dedent(
    """
    import json, sys, time
    from timm_kd.models import resolve_model
    from timm_kd.data import load_image_dataset
    kind, name = sys.argv[1], sys.argv[2]
    start = time.perf_counter()
    try:
        if kind == "model":
            model = resolve_model(name, pretrained=True, role="teacher")
            result = {"ok": type(model).__name__}
        else:
            load_image_dataset(name, "train")
            result = {"ok": "dataset"}
    except Exception as e:
        result = {"error": type(e).__name__, "message": str(e)}
    result["seconds"] = time.perf_counter() - start
    print("RESULT " + json.dumps(result))
    """
)


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(kind: str, name: str, env_changes: dict[str, str | None], tmp_path) -> dict:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(
        [sys.executable, "-c", _CALL, kind, name], env=env, capture_output=True, text=True, timeout=120,
        cwd=str(tmp_path),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _unreachable() -> dict[str, str | None]:
    return {"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
            "HTTPS_PROXY": None, "https_proxy": None, "ALL_PROXY": None, "all_proxy": None}


@pytest.mark.slow
@pytest.mark.parametrize("env", ["offline", "closed_port"])
def test_named_teacher_without_the_hub_fails_fast_naming_the_fixes(env, tmp_path):
    changes = _OFFLINE if env == "offline" else _unreachable()
    result = _run("model", "test_resnet.r160_in1k", changes, tmp_path)
    assert result.get("error") == "HubUnreachableError", result
    message = result["message"]
    assert "teacher 'test_resnet.r160_in1k'" in message
    for fix in ("--teacher-checkpoint", "--teacher test_resnet", "local-dir:", "HF_HUB_OFFLINE=1", "cache"):
        assert fix in message, (fix, message)
    assert ("HF_HUB_OFFLINE=1 is set" if env == "offline" else "cannot be reached") in message
    assert result["seconds"] < 5, result  # huggingface_hub alone retries for ~50 s


@pytest.mark.slow
@pytest.mark.parametrize("env", ["offline", "closed_port"])
def test_hub_dataset_without_the_hub_fails_fast_naming_the_fixes(env, tmp_path):
    changes = _OFFLINE if env == "offline" else _unreachable()
    result = _run("dataset", "timm-kd-tests/no-such-set", changes, tmp_path)
    assert result.get("error") == "HubUnreachableError", result
    message = result["message"]
    assert "dataset 'timm-kd-tests/no-such-set'" in message
    for fix in ("--dataset PATH", "parquet", "save_to_disk", "HF_DATASETS_OFFLINE=1", "cache"):
        assert fix in message, (fix, message)
    assert result["seconds"] < 5, result  # datasets alone retries for ~45 s


@pytest.mark.slow
def test_cached_weights_still_load_when_the_hub_is_unreachable(tmp_path):
    """A filled cache is enough: the unreachable Hub switches to offline mode, not to an error."""
    import timm
    from safetensors.torch import save_file

    hub_cache = tmp_path / "hub"
    repo = hub_cache / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    changes = {**_unreachable(), "HF_HUB_CACHE": str(hub_cache)}
    result = _run("model", "test_resnet.r160_in1k", changes, tmp_path)
    assert result.get("ok") == "ResNet", result
    assert result["seconds"] < 10, result
