"""`lora-gui`: the LoRA workbench in the browser (a thin entry point; the GUI lives in lora_gui/).

    lora-gui --workspace workspace [--host 127.0.0.1] [--port 7860] [--share]

Binds 127.0.0.1 unless told otherwise; a public share link only with --share. Ctrl-C or SIGTERM
stops the server, the scheduler and (with SIGTERM, so they checkpoint) a running job, and the
app exits within seconds; a second signal exits at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lora-gui", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", default="workspace",
                   help="folder holding runs, configs, datasets and outputs; every path in the page stays inside it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--max-upload-mb", type=int, default=20, help="largest accepted upload (default 20 MB)")
    p.add_argument("--keep-jobs", action="store_true",
                   help="on exit, leave a running job running instead of stopping it")
    return p.parse_args(argv)


JOB_WAIT_S = 5.0      # on exit, how long a stopped job gets to write its checkpoint before the app leaves
EXIT_DEADLINE_S = 15.0  # after the first signal the process is gone by then, whatever a thread is doing


def _install_signals(stop: threading.Event) -> None:
    """SIGTERM / SIGINT ask the app to stop (handled from the first line, even during the slow
    imports); a second one leaves at once."""
    def handle(signum, frame):
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def _shutdown(scheduler, ctrl, demo, keep_jobs: bool) -> None:
    """Stop the scheduler, the CLI calls in flight and (unless --keep-jobs) the running job, then
    the server. A watchdog ends the process if a worker thread still blocks the exit."""
    from lora_gui import clirun   # lazy: main() imports the GUI after argparse (a fast --help, signals from the start)
    print("stopping...", flush=True)
    watchdog = threading.Timer(EXIT_DEADLINE_S, lambda: os._exit(0))
    watchdog.daemon = True
    watchdog.start()
    if scheduler is not None:
        scheduler.shutdown()
    clirun.terminate_all()
    if ctrl is not None and not keep_jobs:
        ctrl.queue.stop_all(wait=JOB_WAIT_S)
    if demo is not None:
        demo.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    _install_signals(stop)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lora_gui.controller import Controller  # lazy: the GUI's slow imports after argparse (a fast --help)
    from lora_gui.queue import Scheduler  # lazy: as above
    from lora_gui.ui import CSS, build_app  # lazy: as above (gradio)
    from lora_gui.workspace import Workspace  # lazy: as above

    scheduler = ctrl = demo = None
    try:
        if stop.is_set():
            return 0
        ws = Workspace(args.workspace).create()
        ctrl = Controller(ws, max_upload_bytes=args.max_upload_mb * 1024 * 1024)
        scheduler = Scheduler(ctrl.queue).start()
        demo = build_app(ctrl)
        demo.queue(default_concurrency_limit=4)
        _, local_url, share_url = demo.launch(
            server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
            allowed_paths=[str(ws.root)], max_file_size=f"{args.max_upload_mb}mb", show_error=False,
            quiet=True, inbrowser=False, css=CSS, footer_links=[])
        print(f"LoRA workbench running at {local_url}  (workspace {ws.root})", flush=True)
        if share_url:
            print(f"public share link: {share_url}", flush=True)
        print("press Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
    except OSError as e:  # e.g. the port is taken
        print(f"lora-gui: cannot start the server on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    finally:
        _shutdown(scheduler, ctrl, demo, args.keep_jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
