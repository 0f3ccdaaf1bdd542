"""One distillation step under `accelerate launch` (run by tests/test_wrapper.py).

Each rank builds the same DistillWrapper from safetensors checkpoints, prepares only the student
with Accelerate, takes its share of one global batch, and does one SGD step. The main process
writes the student's weights and what it observed about the wrapping.

    ACCELERATE_USE_CPU=true accelerate launch --config_file cfg.yaml --multi_gpu --num_processes 2 \
        wrapper_ddp_step.py WORK_DIR

(On a machine without GPUs, `--multi_gpu` alone starts two processes that accelerate treats as
two independent single-process runs; ACCELERATE_USE_CPU=true makes them one gloo job.)
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from timm_kd import DistillWrapper


def build(work: Path) -> DistillWrapper:
    cfg = json.loads((work / "setup.json").read_text())
    return DistillWrapper(
        cfg["student"],
        cfg["teacher"],
        loss="kd",
        num_classes=cfg["num_classes"],
        student_checkpoint=work / "student.safetensors",
        teacher_checkpoint=work / "teacher.safetensors",
        student_kwargs=cfg["student_kwargs"],
        teacher_kwargs=cfg["teacher_kwargs"],
    )


def main() -> None:
    work = Path(sys.argv[1])
    cfg = json.loads((work / "setup.json").read_text())
    acc = Accelerator()
    wrapper = build(work)
    teacher_before = {k: v.clone() for k, v in wrapper.teacher.model.state_dict().items()}

    wrapper.student = acc.prepare(wrapper.student)
    optimizer = acc.prepare(torch.optim.SGD(wrapper.student.parameters(), lr=cfg["lr"]))
    wrapper.to(acc.device)
    wrapper.train()

    data = load_file(work / "batch.safetensors")
    n = data["images"].shape[0] // acc.num_processes
    sl = slice(acc.process_index * n, (acc.process_index + 1) * n)
    out = wrapper(data["images"][sl].to(acc.device), data["target"][sl].to(acc.device))
    acc.backward(out["loss"])
    optimizer.step()
    optimizer.zero_grad()

    report = {
        "num_processes": acc.num_processes,
        "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
        "student_is_ddp": isinstance(wrapper.student, DistributedDataParallel),
        "teacher_has_ddp": any(isinstance(m, DistributedDataParallel) for m in wrapper.teacher.modules()),
        "teacher_requires_grad": any(p.requires_grad for p in wrapper.teacher.parameters()),
        "teacher_training": any(m.training for m in wrapper.teacher.modules()),
        "teacher_unchanged": all(
            torch.equal(v, teacher_before[k]) for k, v in wrapper.teacher.model.state_dict().items()
        ),
        "optimizer_params": sum(len(g["params"]) for g in optimizer.param_groups),
        "student_params": len(list(wrapper.student.parameters())),
    }
    reports = [None] * acc.num_processes
    torch.distributed.all_gather_object(reports, report)
    if acc.is_main_process:
        save_file(wrapper.student_state_dict(), str(work / "student_after.safetensors"))
        (work / "report.json").write_text(json.dumps(reports))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
