"""Importing torchvision and Keras ImageNet weights: logit parity on random weights (no
download), the file formats, the download cache, the round trip back to torchvision, the
predictor with class names."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest
from conftest import (
    random_torchvision,
    random_variables,
    randomise_torch_,
    run_cli,
    tiny_torchvision,
    torch_input,
)
from PIL import Image

from vgg_jax import models, pretrained, spec
from vgg_jax.data import views

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
TINY_STAGES = ((8,), (16, 16), (24,))


def images(size: int, count: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def torchvision_logits(model, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch_input(batch, spec.IMAGENET_MEAN, spec.IMAGENET_STD)).numpy()


def assert_parity(ours, theirs):
    """The issue's criterion: max |difference| <= 1e-4 of the largest logit."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


# ------------------------------------------------------------------------- torchvision


def narrow_stages(arch: str) -> tuple[tuple[int, ...], ...]:
    """`arch`'s stages (the same convolutions per block) at a few channels each."""
    widths = (8, 16, 24, 32, 32)
    base = spec.STAGES[arch.removesuffix("_bn")]
    return tuple((width,) * len(block) for width, block in zip(widths, base, strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_parity_at_two_sizes(arch):
    # Each variant's torchvision module (its layers, BN placement, adaptive pool and
    # classifier) at a few channels per convolution: parity does not need the real widths,
    # which the full-size test below runs for vgg16 and vgg16_bn. 64 pixels leave a 2x2
    # map that the adaptive pool spreads over 7x7 bins, 100 a 3x3 one (after dropping
    # odd rows at 25 -> 12).
    stages, batch_norm = narrow_stages(arch), arch.endswith("_bn")
    reference = tiny_torchvision(stages, batch_norm, 1000, seed=ARCHS.index(arch))
    model, variables = pretrained.from_torchvision(reference.state_dict())
    assert model.head == "torchvision" and model.num_classes == 1000
    assert model.stages == stages and model.batch_norm == batch_norm
    assert "num_batches_tracked" not in str(jax.tree_util.tree_structure(variables))
    for size in (64, 100):
        batch = images(size)
        assert_parity(jax.jit(model.apply)(variables, batch), torchvision_logits(reference, batch))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_torchvision_variant_has_the_layout_we_import(arch):
    # The real modules' state dicts (on the meta device: shapes only, no weights) have
    # exactly the keys and convolution shapes the import reads for the preset.
    with torch.device("meta"):
        state = getattr(torchvision.models, arch)().state_dict()
    stages, batch_norm = spec.STAGES[arch.removesuffix("_bn")], arch.endswith("_bn")
    widths = [width for block in stages for width in block]
    expected, previous = {}, 3
    for index, name in pretrained.torchvision_layout(stages, batch_norm):
        if name.startswith("conv"):
            width = widths.pop(0)
            expected[f"features.{index}.weight"] = (width, previous, 3, 3)
            expected[f"features.{index}.bias"] = (width,)
            previous = width
        else:
            for key in ("weight", "bias", "running_mean", "running_var"):
                expected[f"features.{index}.{key}"] = (previous,)
            expected[f"features.{index}.num_batches_tracked"] = ()
    for index, (rows, columns) in {0: (4096, 512 * 49), 3: (4096, 4096), 6: (1000, 4096)}.items():
        expected[f"classifier.{index}.weight"] = (rows, columns)
        expected[f"classifier.{index}.bias"] = (rows,)
    assert {key: tuple(value.shape) for key, value in state.items()} == expected


@pytest.mark.slow
@pytest.mark.parametrize("arch", ("vgg16", "vgg16_bn"))
def test_torchvision_parity_full_size(arch):
    reference = random_torchvision(arch, seed=7)
    model, variables = pretrained.from_torchvision(reference.state_dict(), arch)
    apply = jax.jit(model.apply)
    for size in (224, 160):
        batch = images(size)
        assert_parity(apply(variables, batch), torchvision_logits(reference, batch))


def test_fc1_is_reordered_block_by_block_as_in_one_piece():
    channels, hidden = 3, 10  # 10 rows in blocks of 4: the last block is partial
    weight = np.random.default_rng(0).normal(size=(hidden, channels * 49)).astype(np.float32)
    whole = weight.reshape(hidden, channels, 7, 7).transpose(2, 3, 1, 0).reshape(-1, hidden)
    np.testing.assert_array_equal(
        pretrained.torchvision._fc1_kernel(weight, channels, block=4), whole
    )


def test_adaptive_pool_bins_are_torchvision_s():
    x = np.random.default_rng(0).normal(size=(2, 3, 11, 10)).astype(np.float32)
    for size in (7, 3):
        theirs = torch.nn.AdaptiveAvgPool2d((size, size))(torch.from_numpy(x)).numpy()
        ours = models.adaptive_avg_pool(x.transpose(0, 2, 3, 1), size)
        np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), theirs, atol=1e-6)
    same = np.ones((1, 7, 7, 2), np.float32)
    assert models.adaptive_avg_pool(same, 7) is same  # the identity at 224 pixels


