"""Batched augmentation on the device, checked against torchvision: the parameter laws against torchvision's
samplers and the papers' table (`test_recipes.OFFICIAL`), each op against `torchvision.transforms.v2.functional`
image by image, and the whole view's pixel statistics against the per-image torchvision path, on real images."""

import math
import random

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from moco_hf.augmentation import RECIPES, blur_kernel_size, build_two_crops
from moco_hf.batched_augmentation import (
    COLUMN,
    JITTER_OPS,
    BatchedView,
    OnDeviceTwoCrops,
    ViewParameters,
    ViewSampler,
    gaussian_blur,
    grayscale,
    resized_crops,
)
from moco_hf.data import stack_padded

DRAWS = 4000


@pytest.fixture(scope="module")
def images(cifar_images) -> torch.Tensor:
    """(512, 3, 32, 32) real CIFAR-10 images in [0, 1]."""
    return torch.stack([TF.pil_to_tensor(image) for image in cifar_images[0]]).float() / 255.0


def sampled_rows(recipe, height=32, width=32, draws=DRAWS) -> torch.Tensor:
    sampler = ViewSampler(recipe)
    return torch.tensor([sampler(random.Random(seed), height, width) for seed in range(draws)])


def frequency_matches(flags: torch.Tensor, p: float) -> bool:
    """The observed frequency is within 4.5 binomial standard deviations of `p` (exact at p = 0 or 1)."""
    observed = flags.float().mean().item()
    return abs(observed - p) <= 4.5 * math.sqrt(p * (1 - p) / len(flags)) + 1e-12


@pytest.mark.parametrize("recipe,view", [("v1", 0), ("v2", 0), ("v3", 0), ("v3", 1), ("cifar10-demo", 0)])
def test_parameter_laws_are_the_recipes(recipe, view):
    recipe_view = RECIPES[recipe][view]
    rows = sampled_rows(recipe_view)
    params = ViewParameters(rows)
    jittered = params.flag("jitter")
    for name, p in (("jitter", recipe_view.jitter_p), ("grayscale", recipe_view.grayscale_p),
                    ("solarize", recipe_view.solarize_p), ("flip", recipe_view.flip_p)):  # fmt: skip
        assert frequency_matches(params.flag(name), p), name
    assert frequency_matches(params.blur_sigma > 0, recipe_view.blur_p)
    blurred = params.blur_sigma[params.blur_sigma > 0]
    if len(blurred):
        low, high = recipe_view.blur_sigma
        assert low <= blurred.min() and blurred.max() <= high
        assert stats.kstest(blurred.numpy(), stats.uniform(low, high - low).cdf).pvalue > 1e-3
    # Jitter factors uniform on torchvision's ranges [1 - b, 1 + b], ..., [-h, h]; identity where not jittered.
    b, c, s, h = recipe_view.jitter
    for column, (low, high) in zip(range(4), [(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)], strict=True):
        values = params.jitter_factors[jittered, column].numpy()
        assert low <= values.min() and values.max() <= high
        assert stats.kstest(values, stats.uniform(low, high - low).cdf).pvalue > 1e-3
    assert torch.all(params.jitter_factors[~jittered] == torch.tensor([1.0, 1.0, 1.0, 0.0]))
    orders = {tuple(order) for order in params.jitter_order[jittered].tolist()}
    assert len(orders) == 24 and all(sorted(order) == [0, 1, 2, 3] for order in orders)


@pytest.mark.parametrize("height,width", [(32, 32), (375, 500), (600, 90)])
def test_crop_boxes_follow_torchvisions_random_resized_crop(height, width):
    """Two-sample KS tests against `v2.RandomResizedCrop.make_params` on the same image size: area fraction, log
    aspect ratio and position."""
    recipe = RECIPES["v3"][0]
    ours = ViewParameters(sampled_rows(recipe, height, width))
    theirs_sampler = v2.RandomResizedCrop(32, scale=recipe.crop_scale)
    torch.manual_seed(0)
    theirs = [theirs_sampler.make_params([torch.empty(3, height, width)]) for _ in range(DRAWS)]
    theirs = {name: torch.tensor([float(box[name]) for box in theirs]) for name in ("top", "left", "height", "width")}
    assert ours.top.min() >= 0 and (ours.top + ours.height).max() <= height
    assert ours.left.min() >= 0 and (ours.left + ours.width).max() <= width
    for statistic in (
        lambda p: p["height"] * p["width"] / (height * width),
        lambda p: torch.log(p["width"] / p["height"]),
        lambda p: p["top"],
        lambda p: p["left"],
    ):
        ours_values = statistic({name: getattr(ours, name) for name in theirs})
        assert stats.ks_2samp(ours_values.numpy(), statistic(theirs).numpy()).pvalue > 1e-3


