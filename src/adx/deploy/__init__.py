"""Deploy an exported bundle without Lightning, timm or faiss: ``Inferencer(bundle).predict(images)``.

Needs numpy, Pillow and one runtime: onnxruntime or openvino (``pip install "adx[deploy]"``), or torch for a
TorchScript bundle. Importing this package imports neither torch nor Lightning.
"""

from adx.deploy.inferencer import BundleError, Inferencer, Result, load_metadata

__all__ = ["BundleError", "Inferencer", "Result", "load_metadata"]
