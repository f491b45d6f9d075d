"""Run by test_distributed.py under `accelerate launch` with 2 gloo processes: three MoCo training steps with the
'ddp' batch shuffle on real images, recording each rank's keys, losses and queue."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from safetensors.torch import load_file, save_file

from moco_hf import MocoConfig, MocoModel

STEPS, PER_RANK = 3, 8


def main(workdir: Path) -> None:
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, world
    torch.manual_seed(0)
    model = MocoModel(MocoConfig(backbone="resnet18", queue_size=40, dim=16, momentum=0.9))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, workdir / "initial.safetensors")
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    moco = accelerator.unwrap_model(model)
    assert moco.resolve_shuffle_bn() == "ddp"
    data = load_file(workdir / "images.safetensors")
    records = {}
    for step in range(STEPS):
        rows = slice(step * PER_RANK * world + rank * PER_RANK, step * PER_RANK * world + (rank + 1) * PER_RANK)
        torch.manual_seed(100 + step)
        out = model(pixel_values=data["query"][rows], key_pixel_values=data["key"][rows])
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad()
        records |= {f"k{step}": out.k, f"loss{step}": out.loss.detach(), f"queue{step}": moco.queue.clone()}
        records[f"queue_ptr{step}"] = moco.queue_ptr.clone()
    save_file({k: v.contiguous() for k, v in records.items()}, workdir / f"rank{rank}.safetensors")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
