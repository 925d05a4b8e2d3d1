"""The grain stream: ImageNet-style augmentation, exact resume, each process's share,
bad files, flat memory, and the choice between device-resident and streamed input."""

import logging
import pathlib
import resource

import cv2
import jax
import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image

from vgg_jax import data, train
from vgg_jax.data import sources, stream, views
from vgg_jax.data.info import DatasetUnavailableError
from vgg_jax.metrics_log import read_metrics
from vgg_jax.preemption import Preempted


def _folder(root, classes=("a", "b", "c"), per_class=(12, 4), size=(40, 56)):
    return write_image_folder(root, classes, per_class, size)


@pytest.fixture
def stream_config(tiny_config, tmp_path):
    tiny_config.dataset = "image_folder"
    tiny_config.data_dir = str(_folder(tmp_path / "data"))
    tiny_config.image_size = 16
    tiny_config.input = "stream"
    tiny_config.augment = "random_resized_crop"
    tiny_config.batch_size = 8
    tiny_config.input_workers = 0
    return tiny_config


# ------------------------------------------------------------------------ augmentation


def _element(tmp_path, size=(300, 200)):
    path = tmp_path / "x.jpg"
    pixels = np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return (str(path), 0)


@pytest.mark.parametrize("augment", ["random_resized_crop", "scale_jitter", "crop_flip", "none"])
def test_every_augmentation_gives_uint8_squares(tmp_path, augment):
    element = _element(tmp_path)
    draws = views.random_draws(seed=0, step=0, count=4)
    decoded = views.decode(element[0])
    images = [views.train_view(decoded, row, 32, augment) for row in draws]
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in images)
    if augment != "none":
        assert len({image.tobytes() for image in images}) > 1  # random views


@pytest.mark.parametrize("padding", [0, 2])
def test_crop_padding_sets_how_far_the_host_crop_moves(padding):
    # As on the devices (test_device_input): the bright top-left pixel's place is the
    # crop's offset, mirrored by a flip.
    image = np.full((8, 8, 3), 7, np.uint8)
    image[0, 0] = 255
    draws = views.random_draws(seed=0, step=0, count=64)
    places = []
    for row in draws:
        view = views.train_view(image, row, 8, "crop_flip", crop_padding=padding)
        places += [(r, min(c, 7 - c)) for r, c in np.argwhere(view[..., 0] == 255).tolist()]
    if padding == 0:
        assert places == [(0, 0)] * 64  # flips only
    else:
        assert max(max(place) for place in places) == padding


def test_random_resized_crop_respects_the_area_and_ratio_ranges():
    boxes = [views.crop_box(400, 300, row) for row in views.random_draws(0, 0, 500)]
    areas = [w * h / (400 * 300) for _, _, w, h in boxes]
    ratios = [w / h for _, _, w, h in boxes]
    assert min(areas) >= 0.08 - 0.01 and max(areas) <= 1.0 and max(areas) > 0.8
    assert min(ratios) >= 3 / 4 - 0.05 and max(ratios) <= 4 / 3 + 0.05
    assert all(0 <= left <= 400 - w and 0 <= top <= 300 - h for left, top, w, h in boxes)


