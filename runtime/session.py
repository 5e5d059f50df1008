"""One ONNX Runtime session over an exported model: prefill/decode steps with a KV cache.

``forward(ids, cache, bits)`` runs the new tokens ``ids`` [1, S] after the cached
ones and returns (logits [1, S, vocab], the grown cache). ``bits`` is the
budget: the graph's target_bits input is a per-step input, so changing the budget
never reloads anything, and ``hold`` (runtime/bits_hold.py; on by default) moves it
so that the bits read since the budget was set average the budget.
``last_avg_bits`` is the average bits the step read. ``prefill`` feeds a long sequence in
pieces so that the logits held at once stay near PREFILL_LOGIT_BYTES.

The cache is written in place: each layer's keys and values live in one buffer
bound as both the past input and the present output of the step (the attention
op then appends the new positions instead of copying the whole cache every
token). MoBiQuant files (KVAttention) take uint8 buffers [1, kv_heads, blocks,
block_bytes] whose block size is the cache precision ``kv_bits`` (32, 16, 8 or
4; runtime/kvcache.py), the session's choice; the baselines (GroupQueryAttention)
take float32 [1, kv_heads, capacity, head_dim]. A step writes positions
[length, length + S) only, so an older KVCache of the same buffers stays valid
up to its own length until a later step writes past it; a cache that runs out
of capacity moves to buffers twice as large (up to the model's context).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import kvcache, ops
from .bits_hold import BitsHold
from .modelfile import ModelFileError, ModelInfo, locate

PREFILL_LOGIT_BYTES = 64 << 20  # logits one prefill piece may return


class ContextError(ValueError):
    """Tokens that cannot fit the model's context."""


@dataclass
class KVCache:
    buffers: dict[str, np.ndarray]  # past_key_values.{i}.key|value -> [1, kv_heads, rows, row_size]
    length: int                     # valid positions: [0, length)
    binding: Any = field(default=None, repr=False)  # ORT IOBinding with the buffers bound, made on first use
    positions_per_row: int = 1      # kvcache.BLOCK for uint8 block buffers, 1 for float32 [.., capacity, head_dim]

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2] * self.positions_per_row

    @property
    def nbytes(self) -> int:
        """Bytes the cache's buffers take (all of their capacity)."""
        return sum(b.nbytes for b in self.buffers.values())


