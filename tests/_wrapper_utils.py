"""Helpers for the DistillWrapper tests: tiny real timm models, test images, accelerate configs."""

from __future__ import annotations

import socket
import zlib
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tiny(name: str, num_classes: int = 5, size: int = 32, **cfg) -> torch.nn.Module:
    """A randomly initialized timm model whose ``pretrained_cfg`` says ``size`` px, plus ``cfg``."""
    overlay = {"input_size": (3, size, size), **cfg}
    torch.manual_seed(zlib.crc32(name.encode()))  # stable across runs (str hashes are salted)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, pretrained_cfg_overlay=overlay)


def batch(
    n: int = 8, size: int = 32, num_classes: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def make_image(width: int = 80, height: int = 96, seed: int = 0) -> Image.Image:
    """A smooth random RGB image with hard-edged black and white blocks (stresses resampling)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    arr = np.array(base)
    arr[height // 5 : height // 2, width // 8 : width // 3] = 255
    arr[height // 2 : height * 5 // 8, width // 2 : width * 7 // 8] = 0
    return Image.fromarray(arr)


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_accelerate_config(path: Path, num_processes: int = 2) -> Path:
    """A config file for ``accelerate launch --config_file``: two CPU processes, no user defaults merged."""
    path.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: MULTI_CPU\n"
        "mixed_precision: 'no'\n"
        "use_cpu: true\n"
        "num_machines: 1\n"
        "machine_rank: 0\n"
        f"num_processes: {num_processes}\n"
        "main_training_function: main\n"
        "rdzv_backend: static\n"
        "same_network: true\n"
    )
    return path
