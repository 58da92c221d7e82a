"""Speed of `headstyle eval`'s scorers: seconds per image (wall and process CPU) and the FID/KID statistics.

Prints one row per stage for a batch of 512 px views (skimage's astronaut, mirrored every other
view): dlib's face detection and its 128-D descriptor, the ArcFace backbones (IR-SE50, iresnet50)
on aligned 112 px faces, the FID Inception-v3 at 299 px, and the FID (Gram route below 2048 images,
covariance route above) and KID (100 subsets) statistics on random 2048-D features. Backbones carry
random weights of the published shapes: their cost does not depend on the values. CLIP and Depth
Anything are transformers models whose cost is the model's (not headstyle's) and are not timed.

    .venv/bin/python benchmarks/eval.py [--views 16] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from skimage import data

from headstyle.faces.detect import detect_faces
from headstyle.metrics.arcface import IRSE, ArcFace, IResNet
from headstyle.metrics.dlib_identity import DlibIdentity
from headstyle.metrics.fid import FIDInception, fid, kid


def timed(fn) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    astronaut = data.astronaut()
    mirror = np.ascontiguousarray(astronaut[:, ::-1])
    images = np.stack([astronaut if i % 2 == 0 else mirror for i in range(args.views)])
    n = len(images)
    rows = []

    faces, wall, cpu = timed(lambda: [detect_faces(im)[0] for im in images])
    rows.append(("dlib detection + 68 landmarks", n, wall, cpu))
    dlib_id = DlibIdentity()
    dlib_id.embed(images[:1], faces[:1])  # loads the model once
    _, wall, cpu = timed(lambda: dlib_id.embed(images, faces))
    rows.append(("dlib 128-D descriptor", n, wall, cpu))

    for name, net in (("ArcFace IR-SE50", IRSE(50)), ("ArcFace iresnet50", IResNet(50))):
        with tempfile.TemporaryDirectory() as folder:
            path = f"{folder}/{name.split()[-1]}.pth"
            torch.save(net.state_dict(), path)
            model = ArcFace(path, args.device)
        crops = torch.stack([model.crop(im, f) for im, f in zip(images, faces, strict=True)])
        model.embed_crops(crops[:1])
        _, wall, cpu = timed(lambda model=model, crops=crops: model.embed_crops(crops))
        rows.append((f"{name} (aligned 112 px)", n, wall, cpu))

    inception = FIDInception().to(args.device)
    u8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(args.device)
    inception(u8[:1])
    _, wall, cpu = timed(lambda: inception(u8))
    rows.append(("FID Inception-v3 (299 px)", n, wall, cpu))

    print(f"{'stage':<34}{'images':>7}{'s/image':>10}{'cpu s/image':>13}")
    for name, count, wall, cpu in rows:
        print(f"{name:<34}{count:>7}{wall / count:>10.3f}{cpu / count:>13.3f}")

    print(f"\n{'statistic (2048-D features)':<34}{'images':>7}{'seconds':>10}")
    for count in (64, 1000, 4096):
        a, b = torch.randn(count, 2048), torch.randn(count, 2048) + 0.1
        _, wall, _ = timed(lambda a=a, b=b: fid(a, b))
        print(f"{'FID':<34}{count:>7}{wall:>10.2f}")
        _, wall, _ = timed(lambda a=a, b=b: kid(a, b))
        print(f"{'KID (100 subsets)':<34}{count:>7}{wall:>10.2f}")


if __name__ == "__main__":
    main()
