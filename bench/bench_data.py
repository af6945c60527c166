"""Loading speed: ``dataset.read_oasis`` against a plain one-file-at-a-time PIL loop, same tree, same run.

Writes an OASIS-size tree (default 9,664 / 1,120 / 544 images of 256x256 8-bit PNG, 32 slices per case)
to a temporary folder, then times

* ``plain``: for each split, ``np.stack([np.asarray(Image.open(f)) for f in files])`` (same file order);
* ``read_oasis``: ``dataset.read_oasis(root)`` (uint8 Splits, threaded PIL decode, names parsed, checks);
* ``load_oasis`` (with ``--float``): ``dataset.load_oasis(root)``, i.e. the above plus float32 conversion;
* ``tf.data`` (with ``--tf``): the alternative design, ``tf.io.read_file`` + ``tf.io.decode_png`` in a
  ``map(num_parallel_calls=AUTOTUNE)``, batched and gathered into one uint8 array (TensorFlow import excluded).

Content is realistic for PNG compression: demo slices (synthetic subjects made from the MNI templates,
``build_data.demo_case``) plus per-image Gaussian noise inside the brain, black background, so the files
are about as large as OASIS's (~15 KB) rather than near-empty. Both loaders read from the page cache
(the tree was just written); each is run ``--repeats`` times, alternating, and the best run is reported.
Images per CPU-second (process time, all threads) are printed too: unlike wall-clock rates they barely
move when other programs share the cores, and their ratio to the wall-clock rate shows how many cores
a loader kept busy. The load average is printed before and after, because a busy machine slows every loader.

    python bench/bench_data.py                       # full OASIS size (~1 min to write the tree)
    python bench/bench_data.py --train 960 --validate 112 --test 54 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dataset  # noqa: E402

SLICES_PER_CASE = 32


def write_tree(root: Path, counts: dict[str, int], seed: int, n_base_cases: int = 8) -> None:
    """OASIS-layout tree of noisy demo slices; ``counts`` images per split, 32 slices per case."""
    from PIL import Image

    import build_data

    template = build_data.demo_template()
    bases = np.concatenate([build_data.demo_case(template, seed, c, SLICES_PER_CASE, 256)[1]
                            for c in range(n_base_cases)])  # (n_base_cases * 32, 256, 256) uint8

    jobs = []
    case = 0
    for name in dataset.SPLITS:
        folder = root / dataset.SPLIT_DIRS[name]
        folder.mkdir(parents=True)
        for i in range(counts[name]):
            if i % SLICES_PER_CASE == 0:
                case += 1
            jobs.append((folder / dataset.slice_file_name(case, i % SLICES_PER_CASE), len(jobs)))

    def write(job):
        path, j = job
        base = bases[j % len(bases)]
        rng = np.random.default_rng([seed, j])
        noisy = base + (base > 0) * rng.normal(0, 2.0, base.shape)
        Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mode="L").save(path, format="PNG")

    with ThreadPoolExecutor(dataset._num_workers()) as pool:
        list(pool.map(write, jobs, chunksize=64))


def plain_loop(root: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    out = {}
    for name in dataset.SPLITS:
        folder = root / dataset.SPLIT_DIRS[name]
        files = sorted(folder.iterdir(), key=lambda p: dataset._natural_key(p.name))  # read_oasis order
        out[name] = np.stack([np.asarray(Image.open(f)) for f in files])[..., None]
    return out


def tf_data_loop(root: Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    out = {}
    for name in dataset.SPLITS:
        folder = root / dataset.SPLIT_DIRS[name]
        files = [str(p) for p in sorted(folder.iterdir(), key=lambda p: dataset._natural_key(p.name))]
        ds = (tf.data.Dataset.from_tensor_slices(files)
              .map(lambda f: tf.io.decode_png(tf.io.read_file(f), channels=1), num_parallel_calls=tf.data.AUTOTUNE)
              .batch(256).prefetch(tf.data.AUTOTUNE))
        out[name] = np.concatenate([b.numpy() for b in ds])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=9664, help="train images (default: %(default)s, as OASIS)")
    parser.add_argument("--validate", type=int, default=1120, help="validate images (default: %(default)s)")
    parser.add_argument("--test", type=int, default=544, help="test images (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each loader; best is reported "
                                                               "(default: %(default)s)")
    parser.add_argument("--float", action="store_true", help="also time load_oasis (float32 output, 4x memory)")
    parser.add_argument("--tf", action="store_true", help="also time a tf.io.decode_png tf.data pipeline")
    parser.add_argument("--dir", type=Path, default=None,
                        help="write the tree here and keep it, or reuse the tree a previous run left there "
                             "(default: a temporary folder, deleted afterwards)")
    parser.add_argument("--seed", type=int, default=0, help="content seed (default: %(default)s)")
    args = parser.parse_args(argv)
    counts = {"train": args.train, "validate": args.validate, "test": args.test}
    if min(counts.values()) < 1:
        parser.error("each split needs at least one image")

    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_data_")
        root = Path(tmp) / "oasis"
    else:
        root = args.dir
    try:
        n = sum(counts.values())
        t = time.perf_counter()
        have = {k: len(list((root / dataset.SPLIT_DIRS[k]).glob("*.png"))) if root.exists() else 0 for k in counts}
        if have == counts:
            how = "reused"
        elif root.exists():
            parser.error(f"{root} exists but holds {have}, not {counts}; pass a new folder")
        else:
            write_tree(root, counts, args.seed)
            how = f"written in {time.perf_counter() - t:.1f} s"
        size = sum(p.stat().st_size for p in root.rglob("*.png"))
        print(f"tree: {n} PNGs, {size / n / 1024:.1f} KiB each on average, {how} ({root})")
        print(f"cores: {len(os.sched_getaffinity(0))}, read_oasis decode threads: {dataset._num_workers()}, "
              f"load average before timing: {os.getloadavg()[0]:.2f}")

        times = {"plain": [], "read_oasis": []}
        cpu = {"plain": [], "read_oasis": []}
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            ref = plain_loop(root)
            times["plain"].append(time.perf_counter() - t)
            cpu["plain"].append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            got = dataset.read_oasis(root)
            times["read_oasis"].append(time.perf_counter() - t)
            cpu["read_oasis"].append(time.process_time() - c)
            for name in dataset.SPLITS:  # same pixels, so the comparison is fair
                assert np.array_equal(ref[name], got[name].images), name
            del ref, got
        if args.float:
            times["load_oasis"], cpu["load_oasis"] = [], []
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                x = dataset.load_oasis(root)
                times["load_oasis"].append(time.perf_counter() - t)
                cpu["load_oasis"].append(time.process_time() - c)
                del x

        if args.tf:
            import tensorflow  # noqa: F401  (import time is not decode time)

            times["tf.data"], cpu["tf.data"] = [], []
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                x = tf_data_loop(root)
                times["tf.data"].append(time.perf_counter() - t)
                cpu["tf.data"].append(time.process_time() - c)
                assert np.array_equal(x["test"], dataset.read_split(root / dataset.SPLIT_DIRS["test"]).images)
                del x

        rate = {k: n / min(v) for k, v in times.items()}
        for k, v in times.items():
            runs = ", ".join(f"{n / s:.0f}" for s in v)
            print(f"{k:11s} {rate[k]:7.0f} images/s (best of {len(v)}; runs: {runs}); "
                  f"{n / min(cpu[k]):.0f} images per CPU-second")
        print(f"ratio read_oasis / plain = {rate['read_oasis'] / rate['plain']:.2f}x; "
              f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
