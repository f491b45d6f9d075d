"""MocoModel against a transcription of the paper's algorithm, hand-computed values and real images."""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference_cifar10_demo import SplitBatchNorm as OfficialSplitBatchNorm
from reference_moco import ReferenceMoCo
from transformers import AutoConfig, AutoModel

import moco_hf
from moco_hf import MocoConfig, MocoModel, SplitBatchNorm2d
from moco_hf.modeling_moco import build_projection_head


def small_config(**overrides) -> MocoConfig:
    return MocoConfig(**{"backbone": "resnet18", "queue_size": 64, "dim": 16, "shuffle_bn": "none", **overrides})


# ---- the algorithm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mlp", [False, True])
def test_matches_reference_over_steps_with_queue_wrap(cifar_tensor, mlp):
    # K=24, batch 8: the queue wraps after three steps, and five steps wrap it once more.
    model = MocoModel(small_config(queue_size=24, mlp=mlp, momentum=0.9, softmax_temperature=0.2)).train()
    reference = ReferenceMoCo(model.encoder_q, model.queue, m=0.9, T=0.2).train()
    opt_model = torch.optim.SGD(model.encoder_q.parameters(), lr=0.02, momentum=0.9)
    opt_ref = torch.optim.SGD(reference.encoder_q.parameters(), lr=0.02, momentum=0.9)
    flip = torch.flip(cifar_tensor, dims=[3])
    for step in range(5):
        im_q, im_k = cifar_tensor[8 * step : 8 * step + 8], flip[8 * step + 1 : 8 * step + 9]
        out = model(pixel_values=im_q, key_pixel_values=im_k)
        ref_logits, ref_labels = reference(im_q, im_k)
        ref_loss = F.cross_entropy(ref_logits, ref_labels)
        torch.testing.assert_close(out.logits, ref_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=0)
        assert out.logits.shape == (8, 1 + 24)
        torch.testing.assert_close(model.queue, reference.queue.T, atol=1e-5, rtol=0)
        assert int(model.queue_ptr) == int(reference.queue_ptr) == (8 * (step + 1)) % 24
        for p, p_ref in zip(model.encoder_k.parameters(), reference.encoder_k.parameters(), strict=True):
            torch.testing.assert_close(p, p_ref, atol=1e-5, rtol=0)
        for optimizer, loss in ((opt_model, out.loss), (opt_ref, ref_loss)):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_gradients_reach_only_the_query_encoder(cifar_tensor):
    model = MocoModel(small_config()).train()
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    out = model(pixel_values=cifar_tensor[:8], key_pixel_values=cifar_tensor[8:16])
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.head.parameters())
    assert out.k.grad_fn is None and out.q.grad_fn is not None


def test_momentum_update_matches_hand_computed_values(cifar_tensor):
    model = MocoModel(small_config(momentum=0.5)).train()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.fill_(1.0)
        for p in model.encoder_k.parameters():
            p.fill_(3.0)
    model(pixel_values=cifar_tensor[:4], key_pixel_values=cifar_tensor[4:8])
    # theta_k <- 0.5 * 3 + 0.5 * 1 = 2; a second step: 0.5 * 2 + 0.5 * 1 = 1.5.
    assert all(torch.all(p == 2.0) for p in model.encoder_k.parameters())
    model(pixel_values=cifar_tensor[:4], key_pixel_values=cifar_tensor[4:8])
    assert all(torch.all(p == 1.5) for p in model.encoder_k.parameters())


def test_key_encoder_starts_as_copy_of_query_encoder():
    model = MocoModel(small_config())
    for p_q, p_k in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        assert torch.equal(p_q, p_k)
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(64))


def test_eval_mode_leaves_key_encoder_and_queue_alone(cifar_tensor):
    model = MocoModel(small_config()).eval()
    queue, key_params = model.queue.clone(), [p.clone() for p in model.encoder_k.parameters()]
    with torch.no_grad():
        model(pixel_values=cifar_tensor[:4], key_pixel_values=cifar_tensor[4:8])
    assert torch.equal(model.queue, queue) and int(model.queue_ptr) == 0
    assert all(torch.equal(a, b) for a, b in zip(model.encoder_k.parameters(), key_params, strict=True))


