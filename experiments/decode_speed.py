"""JPEG decoding speed, PIL against OpenCV (BGR decode + conversion, and direct RGB
where OpenCV has it), in one process (why the streaming workers use OpenCV;
experiments/RESULTS.md, "Streaming input").

  python experiments/decode_speed.py [FOLDER] [COUNT]

FOLDER holds JPEGs (any depth); the first COUNT (default 500), read into memory once,
are decoded to RGB arrays in three alternating rounds.
"""

import io
import pathlib
import sys
import time

import cv2
import numpy as np
from PIL import Image


def decode_with_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decode_with_opencv(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_with_opencv_to_rgb(data: bytes) -> np.ndarray:
    """OpenCV's direct RGB decode (IMREAD_COLOR_RGB, newer OpenCV versions)."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)


def main() -> None:
    folder = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/work/data/cifar400/train")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    cv2.setNumThreads(1)  # as on the workers
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    blobs = [p.read_bytes() for p in files[:count]]
    decoders = [("PIL", decode_with_pil), ("OpenCV", decode_with_opencv)]
    if hasattr(cv2, "IMREAD_COLOR_RGB"):
        decoders.append(("OpenCV direct RGB", decode_with_opencv_to_rgb))
    for round_index in range(3):
        for name, decode in decoders:
            start = time.perf_counter()
            for data in blobs:
                decode(data)
            rate = len(blobs) / (time.perf_counter() - start)
            print(f"{round_index} {name}: {rate:.0f} images/s")


if __name__ == "__main__":
    main()
