"""CUDA checks (run where a GPU is: the `device` machine; skipped on CPU-only CI): the same step on the GPU as on
the CPU, bf16 autocast with the queue kept in fp32, the v3 in-batch path, device-agnostic buffers, the batched
augmentation on the GPU as on the CPU."""

import pytest
import torch

from moco_hf import MocoConfig, MocoModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def two_views(batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 32, 32, generator=generator), torch.randn(batch, 3, 32, 32, generator=generator)


def test_gpu_step_matches_cpu_step():
    # shuffle_bn="none": the split shuffle draws its permutation from each device's own generator, so CPU and GPU
    # would group the keys differently (the split mode on the GPU is exercised by the bf16 test below).
    shuffle_bn = "none"
    torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cpu = MocoModel(MocoConfig.from_preset("v2", backbone="resnet18", queue_size=96, shuffle_bn=shuffle_bn)).train()
    gpu = MocoModel(cpu.config).train()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    x1, x2 = two_views()
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        torch.manual_seed(1)  # the split shuffle's permutation
        out = model(pixel_values=x1.to(device), key_pixel_values=x2.to(device))
        out.loss.backward()
        model.loss = out.loss.item()
    assert gpu.loss == pytest.approx(cpu.loss, abs=1e-4)
    torch.testing.assert_close(gpu.queue.cpu(), cpu.queue, atol=1e-4, rtol=0)
    assert int(gpu.queue_ptr) == int(cpu.queue_ptr) == 32
    for (name, p_cpu), p_gpu in zip(cpu.encoder_q.named_parameters(), gpu.encoder_q.parameters(), strict=True):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, atol=1e-3, rtol=1e-3, msg=name)


def test_bf16_autocast_keeps_the_queue_fp32_on_gpu():
    model = MocoModel(MocoConfig.from_preset("v2", backbone="resnet18", queue_size=100)).to("cuda").train()
    assert model.resolve_shuffle_bn() == "split"
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9)
    x1, x2 = (x.cuda() for x in two_views())
    for _ in range(4):  # 4 x 32 = 128 keys: the queue of 100 wraps
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(pixel_values=x1, key_pixel_values=x2)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(out.loss) and model.queue.dtype == torch.float32 and model.queue.is_cuda
    assert int(model.queue_ptr) == 128 % 100
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(100, device="cuda"), atol=1e-2, rtol=0)


def test_v3_in_batch_negatives_on_gpu_bf16():
    config = MocoConfig.from_preset("v3", backbone="resnet18", dim=64, mlp_hidden_dim=256)
    model = MocoModel(config).to("cuda").train()
    x1, x2 = (x.cuda() for x in two_views())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(pixel_values=x1, key_pixel_values=x2)
    out.loss.backward()
    assert out.logits.shape == (32, 32) and torch.isfinite(out.loss)
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert model.predictor[0].weight.grad is not None


@pytest.mark.parametrize("recipe", ["v2", "v3"])
def test_batched_augmentation_on_the_gpu_matches_the_cpu(cifar_images, recipe):
    from moco_hf.batched_augmentation import OnDeviceTwoCrops
    from moco_hf.data import collate

    two_crops = OnDeviceTwoCrops(recipe, 32, (0.5, 0.45, 0.4), (0.25, 0.24, 0.26))
    batch = collate([two_crops.loader_item(image, seed) for seed, image in enumerate(cifar_images[0][:256])])
    on_cpu = two_crops.on_device(batch, torch.device("cpu"))
    on_gpu = two_crops.on_device(batch, torch.device("cuda"))
    for cpu_view, gpu_view in zip(on_cpu, on_gpu, strict=True):
        assert gpu_view.device.type == "cuda"
        torch.testing.assert_close(gpu_view.cpu(), cpu_view, atol=1e-4, rtol=0)