def test_eval_view_is_the_centre_crop_after_resizing_the_shorter_side(tmp_path):
    element = _element(tmp_path, size=(224, 448))  # height 224, width 448
    view = views.center_view(views.decode(element[0]), 224)
    assert view.shape == (224, 224, 3)
    decoded = np.asarray(Image.open(element[0]).convert("RGB"))
    full = cv2.resize(decoded, (512, 256), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(view, full[16:240, 144:368], atol=2)


@pytest.mark.parametrize("input_kind", ["device", "stream"])
def test_the_last_epochs_flip_and_never_crop(tiny_config, tmp_path, input_kind):
    # Every training image grey with a white top-left pixel (PNG: exact pixels), so where
    # that pixel lands in a view, mirrored by a flip, is the view's crop offset.
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(8):
                pixels = np.full((8, 8, 3), 100, np.uint8)
                pixels[0, 0] = 255
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    config = tiny_config
    config.dataset, config.data_dir, config.image_size = "image_folder", str(tmp_path), 8
    config.input, config.input_workers, config.batch_size = input_kind, 0, 8
    config.augment, config.crop_padding, config.num_epochs = "crop_flip", 2, 3
    config.flip_only_last_epochs = 1
    batches = data.create(config, data.create_mesh())
    try:
        unmoved = []
        for epoch in range(3):
            images = np.concatenate(
                [np.asarray(batch["image"]) for batch in batches.train_batches(epoch, 0)]
            )[..., 0]
            assert len(images) == 16
            corners = np.maximum(images[:, 0, 0], images[:, 0, -1])
            unmoved.append(int((corners == 255).sum()))
    finally:
        batches.close()
    assert unmoved[0] < 16 and unmoved[1] < 16  # cropped
    assert unmoved[2] == 16  # flipped at most


# ---------------------------------------------------------------- the stream's batches


def test_process_shares_are_disjoint_and_cover_every_global_batch(tmp_path):
    records = sources.image_folder_records(str(_folder(tmp_path)), "train")
    shares = []
    for process in range(2):
        dataset = stream.train_dataset(
            records,
            seed=3,
            local_batch=3,
            image_size=8,
            augment="none",
            process_index=process,
            process_count=2,
        )
        shares.append(dataset)
    indices = stream.grain.MapDataset.range(len(records)).seed(3).shuffle().repeat()
    for step in range(7):  # 36 records, global batch 6: crosses an epoch boundary
        expected = sorted(int(indices[step * 6 + k]) for k in range(6))
        read = [share[step]["index"] for share in shares]
        assert not set(read[0]) & set(read[1])
        assert sorted(np.concatenate(read)) == expected


def test_an_images_random_view_does_not_depend_on_the_number_of_processes(tmp_path):
    records = sources.image_folder_records(str(_folder(tmp_path)), "train")

    def dataset(process, count):
        return stream.train_dataset(
            records,
            seed=5,
            local_batch=6 // count,
            image_size=16,
            augment="random_resized_crop",
            process_index=process,
            process_count=count,
        )

    for step in (0, 7):
        whole = dataset(0, 1)[step]
        for process in range(2):
            share = dataset(process, 2)[step]
            np.testing.assert_array_equal(share["index"], whole["index"][process::2])
            np.testing.assert_array_equal(share["image"], whole["image"][process::2])
    assert not np.array_equal(dataset(0, 1)[0]["image"], dataset(0, 1)[6]["image"])


def _one_process_train_dataset(records, local_batch, image_size):
    return stream.train_dataset(
        records,
        seed=0,
        local_batch=local_batch,
        image_size=image_size,
        augment="random_resized_crop",
        process_index=0,
        process_count=1,
    )


def test_the_same_seed_and_step_give_the_same_batch(tmp_path):
    records = sources.image_folder_records(str(_folder(tmp_path)), "train")

    def from_step(step, **how):
        dataset = _one_process_train_dataset(records, local_batch=4, image_size=16)
        return stream.iterate(dataset[step:], **how)

    # A decoding worker process (input_workers=1) and decoding threads in this process
    # (input_workers=0, input_threads=3) read the same batches, again and again.
    a = next(from_step(3, workers=1))
    threaded = from_step(3, workers=0, threads=3)
    np.testing.assert_array_equal(next(threaded)["image"], a["image"])
    after = next(threaded)["image"]
    assert not np.array_equal(after, a["image"])
    again = from_step(3, workers=0, threads=2)
    np.testing.assert_array_equal(next(again)["image"], a["image"])
    np.testing.assert_array_equal(next(again)["image"], after)
    np.testing.assert_array_equal(next(from_step(4, workers=0))["image"], after)


def test_every_evaluation_pass_reads_the_whole_share_from_one_iterator(tmp_path):
    records = sources.image_folder_records(str(_folder(tmp_path)), "test")  # 12 images
    passes = stream.EvalPasses(
        records,
        local_batch=5,
        view=lambda image: views.squash(image, 8),
        image_size=8,
        process_index=1,
        process_count=2,
        workers=0,
    )
    assert (len(passes.dataset), passes.batches) == (2, 2)  # 6 images in this share: 5 + 1

    def one_pass(passes_left=3):
        batches = passes.one_pass(passes_left)
        return [batch["index"][batch["mask"] > 0].tolist() for batch in batches]

    first = one_pass()
    iterator = passes.iterator
    assert sorted(sum(first, [])) == list(range(1, 12, 2))
    assert one_pass() == first and passes.iterator is iterator  # no new decoding processes
    stopped = passes.one_pass(1)
    next(stopped)
    stopped.close()  # an evaluation cut short: the next pass starts at the start again
    assert one_pass(1) == first
    # The stream was built for that one pass: nothing of a next one is read ahead.
    assert list(passes.iterator) == []
    passes.close()


@pytest.mark.slow
@pytest.mark.parametrize("resume_workers", [1, 2])
def test_streamed_run_stopped_mid_epoch_resumes_bitwise(
    stream_config, tmp_path, monkeypatch, caplog, resume_workers
):
    from test_checkpoint import SignalAfter, assert_trees_equal

    stream_config.num_epochs = 2
    # The uninterrupted run decodes in threads (input_workers=0: the same batches as
    # worker processes); the stopped run in a worker process, whose iterator state is
    # what the checkpoint must carry; the resumed one with as many workers (grain's saved
    # state is used) or with another count (the stream is rebuilt at the step: grain's
    # state would restore other batches or fail).
    uninterrupted = train.train_and_evaluate(stream_config, str(tmp_path / "a"))
    stream_config.input_workers = 1
    monkeypatch.setattr(train, "PreemptionGuard", lambda: SignalAfter(5))  # mid epoch 2
    with pytest.raises(Preempted):
        train.train_and_evaluate(stream_config, str(tmp_path / "b"))
    assert any((p / "data").is_dir() for p in (tmp_path / "b" / "checkpoints").iterdir())
    monkeypatch.undo()
    stream_config.input_workers = resume_workers
    with caplog.at_level(logging.INFO, logger="vgg_jax"):
        resumed = train.train_and_evaluate(stream_config, str(tmp_path / "b"))
    by_step = any("stream positioned at step" in r.getMessage() for r in caplog.records)
    assert by_step == (resume_workers != 1)
    assert not any("stream position from the step" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "b" / "checkpoints").glob("*.damaged"))  # its digests hold
    assert int(resumed.step) == int(uninterrupted.step) == 8
    assert_trees_equal(resumed.params, uninterrupted.params)
    assert_trees_equal(resumed.opt_state, uninterrupted.opt_state)
    record = read_metrics(tmp_path / "b")[-1]
    assert 0 <= record["input_wait_fraction"] <= 1 and record["train_skipped_files"] == 0


