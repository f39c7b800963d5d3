"""NannyML's confidence-based performance estimation (CBPE) on the evaluation's streams, beside
conceptguard's own estimate (mean calibrated trust): the same reference data, the same
streams. CBPE is fitted on the calibration split's clean inputs (predicted probabilities,
predictions and labels) and estimates each stream's accuracy as one chunk.

nannyml is an optional dependency of the offline job (``pip install conceptguard[cbpe]``;
the dev set has it); without it :func:`cbpe_accuracy` says so and the report shows conceptguard's
estimate alone."""

from __future__ import annotations

import os
import warnings

import numpy as np


def nannyml_version() -> str | None:
    """The installed nannyml's version, or None when it cannot be imported."""
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")  # no usage telemetry
    try:
        import nannyml
    except Exception:  # ImportError, or a broken install (a missing dependency of its own)
        return None
    return str(nannyml.__version__)


def _frame(probabilities: np.ndarray, labels: np.ndarray | None):
    import pandas as pd

    p = np.asarray(probabilities, np.float64)
    df = pd.DataFrame({f"p_{c}": p[:, c] for c in range(p.shape[1])})
    df["y_pred"] = p.argmax(1)
    if labels is not None:
        df["y_true"] = np.asarray(labels, np.int64)
    return df


def cbpe_accuracy(reference_probabilities: np.ndarray, reference_labels: np.ndarray,
                  streams: dict[str, np.ndarray]) -> dict:
    """``{"version": ..., "estimates": {stream: estimated accuracy}}``, or ``{"unavailable":
    why}``. ``streams``: each stream's predicted probabilities ``(N, C)``."""
    version = nannyml_version()
    if version is None:
        return {"unavailable": "nannyml is not installed (pip install nannyml==0.13.1)"}
    import nannyml as nml

    c = reference_probabilities.shape[1]
    estimator = nml.CBPE(problem_type="classification_multiclass",
                         y_pred_proba={k: f"p_{k}" for k in range(c)}, y_pred="y_pred",
                         y_true="y_true", metrics=["accuracy"], chunk_number=1)
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "too few chunks": one chunk per stream is the point
        estimator.fit(_frame(reference_probabilities, reference_labels))
        for name, probs in streams.items():
            if len(probs) == 0:
                continue
            df = estimator.estimate(_frame(probs, None)).to_df()
            analysis = df[df[("chunk", "period")] == "analysis"]
            out[name] = round(float(analysis[("accuracy", "value")].iloc[0]), 4)
    return {"version": version, "estimates": out,
            "fitted_on": "the calibration split's clean inputs"}
