"""PyTorch perplexity of a quantized model on the same windows mobiq-eval scores (the independent side)."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def torch_ppl(qmodel, model_dir, text_path, context: int, bits: float) -> float:
    from mobiquant.tools.evaluate import corpus_ids
    from mobiquant.runtime.modelfile import locate
    from mobiquant.runtime.text import TextCodec

    info = locate(model_dir)
    windows = corpus_ids(TextCodec(info.directory, info.meta), str(text_path), context, None)
    qmodel.set_target_bits(bits)
    qmodel.set_int8_activations(True)  # the exported file's numeric mode
    try:
        nll, n = 0.0, 0
        for w in windows:
            ids = torch.from_numpy(w[None])
            logits = qmodel.model(input_ids=ids).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += len(w) - 1
    finally:
        qmodel.set_int8_activations(False)
    return float(np.exp(nll / n))
