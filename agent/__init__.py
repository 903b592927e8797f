"""facenet-edge-agent: MTCNN face detection and FaceNet recognition on edge boards.

The pipeline is source -> detect -> align -> embed -> match -> publish; each step
lives in its own module of this package (sources, detect, align, embed, gallery,
events, mqtt), tied together by pipeline.py and driven from cli.py.
"""

__version__ = "0.1.0"