def random_factors(count: int, op_index: int) -> torch.Tensor:
    return torch.rand(count) * 0.2 - 0.1 if op_index == 3 else torch.rand(count) * 1.2 + 0.4


@pytest.mark.parametrize(
    "op_index,reference",
    [(0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation), (3, TF.adjust_hue)],
)
def test_each_jitter_op_is_torchvisions_image_by_image(images, op_index, reference):
    images = images[:64]
    factors = random_factors(len(images), op_index)
    batched = JITTER_OPS[op_index](images.clone(), factors)
    expected = torch.stack([reference(image, float(f)) for image, f in zip(images, factors, strict=True)])
    torch.testing.assert_close(batched, expected, atol=2e-5, rtol=0)


def test_grayscale_and_blur_are_torchvisions_image_by_image(images):
    images = images[:32]
    torch.testing.assert_close(grayscale(images).expand(-1, 3, -1, -1), TF.rgb_to_grayscale(images, 3))
    sigmas = torch.rand(len(images)) * 1.9 + 0.1
    for kernel_size in (3, 9):
        expected = torch.stack([TF.gaussian_blur(image, [kernel_size] * 2, [float(s)] * 2)
                                for image, s in zip(images, sigmas, strict=True)])  # fmt: skip
        torch.testing.assert_close(gaussian_blur(images, sigmas, kernel_size), expected, atol=1e-5, rtol=0)


def crop_boxes(rows: torch.Tensor) -> list[tuple[int, int, int, int]]:
    return [tuple(int(row[COLUMN[name]]) for name in ("top", "left", "height", "width")) for row in rows]


