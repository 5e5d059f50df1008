"""Measurement and development tools: ``mobiq-eval`` and ``mobiq-bench`` (they run on a device too, on a
text file), pinned fetching into the cache, the corpora, and the model registry (``models/<name>/model.toml``).

The runtime never imports this package; the exporter does (docs/design.md, "Layout").
"""
