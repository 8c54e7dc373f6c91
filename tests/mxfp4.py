"""MXFP4 in OpenAI's original checkpoint layout, written independently of MLX and transformers.

A block is 32 consecutive values along the input dimension: 16 bytes of FP4 (E2M1) codes,
low nibble first, and one E8M0 byte (a power of two, biased by 127) as its scale. The
scale is the smallest power of two that brings the block's largest magnitude within
FP4's range (|x| <= 6), as `mx.quantize(mode="mxfp4")` chooses it.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
# FP4 E2M1 magnitudes by code 0..7; code | 8 is the negative.
FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
FP4_VALUES = np.concatenate([FP4_MAGNITUDES, -FP4_MAGNITUDES])


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., n] float -> blocks [..., n/32, 16] uint8 and scales [..., n/32] uint8."""
    *lead, n = w.shape
    if n % BLOCK:
        raise ValueError(f"last dimension {n} is not a multiple of {BLOCK}")
    groups = w.astype(np.float32).reshape(*lead, n // BLOCK, BLOCK)
    amax = np.abs(groups).max(axis=-1)
    exponent = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-38) / 6.0)), -127)
    exponent = np.clip(exponent, -127, 127).astype(np.int32)
    scaled = groups / np.exp2(exponent)[..., None].astype(np.float32)
    magnitude = np.abs(np.abs(scaled)[..., None] - FP4_MAGNITUDES).argmin(axis=-1)
    # Zero is written as +0, as MLX writes it.
    codes = magnitude + 8 * ((scaled < 0) & (magnitude > 0))
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, (exponent + 127).astype(np.uint8)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks [..., G, 16] uint8 and scales [..., G] uint8 -> [..., G * 32] float32."""
    low = FP4_VALUES[blocks & 0x0F]
    high = FP4_VALUES[blocks >> 4]
    values = np.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], BLOCK)
    values = values * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)