def test_resized_crop_matches_torchvision_inside_the_crop(images):
    """Upscaling (every crop of a 32 px image at 32 px): torchvision's bilinear resize exactly, except on the
    one-pixel rim, where the crop blends with its neighbours outside where torchvision clamps to its own edge."""
    images = images[:64]
    rows = sampled_rows(RECIPES["v2"][0], draws=len(images))
    crops = resized_crops(images, ViewParameters(rows), 32)
    expected = torch.stack([TF.resized_crop(image, *box, [32, 32], antialias=True)
                            for image, box in zip(images, crop_boxes(rows), strict=True)])  # fmt: skip
    torch.testing.assert_close(crops[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=0)
    assert (crops - expected).abs().max() < 0.5


def test_downscaling_crops_are_anti_aliased(images):
    """Crops of 64 px images taken down to 32 px (ImageNet's usual factor): closer to torchvision's anti-aliased
    resize than torchvision's own resize without anti-aliasing is."""
    images = TF.resize(images[:64], [64, 64], antialias=True)
    rows = sampled_rows(RECIPES["v2"][0], 64, 64, draws=len(images))
    crops = resized_crops(images, ViewParameters(rows), 32)

    def torchvision_crops(antialias):
        return torch.stack([TF.resized_crop(image, *box, [32, 32], antialias=antialias)
                            for image, box in zip(images, crop_boxes(rows), strict=True)])  # fmt: skip

    anti_aliased, aliased = torchvision_crops(True), torchvision_crops(False)
    assert (crops - anti_aliased).abs().mean() < 0.7 * (aliased - anti_aliased).abs().mean()


def torchvision_view(image: torch.Tensor, row: torch.Tensor, view: BatchedView, crop: torch.Tensor) -> torch.Tensor:
    """One image's view, op by op with `torchvision.transforms.v2.functional` and the row's parameters (the crop is
    the batched one, checked on its own above)."""
    p = {name: float(row[index]) for name, index in COLUMN.items()}
    out = crop

    def jitter(out):
        if p["jitter"]:
            ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
            factors = [p["brightness"], p["contrast"], p["saturation"], p["hue"]]
            for position in range(4):
                op_index = int(p[f"order_{position}"])
                out = ops[op_index](out, factors[op_index])
        return out

    def gray(out):
        return TF.rgb_to_grayscale(out, 3) if p["grayscale"] else out

    out = jitter(gray(out)) if view.recipe.grayscale_first else gray(jitter(out))
    if p["blur_sigma"]:
        out = TF.gaussian_blur(out, [view.blur_kernel_size] * 2, [p["blur_sigma"]] * 2)
    if p["solarize"]:
        out = TF.solarize(out, 128 / 255)
    if p["flip"]:
        out = TF.horizontal_flip(out)
    return TF.normalize(out, view.mean.flatten().tolist(), view.std.flatten().tolist())


@pytest.mark.parametrize("recipe,view_index", [("v1", 0), ("v2", 0), ("v3", 1), ("cifar10-demo", 0)])
def test_a_whole_view_is_torchvisions_ops_in_the_recipes_order(cifar_images, recipe, view_index):
    two_crops = OnDeviceTwoCrops(recipe, 32, (0.5, 0.45, 0.4), (0.25, 0.24, 0.26))
    items = [two_crops.loader_item(image, seed) for seed, image in enumerate(cifar_images[0][:48])]
    batch = {name: stack_padded([item[name] for item in items]) for name in items[0]}
    rows = batch[("query_params", "key_params")[view_index]]
    view = two_crops.views[view_index]
    batched = view(batch["image"], rows)
    crops = resized_crops(batch["image"].float() / 255, ViewParameters(rows), 32)
    expected = torch.stack([torchvision_view(image, row, view, crop)
                            for image, row, crop in zip(batch["image"], rows, crops, strict=True)])  # fmt: skip
    torch.testing.assert_close(batched, expected, atol=1e-4, rtol=0)


def test_parameters_are_a_function_of_the_seed_alone(cifar_images):
    two_crops = OnDeviceTwoCrops("v2", 32, (0.5,) * 3, (0.25,) * 3)
    image = cifar_images[0][0]
    first, again, other = (two_crops.loader_item(image, seed) for seed in (7, 7, 8))
    assert torch.equal(first["query_params"], again["query_params"])
    assert torch.equal(first["key_params"], again["key_params"])
    assert not torch.equal(first["query_params"], other["query_params"])
    assert not torch.equal(first["query_params"], first["key_params"])  # two independent views


def test_batched_and_per_image_views_have_the_same_pixel_statistics(cifar_images):
    """The same recipe on 1000 real images both ways: per-channel mean and spread of the views, the fraction of
    grey pixels (grayscale), and the mean absolute horizontal gradient (crop scale and blur) agree."""
    images = cifar_images[0][:1000]
    mean, std = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)
    per_image = build_two_crops("v2", 32, mean, std)
    batched = OnDeviceTwoCrops("v2", 32, mean, std)
    theirs = torch.stack([per_image.loader_item(image, seed)["query"] for seed, image in enumerate(images)])
    items = [batched.loader_item(image, seed) for seed, image in enumerate(images)]
    ours, _ = batched.on_device({name: stack_padded([item[name] for item in items]) for name in items[0]},
                                torch.device("cpu"))  # fmt: skip

    def summary(views):
        pixels = views * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        grey = (pixels.amax(dim=1) - pixels.amin(dim=1) < 1e-3).float().mean()
        gradient = (pixels[..., 1:] - pixels[..., :-1]).abs().mean()
        return torch.cat([pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)), grey.view(1), gradient.view(1)])

    torch.testing.assert_close(summary(ours), summary(theirs), atol=0.015, rtol=0.05)