def test_queue_wraps_when_k_is_not_a_multiple_of_the_batch():
    model = MocoModel(small_config(queue_size=5, dim=2))
    keys = [torch.full((3, 2), float(i)) for i in (1, 2, 3)]
    model._dequeue_and_enqueue(keys[0])  # rows 0-2
    model._dequeue_and_enqueue(keys[1])  # rows 3, 4, then 0
    assert model.queue[:, 0].tolist() == [2.0, 1.0, 1.0, 2.0, 2.0] and int(model.queue_ptr) == 1
    model._dequeue_and_enqueue(keys[2])  # rows 1-3
    assert model.queue[:, 0].tolist() == [2.0, 3.0, 3.0, 3.0, 2.0] and int(model.queue_ptr) == 4


def test_batch_larger_than_queue_keeps_the_newest_keys():
    model = MocoModel(small_config(queue_size=3, dim=1))
    model._dequeue_and_enqueue(torch.arange(5.0).view(5, 1))  # keys 0..4 at rows 0,1,2,0,1: 3, 4, 2 remain
    assert model.queue[:, 0].tolist() == [3.0, 4.0, 2.0] and int(model.queue_ptr) == 2


# ---- shuffling BN -------------------------------------------------------------------------------------------


def test_split_batch_norm_statistics_by_hand():
    bn = SplitBatchNorm2d(1, eps=1e-12, momentum=0.1).train()
    bn.num_splits = 2
    x = torch.tensor([1.0, 10.0, 3.0, 14.0]).view(4, 1, 1, 1)
    # sample i is in group i % 2: group 0 = (1, 3): mean 2, biased var 1; group 1 = (10, 14): mean 12, biased var 4.
    torch.testing.assert_close(bn(x).flatten(), torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    # each group tracks its own running stats (unbiased variances 2 and 8); the layer's are their mean, folded in
    # when read through the state dict.
    torch.testing.assert_close(bn.grouped_running_mean, torch.tensor([0.1 * 2.0, 0.1 * 12.0]))
    torch.testing.assert_close(bn.grouped_running_var, torch.tensor([0.9 + 0.1 * 2.0, 0.9 + 0.1 * 8.0]))
    state = bn.state_dict()
    assert state["running_mean"].item() == pytest.approx(0.9 * 0 + 0.1 * 7.0)
    assert state["running_var"].item() == pytest.approx(0.9 * 1 + 0.1 * 5.0)
    assert "grouped_running_mean" not in state and bn.grouped_running_mean is None
    assert int(bn.num_batches_tracked) == 1
    bn.num_splits = 1  # a plain BatchNorm over the four samples: mean 7, biased var 27.5
    torch.testing.assert_close(bn(x).flatten(), (x.flatten() - 7.0) / 27.5**0.5)
    with pytest.raises(ValueError, match="divisible by num_splits=3"):
        bn.num_splits = 3
        bn(x)


def test_split_batch_norm_matches_the_official_one_through_a_run():
    """Outputs, gradients and running statistics equal the official demo's SplitBatchNorm (repeat and average every
    step) along a run that changes the group count, trains plain, evaluates, loads a state and changes dtype."""
    torch.manual_seed(0)
    ours, official = SplitBatchNorm2d(6, momentum=0.3), OfficialSplitBatchNorm(6, num_splits=1, momentum=0.3)
    for layer in (ours, official):
        torch.nn.init.uniform_(layer.weight, 0.5, 1.5)
        torch.nn.init.uniform_(layer.bias, -0.5, 0.5)
    official.load_state_dict(ours.state_dict())
    dtype = torch.float32

    def step(splits: int, training: bool = True) -> None:
        x = (torch.randn(24, 6, 3, 3, dtype=dtype) * torch.linspace(0.5, 3.0, 6, dtype=dtype).view(6, 1, 1)) + 1.0
        grad = torch.randn_like(x)
        outputs, grads = [], []
        for layer in (ours, official):
            layer.train(training).num_splits = splits
            inputs = x.clone().requires_grad_(training)
            out = layer(inputs)
            outputs.append(out)
            if training:
                layer.zero_grad()
                out.backward(grad)
                grads.append([inputs.grad, layer.weight.grad, layer.bias.grad])
        tolerance = {"atol": 1e-5, "rtol": 1e-5}  # float32 rounding, carried into float64 by the statistics
        torch.testing.assert_close(outputs[0], outputs[1], **tolerance)
        if training:
            for ours_grad, official_grad in zip(*grads, strict=True):
                torch.testing.assert_close(ours_grad, official_grad, **tolerance)

    for splits in (4, 4, 4, 2, 2, 1, 8, 8):
        step(splits)
    step(8, training=False)  # eval normalises with the folded running statistics
    for splits in (2, 2):
        step(splits)
    statistics = ["running_mean", "running_var"]  # the official layer leaves num_batches_tracked at 0
    torch.testing.assert_close(
        [ours.state_dict()[name] for name in statistics], [official.running_mean, official.running_var]
    )
    saved = copy.deepcopy(ours.state_dict())
    for _ in range(3):
        step(4)
    ours.load_state_dict(saved), official.load_state_dict(saved)  # loaded statistics replace the groups'
    step(4)
    step(4)
    ours.double(), official.double()  # the groups' statistics move with the layer
    dtype = torch.float64
    step(4)
    step(4, training=False)
    assert int(ours.num_batches_tracked) == 10 + 3  # the training steps up to `saved`, and after it


def test_split_mode_encodes_keys_with_per_group_statistics(cifar_tensor):
    """'split' gives each shuffled group of keys its own BN statistics, and unshuffles the keys."""
    model = MocoModel(small_config(shuffle_bn="split", num_splits=2)).train()
    im_k = cifar_tensor[:8]
    torch.manual_seed(3)
    perm = torch.randperm(8)
    expected = []
    encoder = copy.deepcopy(model.encoder_k)
    for group in perm.view(4, 2).T:  # positions g, g + 2, ... of the shuffled batch: a group each, with plain BN
        for module in encoder.modules():
            if isinstance(module, SplitBatchNorm2d):
                module.num_splits = 1
        expected.append(F.normalize(encoder(im_k[group]), dim=1))
    expected = torch.cat(expected)[torch.argsort(perm.view(4, 2).T.flatten())]
    torch.manual_seed(3)
    with torch.no_grad(), model._batch_norm_splits(2):
        k = model._encode_keys(im_k, "split")
    torch.testing.assert_close(k, expected, atol=1e-5, rtol=0)


def test_auto_shuffle_is_split_on_one_process():
    assert MocoModel(small_config(shuffle_bn="auto")).resolve_shuffle_bn() == "split"
    with pytest.raises(RuntimeError, match="more than one process"):
        MocoModel(small_config(shuffle_bn="ddp")).resolve_shuffle_bn()


# ---- save, load, Auto classes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, kwargs",
    [
        ("resnet18", {}),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
        ("convnext_atto", {}),
    ],
)
def test_save_and_auto_load_round_trip(tmp_path, cifar_tensor, backbone, kwargs):
    model = MocoModel(small_config(backbone=backbone, backbone_kwargs=kwargs, shuffle_bn="auto", num_splits=2))
    model.train()
    model(pixel_values=cifar_tensor[:8], key_pixel_values=cifar_tensor[8:16])  # moves queue_ptr, BN stats
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".py")) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",  # the image processor of the config, for AutoImageProcessor and the pipeline
    ]
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MocoModel) and isinstance(AutoConfig.from_pretrained(tmp_path), MocoConfig)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert int(loaded.queue_ptr) == 8
    assert all(not p.requires_grad for p in loaded.encoder_k.parameters())
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(cifar_tensor[:4]).pooler_output, model(cifar_tensor[:4]).pooler_output)
        a = model(pixel_values=cifar_tensor[:4], key_pixel_values=cifar_tensor[4:8])
        b = loaded(pixel_values=cifar_tensor[:4], key_pixel_values=cifar_tensor[4:8])
    torch.testing.assert_close(a.logits, b.logits)


