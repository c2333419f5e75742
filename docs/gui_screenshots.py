"""Regenerate the screenshots of each GUI tab that docs/gui.md shows (docs/images/gui/<n>-<tab>.png).

    python docs/gui_screenshots.py [--out docs/images/gui] [--chromium PATH]

Starts `app.py` on a fresh workspace in a temporary folder (the offline demo: its datasets and the form
filled in), opens every tab of the page in Chromium through Playwright (`executable_path`, no browser
download) and saves one screenshot of each; the app is stopped with SIGINT at the end.
"""
from __future__ import annotations

import argparse
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(workspace: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--workspace", str(workspace), "--port", str(port)],
                            cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("app.py did not answer within 120 s")


def shoot(url: str, out: Path, chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright   # the [dev] extra
    saved = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.locator("#sd-start").wait_for()
        names = [t.inner_text().strip() for t in page.get_by_role("tab").all()]
        for i, name in enumerate(names, 1):
            page.get_by_role("tab", name=name, exact=True).click()
            if name == "Dataset":   # show the demo's images
                page.locator("#ds-folder input").click()
                page.get_by_role("option", name="datasets/demo", exact=True).click()
                page.locator("#ds-open").click()
                page.locator("#ds-gallery img").first.wait_for(timeout=180_000)
            page.wait_for_timeout(1500)
            path = out / f"{i}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.png"
            page.screenshot(path=str(path))
            saved.append(path)
        browser.close()
    return saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "gui"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "", help="Chromium's path (default: on PATH)")
    a = ap.parse_args(argv)
    if not a.chromium:
        ap.error("--chromium: no chromium on PATH (apt-get install chromium)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_app(Path(tmp) / "workspace", port)
        try:
            for path in shoot(f"http://127.0.0.1:{port}/", out, a.chromium):
                print(path)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
