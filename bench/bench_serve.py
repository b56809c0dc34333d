"""Throughput of the generation service through its real HTTP API (issue 13, item 5: batching), and the time the HTTP
layer adds per request.

For each ``--max_batch_size`` (default 1, 2, 4) a server is started in this process (uvicorn on a free 127.0.0.1 port,
the same loaded model for all), its worker paused, ``--requests`` (16) requests of one shape and distinct seeds are
queued over HTTP, and the worker let go: requests per minute = 16 / (last completion - release). Then, on an idle
server (batch size 1), the same request is timed directly (``pipe.run``) and through HTTP (POST, follow the SSE
stream to the end, download the MP4); the difference is what the service adds (submit, queue pick-up, completion
notice, download), also broken down.

Model: ``--model_path`` (a Wan2.1-T2V-1.3B folder), or by default Wan2.1-T2V-1.3B sizes with random weights built on
the GPU (real-size umt5-xxl, DiT, VAE from bench/real_size.py, swapped into the stages: no checkpoint needed).
``--tiny``: the built-in tiny model on the CPU (a check of the script; its figures are not the GPU's).

    python bench/bench_serve.py                         # GPU, 480x832x81, 4 steps (CFG), batch sizes 1 2 4
    python bench/bench_serve.py --steps 50 --json out.json
    python bench/bench_serve.py --tiny                  # CPU, 32x32x5, 2 steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402


def build_pipe(args):
    from lightx2v import LightX2VPipeline

    if args.tiny:
        pipe = LightX2VPipeline()
        pipe.create_generator(device="cpu")
        return pipe, "built-in tiny Wan2.1 T2V (CPU)"
    if args.model_path:
        pipe = LightX2VPipeline(model_path=args.model_path, model_cls="wan2.1", task="t2v")
        pipe.create_generator(attn_mode=args.attn)
        return pipe, f"{args.model_path} ({args.attn})"
    # Wan2.1-T2V-1.3B at its real size with random weights: the tiny pipeline gives the API (config, requests),
    # its stages are replaced by real-size ones
    import torch

    from real_size import build_dit, build_t5, build_vae
    from lightx2v.engine.components import ComponentSlot
    from lightx2v.models.wan.stages import Expert, WanDecoder, WanEncoder, WanTransformer

    dev = torch.device("cuda")
    slot = lambda obj: ComponentSlot(lambda d: obj, dev)  # noqa: E731
    pipe = LightX2VPipeline()
    pipe.create_generator(device="cuda")
    runner = pipe.runner
    runner.encoder = WanEncoder(slot(build_t5()), dev, z_dim=16, vae_spatial=8, size_multiple=16, tasks=("t2v",))
    runner.transformer = WanTransformer([Expert(build_dit("wan2.1-t2v-1.3b", attn=args.attn))], dev)
    runner.decoder = WanDecoder(slot(build_vae()), dev)
    return pipe, f"Wan2.1-T2V-1.3B sizes, random bf16 weights ({args.attn}), {torch.cuda.get_device_name()}"


class Server:
    """The service on a free port of 127.0.0.1, serving an already loaded pipeline."""

    def __init__(self, pipe, data_dir: Path, max_batch_size: int):
        import socket

        import uvicorn

        from lightx2v.serve.app import create_app
        from lightx2v.serve.schemas import ServeSettings

        self.app = create_app(ServeSettings(data_dir=str(data_dir), max_batch_size=max_batch_size,
                                            max_queue_size=1000), load=False)
        self.svc = self.app.state.service
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY on accept
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.01)
        self.svc.use_pipeline(pipe)

    def close(self):
        self.server.should_exit = True
        self.thread.join(120)
        self.sock.close()


def body(args, seed: int) -> dict:
    return {"prompt": f"a cat on a surfboard, take {seed}", "seed": seed, "infer_steps": args.steps,
            "target_shape": [args.height, args.width], "target_video_length": args.frames}


def wait_all(http, ids, timeout):
    deadline = time.monotonic() + timeout
    pending = set(ids)
    done = {}
    while pending:
        for tid in list(pending):
            st = http.get(f"/v1/tasks/{tid}/status").json()
            if st["status"] in ("completed", "failed", "cancelled"):
                if st["status"] != "completed":
                    raise RuntimeError(f"task {tid} {st['status']}: {st['error']}")
                done[tid] = st
                pending.discard(tid)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} tasks not done after {timeout} s")
        time.sleep(0.1)
    return done


def throughput(pipe, args, batch: int, root: Path) -> dict:
    srv = Server(pipe, root / f"b{batch}", batch)
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            srv.svc.worker.pause()
            ids = [http.post("/v1/tasks/video/", json=body(args, 100 + i)).json()["task_id"]
                   for i in range(args.requests)]
            released = time.time()
            srv.svc.worker.resume()
            done = wait_all(http, ids, args.timeout)
        last = max(st["completed_at"] for st in done.values())
        batches = [st["batch_size"] for st in done.values()]
        elapsed = last - released
        return {"max_batch_size": batch, "requests": args.requests, "seconds": elapsed,
                "requests/min": 60 * args.requests / elapsed, "mean batch": statistics.mean(batches)}
    finally:
        srv.close()


def overhead(pipe, args, root: Path) -> dict:
    """The same request directly and through HTTP, on an idle server (batch size 1)."""
    srv = Server(pipe, root / "overhead", 1)
    rows = []
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            for k in range(args.overhead_requests):
                b = body(args, 500 + k)
                req = pipe.make_request(seed=b["seed"], prompt=b["prompt"], infer_steps=args.steps,
                                        height=args.height, width=args.width, num_frames=args.frames,
                                        save_result_path=str(root / f"direct{k}.mp4"))
                srv.svc.worker.pause()  # nothing else runs meanwhile
                t0 = time.perf_counter()
                pipe.run(req)
                direct = time.perf_counter() - t0
                srv.svc.worker.resume()
                t0 = time.perf_counter()
                r = http.post("/v1/tasks/video/", json=b)
                t_submit = time.perf_counter() - t0
                tid = r.json()["task_id"]
                with http.stream("GET", f"/v1/tasks/{tid}/events") as ev:
                    for line in ev.iter_lines():
                        if line.startswith("event:") and line[6:].strip() in ("completed", "failed", "cancelled"):
                            break
                t_notified = time.time()
                t1 = time.perf_counter()
                data = http.get(f"/v1/tasks/{tid}/result").content
                t_download = time.perf_counter() - t1
                e2e = time.perf_counter() - t0
                st = http.get(f"/v1/tasks/{tid}/status").json()
                assert st["status"] == "completed" and data, st
                rows.append({"direct s": direct, "http e2e s": e2e, "server run s": st["completed_at"] - st["started_at"],
                             "submit ms": 1e3 * t_submit, "pickup ms": 1e3 * (st["started_at"] - st["created_at"]),
                             "notice ms": 1e3 * (t_notified - st["completed_at"]), "download ms": 1e3 * t_download,
                             "added ms": 1e3 * (e2e - direct)})
            t = []
            for _ in range(50):  # a status poll of the last task
                t0 = time.perf_counter()
                http.get(f"/v1/tasks/{tid}/status")
                t.append(time.perf_counter() - t0)
    finally:
        srv.close()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    med["status GET ms"] = 1e3 * statistics.median(t)
    return med


def table(rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny model on the CPU")
    ap.add_argument("--model_path", default=None, help="a Wan2.1-T2V-1.3B folder (default: random real-size weights)")
    ap.add_argument("--attn", default="torch_sdpa")
    ap.add_argument("--batch_sizes", default="1,2,4")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="default 4 (GPU), 2 (--tiny)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--overhead_requests", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    small = args.tiny
    args.steps = args.steps or (2 if small else 4)
    args.height = args.height or (32 if small else 480)
    args.width = args.width or (32 if small else 832)
    args.frames = args.frames or (5 if small else 81)
    import logging

    logging.getLogger("lightx2v").setLevel(logging.WARNING)
    pipe, what = build_pipe(args)
    print(f"model: {what} | {args.height}x{args.width}x{args.frames}, {args.steps} steps, CFG | "
          f"{args.requests} queued requests per batch size", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = pipe.make_request(seed=0, prompt="warm-up", infer_steps=args.steps, height=args.height,
                                 width=args.width, num_frames=args.frames, save_result_path=str(root / "warm.mp4"))
        pipe.run(warm)
        rows = []
        for b in (int(x) for x in args.batch_sizes.split(",")):
            rows.append(throughput(pipe, args, b, root))
            print(rows[-1], flush=True)
        table(rows)
        over = overhead(pipe, args, root)
        print("\nHTTP layer, per request (median of "
              f"{args.overhead_requests}; 'added' = HTTP end-to-end - direct pipe.run):")
        table([over])
    if args.json:
        Path(args.json).write_text(json.dumps({"model": what, "args": vars(args), "throughput": rows,
                                               "http": over}, indent=2))


if __name__ == "__main__":
    main()
