"""Enrolment from a folder tree: identity ids, folder clashes, skips and re-enrolment.

The pipeline is a stand-in whose embedder returns one face per photo, so these
tests check the folder handling against a real Gallery without loading models.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from agent.enroll import EnrollError, enroll_folder, identity_id_for, identity_ids
from agent.gallery import Gallery

EMBEDDING_SIZE = 4


class FakePipeline:
    """Gives every decodable photo one face with a fixed unit embedding."""

    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self.embedded = 0

    def embed_faces(self, image: np.ndarray) -> tuple[list[SimpleNamespace], np.ndarray]:
        self.embedded += 1
        face = SimpleNamespace(bbox=np.array([0.0, 0.0, 10.0, 10.0]))
        return [face], np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32)


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[FakePipeline]:
    gallery = Gallery(tmp_path / "gallery.db", "test-model", EMBEDDING_SIZE)
    yield FakePipeline(gallery)
    gallery.close()


def _photo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", np.zeros((8, 8, 3), dtype=np.uint8))
    assert ok
    path.write_bytes(png.tobytes())


def _stored_rows(gallery: Gallery) -> list[tuple[str, int]]:
    return gallery._db.execute(
        "SELECT identity_id, COUNT(*) FROM embeddings GROUP BY identity_id ORDER BY identity_id"
    ).fetchall()


@pytest.mark.parametrize(("folder", "expected"), [
    ("Anna Maria", "anna-maria"),
    ("José", "josé"),
    ("Jose\u0301", "josé"),  # decomposed é is normalised to the composed form
    ("王小明", "王小明"),
    ("Ben Afflek (2019)", "ben-afflek-2019"),
])
def test_identity_id_keeps_unicode_letters(folder: str, expected: str) -> None:
    assert identity_id_for(folder) == expected


def test_identity_id_empty_rejected() -> None:
    with pytest.raises(ValueError, match="gives an empty identity id"):
        identity_id_for("!!!")


def test_identity_ids_report_every_clash(tmp_path: Path) -> None:
    people = [tmp_path / name for name in ["Anna Maria", "anna-maria", "José", "Jos", "jos"]]

    with pytest.raises(EnrollError) as caught:
        identity_ids(people)

    message = str(caught.value)
    assert "'Anna Maria' and 'anna-maria' give the same identity id 'anna-maria'" in message
    assert "'Jos' and 'jos' give the same identity id 'jos'" in message
    assert "José" not in message
    assert "rename one of them" in message


def test_clash_stores_nothing(tmp_path: Path, pipeline: FakePipeline) -> None:
    root = tmp_path / "people"
    _photo(root / "Aaron" / "a.png")
    _photo(root / "Anna Maria" / "a.png")
    _photo(root / "anna-maria" / "b.png")

    with pytest.raises(EnrollError, match="'Anna Maria' and 'anna-maria'"):
        enroll_folder(pipeline, root)

    assert _stored_rows(pipeline.gallery) == []
    assert pipeline.embedded == 0


def test_non_latin_folder_enrolled(tmp_path: Path, pipeline: FakePipeline) -> None:
    root = tmp_path / "people"
    _photo(root / "王小明" / "a.png")

    report = enroll_folder(pipeline, root)

    assert report.identities == {"王小明": 1}
    assert _stored_rows(pipeline.gallery) == [("王小明", 1)]


def test_same_photo_not_enrolled_twice(tmp_path: Path, pipeline: FakePipeline) -> None:
    root = tmp_path / "people"
    _photo(root / "madonna" / "a.png")
    enroll_folder(pipeline, root)
    _photo(root / "madonna" / "b.png")

    report = enroll_folder(pipeline, root)

    assert _stored_rows(pipeline.gallery) == [("madonna", 2)]
    assert pipeline.embedded == 2
    assert report.identities == {"madonna": 2}


def test_skip_warning_names_file_once(tmp_path: Path, pipeline: FakePipeline,
                                      caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "people"
    _photo(root / "madonna" / "a.png")
    empty = root / "madonna" / "empty.jpg"
    empty.write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger="agent.enroll"):
        report = enroll_folder(pipeline, root)

    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].count(str(empty)) == 1
    assert report.skipped == [f"{empty}: file is empty (0 bytes); check the source that wrote it"]


def test_nested_and_loose_entries_logged(tmp_path: Path, pipeline: FakePipeline,
                                         caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "people"
    _photo(root / "madonna" / "a.png")
    _photo(root / "madonna" / "2019" / "b.png")
    _photo(root / "loose.png")

    with caplog.at_level(logging.WARNING, logger="agent.enroll"):
        enroll_folder(pipeline, root)

    messages = [r.getMessage() for r in caplog.records]
    assert any("ignored sub-folder" in m and str(root / "madonna" / "2019") in m
               for m in messages)
    assert any("ignored 1 files at the top of" in m and "loose.png" in m for m in messages)
    assert _stored_rows(pipeline.gallery) == [("madonna", 1)]