def test_tiny_models_in_torchvision_layout_import_with_their_stages():
    for batch_norm in (False, True):
        reference = tiny_torchvision(TINY_STAGES, batch_norm, num_classes=5)
        model, variables = pretrained.from_torchvision(reference.state_dict())
        assert model.stages == TINY_STAGES and model.num_classes == 5
        batch = images(40)
        assert_parity(model.apply(variables, batch), torchvision_logits(reference, batch))


def test_bn_conv_bias_is_folded_into_the_running_mean():
    reference = tiny_torchvision(TINY_STAGES, batch_norm=True)
    state = reference.state_dict()
    _, variables = pretrained.from_torchvision(state)
    assert "bias" not in variables["params"]["conv1_1"]
    np.testing.assert_array_equal(
        variables["batch_stats"]["bn1_1"]["mean"],
        (state["features.1.running_mean"] - state["features.0.bias"]).numpy(),
    )


def test_arch_mismatch_and_foreign_state_dicts_are_refused_in_one_line():
    state = tiny_torchvision(TINY_STAGES, batch_norm=True).state_dict()
    with pytest.raises(pretrained.WeightFormatError, match="not vgg16_bn"):
        pretrained.from_torchvision(state, "vgg16_bn")
    del state["classifier.3.bias"]
    with pytest.raises(pretrained.WeightFormatError, match=r"missing \['classifier.3.bias'\]"):
        pretrained.from_torchvision(state)
    with pytest.raises(pretrained.WeightFormatError, match="no features.N.weight"):
        pretrained.from_torchvision({"fc.weight": np.zeros((2, 2))})


def test_round_trip_ours_torchvision_ours_is_exact(tmp_path):
    model = models.create_model("vgg_tiny", 7, head="torchvision", stages=TINY_STAGES)
    variables = random_variables(model, 32)
    state_dict = pretrained.to_torchvision(model, variables)
    assert all(isinstance(v, torch.Tensor) for v in state_dict.values())
    torch.save(state_dict, tmp_path / "tiny.pth")
    for source in (state_dict, tmp_path / "tiny.pth"):
        back_model, back = pretrained.from_torchvision(source)
        assert back_model.stages == model.stages and back_model.num_classes == 7
        jax.tree.map(np.testing.assert_array_equal, back, variables)
    reference = tiny_torchvision(TINY_STAGES, batch_norm=True, num_classes=7)
    reference.load_state_dict(state_dict, strict=True)
    batch = images(48)
    assert_parity(model.apply(variables, batch), torchvision_logits(reference.eval(), batch))


def test_safetensors_file_and_sidecar_normalisation(tmp_path):
    model = models.create_model(
        "vgg_tiny", 3, head="torchvision", stages=TINY_STAGES, mean=(1.0, 2.0, 3.0)
    )
    variables = random_variables(model, 32)
    state = pretrained.torchvision_state_dict(model, variables)
    about = {"mean": [1.0, 2.0, 3.0], "std": list(spec.IMAGENET_STD), "class_names": list("abc")}
    pretrained.write_state_dict(state, tmp_path / "w.safetensors", "safetensors", about)
    back_model, back = pretrained.from_torchvision(tmp_path / "w.safetensors")
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    assert back_model.mean == (1.0, 2.0, 3.0)
    from safetensors import safe_open

    with safe_open(tmp_path / "w.safetensors", "np") as file:
        assert json.loads(file.metadata()["class_names"]) == ["a", "b", "c"]


def test_export_refuses_heads_torchvision_lacks():
    model = models.create_model("vgg_tiny", 3, head="cifar")
    variables = random_variables(model, 16)
    with pytest.raises(ValueError, match="not torchvision's VGG head"):
        pretrained.torchvision_state_dict(model, variables)
    model = models.create_model("vgg_tiny", 3, head="imagenet", stages=TINY_STAGES)
    variables = random_variables(model, 16)
    with pytest.raises(ValueError, match="7x7"):
        pretrained.torchvision_state_dict(model, variables)


