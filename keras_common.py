"""What every Keras layer and model of this project shares: the package they register under and the
config-dict reader. Nothing runs on import."""

from __future__ import annotations

import dataclasses
from typing import Any

_PACKAGE = "oasis_vqvae"  # keras.saving.register_keras_serializable(package=...) of every layer and model
_LAYER_KWARGS = ("name", "trainable", "dtype")  # Keras arguments a model takes beside its config


def _config_from_dict(cls, d: dict[str, Any] | None):
    """Build config dataclass ``cls`` from a dict, naming any keys it does not have."""
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} keys: {unknown}. Valid keys: {sorted(known)}")
    return cls(**d)
