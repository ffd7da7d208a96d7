"""A GGUF's rope_freqs tensor back to the `llama3` rope_scaling it was computed from (Llama 3.1, 3.2, 3.3).

llama.cpp's converter does not write a Llama 3 checkpoint's rope_scaling as metadata: it writes
`rope_freqs.weight`, one divisor per rotary frequency, from transformers' formula. For a frequency f of
wavelength w = 2 pi / f, with L = original_max_position_embeddings:
  w < L / high_freq_factor   -> 1                      (high frequencies kept)
  w > L / low_freq_factor    -> factor                 (low frequencies slowed by the factor)
  otherwise                  -> 1 / ((1 - s) / factor + s),  s = (L / w - low_freq_factor) /
                                                                 (high_freq_factor - low_freq_factor)
The divisors are all RoPE uses, so any parameters that give the same divisors give the same model. This
module finds such parameters (first the ones Llama 3 ships with, then by solving the smooth band with
low_freq_factor 1) and checks that they reproduce every divisor; a file whose divisors no llama3
parameters reproduce is refused.
"""

from __future__ import annotations

import math

import numpy as np

# What Meta's Llama 3.1 / 3.2 / 3.3 configs hold besides the factor (8 for 3.1 and 3.3, 32 for 3.2).
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The divisors are stored as float32.
RTOL = 1e-5


def llama3_divisors(inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> np.ndarray:
    """Each frequency's divisor under llama3 scaling (transformers' _compute_llama3_parameters)."""
    old = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high_freq_factor, 1.0, np.where(wavelen > old / low_freq_factor, factor, medium))


def llama3_rope_scaling(rope_freqs: np.ndarray, rope_theta: float, head_dim: int) -> dict:
    """HF's rope_scaling dict whose divisors equal `rope_freqs` (float32, head_dim / 2); ValueError if none does.
    Its floats are float64 (the caller writes them as the float32 values they stand for)."""
    divisors = np.asarray(rope_freqs, dtype=np.float64)
    inv_freq = rope_theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if divisors.shape != inv_freq.shape:
        raise ValueError(f"GGUF rope_freqs.weight has {divisors.size} values; a head of {head_dim} has "
                         f"{inv_freq.size} rotary frequencies")
    largest = float(divisors.max())
    candidates = [dict(LLAMA3_DEFAULTS)]
    solved = _solve_smooth_band(divisors, inv_freq, largest)
    if solved is not None:
        high = solved["high_freq_factor"]
        candidates += [{**solved, "high_freq_factor": round(high, digits)} for digits in range(4)] + [solved]
    # Each number as a config would write it (8.0, not the float32 divisor's 8.000001) first, as solved last.
    for factor in dict.fromkeys([round(largest, digits) for digits in range(4)] + [largest]):
        for params in candidates:
            if np.allclose(llama3_divisors(inv_freq, factor, **params), divisors, rtol=RTOL, atol=0):
                return {"rope_type": "llama3", "factor": factor, **params}
    raise ValueError("GGUF rope_freqs.weight matches no llama3 rope scaling (Llama 3.1-style); this file cannot "
                     "be converted")


def _solve_smooth_band(divisors: np.ndarray, inv_freq: np.ndarray, factor: float) -> dict | None:
    """With low_freq_factor 1: s = (L / w - 1) / (high - 1) is linear in 1 / w over the band where
    1 < divisor < factor; two points of it give L and high_freq_factor (one point, with high 4, gives L)."""
    band = (divisors > 1 + RTOL) & (divisors < factor * (1 - RTOL))
    if factor <= 1 or not band.any():
        return None
    s = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
    x = inv_freq[band] / (2 * math.pi)  # 1 / wavelength
    if band.sum() >= 2:
        slope, intercept = np.polyfit(x, s, 1)  # s = L / (high - 1) * x - 1 / (high - 1)
        if intercept >= 0:
            return None
        high = 1 - 1 / intercept
        old = slope * (high - 1)
    else:
        high = LLAMA3_DEFAULTS["high_freq_factor"]
        old = (s[0] * (high - 1) + 1) / x[0]
    return {"low_freq_factor": 1.0, "high_freq_factor": float(high),
            "original_max_position_embeddings": int(round(old))}
