"""``lightx2v serve`` / ``python -m lightx2v.server`` (the generation service) and ``lightx2v submit`` (its client).

Nothing heavy is imported here: FastAPI and uvicorn (the ``serve`` extra) only when a sub-command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from lightx2v.errors import UserError


def _lightx2v_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_cls", default=None, help="model class (default: the first built-in one)")
    p.add_argument("--task", default="t2v", help="t2v | i2v | flf2v | t2i ...")
    p.add_argument("--model_path", default=None, help="checkpoint folder; omit for the built-in tiny model")
    p.add_argument("--config_json", default=None, help="LightX2V-style JSON config (load-time settings, defaults)")
    for flag in ("device", "dtype", "attn_mode"):
        p.add_argument(f"--{flag}", default=None, help="load-time override of the config")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    _lightx2v_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_queue_size", type=int, default=100, help="pending + processing tasks; more get 503")
    p.add_argument("--data_dir", default="lightx2v-data", help="task database, results and uploads")
    p.add_argument("--input_dir", default=None, help="the only folder image_path may name (default data_dir/inputs)")
    p.add_argument("--lora_dir", default=None, help="folder of the LoRA files a request may name (lora_name)")
    p.add_argument("--api_key", default=None, help="require this key (X-API-Key or Authorization: Bearer) on "
                   "every route but /health; default: $LIGHTX2V_API_KEY, else none")
    p.add_argument("--max_batch_size", type=int, default=1, help="queued requests of equal settings per DiT batch")
    p.add_argument("--max_upload_mb", type=float, default=20.0, help="request body limit (413 above)")
    p.add_argument("--rerun_interrupted", action="store_true",
                   help="after a crash, run the interrupted task again instead of failing it")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace):
    from lightx2v.serve.schemas import ServeSettings

    overrides = {k: getattr(args, k) for k in ("device", "dtype", "attn_mode") if getattr(args, k) is not None}
    return ServeSettings(model_cls=args.model_cls, task=args.task, model_path=args.model_path,
                         config_json=args.config_json, overrides=overrides, host=args.host, port=args.port,
                         max_queue_size=args.max_queue_size, data_dir=args.data_dir, input_dir=args.input_dir,
                         lora_dir=args.lora_dir, api_key=args.api_key or os.environ.get("LIGHTX2V_API_KEY") or None,
                         max_batch_size=args.max_batch_size, max_upload_mb=args.max_upload_mb,
                         rerun_interrupted=args.rerun_interrupted)


def _require_extra():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"lightx2v serve needs the serve extra ({e.name} is missing): "
                        "pip install 'lightx2v[serve]'") from None


def run_server(settings, log_level: str = "info") -> int:
    """Serve until interrupted. Returns 1 if the model failed to load, else 0."""
    _require_extra()
    import logging

    import uvicorn

    from lightx2v.pipeline import LightX2VPipeline
    from lightx2v.serve.app import Service, create_app

    # the quick checks (model class, task, path) before anything listens
    LightX2VPipeline(model_path=settings.model_path, model_cls=settings.model_cls, task=settings.task)
    logging.getLogger("lightx2v").setLevel(log_level.upper())
    service = Service(settings)
    app = create_app(service=service)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                                           access_log=log_level == "debug"))
    service.on_load_error = lambda e: setattr(server, "should_exit", True)
    print(f"lightx2v serve: http://{settings.host}:{settings.port} (model {service.model_cls} {settings.task}, "
          f"{settings.model_path or 'built-in tiny model'}; data {service.layout.data_dir})", file=sys.stderr,
          flush=True)
    server.run()
    return 1 if service.load_error else 0


def _serve(args: argparse.Namespace) -> int:
    return run_server(settings_from_args(args), args.log_level)


def add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--api_key", default=None, help="default: $LIGHTX2V_API_KEY")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--image_path", default=None, help="a local image (sent as base64) or a name in the server's "
                   "input folder")
    p.add_argument("--last_frame_path", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--infer_steps", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num_frames", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--sample_shift", type=float, default=None)
    p.add_argument("--out", required=True, help="where to save the result (.mp4 / .png)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the result")


def _submit(args: argparse.Namespace) -> int:
    _require_extra()
    from lightx2v.serve.client import Client, ServiceError

    fields = {k: getattr(args, k) for k in ("negative_prompt", "seed", "infer_steps", "height", "width", "num_frames",
                                            "guidance_scale", "sample_shift")}

    def show(ev):
        if ev.get("steps"):
            print(f"\r{ev['status']:<10} {ev.get('stage', '')} step {ev['step']}/{ev['steps']} "
                  f"({ev['progress']}%)", end="", file=sys.stderr, flush=True)

    try:
        with Client(args.url, api_key=args.api_key or os.environ.get("LIGHTX2V_API_KEY")) as c:
            path = c.generate(args.prompt, args.out, image_path=args.image_path,
                              last_frame_path=args.last_frame_path, timeout=args.timeout, on_progress=show, **fields)
    except ServiceError as e:
        print("", file=sys.stderr)
        raise UserError(str(e)) from None
    print(f"\nsaved {path}", file=sys.stderr)
    return 0


def register_serve(subparsers) -> None:
    """Add ``serve`` and ``submit`` to ``lightx2v``'s sub-commands."""
    serve = subparsers.add_parser("serve", help="run the generation service (HTTP API)")
    add_serve_args(serve)
    serve.set_defaults(func=_serve)
    submit = subparsers.add_parser("submit", help="send a request to a running server and download the result")
    add_submit_args(submit)
    submit.set_defaults(func=_submit)


def main(argv: list[str] | None = None) -> int:
    """``python -m lightx2v.server`` (LightX2V's entry point): the ``serve`` flags."""
    import logging

    p = argparse.ArgumentParser(prog="python -m lightx2v.server", description="Run the generation service.")
    add_serve_args(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return _serve(args)
    except UserError as e:
        print(f"lightx2v: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
