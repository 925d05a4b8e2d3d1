"""vgg_jax.lpips equals the reference `lpips` package (VGG, v0.1 and v0.0, spatial on and
off): values, per-pixel maps and input gradients, on one random torchvision VGG16 loaded
into both; and where its learned layers come from."""

import hashlib
import io
import shutil
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_torchvision

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
reference_lpips = pytest.importorskip("lpips")

from vgg_jax import lpips, models, pretrained  # noqa: E402

# (height, width): a square one, and one whose maps shrink to odd sizes (56 -> 7 -> 3,
# 40 -> 5 -> 2): the max-pools drop a row and the upsampling ratios are not integers.
SIZES = ((32, 32), (56, 40))
CONVS = [f"conv{b}_{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)]


def real_looking(count, height, width, seed):
    """Images in (-1, 1) with what photographs have: smooth gradients, patches with sharp
    edges, sensor noise, soft highlights. Not clipped: where an image is flat, the
    maxima of VGG's max-pools tie, and which one gets the gradient is up to the rounding
    of each implementation."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for _ in range(count):
        slope = rng.uniform(-1, 1, (3, 3))
        image = slope[:, 0] * rows[..., None] + slope[:, 1] * cols[..., None] + slope[:, 2] / 3
        for _ in range(3):
            top, left = rng.integers(0, height), rng.integers(0, width)
            h, w = rng.integers(height // 8, height // 2), rng.integers(width // 8, width // 2)
            image[top : top + h, left : left + w] = rng.uniform(-1, 1, 3)
        images.append(np.tanh(1.5 * image + rng.normal(0, 0.05, image.shape)))
    return np.asarray(images, np.float32)


def image_pairs(height, width):
    """x and y: another picture, x with more noise, x shifted by a pixel."""
    x = real_looking(3, height, width, seed=1)
    noisy = x[1] + np.random.default_rng(2).normal(0, 0.1, x[1].shape)
    y = np.stack([real_looking(1, height, width, seed=3)[0], noisy, np.roll(x[2], 1, axis=1)])
    return x, np.tanh(y).astype(np.float32)


@pytest.fixture(scope="module")
def backbone():
    """One random torchvision VGG16 (nonzero biases): its state dict and our conversion."""
    state = random_torchvision("vgg16", seed=0).state_dict()
    return state, pretrained.from_torchvision(state, "vgg16")


@cache
def reference(version):
    return reference_lpips.LPIPS(net="vgg", pnet_rand=True, version=version, verbose=False)


def load_reference(version, state):
    model = reference(version)
    # Its trunk holds torchvision's features.N modules as sliceK.N.
    net = {key: state["features." + key.split(".", 1)[1]] for key in model.net.state_dict()}
    model.net.load_state_dict(net)
    return model


def torch_images(images, dtype):
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype).contiguous()


# Where conv1_2, conv2_2, conv3_3 and conv4_3 (of the 13 convolutions) are max-pooled.
POOLED = (1, 3, 6, 9)


def switches(pre_activations):
    """Per image, the state of every kink of the network's function: the sign of each
    ReLU's input and the position of each max-pool window's maximum."""
    states = []
    for index, pre in enumerate(pre_activations):
        states.append((pre > 0).reshape(len(pre), -1))
        if index in POOLED:
            n, h, w, c = pre.shape
            windows = pre[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
            states.append(windows.transpose(0, 1, 3, 5, 2, 4).reshape(n, -1, 4).argmax(-1))
    return np.concatenate(states, axis=1)


def reference_run(model, x, y, dtype, cotangents=None):
    """Distances, maps, the gradient of <distances, c0> + <maps, c1> w.r.t. x (with
    cotangents (c0, c1)), and the kinks' states in x's pass (`switches`; through hooks,
    as its ReLUs work in place)."""
    model = model.to(dtype)
    pre_activations = []

    def record(module, inputs):
        pre_activations.append(inputs[0].detach().permute(0, 2, 3, 1).numpy().copy())

    relus = [m for m in model.net.modules() if isinstance(m, torch.nn.ReLU)]
    hooks = [relu.register_forward_pre_hook(record) for relu in relus]
    tx = torch_images(x, dtype).requires_grad_(cotangents is not None)
    outputs = []
    for spatial in (False, True):
        model.spatial = spatial
        out = model(tx, torch_images(y, dtype))
        outputs.append(out[:, 0] if spatial else out[:, 0, 0, 0])
    for hook in hooks:
        hook.remove()
    result = {
        "distances": outputs[0].detach().numpy(),
        "maps": outputs[1].detach().numpy(),
        # The first pass is x's (then y's, then both again with spatial on).
        "switches": switches(pre_activations[: len(relus)]),
    }
    if cotangents is not None:
        weights = [torch.from_numpy(c).to(dtype) for c in cotangents]
        (gradient,) = torch.autograd.grad(outputs, tx, weights)
        result["gradient"] = gradient.permute(0, 2, 3, 1).numpy()
    model.float()
    return result


def our_run(backbone_pair, version, x, y, dtype, cotangents=None, with_switches=True):
    """What `reference_run` returns, from vgg_jax.lpips (jitted, as a loss would use it)."""
    off = lpips.LPIPS(backbone_pair, version, spatial=False, dtype=dtype)
    on = lpips.LPIPS(backbone_pair, version, spatial=True, dtype=dtype)
    x, y = x.astype(dtype), y.astype(dtype)

    @jax.jit
    def run(variables, x, y):
        def both(x):
            return off.apply(variables, x, y), on.apply(variables, x, y)

        result = {}
        if cotangents is None:
            result["distances"], result["maps"] = both(x)
        else:
            (result["distances"], result["maps"]), pull = jax.vjp(both, x)
            (result["gradient"],) = pull(tuple(jnp.asarray(c, dtype) for c in cotangents))
        if with_switches:
            pre = off.model.apply(
                variables["backbone"], x, layers=CONVS, before_relu=True, method="features"
            )
            result["pre_activations"] = [pre[name] for name in CONVS]
        return result

    result = jax.tree.map(np.asarray, run(off.variables, x, y))
    if with_switches:
        result["switches"] = switches(result.pop("pre_activations"))
    return result


def cotangents_for(x):
    """Weights for the distances and the maps' pixels, so that both count alike."""
    rng = np.random.default_rng(4)
    height, width = x.shape[1:3]
    return rng.normal(size=len(x)), rng.normal(size=x.shape[:3]) / np.sqrt(height * width)


def relative(got, want, axis=None):
    """max |got - want| over the max |want|, per image with axis."""
    return np.abs(got - want).max(axis=axis) / np.abs(want).max(axis=axis)


def norm_relative(got, want):
    """|got - want| / |want| per image (Euclidean norms over H, W, C)."""
    axes = tuple(range(1, got.ndim))
    return np.sqrt(((got - want) ** 2).sum(axes) / (want**2).sum(axes))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("version", lpips.VERSIONS)
def test_distances_and_maps_equal_the_reference(backbone, version, size):
    state, pair = backbone
    x, y = image_pairs(*size)
    ours = our_run(pair, version, x, y, jnp.float32, with_switches=False)
    theirs = reference_run(load_reference(version, state), x, y, torch.float32)
    assert ours["distances"].shape == (3,) and ours["maps"].shape == (3, *size)
    # Two orders of summation through 13 layers of float32 convolutions (measured <= 5e-7
    # relative); each distance is a sum of positive terms. A map's pixel is a difference
    # of nearly equal features where the two images agree there, so maps are compared
    # to each map's largest value (measured <= 2e-6 of it).
    np.testing.assert_allclose(ours["distances"], theirs["distances"], rtol=1e-5)
    assert relative(ours["maps"], theirs["maps"], axis=(1, 2)).max() <= 1e-5


@pytest.mark.parametrize("version", lpips.VERSIONS)
def test_float32_gradients_equal_the_reference(backbone, version):
    state, pair = backbone
    x = real_looking(16, 16, 16, seed=5)
    y = np.tanh(x + np.random.default_rng(6).normal(0, 0.2, x.shape)).astype(np.float32)
    cotangents = cotangents_for(x)
    ours = our_run(pair, version, x, y, jnp.float32, cotangents)
    theirs = reference_run(load_reference(version, state), x, y, torch.float32, cotangents)
    # Gradients are discontinuous at the kinks: a ReLU's input crossing 0, a max-pool
    # window's maximum changing places. float32 rounding (<= ~1e-6 of a layer's largest
    # value, measured) puts a ReLU input on the other side than float64 would now and then
    # (about 1 in 10 32x32 images, here and in the reference), and one such crossing
    # moves the gradient by up to ~3e-3 of its norm. So images where the two runs are on
    # different sides of a kink are left out (many small images: few are), and on the
    # others the gradients agree to rounding: <= 1e-4, 20 times what separates the
    # reference's own float32 gradients from its float64 ones (measured <= 5e-6).
    same_side = (ours["switches"] == theirs["switches"]).all(1)
    assert same_side.sum() >= 12, f"{(~same_side).sum()} of {len(x)} images across a kink"
    errors = norm_relative(ours["gradient"], theirs["gradient"])
    assert (errors[same_side] <= 1e-4).all(), (errors, same_side)


@pytest.mark.parametrize("version", lpips.VERSIONS)
def test_float64_runs_equal_the_reference_to_rounding(backbone, version):
    # float64 (both here and in torch): the same arithmetic, gradients included, with
    # nothing for float32 rounding to hide (measured <= 4e-14 relative; one of the
    # reference's float32 constants taken as its decimal value shows as 5e-8). Odd map
    # sizes: 40 -> 5 -> 2 and 24 -> 3 -> 1 rows after the pools.
    state, pair = backbone
    x, y = image_pairs(40, 24)
    cotangents = cotangents_for(x)
    theirs = reference_run(load_reference(version, state), x, y, torch.float64, cotangents)
    with jax.enable_x64(True):
        ours = our_run(pair, version, x, y, jnp.float64, cotangents, with_switches=False)
    assert relative(ours["distances"], theirs["distances"]) <= 1e-12
    assert relative(ours["maps"], theirs["maps"]) <= 1e-12
    assert norm_relative(ours["gradient"], theirs["gradient"]).max() <= 1e-12


def test_metric_is_jitable_differentiable_and_zero_on_equal_images(backbone):
    _, pair = backbone
    metric = lpips.LPIPS(pair)
    x, y = image_pairs(32, 32)
    distances = metric(x, y)
    assert distances.shape == (3,) and (np.asarray(distances) > 0).all()
    assert np.abs(np.asarray(metric(x, x))).max() <= 1e-6

    @jax.jit
    def loss(variables, x):  # the pure form, inside a jitted, differentiated loss
        return metric.apply(variables, x, y).mean()

    value, gradient = jax.value_and_grad(loss, argnums=1)(metric.variables, x)
    np.testing.assert_allclose(value, np.asarray(distances).mean(), rtol=1e-6)
    assert np.isfinite(gradient).all() and np.abs(gradient).max() > 0


def test_inputs_and_backbones_are_checked(backbone):
    state, pair = backbone
    metric = lpips.LPIPS(pair, "0.0")
    x = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="same shape"):
        metric(x, x[:1])
    with pytest.raises(ValueError, match="float images in"):
        metric(x.astype(np.uint8), x.astype(np.uint8))
    with pytest.raises(ValueError, match="at least 16x16"):
        metric(x[:, :8], x[:, :8])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        metric(x[..., :1], x[..., :1])
    with pytest.raises(ValueError, match="version must be one of"):
        lpips.LPIPS(pair, "0.2")
    with pytest.raises(ValueError, match="torchvision:vgg16, not keras:vgg16"):
        lpips.LPIPS("keras:vgg16")
    with pytest.raises(pretrained.WeightFormatError, match="VGG16 without BN"):
        lpips.LPIPS((models.vgg16_bn(), pair[1]))
    with pytest.raises(pretrained.WeightFormatError, match="not vgg16"):
        lpips.LPIPS(random_torchvision("vgg11_bn").state_dict())