def test_images_of_different_sizes_share_a_batch(cifar_images):
    """Large photos are shrunk in the worker; smaller images are edge-padded, and their crops stay inside them."""
    two_crops = OnDeviceTwoCrops("v2", 32, (0.5,) * 3, (0.25,) * 3)
    big = cifar_images[0][0].resize((300, 200))
    small = cifar_images[0][1].resize((40, 33))
    items = [two_crops.loader_item(image, seed) for seed, image in enumerate([big, small])]
    assert items[0]["image"].shape == (3, 64, 96)  # short side 2 x 32
    batch = {name: stack_padded([item[name] for item in items]) for name in items[0]}
    assert batch["image"].shape == (2, 3, 64, 96)
    assert torch.equal(batch["image"][1, :, :33, 40:], items[1]["image"][:, :, 39:].expand(-1, -1, 56))
    assert torch.equal(batch["image"][1, :, 33:, :40], items[1]["image"][:, 32:, :].expand(-1, 31, -1))
    for item in items:
        params = ViewParameters(item["query_params"].view(1, -1))
        assert (params.top + params.height).item() <= item["image"].shape[1]
        assert (params.left + params.width).item() <= item["image"].shape[2]
    query, key = two_crops.on_device(batch, torch.device("cpu"))
    assert query.shape == key.shape == (2, 3, 32, 32) and torch.isfinite(query).all()


@pytest.fixture(scope="module")
def thin_images() -> list:
    """Very thin PNGs, decoded as `datasets.Image` decodes them: 20,000,000 x 1 (58 KB as a file, under PIL's pixel
    limit), 10000 x 4 and 4 x 10000."""
    import io

    from PIL import Image

    decoded = []
    for size in ((20_000_000, 1), (10_000, 4), (4, 10_000)):
        buffer = io.BytesIO()
        Image.new("RGB", size, (200, 30, 90)).save(buffer, format="PNG")
        decoded.append(Image.open(io.BytesIO(buffer.getvalue())))
    return decoded


def test_very_thin_images_cost_a_bounded_batch(cifar_images, thin_images):
    """Shrunk on the long side too: a batch padded to its largest height and width stays within (2 x 64)^2 pixels
    per image at crop 32, where before the 20,000,000 x 1 image asked for 30 GB."""
    two_crops = OnDeviceTwoCrops("v2", 32, (0.5,) * 3, (0.25,) * 3)
    items = [two_crops.loader_item(image, seed) for seed, image in enumerate([*thin_images, cifar_images[0][0]])]
    assert [tuple(item["image"].shape[1:]) for item in items] == [(1, 128), (1, 128), (128, 1), (32, 32)]
    batch = {name: stack_padded([item[name] for item in items]) for name in items[0]}
    assert batch["image"].shape == (4, 3, 128, 128)
    query, key = two_crops.on_device(batch, torch.device("cpu"))
    assert query.shape == key.shape == (4, 3, 32, 32) and torch.isfinite(query).all() and torch.isfinite(key).all()
    # The pixels survive the shrink (one colour, up to PIL's rounding): the image is resampled, not cut or padded.
    for item in items[:3]:
        colour = torch.tensor([200, 30, 90]).view(3, 1, 1)
        assert (item["image"].int() - colour).abs().max() <= 1


def test_very_thin_images_evaluate_in_bounded_memory(thin_images):
    """Evaluation (kNN bank and queries, knn_eval, linear_eval) caps the long side at 4x the resize: the centre crop
    of a thin image is padded, where before the 20,000,000 x 1 image was resized to 32 x 640,000,000."""
    from moco_hf.augmentation import evaluation_transform, resize_short_side

    transform = evaluation_transform(32, (0.5,) * 3, (0.25,) * 3)
    for image in thin_images:
        assert transform(image).shape == (3, 32, 32)
    for height, width in [(480, 640), (640, 333), (37, 1000), (100, 100)]:  # elsewhere torchvision's own resize
        pixels = torch.rand(3, height, width)
        expected = v2.Resize(256, max_size=1024, antialias=True)(pixels)
        assert torch.equal(resize_short_side(pixels, 256, max_aspect=4), expected)


def test_blur_kernel_is_the_per_image_paths(cifar_images):
    assert BatchedView(RECIPES["v2"][0], 224, (0.5,) * 3, (0.25,) * 3).blur_kernel_size == blur_kernel_size(224) == 23