@pytest.mark.slow
def test_a_stream_rebuilt_at_a_step_then_stopped_again_resumes_bitwise(
    stream_config, tmp_path, monkeypatch, caplog
):
    # Stopped, resumed with another worker count (the stream is rebuilt at the step),
    # stopped again and resumed with that count: the second checkpoint's iterator state
    # belongs to a stream that did not start at step 0.
    from test_checkpoint import SignalAfter, assert_trees_equal

    stream_config.num_epochs = 2
    uninterrupted = train.train_and_evaluate(stream_config, str(tmp_path / "a"))
    for workers, polls in ((1, 2), (2, 3)):
        stream_config.input_workers = workers
        monkeypatch.setattr(train, "PreemptionGuard", lambda polls=polls: SignalAfter(polls))
        with pytest.raises(Preempted):
            train.train_and_evaluate(stream_config, str(tmp_path / "b"))
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="vgg_jax"):
        resumed = train.train_and_evaluate(stream_config, str(tmp_path / "b"))
    assert any("(no stream state saved)" in r.getMessage() for r in caplog.records)
    assert int(resumed.step) == int(uninterrupted.step) == 8
    assert_trees_equal(resumed.params, uninterrupted.params)
    assert_trees_equal(resumed.opt_state, uninterrupted.opt_state)


