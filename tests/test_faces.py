"""Photo alignment in PanoHead's convention: pose fit (closed forms), camera labels (mirror), the crop on a
real photograph (skimage's astronaut: frontal, mirrored, rolled), and `headstyle align`'s bad input."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from headstyle.cameras import MIRROR_INDICES, mirror
from headstyle.cli import app
from headstyle.faces import pose as P
from headstyle.faces.align import align_photo
from headstyle.faces.dataset import read_camera
from headstyle.faces.detect import detect_faces

MIRROR_TOLERANCE_DEGREES = 1.5
ROLL_TOLERANCE_DEGREES = 2.0


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def aligned(astronaut):
    return align_photo(astronaut, detect_faces(astronaut))


def test_mean_face_is_mirror_symmetric():
    flipped = P.MEAN_FACE_68[P.MIRROR_68] * [-1, 1, 1]
    np.testing.assert_allclose(flipped, P.MEAN_FACE_68, atol=1e-12)
    assert np.array_equal(P.MIRROR_68[P.MIRROR_68], np.arange(68))


@pytest.mark.parametrize(("yaw", "pitch", "roll"), [(0, 0, 0), (35, -10, 5), (-60, 20, -30), (10, 45, 12)])
def test_weak_perspective_fit_recovers_a_known_pose(yaw, pitch, roll):
    R = P.rotation_from_euler(*(math.radians(a) for a in (yaw, pitch, roll)))
    truth = P.WeakPerspective(R, 2.5, np.array([250.0, -240.0]))
    fit = P.fit_weak_perspective(truth.project(P.MEAN_FACE_68))
    np.testing.assert_allclose(fit.R, R, atol=1e-6)
    assert fit.s == pytest.approx(2.5, rel=1e-6)
    np.testing.assert_allclose([math.degrees(a) for a in P.euler_from_rotation(fit.R)], [yaw, pitch, roll], atol=1e-4)


def test_camera_label_matches_panohead_frontal_and_mirrors():
    c = P.camera_label(np.eye(3))
    np.testing.assert_allclose(c[:16].reshape(4, 4), [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2.7], [0, 0, 0, 1]],
                               atol=1e-7)
    np.testing.assert_allclose(c[16:], [4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1])
    R = P.rotation_from_euler(0.4, 0.2, 0.1)
    R_mirror = P.rotation_from_euler(-0.4, 0.2, -0.1)
    np.testing.assert_allclose(mirror(torch.from_numpy(P.camera_label(R))).numpy(), P.camera_label(R_mirror), atol=1e-6)
    # The camera sits at radius 2.7 on the side the head turns away from: +x for a positive yaw.
    assert np.linalg.norm(c[[3, 7, 11]]) == pytest.approx(2.7)
    assert P.camera_label(R)[3] == pytest.approx(2.7 * math.sin(0.4), rel=1e-6)


def test_astronaut_crop_is_512_and_near_frontal(aligned):
    assert aligned.crop.shape == (512, 512, 3) and aligned.crop.dtype == np.uint8
    assert abs(aligned.yaw) < 10 and abs(aligned.pitch) < 15 and abs(aligned.roll) < 5
    assert 0.7 <= aligned.scale <= 1.3
    # The face sits where PanoHead puts it: eyes in the upper half, centred horizontally.
    assert np.linalg.norm(aligned.camera[[3, 7, 11]]) == pytest.approx(2.7, rel=1e-5)


def test_mirrored_photo_gives_the_mirrored_camera(astronaut, aligned):
    flipped = np.ascontiguousarray(astronaut[:, ::-1])
    m = align_photo(flipped, detect_faces(flipped))
    assert m.yaw == pytest.approx(-aligned.yaw, abs=MIRROR_TOLERANCE_DEGREES)
    assert m.pitch == pytest.approx(aligned.pitch, abs=MIRROR_TOLERANCE_DEGREES)
    assert m.roll == pytest.approx(-aligned.roll, abs=MIRROR_TOLERANCE_DEGREES)
    # Entries 1, 2, 3, 4, 8 change sign, the rest stay (cam2world rotation entries within sin(1.5 deg)).
    expected = mirror(torch.from_numpy(aligned.camera)).numpy()
    np.testing.assert_allclose(m.camera[:16], expected[:16], atol=2.7 * math.radians(MIRROR_TOLERANCE_DEGREES))
    assert set(MIRROR_INDICES) == {1, 2, 3, 4, 8}
    # The crop is the mirror image of the crop (up to the landmarks' own asymmetry: a few grey levels).
    assert np.abs(m.crop[:, ::-1].astype(float) - aligned.crop).mean() < 12


@pytest.mark.parametrize("roll", [15.0, -20.0])
def test_a_known_roll_of_the_photo_is_recovered(astronaut, aligned, roll):
    h, w = astronaut.shape[:2]
    # cv2 turns the picture counter-clockwise on screen for a positive angle.
    rotation = cv2.getRotationMatrix2D((w / 2, h / 2), roll, 1.0)
    rolled = cv2.warpAffine(astronaut, rotation, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    r = align_photo(rolled, detect_faces(rolled))
    assert r.photo_roll - aligned.photo_roll == pytest.approx(roll, abs=ROLL_TOLERANCE_DEGREES)
    # Roll is in-plane: the crop (de-rotated by the quad) keeps yaw and pitch.
    assert r.yaw == pytest.approx(aligned.yaw, abs=3) and r.pitch == pytest.approx(aligned.pitch, abs=3)


def test_align_command_writes_crops_and_panohead_dataset_json(astronaut, aligned, tmp_path):
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    result = CliRunner().invoke(app, ["align", str(tmp_path / "astronaut.png"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    crop = np.asarray(Image.open(tmp_path / "out" / "astronaut.png"))
    assert crop.shape == (512, 512, 3)
    labels = json.loads((tmp_path / "out" / "dataset.json").read_text())["labels"]
    assert labels[0][0] == "astronaut.png" and len(labels[0][1]) == 25 and isinstance(labels[0][1][0], str)
    c = read_camera(tmp_path / "out" / "dataset.json", "astronaut.png")
    np.testing.assert_allclose(c, aligned.camera, atol=1e-6)  # six decimals, as PanoHead writes them
    assert np.array_equal(crop, aligned.crop)


def _blank(path):
    Image.fromarray(np.full((256, 256, 3), 180, np.uint8)).save(path)


def _corrupt(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)


@pytest.mark.parametrize(("make", "message"), [(_blank, "no face found"), (_corrupt, "not a readable image")])
def test_bad_photo_exits_2_with_one_line_and_writes_nothing(make, message, tmp_path, astronaut, capsys):
    from headstyle.cli import main

    Image.fromarray(astronaut).save(tmp_path / "good.png")
    make(tmp_path / "bad.png")
    out = tmp_path / "out"
    argv = ["headstyle", "align", str(tmp_path / "good.png"), str(tmp_path / "bad.png"), "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "bad.png" in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
