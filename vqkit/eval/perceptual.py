"""Perceptual speech-quality metrics from outside libraries: ViSQOL v3 and DNSMOS.

ViSQOL (``visqol-python``, speech mode with its deep-lattice quality mapper, the C++ default) is
intrusive: it compares an output with its reference, both resampled to 16 kHz, and returns a
MOS-LQO (1..5). DNSMOS (``speechmos``, Microsoft's ONNX models bundled in that package) is not:
it predicts a listener's opinion of one signal (signal, background, overall: ITU-T P.835; and
P.808) from the signal alone, at 16 kHz. Both ship their model files inside their packages; no
file is fetched at run time. Both are optional (``pip install 'vqkit[eval]'``): without them
every score is the failure record ``{"error": "not installed: ..."}``.

Signals are float ``(T,)`` in -1..1 at ``sample_rate``; each function raises ``RuntimeError`` with
a reason when the library cannot score, and :func:`perceptual_scores` turns that into a record.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from vqkit.audio.io import resample
from vqkit.eval.metrics import try_metric

PERCEPTUAL_RATE = 16000  # ViSQOL speech mode and DNSMOS are defined on 16 kHz speech
DNSMOS_KEYS = {"dnsmos_sig": "sig_mos", "dnsmos_bak": "bak_mos", "dnsmos_ovrl": "ovrl_mos"}
DNSMOS_KEYS["dnsmos_p808"] = "p808_mos"
PERCEPTUAL_KEYS = ("visqol", *DNSMOS_KEYS)
INSTALL_HINT = "pip install 'vqkit[eval]'"


def missing() -> str | None:
    """Why the perceptual metrics cannot run (the packages that are absent), or None."""
    needed = {"visqol": "visqol-python", "ai_edge_litert": "ai-edge-litert"}
    needed.update(speechmos="speechmos", onnxruntime="onnxruntime")
    absent = [pip for module, pip in needed.items() if importlib.util.find_spec(module) is None]
    return f"not installed: {', '.join(absent)} ({INSTALL_HINT})" if absent else None


def _at_16k(x: np.ndarray, sample_rate: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a signal shaped (T,), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("signal contains NaN or Inf")
    # What a listener hears from a 16-bit file; DNSMOS refuses samples outside -1..1.
    return np.clip(resample(x, sample_rate, PERCEPTUAL_RATE), -1.0, 1.0)


@functools.lru_cache(maxsize=1)
def _visqol_api() -> Any:
    from visqol.api import VisqolApi

    api = VisqolApi()
    with _quiet_stderr():  # TFLite's C++ runtime logs an INFO line as it loads the model
        api.create(mode="speech", use_lattice_model=True)
    return api


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null meanwhile (C libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def visqol(x: np.ndarray, x_hat: np.ndarray, sample_rate: int) -> float:
    """ViSQOL v3 MOS-LQO (1..5) of ``x_hat`` against ``x``, both ``(T,)`` at ``sample_rate``,
    in speech mode with the lattice mapper, after resampling both to 16 kHz."""
    x16, x_hat16 = _at_16k(x, sample_rate), _at_16k(x_hat, sample_rate)
    if x16.shape != x_hat16.shape:
        raise ValueError(f"expected x and x_hat of the same shape, got {x.shape}, {x_hat.shape}")
    if not np.any(x16):
        raise ValueError("reference is silent")
    if not np.any(x_hat16):
        raise ValueError("output is silent")
    try:
        result = _visqol_api().measure_from_arrays(
            x16.astype(np.float64), x_hat16.astype(np.float64), PERCEPTUAL_RATE
        )
    except Exception as e:  # the library raises whatever numpy raised inside it
        raise RuntimeError(f"ViSQOL: {type(e).__name__}: {e}") from None
    return float(result.moslqo)


@functools.lru_cache(maxsize=1)
def _dnsmos_model() -> Any:
    """speechmos's DNSMOS with single-threaded ONNX sessions (its own use all cores)."""
    import onnxruntime as ort
    from speechmos import dnsmos

    root = os.path.dirname(dnsmos.__file__)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    model = dnsmos.DNSMOS.__new__(dnsmos.DNSMOS)
    model.primary_model_path = os.path.join(root, "dnsmos_models", "sig_bak_ovr.onnx")
    cpu = ["CPUExecutionProvider"]
    model.onnx_sess = ort.InferenceSession(model.primary_model_path, options, providers=cpu)
    p808 = os.path.join(root, "dnsmos_models", "model_v8.onnx")
    model.p808_onnx_sess = ort.InferenceSession(p808, options, providers=cpu)
    return model


def dnsmos_scores(x: np.ndarray, sample_rate: int) -> dict[str, float]:
    """DNSMOS of ``x`` ``(T,)`` at ``sample_rate`` after resampling to 16 kHz: ``dnsmos_sig``,
    ``dnsmos_bak``, ``dnsmos_ovrl`` (P.835, 1..5) and ``dnsmos_p808``."""
    x16 = _at_16k(x, sample_rate)
    if not np.any(x16):
        raise ValueError("signal is silent")
    try:
        scores = _dnsmos_model()(x16, PERCEPTUAL_RATE, False)
    except Exception as e:
        raise RuntimeError(f"DNSMOS: {type(e).__name__}: {e}") from None
    out = {key: float(scores[name]) for key, name in DNSMOS_KEYS.items()}
    if not all(np.isfinite(list(out.values()))):
        raise RuntimeError(f"DNSMOS: non-finite scores {out}")
    return out


def perceptual_scores(
    x: np.ndarray, x_hat: np.ndarray, sample_rate: int, *, dnsmos: bool = True
) -> dict[str, Any]:
    """``visqol`` of ``x_hat`` against ``x`` and the ``dnsmos_*`` of ``x_hat`` (None unless
    ``dnsmos``: it is the slow one); a metric that cannot run is recorded as
    ``{"error": reason}``."""
    absent = missing()
    if absent:
        return {k: {"error": absent} if dnsmos or k == "visqol" else None for k in PERCEPTUAL_KEYS}
    out: dict[str, Any] = dict.fromkeys(DNSMOS_KEYS)
    out["visqol"] = try_metric(visqol, x, x_hat, sample_rate)
    if not dnsmos:
        return out
    try:
        out.update(dnsmos_scores(x_hat, sample_rate))
    except (ValueError, RuntimeError) as e:
        out.update(dict.fromkeys(DNSMOS_KEYS, {"error": str(e)}))
    return out
