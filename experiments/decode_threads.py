"""The streaming workers' per-image work (OpenCV decode, random-resized crop to 224,
flip) in 1 and 2 threads, without grain: the ceiling for the threaded input pipeline,
and OpenCV's direct RGB decode against BGR decode + conversion
(experiments/RESULTS.md, "Streaming input").

  python experiments/decode_threads.py [FOLDER] [COUNT]

FOLDER holds JPEGs (any depth); the first 1,000 are read into memory once and COUNT
(default 2,000) images are decoded and augmented per setting.
"""

import pathlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from decode_speed import decode_with_opencv, decode_with_opencv_to_rgb  # this folder

from vgg_jax.data import views


def main() -> None:
    folder = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/work/data/cifar400")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    blobs = [path.read_bytes() for path in sorted(folder.rglob("*.jpg"))[:1000]]
    has_rgb_decode = hasattr(cv2, "IMREAD_COLOR_RGB")

    def one_image(index: int, direct_rgb: bool) -> np.ndarray:
        decode = decode_with_opencv_to_rgb if direct_rgb else decode_with_opencv
        image = decode(blobs[index % len(blobs)])
        draws = views.random_draws(0, index, 1)[0].tolist()
        return views.train_view(image, draws, 224, "random_resized_crop")

    for threads in (1, 2):
        for direct_rgb in (False, True) if has_rgb_decode else (False,):
            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                images = pool.map(one_image, range(count), [direct_rgb] * count, chunksize=32)
                list(images)
            rate = count / (time.perf_counter() - start)
            decode = "direct RGB" if direct_rgb else "BGR + cvtColor"
            print(f"threads {threads}, {decode}: {rate:.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
