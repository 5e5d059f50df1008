"""One ONNX Runtime session over an exported model: prefill/decode steps with a KV cache.

``forward(ids, cache, bits)`` runs the new tokens ``ids`` [1, S] after the cached
ones and returns (logits [1, S, vocab], the grown cache). ``bits`` is the
target_bits input of MoBiQuant graphs: a per-step input, so changing the budget
never reloads anything. ``last_avg_bits`` is the average bits the step read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .modelfile import ModelFileError, ModelInfo, locate


@dataclass
class KVCache:
    tensors: dict[str, np.ndarray]  # past_key_values.{i}.key|value -> [1, kv_heads, P, head_dim]
    length: int


class ModelSession:
    def __init__(self, path, threads: int | None = None):
        import onnxruntime as ort

        self.info: ModelInfo = locate(path)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
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
        self.outputs = ["logits", *self.present_names] + (["avg_bits"] if self.elastic else [])
        shape = self.inputs[self.past_names[0]].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.last_avg_bits = float("nan")

    def empty_cache(self) -> KVCache:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return KVCache({n: empty for n in self.past_names}, 0)

    def forward(self, ids: np.ndarray, cache: KVCache, bits: float | None = None) -> tuple[np.ndarray, KVCache]:
        total = cache.length + ids.shape[1]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, total), np.int64), **cache.tensors}
        if self.elastic:
            feeds["target_bits"] = np.array(8.0 if bits is None else bits, np.float32)
        out = self.session.run(self.outputs, feeds)
        if self.elastic:
            self.last_avg_bits = float(out[-1])
        present = dict(zip(self.past_names, out[1:1 + len(self.past_names)]))
        return out[0], KVCache(present, total)
