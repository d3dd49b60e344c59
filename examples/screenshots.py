"""Make the README's screenshots of torchdebug's views in a real TensorBoard.

Trains the demo run (digits, 20% flipped labels), starts TensorBoard on it, and has
headless Chromium photograph the data map, the grid of flagged samples and the flagged
table as they appear in TensorBoard's Images and Text dashboards.

Run (a few minutes on two CPU cores; most of it is the demo's training)::

    python examples/screenshots.py
    python examples/screenshots.py --root runs/demo --reuse  # photograph an existing run

Needs Chromium (``apt-get install chromium`` on Debian) besides torchdebug's own
dependencies. TensorBoard listens on 127.0.0.1 only and Chromium opens only its pages;
nothing else is contacted. The PNGs go to ``--out`` (``docs/images`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# Tags that must be in TensorBoard before anything is photographed.
_NEEDED_IMAGE_TAGS = ("torchdebug/data_map", "torchdebug/review/mislabeled_grid")

# Flags that keep Chromium from calling out: no sync, updates, first-run pages or pings.
_QUIET_CHROMIUM = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

_MAX_BYTES = 400_000


@dataclass(frozen=True)
class _Shot:
    """One screenshot: which page, how big a window and where the PNG goes."""

    name: str
    fragment: str
    width: int
    height: int
    scale: int


# The legacy Images and Text dashboards take the tag filter (a regex; %24 is "$") in the URL
# fragment. A scale of 2 draws the logged images at their own resolution inside the cards.
_SHOTS = (
    _Shot("tensorboard_data_map.png", "images&tagFilter=data_map%24", 1040, 820, 2),
    _Shot("tensorboard_flagged_grid.png", "images&tagFilter=mislabeled_grid%24", 1040, 960, 2),
    _Shot("tensorboard_table.png", "text&tagFilter=mislabeled_table", 1920, 820, 1),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=None, help="where the demo run goes (default: a temp dir)"
    )
    parser.add_argument("--out", default="docs/images", help="folder for the PNGs")
    parser.add_argument("--chromium", default=None, help="path to a Chromium or Chrome binary")
    parser.add_argument(
        "--reuse", action="store_true", help="photograph the run already in --root, do not train"
    )
    args = parser.parse_args()

    chromium = _find_chromium(args.chromium)
    if args.reuse and args.root is None:
        parser.error("--reuse needs --root")

    with tempfile.TemporaryDirectory(prefix="torchdebug_screenshots_") as scratch:
        # The default root ends in runs/demo so that TensorBoard's sidebar reads as in the README.
        root = Path(args.root or Path(scratch) / "runs" / "demo").resolve()
        if not args.reuse:
            _train_demo(root)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _photograph(root, out, chromium, Path(scratch))


def _find_chromium(given: str | None) -> str:
    """Return the Chromium binary to use, or exit saying how to install one."""
    candidates = [given] if given else ["chromium", "chromium-browser", "google-chrome"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    sys.exit(
        f"Chromium not found (looked for {', '.join(candidates)}). Install it with "
        "`apt-get install chromium` or pass --chromium /path/to/chromium."
    )


def _train_demo(root: Path) -> None:
    """Run the demo into ``root``, its output going to this terminal."""
    command = [sys.executable, "-m", "torchdebug", "demo", "--root", str(root)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def _photograph(root: Path, out: Path, chromium: str, scratch: Path) -> None:
    """Serve ``root`` with TensorBoard and save every screenshot in ``_SHOTS`` to ``out``."""
    port = _free_port()
    server = _start_tensorboard(root, port)
    try:
        _wait_for_tags(server, port)
        for shot in _SHOTS:
            path = out / shot.name
            url = f"http://127.0.0.1:{port}/#{shot.fragment}"
            _screenshot(chromium, url, shot, path, scratch)
            _trim(path, shot.scale)
            print(f"wrote {path} ({path.stat().st_size // 1000} KB) from {url}", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_tensorboard(root: Path, port: int) -> subprocess.Popen[bytes]:
    """Start TensorBoard on ``root``, listening on 127.0.0.1 only."""
    # Run from two levels up so the sidebar shows a short logdir such as runs/demo.
    cwd = root.parent.parent
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        os.path.relpath(root, cwd),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--samples_per_plugin",
        "images=100,text=100",
    ]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_tags(server: subprocess.Popen[bytes], port: int, timeout: float = 180.0) -> None:
    """Wait until TensorBoard lists torchdebug's image tags, or fail after ``timeout`` s."""
    url = f"http://127.0.0.1:{port}/data/plugin/images/tags"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"TensorBoard exited with code {server.returncode} before serving {url}")
        if set(_NEEDED_IMAGE_TAGS) <= _image_tags(url):
            return
        time.sleep(1.0)
    sys.exit(f"TensorBoard did not list {', '.join(_NEEDED_IMAGE_TAGS)} within {timeout:.0f} s")


def _image_tags(url: str) -> set[str]:
    """Return the image tags of every run, or an empty set while the server is starting."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            runs = json.load(response)
    except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
        return set()
    return {tag for tags in runs.values() for tag in tags}


def _screenshot(chromium: str, url: str, shot: _Shot, path: Path, scratch: Path) -> None:
    """Save a headless Chromium screenshot of ``url`` to ``path``."""
    # A fresh profile per shot: nothing from a user's own browser profile leaks in.
    profile = tempfile.mkdtemp(prefix="chromium_", dir=scratch)
    command = [
        chromium,
        *_QUIET_CHROMIUM,
        f"--user-data-dir={profile}",
        f"--window-size={shot.width},{shot.height}",
        f"--force-device-scale-factor={shot.scale}",
        # Virtual time runs only while the page is busy, so 20 s costs a few real seconds.
        "--virtual-time-budget=20000",
        f"--screenshot={path.resolve()}",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if result.returncode != 0 or not path.exists():
        sys.exit(f"Chromium failed on {url} (code {result.returncode}):\n{result.stderr[-2000:]}")


def _trim(path: Path, scale: int) -> None:
    """Cut the screenshot below the first dashboard section; shrink it if still too big."""
    image = Image.open(path).convert("RGB")
    bottom = _first_section_bottom(image, scale)
    if bottom is not None:
        image = image.crop((0, 0, image.width, bottom))
    image.save(path, optimize=True)
    if path.stat().st_size > _MAX_BYTES:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _first_section_bottom(image: Image.Image, scale: int) -> int | None:
    """Return the row just below the section that holds the tags matching the filter.

    Walks down a column just inside the right edge of TensorBoard's main pane, right of
    every card: the first long run of white there is the "Tags matching" section, and
    the next section (all of torchdebug's tags again) starts below its shadow.
    """
    x = image.width - 12 * scale
    min_run = 150 * scale
    run_start = None
    for y in range(image.height):
        white = image.getpixel((x, y)) == (255, 255, 255)
        if white and run_start is None:
            run_start = y
        elif not white and run_start is not None:
            if y - run_start >= min_run:
                return y + 3 * scale
            run_start = None
    return None


if __name__ == "__main__":
    main()
