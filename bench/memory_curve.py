"""Peak memory of the memory-bank stage against the number of training images (issue 6, goal 5).

    python bench/memory_curve.py --data ../shared/data/mvtec_ad/bottle --images 26,52,104,209,418 \
        --peer-max 104 --out runs/memory_curve.json --plot bench/figures/memory_curve.png

For each count it makes an MVTec-layout folder whose ``train/good`` holds that many images (the first ones of
the real set; beyond the real count, mirrored copies written as PNG) with the real ``test`` and
``ground_truth`` copied in, then runs ``tocoad train`` with both training stages off (the frozen F; what
remains is the bank: features, coreset, index, calibration, profile, saving) in its own process under ``/usr/bin/time`` and records its peak RSS and seconds. The peer,
anomalib's PatchCore fit (features + KCenterGreedy, same settings), runs on the same folders up to
``--peer-max`` images (its greedy grows with the square of the patch count). Writes JSON and ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_folder(data: Path, n: int, dest: Path) -> Path:
    """An MVTec-layout copy of ``data`` with ``n`` training images (mirrored copies past the real count)."""
    real = sorted((data / "train" / "good").iterdir())
    good = dest / data.name / "train" / "good"
    good.mkdir(parents=True)
    for i in range(n):
        src = real[i % len(real)]
        if i < len(real):
            shutil.copyfile(src, good / src.name)
        else:  # a mirrored copy: a different image of the same kind
            img = np.asarray(Image.open(src))[:, ::-1]
            Image.fromarray(np.ascontiguousarray(img)).save(good / f"mirror{i:04d}_{src.stem}.png")
    for part in ("test", "ground_truth"):  # copies: anomalib's dataset scan finds no linked files
        shutil.copytree(data / part, dest / data.name / part)
    return dest / data.name


def timed_run(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: peak RSS (MB) and wall seconds."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = (float(g) if g else 0.0 for g in wall.groups())
    return {"peak_rss_mb": rss / 1024, "seconds": 3600 * h + 60 * m + s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--images", default="26,52,104,209,418")
    p.add_argument("--peer-max", type=int, default=104, help="largest count anomalib runs on (0: none)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args()
    result = {"machine": machine(), "data": str(args.data), "rows": []}
    peer_py = ROOT / "bench" / ".venv-anomalib" / "bin" / "python"
    for n in (int(x) for x in args.images.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            folder = make_folder(args.data, n, Path(tmp) / "data")
            cmd = [str(ROOT / ".venv" / "bin" / "tocoad"), "train", "--data", str(folder)]
            cmd += ["--out", str(Path(tmp) / "bundle"), "--set", "runtime.progress=false"]
            cmd += [
                "--set",
                "stage_d.enabled=false",
                "--set",
                "contrastive.enabled=false",
            ]  # frozen F: the bank
            row = {"images": n, "tocoad": timed_run(cmd)}
            meta = json.loads((Path(tmp) / "bundle" / "manifest.json").read_text())
            row["bank_patches"] = meta["metrics"]["calibration"]["bank_patches"]
            if 0 < n <= args.peer_max:
                peer = [str(peer_py), str(ROOT / "bench" / "anomalib_patchcore.py"), "--data", str(folder)]
                peer += ["--coreset-ratio", "0.01", "--layers", "blocks.2", "blocks.4", "--no-aupro"]
                peer += ["--latency-images", "1", "--latency-warmup", "0", "--out", str(Path(tmp) / "p.json")]
                row["anomalib"] = timed_run(peer)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)


def plot(result: dict, path: Path) -> None:
    """Peak RSS against training images, ours and the peer's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["rows"]
    ax.plot([r["images"] for r in rows], [r["tocoad"]["peak_rss_mb"] for r in rows], "o-", label="tocoad")
    peer = [r for r in rows if "anomalib" in r]
    if peer:
        ax.plot(
            [r["images"] for r in peer], [r["anomalib"]["peak_rss_mb"] for r in peer], "s--", label="anomalib"
        )
    ax.set_xlabel("training images (256 px)")
    ax.set_ylabel("peak RSS of the bank build (MB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
