"""A small image folder of a few CIFAR-10 classes, linked from an unpacked one.

  python /work/shared/tools/cifar10_jpeg.py folder /tmp/cifar     # all of CIFAR-10
  python experiments/cifar_subset.py /tmp/cifar /tmp/few --classes=frog,horse,ship,truck \
      --train=100 --test=250

DST/{train,test}/<class>/ get symbolic links to the first --train / --test files (by
name) of each class: a folder `--config.dataset=image_folder` reads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def make_subset(source: Path, target: Path, classes: list[str], counts: dict[str, int]) -> None:
    for split, count in counts.items():
        for name in classes:
            files = sorted((source / split / name).iterdir())[:count]
            if len(files) < count:
                raise SystemExit(f"{source / split / name} has {len(files)} files, not {count}")
            folder = target / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for file in files:
                link = folder / file.name
                if not link.exists():
                    os.symlink(file.resolve(), link)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="an unpacked CIFAR-10 image folder")
    parser.add_argument("target", type=Path)
    parser.add_argument("--classes", required=True, help="comma-separated class names")
    parser.add_argument("--train", type=int, required=True, help="images per class")
    parser.add_argument("--test", type=int, required=True, help="images per class")
    args = parser.parse_args()
    counts = {"train": args.train, "test": args.test}
    make_subset(args.source, args.target, args.classes.split(","), counts)


if __name__ == "__main__":
    main()
