"""Build the other formats and precisions of the four models, next to the ONNX fp32 files.

- ONNX int8 of the embedder: static quantization with onnxruntime.quantization
  (QDQ format, int8 weights per output channel, uint8 activations), calibrated
  on real face crops from the example train set.
- SavedModel of all four, exported from Keras models that carry the same weights:
  the Keras rebuild of facenet_keras.h5 and the mtcnn 1.0.0 Keras networks.
- TFLite fp32 and fp16 of all four, converted from those SavedModels, and TFLite
  int8 of the embedder, calibrated on the same face crops as the ONNX int8 file.

Every variant keeps the input and output names of the ONNX files, so the
runtimes return the same dictionaries.

NOTE: the MTCNN stages get no int8 variant. Calibrating them needs the pyramid
images and the R-Net and O-Net patches of real frames, and the three networks
together cost under a tenth of the embedder per face, so int8 would save little.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.align import crop_face, prewhiten
from agent.detect import MtcnnDetector
from agent.models import mtcnn_onnx
from agent.models.manifest import ModelVariant, sha256_path
from agent.runtimes import OnnxRuntime

log = logging.getLogger(__name__)

EMBEDDER_INPUT_SHAPE = (None, 160, 160, 3)
MTCNN_INPUT_SHAPES = {"pnet": (None, None, None, 3), "rnet": (None, 24, 24, 3),
                      "onet": (None, 48, 48, 3)}
STEMS = {"embedder": "facenet", "pnet": "pnet", "rnet": "rnet", "onet": "onet"}
CALIBRATION_MARGIN = 0.2  # the default alignment.margin, so crops look like the agent's
CALIBRATION_BATCH = 8


def variant_name(role: str, format: str, precision: str) -> str:
    """Return the file (or folder) name of a variant, such as facenet-int8.tflite."""
    stem = STEMS[role]
    if format == "savedmodel":
        return f"{stem}-savedmodel"
    return f"{stem}.onnx" if (format, precision) == ("onnx", "fp32") else \
        f"{stem}-{precision}.{format}"


def calibration_crops(model_dir: Path, photos_dir: Path, image_size: int) -> np.ndarray:
    """Detect the best face in each photo under `photos_dir` with the ONNX models in `model_dir`.

    Returns (N, image_size, image_size, 3) uint8 crops, cut as the pipeline cuts them.
    """
    from agent.images import ImageError, read_image

    runtime = OnnxRuntime()
    detector = MtcnnDetector(*(runtime.load(model_dir / f"{stage}.onnx")
                               for stage in ("pnet", "rnet", "onet")))
    crops = []
    for path in sorted(photos_dir.glob("*/*.jpg")):
        try:
            image = read_image(path)
        except ImageError as error:
            log.warning("calibration: skipped %s: %s", path, error)
            continue
        faces = detector.detect(image)
        if faces:
            best = max(faces, key=lambda face: face.score)
            crops.append(crop_face(image, best.bbox, CALIBRATION_MARGIN, image_size))
    if not crops:
        raise RuntimeError(f"no face found for calibration under {photos_dir}")
    log.info("calibration: %d face crops from %s", len(crops), photos_dir)
    return np.stack(crops)


def quantize_onnx_int8(source: Path, target: Path, samples: np.ndarray) -> None:
    """Write a static int8 (QDQ) copy of the ONNX model `source`, calibrated on `samples`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                {"input": samples[i:i + CALIBRATION_BATCH]}
                for i in range(0, len(samples), CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    prepared = target.with_suffix(".prepared.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(target), Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        prepared.unlink(missing_ok=True)
    log.info("wrote %s: int8 calibrated on %d face crops", target.name, len(samples))


def keras_models(h5_path: Path, mtcnn_package: Path) -> dict[str, Any]:
    """Return the Keras FaceNet rebuild and the mtcnn 1.0.0 Keras networks, keyed by role."""
    from agent.models.keras_facenet import build_keras_facenet

    models = {"embedder": build_keras_facenet(h5_path)}
    sys.path.insert(0, str(mtcnn_package.parent))
    try:
        from mtcnn.network.onet import ONet
        from mtcnn.network.pnet import PNet
        from mtcnn.network.rnet import RNet
    finally:
        sys.path.remove(str(mtcnn_package.parent))
    weights_dir = mtcnn_package / "assets" / "weights"
    for stage, network_class in (("pnet", PNet), ("rnet", RNet), ("onet", ONet)):
        network = network_class()
        network.build()
        network.set_weights(mtcnn_onnx.load_stage_weights(weights_dir, stage))
        models[stage] = network
    return models


def export_savedmodel(model: Any, role: str, target: Path) -> None:
    """Export a Keras model as a SavedModel whose serving_default names its tensors as ONNX does."""
    import keras
    import tensorflow as tf

    input_shape = EMBEDDER_INPUT_SHAPE if role == "embedder" else MTCNN_INPUT_SHAPES[role]
    output_names = ("embedding",) if role == "embedder" else mtcnn_onnx.OUTPUT_NAMES[role]

    def serve(input: Any) -> dict[str, Any]:
        outputs = model(input, training=False)
        if len(output_names) == 1:
            outputs = [outputs]
        return dict(zip(output_names, outputs, strict=True))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serving_default", fn=serve,
        input_signature=[tf.TensorSpec(input_shape, tf.float32, name="input")],
    )
    archive.write_out(str(target), verbose=False)
    log.info("wrote %s", target.name)


def convert_tflite(savedmodel: Path, target: Path, precision: str,
                   samples: np.ndarray | None = None) -> None:
    """Convert a SavedModel to TFLite in fp32, fp16 (weights) or int8 (weights and activations).

    int8 needs `samples`, the representative inputs that set the activation ranges.
    Input and output stay float32, so callers feed the same arrays as for fp32.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(savedmodel))
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        if samples is None:
            raise ValueError("int8 conversion needs representative samples")

        def representative() -> Iterator[dict[str, np.ndarray]]:
            for sample in samples:
                yield {"input": sample[None]}

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif precision != "fp32":
        raise ValueError(f"unsupported TFLite precision {precision!r}")
    target.write_bytes(converter.convert())
    log.info("wrote %s (%d kB)", target.name, target.stat().st_size // 1000)


def build_variants(directory: Path, h5_path: Path, mtcnn_package: Path,
                   example_data: Path, image_size: int) -> list[ModelVariant]:
    """Write every variant into `directory`, next to the ONNX fp32 files, and describe them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    crops = calibration_crops(directory, example_data / "train", image_size)
    samples = prewhiten(crops)

    written: list[tuple[str, str, str]] = []
    quantize_onnx_int8(directory / variant_name("embedder", "onnx", "fp32"),
                       directory / variant_name("embedder", "onnx", "int8"), samples)
    written.append(("embedder", "onnx", "int8"))

    for role, model in keras_models(h5_path, mtcnn_package).items():
        savedmodel = directory / variant_name(role, "savedmodel", "fp32")
        export_savedmodel(model, role, savedmodel)
        written.append((role, "savedmodel", "fp32"))
        precisions = ("fp32", "fp16", "int8") if role == "embedder" else ("fp32", "fp16")
        for precision in precisions:
            target = directory / variant_name(role, "tflite", precision)
            convert_tflite(savedmodel, target, precision,
                           samples if precision == "int8" else None)
            written.append((role, "tflite", precision))

    variants = [ModelVariant(role, "onnx", "fp32", directory / variant_name(role, "onnx", "fp32"),
                             sha256_path(directory / variant_name(role, "onnx", "fp32")))
                for role in STEMS]
    for role, format, precision in written:
        path = directory / variant_name(role, format, precision)
        variants.append(ModelVariant(role, format, precision, path, sha256_path(path)))
    return variants
