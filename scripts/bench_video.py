#!/usr/bin/env python3
"""Peak RSS and time of preparing a long 1080p video (issue 6: < 1 GB beyond the model).

Writes a synthetic 1920x1080 video (default 10 minutes at 5 fps, mpeg4) and runs the video
preparation (probe, sampling, decoding, resizing, patchifying) in a child process, printing its
peak RSS over the interpreter baseline measured in the same run.

    python scripts/bench_video.py --minutes 10 --fps 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
import numpy, torch, PIL.Image, av
from qvl.runtime.video import VideoOptions, load_video
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
v = load_video(sys.argv[1], VideoOptions(max_frames=int(sys.argv[2])), (0.5,) * 3, (0.5,) * 3)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": round(dt, 1), "frames": len(v.frame_indices), "grid": v.grid_thw,
                  "baseline_mib": round(base / 1024), "peak_mib": round(peak / 1024),
                  "added_mib": round((peak - base) / 1024)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--fps", type=int, default=5)
    ap.add_argument("--max-frames", type=int, default=32)
    args = ap.parse_args()
    import av
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.mp4"
        n = int(args.minutes * 60 * args.fps)
        t0 = time.perf_counter()
        with av.open(str(path), "w") as c:
            s = c.add_stream("mpeg4", rate=args.fps)
            s.width, s.height, s.pix_fmt = 1920, 1080, "yuv420p"
            base = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
            for i in range(n):
                frame = av.VideoFrame.from_ndarray(np.roll(base, i * 8, axis=1), format="rgb24")
                for p in s.encode(frame):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        made = time.perf_counter() - t0
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.max_frames)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)
        result.update({"video": f"{args.minutes} min 1920x1080 at {args.fps} fps ({n} frames)",
                       "file_mib": round(path.stat().st_size / 2**20), "encode_s": round(made, 1)})
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
