"""gruserve: train, export and serve GRU text decoders (NRT review tips) with ONNX Runtime.

The import root of the distribution: `gruserve.export` (PyTorch side), `gruserve.runtime`
(serving), `gruserve.v1` (the generated gRPC code). This file lives beside `v1/` because
`protos/gruserve/` is the folder the proto import paths already name `gruserve`; pyproject's
package-dir maps it, so `pip install .` and `pip install -e .` both find it.
"""

# the one place the version is written: pyproject reads it (dynamic version)
__version__ = "0.1.0"
