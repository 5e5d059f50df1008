"""MoBiQuant exporter (workstation side, needs torch): convert, calibrate, export ONNX."""