def test_learned_layers_are_the_packages_or_a_checked_download(tmp_path, monkeypatch):
    installed = lpips.weights_path("0.1")
    assert installed.parent.parent.parent == Path(reference_lpips.__file__).parent
    expected = torch.load(installed, map_location="cpu", weights_only=True)
    layers = lpips.load_linear_layers("0.1")
    for index, name in enumerate(lpips.LAYERS):
        weight = expected[f"lin{index}.model.1.weight"].numpy()
        np.testing.assert_array_equal(layers[name], weight.reshape(-1))

    # Without the package: downloaded once into the cache, its digest checked.
    monkeypatch.setattr(lpips.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("VGG_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("VGG_JAX_OFFLINE", "1")
    cached = tmp_path / "lpips" / "v0.0" / "vgg.pth"
    with pytest.raises(pretrained.WeightsUnavailableError) as error:
        lpips.weights_path("0.0")
    message = str(error.value)
    assert "\n" not in message and lpips.WEIGHT_FILES["0.0"].url in message
    assert str(cached) in message and "vgg-jax[lpips]" in message

    published = Path(reference_lpips.__file__).parent / "weights" / "v0.0" / "vgg.pth"
    monkeypatch.delenv("VGG_JAX_OFFLINE")
    requested = []

    def urlopen(url, timeout):
        requested.append(url)
        return io.BytesIO(published.read_bytes())

    monkeypatch.setattr(pretrained.registry.urllib.request, "urlopen", urlopen)
    assert lpips.weights_path("0.0") == cached
    assert lpips.weights_path("0.0") == cached  # from the cache the second time
    assert requested == [lpips.WEIGHT_FILES["0.0"].url]
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == lpips.WEIGHT_FILES["0.0"].digest
    assert (lpips.load_linear_layers("0.0")["conv1_2"] >= 0).all()

    cached.write_bytes(cached.read_bytes() + b"\0")
    with pytest.raises(pretrained.WeightFormatError, match="does not match the published"):
        lpips.weights_path("0.0")


def test_learned_layers_from_a_file_are_checked(tmp_path):
    path = tmp_path / "mine.pth"
    state = torch.load(lpips.weights_path("0.1"), map_location="cpu", weights_only=True)
    torch.save({**state, "lin2.model.1.weight": -state["lin2.model.1.weight"]}, path)
    with pytest.raises(pretrained.WeightFormatError, match="lin2.model.1.weight has negative"):
        lpips.load_linear_layers(path)
    del state["lin4.model.1.weight"]
    torch.save(state, path)
    with pytest.raises(pretrained.WeightFormatError, match="no lin4.model.1.weight"):
        lpips.load_linear_layers(path)
    shutil.copy(lpips.weights_path("0.0"), path)
    np.testing.assert_array_equal(
        lpips.load_linear_layers(path)["conv5_3"], lpips.load_linear_layers("0.0")["conv5_3"]
    )
