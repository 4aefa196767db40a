"""Parallel vs one-at-a-time image download, against a local server that adds 100 ms per request.

    python benchmarks/bench_download.py                 # the ratio is the last line
    python benchmarks/bench_download.py --latency=0.05  # other latency, in seconds

Serves ../shared/coco_mirror (or a synthetic mirror when ../shared is absent) on 127.0.0.1,
fetches the annotation zip once into a shared cache, then times download_coco.main() with its
default counts (100 training + 10 test images) twice into fresh folders: WORKERS=1, then the
script's default WORKERS. Both runs decode and check every image, exactly as a user's run does.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import download_coco as dl  # noqa: E402


class SlowHandler(SimpleHTTPRequestHandler):
    latency = 0.1

    def log_message(self, *args):
        pass

    def send_head(self):
        time.sleep(self.latency)  # a far-away server: every request waits this long first
        return super().send_head()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops bursts of connections (1 s SYN retries)


def serve(folder: str, latency: float) -> None:
    """Runs in its own process (like a real server), so it does not share the client's GIL."""
    SlowHandler.latency = latency
    server = Server(("127.0.0.1", 0), partial(SlowHandler, directory=folder))
    print(server.server_address[1], flush=True)
    server.serve_forever()


def mirror_folder(tmp: Path) -> Path:
    shared = REPO.parent / "shared" / "coco_mirror"
    if (shared / "val2017").is_dir():
        return shared
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_coco_mirror

    print(f"{shared} not found: using a synthetic mirror")
    return make_coco_mirror(tmp / "mirror", n_images=120)


def timed_run(url: str, tmp: Path, name: str, workers: int) -> tuple[float, int]:
    args = [
        f"--COCO_BASE_URL={url}",
        f"--OUTPUT_DIR={tmp / name / 'out'}",
        f"--SAMPLES_DIR={tmp / name / 'samples'}",
        f"--ANNOTATIONS_DIR={tmp / 'cache'}",
        f"--WORKERS={workers}",
    ]
    start = time.perf_counter()
    result = dl.main(args)
    seconds = time.perf_counter() - start
    assert (result["delivered"], result["failed"]) == (dl.NUM_IMAGES, 0), result
    return seconds, result["downloaded"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.1, help="seconds added to every request")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: be the server process
    opts = parser.parse_args()
    if opts.serve:
        return serve(opts.serve, opts.latency)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = subprocess.Popen(
            [sys.executable, __file__, f"--serve={mirror_folder(tmp)}", f"--latency={opts.latency}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            url = f"http://127.0.0.1:{server.stdout.readline().strip()}"
            timed_run(url, tmp, "warm-up", dl.WORKERS)  # fetches and caches the annotation zip once
            serial, requests = timed_run(url, tmp, "serial", 1)
            parallel, _ = timed_run(url, tmp, "parallel", dl.WORKERS)
        finally:
            server.kill()
            server.wait()
    print(f"\n{requests} image requests per run, {opts.latency * 1000:.0f} ms added latency each")
    print(f"one at a time (WORKERS=1):   {serial:6.2f} s")
    print(f"parallel (WORKERS={dl.WORKERS}):     {parallel:6.2f} s")
    print(f"speed-up: {serial / parallel:.1f}x")


if __name__ == "__main__":
    main()