def test_reading_pth_without_torch_names_the_extra(tmp_path, monkeypatch):
    torch.save({"a": torch.zeros(1)}, tmp_path / "w.pth")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(ImportError, match=r"vgg-jax\[torch\]"):
        pretrained.from_torchvision(tmp_path / "w.pth")


# ------------------------------------------------------------------------------- Keras


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return pytest.importorskip("keras")


def random_keras(keras, build, size: int):
    keras.utils.set_random_seed(size)
    reference = build(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    rng = np.random.default_rng(size)
    for layer in reference.layers:
        weights = layer.get_weights()
        if weights:  # nonzero biases
            bias = rng.uniform(-0.1, 0.1, weights[1].shape).astype(np.float32)
            layer.set_weights([weights[0], bias])
    return reference


@pytest.mark.parametrize("name", ("VGG16", "VGG19"))
def test_keras_parity_at_two_sizes(keras, name):
    # Keras flattens the last map (no pooling): the model takes the size it was built for.
    for size in (32, 64):
        reference = random_keras(keras, getattr(keras.applications, name), size)
        model, variables = pretrained.from_keras(reference, name.lower())
        assert model.head == "imagenet" and model.mean == spec.CAFFE_MEAN_RGB
        batch = images(size)
        caffe = keras.applications.vgg16.preprocess_input(batch.astype(np.float32))
        assert_parity(model.apply(variables, batch), np.asarray(reference(caffe)))


def test_keras_weight_files_read_without_tensorflow_layouts(keras, tmp_path):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    reference = random_keras(keras, keras.applications.VGG16, 32)
    _, expected = pretrained.from_keras(reference)
    # The published files' legacy layout, Keras 3's .weights.h5 and a whole-model .h5.
    with h5py.File(tmp_path / "legacy.h5", "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, reference)
    reference.save_weights(tmp_path / "new.weights.h5")
    reference.save(str(tmp_path / "model.h5"))
    for path in ("legacy.h5", "new.weights.h5", "model.h5"):
        model, variables = pretrained.from_keras(tmp_path / path, "vgg16")
        jax.tree.map(np.testing.assert_array_equal, variables, expected)
    notop = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    notop.save_weights(tmp_path / "notop.weights.h5")
    model, variables = pretrained.from_keras(tmp_path / "notop.weights.h5")
    assert set(variables["params"]) == {f"conv{b}_{i}" for b, i in spec_convs("vgg16")}
    features = model.apply(variables, images(32), layers=("conv5_3",), method="features")
    assert features["conv5_3"].shape == (2, 2, 2, 512)


def spec_convs(name):
    return [
        (b, i) for b, block in enumerate(spec.STAGES[name], 1) for i in range(1, len(block) + 1)
    ]


def test_keras_view_is_load_img_s(keras, tmp_path):
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (61, 83, 3), np.uint8))
    picture.save(tmp_path / "p.png")
    theirs = keras.utils.img_to_array(
        keras.utils.load_img(tmp_path / "p.png", target_size=(32, 32))
    )
    np.testing.assert_array_equal(
        views.keras_view(np.asarray(picture), 32), theirs.astype(np.uint8)
    )


# ---------------------------------------------------------------- classifying, class names


def test_imagenet_class_names_ship_with_the_package():
    names = pretrained.imagenet_class_names()
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "tench" and names[-1] == "toilet tissue"
    assert names == tuple(torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def test_torchvision_view_is_its_eval_transform():
    from torchvision.transforms import functional

    rng = np.random.default_rng(0)
    for shape in ((300, 400, 3), (500, 260, 3), (224, 224, 3)):
        picture = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        # What torchvision's ImageClassification preset does to a PIL image before scaling.
        expected = functional.center_crop(functional.resize(picture, [256]), [224])
        expected = functional.pil_to_tensor(expected).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(views.torchvision_view(np.asarray(picture), 224), expected)


def test_predictor_prints_imagenet_names_and_matches_torchvision(tmp_path):
    reference = tiny_torchvision(TINY_STAGES, batch_norm=True, num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "tiny.pth")
    predictor = pretrained.predictor(tmp_path / "tiny.pth")
    assert predictor.image_size == 224 and len(predictor.class_names) == 1000
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (260, 300, 3), np.uint8))
    probabilities = predictor.predict(picture)
    transform = torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        theirs = torch.softmax(reference(transform(picture)[None]), -1).numpy()
    np.testing.assert_allclose(probabilities, theirs, atol=1e-5)
    [[(name, _), *_]] = predictor.top_k(probabilities)
    assert name == pretrained.imagenet_class_names()[int(theirs.argmax())]


