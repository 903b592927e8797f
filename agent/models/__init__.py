"""Model files for the agent: building them off the device and loading their manifest.

`build` (with `fetch`, `keras_facenet`, `facenet_onnx`, `mtcnn_onnx` and
`onnx_graph`) needs the `build` extra. `manifest` imports only the standard
library and NumPy, so the device can verify and load models without it.
"""
