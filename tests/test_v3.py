"""MoCo v3 and in-batch negatives: against a transcription of the paper's Algorithm 1 (one and two processes),
the momentum schedule by hand, and a ViT trained on real images."""

import math
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import free_port
from reference_moco import ReferenceMoCoV3
from torchvision.transforms import v2

from moco_hf import MocoConfig, MocoModel, export_encoder
from moco_hf.optimization import build_optimizer
from moco_hf.schedules import momentum_at


def v3_config(**overrides) -> MocoConfig:
    small = {"backbone": "resnet18", "dim": 16, "mlp_hidden_dim": 32, "softmax_temperature": 0.2}
    return MocoConfig.from_preset("v3", **{**small, **overrides})


def run_side_by_side(images: torch.Tensor, steps: int, rank: int = 0) -> list[tuple[float, float]]:
    """`steps` training steps of MocoModel (v3) and of the Algorithm 1 transcription from the same weights and
    inputs; checks the key encoders agree after each step and returns the (ours, reference) losses."""
    torch.manual_seed(0)  # the same initial weights on every process
    model = MocoModel(v3_config()).train()
    reference = ReferenceMoCoV3(model.encoder_q, model.predictor, T=0.2).train()
    ours_opt = torch.optim.SGD([*model.encoder_q.parameters(), *model.predictor.parameters()], lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD([*reference.f_q.parameters(), *reference.predictor.parameters()], lr=0.05, momentum=0.9)
    flip = v2.RandomHorizontalFlip(p=1.0)
    losses = []
    for step in range(steps):
        batch = images[(step * 2 + rank) * 8 : (step * 2 + rank + 1) * 8]
        x1, x2 = batch, flip(torch.roll(batch, shifts=2, dims=3))
        m = momentum_at(step, steps, 0.99, "cosine")
        model.key_momentum = m
        out = model(pixel_values=x1, key_pixel_values=x2)
        ref_loss = reference(x1, x2, m)
        world = dist.get_world_size() if dist.is_initialized() else 1
        assert out.logits.shape == (8, 8 * world) and out.labels.tolist() == list(range(8 * rank, 8 * rank + 8))
        losses.append((out.loss.item(), ref_loss.item()))
        for optimizer, loss in ((ours_opt, out.loss), (ref_opt, ref_loss)):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for ours, theirs in zip(
            model.encoder_k.state_dict().values(), reference.f_k.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    return losses


def test_v3_matches_algorithm_1_over_steps(cifar_tensor):
    for ours, reference in run_side_by_side(cifar_tensor, steps=3):
        assert ours == pytest.approx(reference, abs=1e-5)


def _two_process_worker(rank: int, port: int, images: torch.Tensor) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        for ours, reference in run_side_by_side(images, steps=2, rank=rank):
            assert abs(ours - reference) < 1e-5, (rank, ours, reference)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_v3_matches_algorithm_1_with_negatives_gathered_from_two_processes(cifar_tensor):
    torch.multiprocessing.spawn(_two_process_worker, args=(free_port(), cifar_tensor[:64].clone()), nprocs=2, join=True)


def test_momentum_schedule_by_hand():
    assert momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_at(25, 100, 0.99, "cosine") == pytest.approx(1 - 0.5 * (1 + math.sqrt(0.5)) * 0.01)  # 0.991464
    assert momentum_at(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    assert momentum_at(150, 100, 0.99, "cosine") == pytest.approx(1.0)
    assert momentum_at(37, 100, 0.999, "constant") == 0.999


def test_in_batch_negatives_with_v2_heads_by_hand(cifar_tensor):
    torch.manual_seed(0)
    model = MocoModel(MocoConfig.from_preset("v2", backbone="resnet18", dim=16, queue_size=0, shuffle_bn="none"))
    x1, x2 = cifar_tensor[:8], torch.flip(cifar_tensor[:8], dims=[3])
    out = model.train()(pixel_values=x1, key_pixel_values=x2)
    # SimCLR-style dictionary: each query against the 8 keys of the batch, its own key the positive.
    logits = out.q @ out.k.T / 0.2
    torch.testing.assert_close(out.logits, logits, atol=1e-6, rtol=0)
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits, torch.arange(8)).item(), abs=1e-6)
    assert model.queue.shape == (0, 16)


def test_v3_vit_trains_on_real_images_then_saves_loads_and_exports(cifar_tensor, tmp_path):
    vit = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "patch_size": 8},
           "projector_layers": 3, "freeze_patch_embed": True, "optimizer": "adamw", "image_size": 32}  # fmt: skip
    model = MocoModel(v3_config(**vit)).train()
    assert not model.encoder_q.backbone.patch_embed.proj.weight.requires_grad
    augment = v2.Compose([v2.RandomResizedCrop(32, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    images = cifar_tensor[:16]
    optimizer = build_optimizer(model, model.config, learning_rate=1e-3)  # AdamW, as the trainer builds it
    losses = []
    for step in range(20):
        model.key_momentum = momentum_at(step, 20, 0.99, "cosine")
        out = model(pixel_values=torch.stack([augment(x) for x in images]),
                    key_pixel_values=torch.stack([augment(x) for x in images]))  # fmt: skip
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, losses

    model.eval().save_pretrained(tmp_path / "v3")
    loaded = MocoModel.from_pretrained(tmp_path / "v3").eval()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    exported = timm.create_model(f"local-dir:{export_encoder(model, tmp_path / 'encoder')}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(images), model.get_image_features(images).pooler_output, atol=1e-5, rtol=0)
