"""distribute.py: the Keras multi-worker workaround is still needed (this test fails once Keras is fixed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from conftest import REPO

# Run by each of two workers: a plain Keras model fitted on (x, y) batches under a real two-process
# MultiWorkerMirroredStrategy, first as Keras ships it, then with one part of the workaround, then with
# both. Each attempt prints one line; an error is raised while tracing, before any collective runs, so
# the cluster stays usable for the next attempt.
PROBE = """
import sys
import numpy as np
import tensorflow as tf
import keras
import distribute

strategy = tf.distribute.MultiWorkerMirroredStrategy()
assert distribute.is_multi_worker(strategy)
x = np.random.default_rng(0).random((8, 3), dtype=np.float32)
data = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(4)
for name, patches in (("keras", []), ("build patched", [distribute.symbolic_build_from_local_batch]),
                      ("both patched", [distribute.symbolic_build_from_local_batch,
                                        distribute.report_logs_with_replica_axis])):
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    for patch in patches:
        patch(model)
    try:
        model.fit(data, epochs=1, verbose=0)
        print(f"{name}: ok", flush=True)
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_keras_still_needs_the_multi_worker_workaround():
    """Both Keras bugs that ``distribute.patch_keras_for_multi_worker`` works around still happen.

    When this fails because an attempt without a part of the workaround succeeded, Keras fixed that bug:
    remove that part of the workaround (and this test's line for it).
    """
    ports = [_free_port(), _free_port()]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CONFIG": json.dumps(tf_config)}
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out + err[-3000:]
    lines = dict(line.split(": ", 1) for line in outputs[0][0].splitlines())
    other = dict(line.split(": ", 1) for line in outputs[1][0].splitlines())
    assert {k: v.split(":")[0] for k, v in other.items()} == {k: v.split(":")[0] for k, v in lines.items()}  # alike
    # Bug 2: before the first step Keras all-reduces a nested (x, y) batch, which strategy.reduce refuses.
    assert "PerReplica" in lines["keras"], f"Keras builds from a nested batch now: drop symbolic_build_from_local_batch ({lines['keras']})"
    # Bug 1: each step's scalar logs are reduced with axis=0 across workers.
    assert "Invalid reduction dimension 0" in lines["build patched"], \
        f"Keras reduces scalar logs now: drop report_logs_with_replica_axis ({lines['build patched']})"
    assert lines["both patched"] == "ok"
