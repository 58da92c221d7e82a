import json
import math

import torch

from headstyle import cameras


def test_fixture_camera_cases(parity_dir):
    data = json.loads((parity_dir / "camera_cases.json").read_text())
    assert len(data["cases"]) == 21
    for case in data["cases"]:
        c = cameras.cameras(case["yaw"], case["pitch"])
        expected = torch.tensor(case["c"], dtype=torch.float32)
        assert torch.allclose(c[0], expected, atol=1e-5), (case["yaw"], case["pitch"], (c[0] - expected).abs().max())


def test_intrinsics_match_fixture(parity_dir):
    data = json.loads((parity_dir / "camera_cases.json").read_text())
    assert torch.allclose(cameras.intrinsics_from_fov().flatten(), torch.tensor(data["intrinsics"]), atol=1e-6)


def test_mirror_is_involution_and_negates_yaw():
    g = torch.Generator().manual_seed(0)
    c, yaw, pitch = cameras.sample_360_cameras(16, generator=g)
    assert torch.equal(cameras.mirror(cameras.mirror(c)), c)
    assert torch.allclose(cameras.mirror(c), cameras.cameras(-yaw, pitch), atol=1e-5)
    # A mirrored camera is a different camera unless yaw is 0 or pi.
    assert (cameras.mirror(c) - c).abs().amax(dim=1).min() > 1e-3


def test_camera_geometry():
    c = cameras.cameras(torch.tensor([0.0, 0.7, -2.0]), torch.tensor([0.2, -0.3, 0.1]))
    pose = c[:, :16].reshape(-1, 4, 4)
    rot = pose[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(3), atol=1e-5)
    assert torch.allclose(pose[:, :3, 3].norm(dim=1), torch.full((3,), cameras.RADIUS), atol=1e-5)
    # The forward axis points from the origin to the look-at pivot.
    to_pivot = torch.tensor(cameras.PIVOT) - pose[:, :3, 3]
    assert torch.allclose(rot[:, :, 2], to_pivot / to_pivot.norm(dim=1, keepdim=True), atol=1e-5)
    # Positive pitch moves the camera to -y (PanoHead's convention).
    assert pose[0, 1, 3] < 0


def test_samplers_ranges_and_determinism():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c1, yaw, pitch = cameras.sample_front_cameras(256, generator=g1)
    c2, _, _ = cameras.sample_front_cameras(256, generator=g2)
    assert torch.equal(c1, c2)
    assert yaw.abs().max() <= math.pi / 3 and pitch.abs().max() <= math.pi / 6
    assert yaw.abs().max() > 0.9 * math.pi / 3
    _, yaw360, _ = cameras.sample_360_cameras(256, generator=g1)
    assert yaw360.abs().max() > 0.9 * math.pi


def test_turntable_and_angles():
    c = cameras.turntable_cameras(8)
    assert c.shape == (8, 25)
    assert torch.allclose(c[0], cameras.cameras(0.0, 0.0)[0], atol=1e-6)
    assert torch.allclose(c[4], cameras.cameras(-math.pi, 0.0)[0], atol=1e-5)
    assert cameras.parse_angles_degrees("-90, 0,90") == [-math.pi / 2, 0.0, math.pi / 2]
    try:
        cameras.parse_angles_degrees("10,abc")
    except ValueError as exc:
        assert "abc" in str(exc)
    else:
        raise AssertionError("bad angle accepted")