@pytest.mark.slow
def test_predict_cli_with_weights_prints_class_names(tmp_path):
    reference = tiny_torchvision(spec.STAGES["vgg_tiny"], batch_norm=False, num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "tiny.pth")
    picture = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "picture.png")
    result = run_cli(
        "vgg_jax.predict",
        f"--weights={tmp_path / 'tiny.pth'}",
        "--top=3",
        str(tmp_path / "picture.png"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = result.stdout.splitlines()
    names = set(pretrained.imagenet_class_names())
    ranked = line.split(": ", 1)[1].split(", ")
    assert len(ranked) == 3 and all(entry.rsplit(" ", 1)[0] in names for entry in ranked)
    result = run_cli("vgg_jax.predict", str(tmp_path / "picture.png"))
    assert result.returncode != 0 and "workdir" in result.stderr


# ------------------------------------------------------------------------- downloading


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A 'published' torchvision file served from a file:// URL, and an empty cache."""
    stages = spec.STAGES["vgg_tiny"]
    reference = randomise_torch_(tiny_torchvision(stages, batch_norm=False), seed=3)
    served = tmp_path / "served" / "tiny.pth"
    served.parent.mkdir()
    torch.save(reference.state_dict(), served)
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    entry = pretrained.WeightFile(served.as_uri(), "sha256", digest[:8])
    monkeypatch.setitem(pretrained.WEIGHT_FILES, "torchvision:vgg11", entry)
    monkeypatch.setitem(spec.PRETRAINED, "torchvision:vgg11", ("vgg_tiny", False))
    monkeypatch.setenv("VGG_JAX_CACHE", str(tmp_path / "cache"))
    return served, reference


def test_load_downloads_once_into_the_cache_and_checks_the_digest(published, tmp_path):
    served, reference = published
    model, variables = pretrained.load("torchvision:vgg11", arch=None)
    cached = tmp_path / "cache" / "tiny.pth"
    assert cached.is_file()
    served.unlink()  # the second load reads the cache
    _, again = pretrained.load("torchvision:vgg11", arch=None)
    jax.tree.map(np.testing.assert_array_equal, again, variables)
    batch = images(40)
    assert_parity(model.apply(variables, batch), torchvision_logits(reference, batch))
    cached.write_bytes(b"not the file")
    with pytest.raises(pretrained.WeightFormatError, match="does not match the published"):
        pretrained.fetch("torchvision:vgg11")


def test_a_download_with_the_wrong_digest_is_not_cached(published, tmp_path, monkeypatch):
    served, _ = published
    monkeypatch.setitem(
        pretrained.WEIGHT_FILES,
        "torchvision:vgg11",
        pretrained.WeightFile(served.as_uri(), "sha256", "00000000"),
    )
    with pytest.raises(pretrained.WeightFormatError, match="00000000"):
        pretrained.fetch("torchvision:vgg11")
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_load_fails_in_one_line_naming_url_and_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("VGG_JAX_CACHE", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/vgg16_bn-6c64b313.pth"  # nothing listens on port 9
    monkeypatch.setitem(
        pretrained.WEIGHT_FILES,
        "torchvision:vgg16_bn",
        pretrained.WeightFile(url, "sha256", "6c64b313"),
    )
    with pytest.raises(pretrained.WeightsUnavailableError) as error:
        pretrained.load("torchvision:vgg16_bn")
    message = str(error.value)
    assert "\n" not in message and url in message
    assert str(tmp_path / "cache" / "vgg16_bn-6c64b313.pth") in message


def test_vgg_jax_offline_forbids_downloads(published, monkeypatch):
    monkeypatch.setenv("VGG_JAX_OFFLINE", "1")
    with pytest.raises(pretrained.WeightsUnavailableError, match="VGG_JAX_OFFLINE=1"):
        pretrained.load("torchvision:vgg11")


def test_every_published_name_has_a_file_and_an_architecture():
    assert set(pretrained.WEIGHT_FILES) == set(spec.PRETRAINED)
    for name, weight_file in pretrained.WEIGHT_FILES.items():
        model, batch_norm = spec.PRETRAINED[name]
        assert weight_file.filename.startswith(model + ("_bn" if batch_norm else ""))
    with pytest.raises(FileNotFoundError, match="not one of"):
        pretrained.load("torchvision:vgg17")
