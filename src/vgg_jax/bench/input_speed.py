"""Speed of the host input pipeline (docs/benchmarking.md): ours against tf.data doing the
same work in its fastest standard form (`decode_and_crop_jpeg` decodes only the crop)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from vgg_jax.bench import profiling
from vgg_jax.data import sources, stream


def ours(
    config: ml_collections.ConfigDict, root: str, workers: int, threads: int = 1
) -> Iterator[Any]:
    records = sources.image_folder_records(root, "train")
    dataset = stream.train_dataset(
        records,
        seed=config.seed,
        local_batch=config.batch_size,
        image_size=config.image_size,
        augment="random_resized_crop",
        process_index=0,
        process_count=1,
    )
    return stream.iterate(dataset, workers, threads)


def tf_data(config: ml_collections.ConfigDict, root: str, workers: int) -> Iterator[Any]:
    tf = sources.import_tensorflow()
    files, _ = sources.list_image_folder(root, "train")
    paths = [str(path) for path, _ in files]
    labels = [label for _, label in files]
    size = config.image_size

    def decode_crop_flip(path, label):
        data = tf.io.read_file(path)
        shape = tf.io.extract_jpeg_shape(data)
        begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.zeros((1, 0, 4)),
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(image, (size, size), method="bilinear")
        image = tf.image.random_flip_left_right(tf.cast(tf.round(image), tf.uint8))
        return image, label

    dataset = (
        tf.data.Dataset.from_tensor_slices((paths, labels))
        .shuffle(len(paths), seed=config.seed, reshuffle_each_iteration=True)
        .repeat()
        .map(decode_crop_flip, num_parallel_calls=workers, deterministic=False)
        .batch(config.batch_size, drop_remainder=True)
        .prefetch(2)
    )
    return iter(dataset.as_numpy_iterator())


PIPELINES: dict[str, Callable[..., Iterator[Any]]] = {
    "ours": ours,
    "ours_threads": lambda config, root, threads: ours(config, root, 0, threads),
    "tf_data": tf_data,
}
# The JSON's ratios to tf.data with N parallel calls: ours with N worker processes, and
# ours with N threads in one process.
RATIOS = {"ratio_vs_tf_data": "ours", "ratio_threads_vs_tf_data": "ours_threads"}


def run(
    config: ml_collections.ConfigDict,
    root: str,
    workers_list: list[int],
    steps: int,
    burn_in: int,
) -> dict[str, Any]:
    """Every number of one input benchmark (what --json writes)."""
    root = os.path.expanduser(root)
    if not workers_list or min(workers_list) < 1:
        raise ValueError(f"--input_workers must be counts >= 1, got {workers_list}")
    results: dict[str, Any] = {
        "folder": root,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "steps": steps,
        "burn_in": burn_in,
        "cpus": os.cpu_count(),
        "runs": {},
        **{key: {} for key in RATIOS},
    }
    for workers in workers_list:
        for name, make in PIPELINES.items():
            iterator = make(config, root, workers)
            # Host work: a batch is complete when next() returns it.
            times = profiling.time_steps(functools.partial(next, iterator), steps, burn_in, None)
            if hasattr(iterator, "close"):
                iterator.close()
            summary = profiling.summarise_times(times, config.batch_size)
            results["runs"][f"{name}_{workers}"] = summary
        speed = {name: results["runs"][f"{name}_{workers}"]["images_per_s"] for name in PIPELINES}
        for key, name in RATIOS.items():
            results[key][str(workers)] = speed[name] / speed["tf_data"]
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        f"input pipeline: {results['folder']}/train, {results['image_size']}px random-resized-"
        f"crop + flip, batch {results['batch_size']}, {results['steps']} batches after "
        f"{results['burn_in']}; {results['cpus']} CPUs"
    ]
    for name, run_ in results["runs"].items():
        lines.append(
            f"{name:>12}: {run_['images_per_s']:8.1f} images/s "
            f"(median {run_['median_s']:.3f} s/batch)"
        )
    for workers, ratio in results["ratio_vs_tf_data"].items():
        threads = results["ratio_threads_vs_tf_data"][workers]
        lines.append(f"ratio ours/tf.data with {workers} worker(s): {ratio:.2f}")
        lines.append(f"ratio ours/tf.data with {workers} thread(s) in one process: {threads:.2f}")
    return "\n".join(lines)
