"""Every numerical tolerance of the test suite, stated once.

- fp32 inputs: ``max|actual − expected| <= FP32_RTOL · max|expected|`` (relative to the largest
  reference entry, so tiny entries are not judged by their own size).
- bf16 inputs: relative RMS against the fp32 reference run on the same (bf16-valued) inputs,
  ``rms(actual − expected) / rms(expected)``; outputs and states are rounded to bf16 once (2⁻⁹
  relative), gradients of bf16 inputs come back in bf16 too.
"""

import numpy as np

FP32_RTOL = 1e-5
BF16_REL_RMS_OUTPUT = 5e-3
BF16_REL_RMS_GRAD = 1e-2


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def max_rel_error(actual, expected) -> float:
    a, e = _f64(actual), _f64(expected)
    scale = np.max(np.abs(e))
    return float(np.max(np.abs(a - e)) / scale) if scale > 0 else float(np.max(np.abs(a)))


def rel_rms_error(actual, expected) -> float:
    a, e = _f64(actual), _f64(expected)
    scale = np.sqrt(np.mean(e**2))
    return float(np.sqrt(np.mean((a - e) ** 2)) / scale) if scale > 0 else float(np.sqrt(np.mean(a**2)))


def assert_close(actual, expected, *, what: str, bf16: bool = False, grad: bool = False) -> None:
    """fp32 rule by default; ``bf16=True`` applies the relative-RMS rule (output or gradient)."""
    assert np.shape(actual) == np.shape(expected), f"{what}: shape {np.shape(actual)} != {np.shape(expected)}"
    assert np.all(np.isfinite(_f64(actual))), f"{what}: non-finite values"
    if bf16:
        err, tol = rel_rms_error(actual, expected), (BF16_REL_RMS_GRAD if grad else BF16_REL_RMS_OUTPUT)
        assert err <= tol, f"{what}: relative RMS error {err:.3g} > {tol:.3g}"
    else:
        err = max_rel_error(actual, expected)
        assert err <= FP32_RTOL, f"{what}: max relative error {err:.3g} > {FP32_RTOL:.3g}"