def test_loading_in_bfloat16_keeps_the_queue_in_float32(tmp_path):
    MocoModel(small_config()).save_pretrained(tmp_path)
    loaded = MocoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.encoder_q.head.weight.dtype == torch.bfloat16
    assert loaded.queue.dtype == torch.float32 and loaded.queue_ptr.dtype == torch.long


def test_missing_queue_in_checkpoint_is_initialised_not_garbage(tmp_path):
    from safetensors.torch import load_file, save_file

    model = MocoModel(small_config())
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["queue"], state["queue_ptr"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = MocoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.queue.norm(dim=1), torch.ones(64))
    assert int(loaded.queue_ptr) == 0
    assert torch.equal(loaded.encoder_q.head.weight, model.encoder_q.head.weight)


def test_features_and_autocast(cifar_tensor):
    model = MocoModel(small_config()).train()
    features = model.get_image_features(cifar_tensor[:4])
    assert features.pooler_output.shape == (4, model.num_features) == (4, 512)
    assert features.last_hidden_state.shape[:2] == (4, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=cifar_tensor[:8], key_pixel_values=cifar_tensor[8:16])
    assert torch.isfinite(out.loss) and model.queue.dtype == torch.float32
    torch.testing.assert_close(model.queue[:8], out.k.float(), atol=0, rtol=0)


