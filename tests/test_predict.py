"""The notebook API and the predict / evaluate CLIs on good and bad inputs."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from vgg_jax import inference


@pytest.fixture
def workdir(smoke_run):
    """The smoke config trained from the command line (shared by the session's tests)."""
    return smoke_run["workdir"]


def png_bomb(path, width=30000, height=30000):
    """A tiny PNG whose header claims 900 megapixels."""
    buffer = io.BytesIO()
    Image.new("1", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then IHDR's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    good = {
        "rgb.png": Image.fromarray(rgb),
        "photo.jpg": Image.fromarray(rgb),
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }
    for name, image in good.items():
        image.save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    jpeg = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png_bomb(folder / "bomb.png")
    return folder, sorted(good)


@pytest.mark.slow
def test_load_predict_accepts_paths_pil_images_and_arrays(workdir, images):
    folder, names = images
    model = inference.load(workdir)
    assert model.step == 4 * 32 and len(model.class_names) == 10
    assert set(model.variables) == {"params", "batch_stats"}
    assert model.config.model == "vgg_tiny"
    pil = Image.open(folder / "rgb.png")
    array = np.asarray(pil)
    probabilities = model.predict([folder / "rgb.png", pil, array])
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    # The same image by three routes gets the same answer.
    np.testing.assert_allclose(probabilities[0], probabilities[1], rtol=1e-6)
    np.testing.assert_allclose(probabilities[0], probabilities[2], rtol=1e-6)
    assert model.predict(array[None]).shape == (1, 10)  # a uint8 batch


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("notes.txt", "not an image"),
        ("truncated.jpg", "truncated"),
        ("bomb.png", "decompression bomb"),
        ("missing.png", "no such file"),
    ],
)
def test_bad_files_raise_a_clear_image_error(images, name, reason):
    folder, _ = images
    with pytest.raises(inference.ImageError, match=reason) as error:
        inference.read_image(folder / name)
    assert name in str(error.value)


@pytest.mark.slow
def test_predict_cli_reports_bad_files_and_still_predicts_the_rest(workdir, images):
    folder, names = images
    bad = ["notes.txt", "truncated.jpg", "bomb.png"]
    paths = [str(folder / n) for n in names + bad]
    result = run_cli("vgg_jax.predict", f"--workdir={workdir}", *paths)
    assert result.returncode == 1
    predicted = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(predicted) == len(names)
    for line in predicted:
        assert line.count("class_") == 5  # top-5 with probabilities
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad)
    assert errors == result.stderr.strip().splitlines()  # no library log lines around them
    for name in bad:
        assert any(name in line for line in errors)


def test_predict_cli_without_a_checkpoint_says_so(tmp_path):
    result = run_cli("vgg_jax.predict", f"--workdir={tmp_path}", "x.png")
    assert result.returncode != 0
    assert "no checkpoint" in result.stderr


@pytest.mark.slow
def test_evaluate_cli_matches_the_training_log(workdir):
    result = run_cli("vgg_jax.evaluate", f"--workdir={workdir}", "--step=best")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # orbax's INFO lines stay quiet
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    best = max(logged, key=lambda r: r["test_accuracy"])
    assert metrics["test_accuracy"] == pytest.approx(best["test_accuracy"])