# ---------------------------------------------------------------------- bad data, size


@pytest.mark.slow
def test_unreadable_files_are_skipped_and_counted_while_streaming(stream_config, tmp_path, caplog):
    root = tmp_path / "data"
    (root / "train" / "a" / "0.jpg").write_bytes(b"")
    good = (root / "test" / "b" / "0.jpg").read_bytes()
    (root / "test" / "b" / "0.jpg").write_bytes(good[: len(good) // 3])
    stream_config.num_epochs = 1
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(stream_config, str(tmp_path / "w"))
    record = read_metrics(tmp_path / "w")[-1]
    assert record["train_skipped_files"] >= 1 and record["test_skipped_files"] == 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "0.jpg" in messages and "unreadable" in messages
    # 12 test images, one unreadable: masked out, not dropped silently, not counted right.
    assert record["test_accuracy"] * 11 == pytest.approx(round(record["test_accuracy"] * 11))


def test_auto_input_streams_what_does_not_fit_and_says_why(stream_config, caplog):
    stream_config.input = "auto"
    stream_config.augment = "crop_flip"
    stream_config.device_input_budget_gb = 1e-6  # a few KB
    assert data.choose(stream_config)[0] == "stream"
    stream_config.device_input_budget_gb = 1.0
    kind, why = data.choose(stream_config)
    assert kind == "device" and "within the 1 GiB device budget" in why
    stream_config.augment = "random_resized_crop"
    assert data.choose(stream_config) == (
        "stream",
        "augment='random_resized_crop' runs on the host",
    )


def test_synthetic_data_streams_the_images_the_device_input_holds(tiny_config):
    # Streamed where asked, or where the augmentation runs on the host.
    tiny_config.synthetic_eval_size = 20  # not a whole number of batches: one padded
    tiny_config.input_workers, tiny_config.eval_batch_size = 0, 8
    got = {}
    for kind in ("device", "stream"):
        tiny_config.input = kind
        batches = data.create(tiny_config, data.create_mesh(), normalisation=((0,) * 3,) * 2)
        try:
            got[kind] = [jax.tree.map(np.asarray, batch) for batch in batches.eval_batches()]
        finally:
            batches.close()
    assert len(got["stream"]) == len(got["device"]) == 3
    for streamed, held in zip(got["stream"], got["device"], strict=True):
        for name in ("image", "label", "mask"):
            np.testing.assert_array_equal(streamed[name], held[name])


@pytest.mark.slow
def test_host_memory_stays_flat_while_streaming(tmp_path):
    """Two passes over 2,400 JPEGs: the peak RSS after the second equals the first's,
    i.e. memory does not grow with the number of files read."""
    records = sources.image_folder_records(
        str(_folder(tmp_path, classes=tuple("abcdef"), per_class=(400, 1), size=(32, 32))),
        "train",
    )
    dataset = _one_process_train_dataset(records, local_batch=48, image_size=32)
    iterator = stream.iterate(dataset, workers=0)
    steps = len(records) // 48
    peaks = []
    for _ in range(2):
        for _ in range(steps):
            next(iterator)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert peaks[1] - peaks[0] < 20 * 1024, peaks  # KiB: under 20 MiB more


def test_top5_counts_a_label_among_the_five_highest_logits():
    logits = jax.numpy.tile(jax.numpy.arange(7.0), (4, 1))  # class 6 highest, 0 lowest
    labels = jax.numpy.array([6, 2, 1, 0])
    np.testing.assert_array_equal(train.top_k_correct(logits, labels, 5), [1, 1, 0, 0])
    np.testing.assert_array_equal(train.top_k_correct(logits, labels, 1), [1, 0, 0, 0])


@pytest.mark.slow
def test_input_benchmark_times_ours_against_tf_data(tmp_path):
    import json

    from conftest import CONFIGS, run_cli

    root = _folder(tmp_path / "data", per_class=(12, 1), size=(60, 80))
    out = tmp_path / "input.json"
    result = run_cli(
        "vgg_jax.benchmark",
        f"--config={CONFIGS / 'vgg16_imagenet.py'}",
        f"--input={root}",
        "--config.image_size=32",
        "--config.batch_size=8",
        "--steps=2",
        "--burn_in=1",
        "--input_workers=1",
        f"--json={out}",
    )
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert set(numbers["runs"]) == {"ours_1", "ours_threads_1", "tf_data_1"}
    assert numbers["runs"]["ours_1"]["images_per_s"] > 0
    assert numbers["ratio_vs_tf_data"]["1"] > 0
    assert numbers["ratio_threads_vs_tf_data"]["1"] > 0
    assert "ratio ours/tf.data with 1 worker(s)" in result.stdout
    assert "ratio ours/tf.data with 1 thread(s) in one process" in result.stdout


@pytest.mark.slow
def test_tfds_data_source_streams(tiny_config, tmp_path):
    """A TFDS dataset read through tfds.data_source (mocked: no download)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    tiny_config.dataset, tiny_config.image_size = "cifar10", 32
    tiny_config.input, tiny_config.input_workers = "stream", 0  # the mock is in-process
    tiny_config.augment = "crop_flip"
    tiny_config.num_epochs = 1
    with tfds.testing.mock_data(num_examples=64):
        train.train_and_evaluate(tiny_config, str(tmp_path))
    record = read_metrics(tmp_path)[-1]
    assert record["epoch"] == 1 and 0 <= record["test_accuracy"] <= 1


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_decodes_to_the_same_rgb_either_way(tmp_path, monkeypatch, mode):
    """OpenCV's direct RGB decode (where it has one) and its BGR decode then conversion
    give the same pixels, for colour and greyscale JPEGs."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 40, 3) if mode == "RGB" else (24, 40), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(tmp_path / "a.jpg", quality=90)
    element = (str(tmp_path / "a.jpg"), 0)
    direct = views.decode(element[0])
    monkeypatch.delattr(cv2, "IMREAD_COLOR_RGB", raising=False)
    converted = views.decode(element[0])
    assert direct.shape == converted.shape == (24, 40, 3) and direct.dtype == np.uint8
    np.testing.assert_array_equal(direct, converted)


def test_a_streamed_class_of_unreadable_files_is_refused(stream_config):
    for path in (pathlib.Path(stream_config.data_dir) / "train" / "b").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(DatasetUnavailableError, match="training class.*\\bb\\b"):
        data.create(stream_config, data.create_mesh())


def test_a_streamed_test_split_of_unreadable_files_is_refused(stream_config, tmp_path):
    for path in (pathlib.Path(stream_config.data_dir) / "test").rglob("*.jpg"):
        path.write_bytes(b"")
    stream_config.num_epochs, stream_config.max_steps_per_epoch = 1, 1
    with pytest.raises(DatasetUnavailableError, match="no readable image in the evaluation"):
        train.train_and_evaluate(stream_config, str(tmp_path / "run"))


@pytest.mark.slow
def test_a_finished_stream_closes_without_waiting_for_its_workers(stream_config):
    # Batches larger than a pipe (48 x 48 x 3 x 16 bytes = 110 KB > 64 KB): a decoding
    # process that read ahead beyond the run could not hand its batch over and would keep
    # grain's close waiting its 25 s kill timeout, per stream.
    import time

    from vgg_jax import data

    stream_config.image_size, stream_config.batch_size = 48, 16
    stream_config.input, stream_config.input_workers, stream_config.num_epochs = "stream", 2, 1
    stream_config.max_steps_per_epoch = 2
    batches = data.create(stream_config, data.create_mesh(), ((100.0,) * 3, (50.0,) * 3))
    assert len(list(batches.train_batches(0, 0))) == 2
    assert sum(1 for _ in batches.eval_batches()) == batches.eval_passes.batches
    start = time.perf_counter()
    batches.close()
    assert time.perf_counter() - start < 20  # grain's kill timeout is 25 s