# ---- config and input validation ---------------------------------------------------------------------------


def test_presets():
    v1, v2 = MocoConfig.from_preset("v1"), MocoConfig.from_preset("v2", backbone="resnet18")
    assert (v1.queue_size, v1.momentum, v1.softmax_temperature, v1.dim, v1.mlp) == (65536, 0.999, 0.07, 128, False)
    assert (v2.softmax_temperature, v2.mlp, v2.augmentation, v2.lr_schedule) == (0.2, True, "v2", "cosine")
    assert v2.backbone == "resnet18"
    head = build_projection_head(512, v2)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"] and head[0].out_features == 512
    with pytest.raises(ValueError, match="Unknown MoCo preset 'v9'"):
        MocoConfig.from_preset("v9")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("queue_size", -1, "queue_size must be an integer >= 0"),
        ("softmax_temperature", 0.0, "softmax_temperature must be a number >= 0.01"),
        ("momentum", 1.5, r"momentum must be a number in \[0, 1\]"),
        ("shuffle_bn", "sync", "shuffle_bn must be one of"),
        ("dim", 0, "dim must be an integer from 1 to 65536"),
        ("backbone", "resnet_18", "Did you mean 'resnet18'"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        MocoConfig(**{"backbone": "resnet18", field: value})


def test_config_json_with_bad_value_fails_naming_the_field(tmp_path):
    small_config().save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"queue_size": 64', '"queue_size": -5')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="queue_size"):
        AutoConfig.from_pretrained(tmp_path)


def test_bad_inputs_get_clear_errors(cifar_tensor):
    model = MocoModel(small_config())
    with pytest.raises(ValueError, match="must have 3 channels"):
        model(pixel_values=cifar_tensor[:4, :1])
    with pytest.raises(ValueError, match="add a batch dimension"):
        model(pixel_values=cifar_tensor[0])
    with pytest.raises(ValueError, match="same images: got batch sizes 4 and 3"):
        model(pixel_values=cifar_tensor[:4], key_pixel_values=cifar_tensor[:3])
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        model(pixel_values=[[1.0]])


def test_auto_classes_registered_on_import():
    assert AutoConfig.for_model("moco", backbone="resnet18").__class__ is MocoConfig
    assert moco_hf.MocoModel is MocoModel


# ---- learning on real images --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_few_optimizer_steps_on_real_images_lower_the_loss(cifar_tensor):
    from torchvision.transforms import v2

    augment = v2.Compose([v2.RandomResizedCrop(32, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    images = cifar_tensor[:64]
    model = MocoModel(small_config(queue_size=128, mlp=True, softmax_temperature=0.2, momentum=0.99)).train()
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.05, momentum=0.9)

    def two_views():
        return torch.stack([augment(x) for x in images]), torch.stack([augment(x) for x in images])

    with torch.no_grad():  # fill the queue with real keys first, so the loss is measured against real negatives
        for _ in range(2):
            model(*two_views())
    losses = []
    for _ in range(40):
        out = model(*two_views())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, losses  # measured: 4.63 -> 3.77


@pytest.mark.parametrize("batch, groups", [(16, 8), (8, 4), (12, 6), (6, 3), (4, 2), (3, 1), (2, 1)])
def test_split_batch_norm_fits_its_groups_to_small_batches(batch, groups, cifar_tensor):
    from moco_hf.modeling_moco import batch_norm_groups

    assert batch_norm_groups(batch, 8) == groups
    model = MocoModel(small_config(shuffle_bn="split", num_splits=8)).train()
    out = model(pixel_values=cifar_tensor[:batch], key_pixel_values=cifar_tensor[batch : 2 * batch])
    assert torch.isfinite(out.loss) and out.logits.shape[0] == batch


def test_a_single_image_cannot_train_batch_norm_and_says_so(cifar_tensor):
    model = MocoModel(small_config()).train()
    with pytest.raises(ValueError, match="at least 2 images per batch"):
        model(pixel_values=cifar_tensor[:1], key_pixel_values=cifar_tensor[1:2])


def test_a_bf16_model_takes_fp32_pixels(cifar_tensor, tmp_path):
    MocoModel(small_config()).save_pretrained(tmp_path)
    model = MocoModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    features = model.get_image_features(cifar_tensor[:4]).pooler_output
    assert features.dtype == torch.bfloat16 and torch.isfinite(features.float()).all()
    assert model(pixel_values=cifar_tensor[:4], key_pixel_values=cifar_tensor[4:8]).loss.isfinite()
