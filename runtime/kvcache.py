"""The KV cache's storage: one uint8 buffer per layer for keys and one for values, at 32, 16, 8 or 4 bits.

Each buffer is [batch, kv_heads, blocks, block_bytes]; a block holds 16 positions of one head
(custom_ops/include/mobiq/attention.h has the byte layout; docs/design.md, "The KV cache").
The KVAttention op reads the precision from ``block_bytes``, so the precision is the session's
choice: the same model file runs with any of them, and nothing is re-exported.
8 and 4 bits store symmetric codes with one float32 scale per position and group of
:func:`group` dims (64 for SmolLM2's head size), i.e. 68 and 36 bytes per 64 values
(0.27x and 0.14x float32).
"""

from __future__ import annotations

BLOCK = 16  # positions per block
BITS = (32, 16, 8, 4)
DEFAULT_BITS = 8


def check_bits(bits: int) -> int:
    """``bits`` when it is a cache precision, else a one-line ValueError."""
    if bits not in BITS:
        raise ValueError(f"[kv] cache bits expected one of {', '.join(map(str, BITS))}; got {bits}")
    return int(bits)


def group(head_dim: int) -> int:
    """Dims per scale at 8 and 4 bits: 64, 32 or 16, the largest that divides ``head_dim``."""
    return next(g for g in (64, 32, 16) if head_dim % g == 0)


def block_bytes(bits: int, head_dim: int) -> int:
    """Bytes of one block of ``head_dim``-wide keys (or values) at ``bits``."""
    check_bits(bits)
    if head_dim % 16:
        raise ValueError(f"[kv] head size expected a multiple of 16; got {head_dim}")
    codes = BLOCK * head_dim * bits // 8
    scales = 4 * BLOCK * (head_dim // group(head_dim)) if bits <= 8 else 0
    return codes + scales


def blocks(positions: int) -> int:
    """Blocks holding ``positions`` positions."""
    return -(-positions // BLOCK)


def bytes_per_position(bits: int, kv_heads: int, head_dim: int, layers: int) -> float:
    """Cache bytes one position costs (keys and values of every layer)."""
    return 2 * layers * kv_heads * block_bytes(bits, head_dim) / BLOCK