class ModelSession:
    def __init__(self, path, threads: int | None = None, kv_bits: int | None = None, hold: bool = True):
        """``hold``: keep the bits read at the budget on average (False: every step asks for the budget itself)."""
        import onnxruntime as ort

        self.info: ModelInfo = locate(path)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.log_severity_level = 4  # fatal only: its errors reach the user as our one-line exceptions
        try:
            options.register_custom_ops_library(ops.library_path())
        except ops.OpLibraryError:
            raise
        except Exception as e:  # noqa: BLE001 — ORT raises a generic error for an incompatible library
            raise ops.OpLibraryError(f"[mobiq_ops] op library could not be loaded by ONNX Runtime "
                                     f"{ort.__version__}: {e}") from e
        try:
            self.session = ort.InferenceSession(str(self.info.onnx_path), options)
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"[mobiq] {self.info.onnx_path}: ONNX Runtime could not load it ({e})") from e
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present_names = ["present." + n[len("past_key_values."):] for n in self.past_names]
        self.elastic = "target_bits" in self.inputs
        past = self.inputs[self.past_names[0]]
        self.kv_heads = int(past.shape[1])
        self.blocked = past.type == "tensor(uint8)"  # KVAttention's cache blocks, else a float32 cache
        if self.blocked:
            self.head_dim = int((self.info.meta.get("kv_cache") or {}).get("head_dim", 0))
            if not self.head_dim:
                raise ModelFileError(f"[mobiq] {self.info.directory / 'mobiq.json'}: kv_cache.head_dim expected; "
                                     f"got none (re-export the model)")
            self.row_dtype, self.positions_per_row = np.uint8, kvcache.BLOCK
            self.set_kv_bits(kvcache.DEFAULT_BITS if kv_bits is None else kv_bits)
        else:
            self.head_dim, self.kv_bits = int(past.shape[3]), 32
            self.row_shape, self.row_dtype, self.positions_per_row = (self.head_dim,), np.float32, 1
            self.set_kv_bits(32 if kv_bits is None else kv_bits)
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.prefill_rows = max(16, PREFILL_LOGIT_BYTES // (4 * self.vocab))  # SmolLM2 341, Gemma 3 64
        self.last_avg_bits = float("nan")
        self.hold = BitsHold() if hold and self.elastic else None

    def empty_cache(self, capacity: int = 0) -> KVCache:
        """A cache with room for ``capacity`` positions (zeros are not resident until written)."""
        return KVCache(self._buffers(capacity), 0, positions_per_row=self.positions_per_row)

    def set_kv_bits(self, bits: int) -> None:
        """The precision of caches made from now on (``empty_cache``); a cache keeps the one it was made with."""
        if not self.blocked:
            if bits != 32:
                raise ValueError(f"[mobiq] {self.info.onnx_path}: a float32 cache (GroupQueryAttention); kv_bits "
                                 f"expected 32; got {bits}")
            return
        self.kv_bits = kvcache.check_bits(bits)
        self.row_shape = (kvcache.block_bytes(self.kv_bits, self.head_dim),)

    def cache_bits(self, cache: KVCache) -> int:
        """The precision ``cache`` was made with."""
        if not self.blocked:
            return 32
        row = next(iter(cache.buffers.values())).shape[3]
        return next(b for b in kvcache.BITS if kvcache.block_bytes(b, self.head_dim) == row)

    def _buffers(self, capacity: int, like: KVCache | None = None) -> dict[str, np.ndarray]:
        """Zeroed buffers for ``capacity`` positions, in the format of ``like`` (else this session's kv_bits)."""
        rows = -(-capacity // self.positions_per_row)
        row_shape = next(iter(like.buffers.values())).shape[3:] if like else self.row_shape
        return {n: np.zeros((1, self.kv_heads, rows, *row_shape), self.row_dtype) for n in self.past_names}

    def cache_bytes_per_position(self, bits: int | None = None) -> float:
        """Cache bytes one position of context costs at ``bits`` (default: this session's; keys and values of
        every layer)."""
        layers = len(self.past_names) // 2  # a key and a value buffer per layer
        return kvcache.bytes_per_position((bits or self.kv_bits) if self.blocked else 32, self.kv_heads, self.head_dim,
                                          layers)

    def _room(self, cache: KVCache, total: int) -> KVCache:
        """``cache`` itself when ``total`` positions fit, else its valid part in larger buffers."""
        if total <= cache.capacity:
            return cache
        grown = self._buffers(max(total, min(2 * cache.capacity, self.info.context)), like=cache)
        rows = -(-cache.length // self.positions_per_row)
        for name, old in cache.buffers.items():
            grown[name][:, :, :rows] = old[:, :, :rows]
        return KVCache(grown, cache.length, positions_per_row=self.positions_per_row)

    def _binding(self, cache: KVCache):
        """The cache's IOBinding: logits first, then every buffer as past input and present output."""
        import onnxruntime as ort

        if cache.binding is None:
            cache.binding = self.session.io_binding()
            cache.binding.bind_output("logits")  # outputs come back in binding order
            for past, present in zip(self.past_names, self.present_names):
                value = ort.OrtValue.ortvalue_from_numpy(cache.buffers[past])
                cache.binding.bind_ortvalue_input(past, value)
                cache.binding.bind_ortvalue_output(present, value)
        return cache.binding

    def forward(self, ids: np.ndarray, cache: KVCache, bits: float | None = None) -> tuple[np.ndarray, KVCache]:
        total = cache.length + ids.shape[1]
        if total > self.info.context:
            raise ContextError(f"[mobiq] {total} positions expected <= the model's context {self.info.context} "
                               f"({cache.length} cached + {ids.shape[1]} new)")
        cache = self._room(cache, total)
        binding = self._binding(cache)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        binding.bind_output("logits")  # a fresh array per step (its shape follows ids)
        if self.elastic:
            bits = 8.0 if bits is None else bits
            binding.bind_cpu_input("target_bits", np.array(self.hold.target(bits, ids.shape[1]) if self.hold else bits,
                                                          np.float32))
            binding.bind_output("avg_bits")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:  # noqa: BLE001 — ORT raises its own generic errors (e.g. a corrupt tensor, a bad scale)
            raise ModelFileError(f"[mobiq] {self.info.onnx_path}: ONNX Runtime failed running it "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        out = binding.get_outputs()
        if self.elastic:
            self.last_avg_bits = float(out[-1].numpy())
            if self.hold:
                self.hold.record(self.last_avg_bits, ids.shape[1])
        return out[0].numpy(), KVCache(cache.buffers, total, binding, self.positions_per_row)

    def prefill(self, ids: np.ndarray, cache: KVCache, bits: float | None = None) -> Iterator[tuple[np.ndarray, KVCache]]:
        """``forward`` over ids [1, S] in pieces of at most ``prefill_rows`` positions, the cache carried: yields
        each piece's (logits, cache). A token's logits are those one call would give; what is held at once stays
        near PREFILL_LOGIT_BYTES (one call over 4,096 positions of a 262k vocabulary would return 4.3 GB)."""
        for i in range(0, max(ids.shape[1], 1), self.prefill_rows):
            logits, cache = self.forward(ids[:, i:i + self.prefill_rows], cache, bits)
            yield logits, cache

    def prefill_last(self, ids: np.ndarray, cache: KVCache, bits: float | None = None) -> tuple[np.ndarray, KVCache]:
        """(logits [1, 1, vocab] of the last position, cache) after :meth:`prefill` over ``ids``."""
        for logits, cache in self.prefill(ids, cache, bits):
            pass
        return logits[:, -1:], cache
