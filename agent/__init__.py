"""facenet-edge-agent: MTCNN face detection and FaceNet recognition on edge boards.

The pipeline is source -> detect -> align -> embed -> match -> publish; each step
lives in its own module of this package (sources, detect, align, embed, gallery,
events, mqtt), tied together by pipeline.py and driven from cli.py.
"""

import os

__version__ = "0.1.0"

# OpenCV reads its decode limit once, when cv2 is first imported, and several
# modules of this package import cv2; agent.images.MAX_PIXELS is the same value.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(100_000_000))
