"""Train the segmenter on the demo data's real training slices and masks; Dice on the test split.

    python bench/bench_segmenter.py                       # the settings train.py uses
    python bench/bench_segmenter.py --epochs 4 --filters 8

Prints the training time and the per-tissue Dice (CSF, grey, white matter) on the test split, the
figures ``train.py`` writes to ``metrics.json`` as ``segmenter_test_dice_*``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import utils

    utils.quiet_tensorflow()
    from segmenter import SegmenterConfig

    defaults = SegmenterConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="data root (default: the demo set)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--crop", type=float, default=defaults.crop)
    for name in ("epochs", "filters", "depth", "batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--save", type=Path, default=None, help="also save the trained segmenter here (.keras)")
    args = p.parse_args(argv)

    import build_data
    import dataset
    from anatomy import tissue_dice
    from segmenter import segment, train_segmenter

    root = args.data or build_data.ensure_demo_dataset()
    splits = dataset.read_oasis(root, image_size=args.image_size, masks=True)
    config = SegmenterConfig(image_size=args.image_size, filters=args.filters, depth=args.depth, epochs=args.epochs,
                             batch_size=args.batch_size, learning_rate=args.learning_rate, crop=args.crop)
    start = time.perf_counter()
    model = train_segmenter(splits["train"], None, config, verbose=2)
    seconds = time.perf_counter() - start
    dice = tissue_dice(segment(model, splits["test"].images), splits["test"].masks)
    print(f"config {config.to_dict()}: trained in {seconds:.1f} s; test Dice "
          + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
    if args.save:
        model.save(args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
