"""Spread training over devices or workers: the ``tf.distribute`` strategy, each process's role, a barrier.

``train.py --distribute`` picks one of three strategies (:func:`make_strategy`):

* ``none``: TensorFlow's default strategy, one device;
* ``mirrored``: ``MirroredStrategy`` over the visible GPUs, or over logical CPU devices
  (:func:`split_cpu`, ``--virtual-cpus``) to try it without GPUs;
* ``multiworker``: ``MultiWorkerMirroredStrategy`` over the processes that ``TF_CONFIG`` describes.

In a multi-worker run every process executes the same steps (the collectives need them all); one is the
chief (:func:`is_chief`), whose files are the run's. :func:`barrier` makes every worker wait for the
others, and :func:`prepare_fit` works around two Keras bugs that stop ``fit`` under a multi-worker
strategy (:func:`patch_keras_for_multi_worker`; tests/test_distribute.py fails once Keras is fixed).
Nothing runs on import; TensorFlow is imported by the functions that use it.
"""

from __future__ import annotations

import os


class StrategyError(ValueError):
    """A strategy that cannot be built here; the message is one line saying what to do."""


def split_cpu(count: int) -> None:
    """Split the CPU into ``count`` logical devices (before TensorFlow uses it)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def make_strategy(kind: str):
    """The ``tf.distribute`` strategy for ``kind`` in ``("none", "mirrored", "multiworker")``.

    Raises:
        StrategyError: multiworker without a usable ``TF_CONFIG``; mirrored with a single device.
    """
    import tensorflow as tf

    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise StrategyError("--distribute multiworker needs the TF_CONFIG environment variable describing "
                                "the cluster; set it on every worker, or use --distribute mirrored")
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except (ValueError, KeyError) as e:
            raise StrategyError(f"--distribute multiworker: TF_CONFIG is not a usable cluster description ({e}); "
                                'expected e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                                '"task": {"type": "worker", "index": 0}}') from None
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy()
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        raise StrategyError("--distribute mirrored found no GPU and a single CPU device; "
                            "pass --virtual-cpus 2 to split the CPU, or run on GPUs")
    return tf.distribute.MirroredStrategy(devices=[d.name for d in cpus])


def is_multi_worker(strategy) -> bool:
    """Whether ``strategy`` spans several worker processes."""
    import tensorflow as tf

    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def is_chief(strategy) -> bool:
    """The chief: ``task.type == "chief"``, or worker 0 when the cluster has no chief; the single
    process of a one-machine run."""
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                            and "chief" not in resolver.cluster_spec().as_dict())


def task_name(strategy) -> str:
    """``"worker1"``, ``"chief0"``...: this process's task in the cluster (``""`` on one machine)."""
    if not is_multi_worker(strategy):
        return ""
    resolver = strategy.cluster_resolver
    return f"{resolver.task_type}{resolver.task_id}"


def barrier(strategy) -> None:
    """Wait until every worker got here (an all-reduce of a constant); a no-op on one worker.

    ``train.py`` calls it after every worker has read ``--out`` and before the chief writes to it, so a
    worker that starts late never takes the chief's fresh ``config.json`` for an earlier run.
    """
    if is_multi_worker(strategy):
        import tensorflow as tf

        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)


def prepare_fit(model, strategy) -> None:
    """Make ``model.fit`` work under ``strategy``: patches the model only when it spans several workers."""
    if is_multi_worker(strategy):
        patch_keras_for_multi_worker(model)


def patch_keras_for_multi_worker(model) -> None:
    """Work around two Keras 3 bugs that stop ``model.fit`` under a multi-worker strategy.

    Both are in Keras' TensorFlow trainer (still in Keras 3.15) and hit any model, not only ours;
    this patches the given model instance only, and :func:`prepare_fit` calls it only when the
    strategy spans several workers. tests/test_distribute.py shows both bugs on the installed Keras
    and fails once Keras no longer has them, so this function can go.

    1. Each step's logs are reduced across workers with ``strategy.reduce("MEAN", v, axis=0)``,
       which fails on the scalar metric values every model returns: ``Invalid reduction dimension 0
       for input with 0 dimensions`` (tensorflow/tensorflow#72388). Returning each value with a
       leading axis of length 1 makes that the plain mean over replicas; ``fit`` sees scalars again.
    2. Before the first step ``fit`` reads one batch to build the loss and metrics symbolically
       and first all-reduces it with ``strategy.reduce``, which does not take nested values, so
       ``(x, y)`` data fail (``Attempt to convert a value (PerReplica...) to a Tensor``). Only shapes
       and dtypes are needed: this process's own replica of the batch gives them. This overrides
       Keras' private ``Trainer._maybe_symbolic_build`` on the instance.
    """
    report_logs_with_replica_axis(model)
    symbolic_build_from_local_batch(model)


def report_logs_with_replica_axis(model) -> None:
    """Bug 1 of :func:`patch_keras_for_multi_worker`: each step returns its logs with a replica axis."""
    import tensorflow as tf

    def with_replica_axis(step):
        def wrapped(data):
            return {k: tf.expand_dims(v, 0) for k, v in step(data).items()}
        return wrapped

    model.train_step = with_replica_axis(model.train_step)
    model.test_step = with_replica_axis(model.test_step)


def symbolic_build_from_local_batch(model) -> None:
    """Bug 2 of :func:`patch_keras_for_multi_worker`: build from this process's replica of the first
    batch (overrides Keras' private ``Trainer._maybe_symbolic_build`` on the instance)."""
    import tensorflow as tf

    from keras import tree

    strategy = model.distribute_strategy

    def local(v):
        return strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(local, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build
