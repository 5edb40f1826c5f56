#!/usr/bin/env python3
"""A stand-in for llama.cpp's `llama-server` b11434 (stdlib only), modelled on what the real one did here.

Measured behaviour it copies (ENGINE.md, tests/fixtures/engines/*): logs on stderr with llama.cpp's
`M.SS.mmm.uuu L ` prefix; binds its socket first (`--host PATH.sock`: a unix socket, as poolmgr runs engines;
else TCP, `--port 0` = ephemeral), answers 503 "Loading model" while loading, then logs
`srv  llama_server: listening on unix://PATH` (or `http://HOST:PORT`) and serves /health, /slots,
/props (build_info "b11434-fake"), /metrics (`--metrics`, else 501), POST /completion. A missing, empty or
corrupt model file, a busy port: the real stderr lines, exit 1. SIGTERM while loading kills it (the signal),
once ready it exits 0.

Told what to do by the environment (or by a `fake-engine-mode: MODE` line in the model file):
  FAKE_ENGINE_MODE        ok | exit | hang | fail_model | oom | spillover | crash_after | hog
  FAKE_ENGINE_LOAD_MS     how long "Loading model" lasts (default 30)
  FAKE_ENGINE_EXIT_CODE   code for `exit` / `crash_after` (exit: default 1; crash_after: a signal unless set)
  FAKE_ENGINE_CRASH_AFTER_MS   crash this long after ready (default 100)
  FAKE_ENGINE_CRASH_SIGNAL     signal number for crash_after (default 11, SIGSEGV; no core file)
  FAKE_ENGINE_IGNORE_TERM=1    ignore SIGTERM (a wedged engine)
  FAKE_ENGINE_GRANDCHILD  term | ignore_term: fork a long-lived grandchild (logs its pid)
  FAKE_ENGINE_COMPLETION_MS    how long a completion holds its slot (default 0)
  FAKE_ENGINE_STRICT_FLAGS=1   unknown flags fail like the real binary (default: ignored)
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn

BUILD_INFO = "b11434-fake"
_T0 = time.monotonic()
_VALUE_FLAGS = {
    "-m": "model", "--model": "model", "--host": "host", "--port": "port", "-np": "parallel",
    "--parallel": "parallel", "-c": "ctx_size", "--ctx-size": "ctx_size", "-ngl": "ngl",
    "--n-gpu-layers": "ngl", "--gpu-layers": "ngl", "--api-key": "api_key", "--fit": None,
    "-sm": None, "--split-mode": None, "-ts": None, "--tensor-split": None, "-mg": None, "--main-gpu": None,
    "-dev": None, "--device": None, "--temp": None, "--seed": None, "-t": None, "--threads": None,
    "--load-mode": None, "-lv": None, "--log-verbosity": None, "--alias": None, "-a": None,
}  # fmt: skip
_BOOL_FLAGS = {"--metrics", "--no-webui", "--webui", "--no-ui", "--ui", "--slots", "--no-slots", "--version"}


def log(level: str, tag: str, message: str) -> None:
    us = int((time.monotonic() - _T0) * 1_000_000)
    stamp = f"{us // 60_000_000}.{us // 1_000_000 % 60:02d}.{us // 1000 % 1000:03d}.{us % 1000:03d}"
    sys.stderr.write(f"{stamp} {level} {tag}: {message}\n" if tag else f"{stamp} {level} {message}\n")
    sys.stderr.flush()


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"model": "", "host": "127.0.0.1", "port": "8080", "parallel": "1"}
    opts.update(ctx_size="4096", ngl=None, api_key="", flags=set())
    strict = os.environ.get("FAKE_ENGINE_STRICT_FLAGS") == "1"
    i = 0
    while i < len(argv):
        arg, _, inline = argv[i].partition("=")
        if arg in _VALUE_FLAGS:
            value = inline if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if inline else 2
            key = _VALUE_FLAGS[arg]
            if key:
                opts[key] = value
            continue
        if arg in _BOOL_FLAGS:
            opts["flags"].add(arg)
        elif arg.startswith("-") and strict:
            sys.stderr.write(f"error: invalid argument: {arg}\n")
            sys.exit(1)
        i += 1
    return opts


def model_mode(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("latin-1")
    except OSError:
        return None
    match = re.search(r"fake-engine-mode:\s*(\w+)", head)
    return match.group(1) if match else None


def model_failure(path: str) -> str | None:
    """The real first error line for a model that cannot load, or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        return f"gguf_init_from_file: failed to open GGUF file '{path}' ({exc.strerror})"
    if len(head) < 4:
        return "gguf_init_from_reader: failed to read magic"
    if head[:4] != b"GGUF":
        magic = head[:4].decode("latin-1")
        return f"gguf_init_from_reader: invalid magic characters: '{magic}', expected 'GGUF'"
    if len(head) < 24:
        return "gguf_init_from_reader: failed to read key-value pairs"
    return None


def fail_model(first_line: str, path: str) -> NoReturn:
    log("E", "", first_line)
    log("E", "llama_model_load", f"error loading model: llama_model_loader: failed to load model from {path}")
    log("E", "llama_model_load_from_file_impl", "failed to load model")
    log("E", "cmn  common_init_", f"failed to load model '{path}'")
    log("E", "srv    load_model", f"failed to load model, '{path}'")
    log("I", "srv    operator()", "operator(): cleaning up before exit...")
    log("E", "srv  llama_server", "exiting due to model loading error")
    sys.exit(1)


def fail_vram_oom(path: str) -> NoReturn:
    # The decisive lines of tests/fixtures/engines/h200-llama-server-b11434-cuda/oom-stderr.txt.
    log(
        "W",
        "common_fit_params",
        "failed to fit params to free device memory: n_gpu_layers already set by user to 99, abort",
    )
    log(
        "E",
        "ggml_backend_cuda_buffer_type_alloc_buffer",
        "allocating 1318912.64 MiB on device 0: cudaMalloc failed: out of memory",
    )
    log("E", "ggml_gallocr_reserve_n_impl", "failed to allocate CUDA0 buffer of size 1382980139136")
    log("E", "graph_reserve", "failed to allocate compute buffers")
    log("E", "llama_init_from_model", "failed to initialize the context: failed to allocate compute pp buffers")
    log("E", "cmn  common_init_", f"failed to create context with model '{path}'")
    log("E", "srv    load_model", f"failed to create_context with model '{path}'")
    log("I", "srv    operator()", "operator(): cleaning up before exit...")
    log("E", "srv  llama_server", "exiting due to model loading error")
    sys.exit(1)


def warn_spillover() -> None:
    # The first lines of tests/fixtures/engines/h200-llama-server-b11434-cuda/no-gpu-visible-stderr.txt.
    log("E", "ggml_cuda_init", "failed to initialize CUDA: no CUDA-capable device is detected")
    sys.stderr.write(
        "warning: no usable GPU found, --gpu-layers option will be ignored\n"
        "warning: one possible reason is that llama.cpp was compiled without GPU support\n"
        "warning: consult docs/build.md for compilation instructions\n"
    )
    sys.stderr.flush()


class Engine:
    def __init__(self, opts: dict[str, Any]) -> None:
        self.opts = opts
        self.loaded = threading.Event()
        self.cond = threading.Condition()
        self.n_slots = max(1, int(opts["parallel"]))
        self.busy = [False] * self.n_slots
        self.prompt_tokens = 0
        self.predicted_tokens = 0
        self.n_decode = 0
        self.completion_s = int(os.environ.get("FAKE_ENGINE_COMPLETION_MS", "0")) / 1000

    def take_slot(self) -> int:
        with self.cond:
            while all(self.busy):
                self.cond.wait()
            slot = self.busy.index(False)
            self.busy[slot] = True
            return slot

    def free_slot(self, slot: int) -> None:
        with self.cond:
            self.busy[slot] = False
            self.cond.notify()

    def metrics(self) -> str:
        lines = []
        values = {
            "prompt_tokens_total": ("counter", self.prompt_tokens),
            "tokens_predicted_total": ("counter", self.predicted_tokens),
            "n_decode_total": ("counter", self.n_decode),
            "prompt_tokens_seconds": ("gauge", 1000.0),
            "predicted_tokens_seconds": ("gauge", 300.0),
            "requests_processing": ("gauge", sum(self.busy)),
            "requests_deferred": ("gauge", 0),
        }
        for name, (kind, value) in values.items():
            lines += [f"# HELP llamacpp:{name} {name}", f"# TYPE llamacpp:{name} {kind}", f"llamacpp:{name} {value}"]
        return "\n".join(lines) + "\n"


JSON = "application/json"
Reply = tuple[int, Any, str]


def _error(status: int, message: str, kind: str) -> Reply:
    return status, {"error": {"code": status, "message": message, "type": kind}}, JSON


class Routes:
    """The HTTP answers, apart from the loading / API key gate."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.flags = engine.opts["flags"]
        self.model = engine.opts["model"]
        self.n_ctx = int(engine.opts["ctx_size"]) // engine.n_slots

    def get(self, path: str) -> Reply:
        handlers: dict[str, Callable[[], Reply]] = {
            "/health": lambda: (200, {"status": "ok"}, JSON),
            "/slots": self.slots,
            "/props": self.props,
            "/metrics": self.metrics,
            "/v1/models": lambda: (200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}, JSON),
        }
        handler = handlers.get(path)
        return handler() if handler else _error(404, "File Not Found", "not_found_error")

    def slots(self) -> Reply:
        if "--no-slots" in self.flags:
            return _error(501, "This server does not support slots endpoint.", "not_supported_error")
        slots = [
            {"id": i, "n_ctx": self.n_ctx, "speculative": False, "is_processing": busy}
            for i, busy in enumerate(self.engine.busy)
        ]
        return 200, slots, JSON

    def props(self) -> Reply:
        props = {"total_slots": self.engine.n_slots, "model_path": self.model, "build_info": BUILD_INFO}
        return 200, {**props, "default_generation_settings": {"n_ctx": self.n_ctx}}, JSON

    def metrics(self) -> Reply:
        if "--metrics" not in self.flags:
            msg = "This server does not support metrics endpoint. Start it with `--metrics`"
            return _error(501, msg, "not_supported_error")
        return 200, self.engine.metrics(), "text/plain; version=0.0.4"

    def complete(self, path: str, raw: bytes) -> Reply:
        if path not in ("/completion", "/completions", "/v1/completions"):
            return _error(404, "File Not Found", "not_found_error")
        try:
            req = json.loads(raw or b"{}")
            prompt, n_predict = str(req.get("prompt", "")), int(req.get("n_predict", 16))
        except (ValueError, TypeError, AttributeError):
            return _error(400, "Invalid request body", "invalid_request_error")
        engine = self.engine
        slot = engine.take_slot()
        try:
            time.sleep(engine.completion_s)
            evaluated = len(prompt.split()) + 1
            with engine.cond:
                engine.prompt_tokens += evaluated
                engine.predicted_tokens += n_predict
                engine.n_decode += n_predict
        finally:
            engine.free_slot(slot)
        body = {"content": "x" * n_predict, "tokens_predicted": n_predict, "tokens_evaluated": evaluated}
        return 200, {**body, "id_slot": slot, "stop": True, "model": self.model}, JSON


def make_handler(engine: Engine) -> type[BaseHTTPRequestHandler]:
    routes = Routes(engine)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def address_string(self) -> str:
            return str(self.client_address[0]) if self.client_address else "unix"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # llama-server does not log requests at the default verbosity

        def reply(self, answer: Reply) -> None:
            status, body, ctype = answer
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def refused(self) -> Reply | None:
            if not engine.loaded.is_set():
                return _error(503, "Loading model", "unavailable_error")
            key = engine.opts["api_key"]
            if key and self.path != "/health" and self.headers.get("Authorization") != f"Bearer {key}":
                return _error(401, "Invalid API Key", "authentication_error")
            return None

        def do_GET(self) -> None:
            self.reply(self.refused() or routes.get(self.path))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            self.reply(self.refused() or routes.complete(self.path, raw))

    return Handler


def spawn_grandchild(kind: str) -> None:
    action = "signal.SIG_IGN" if kind == "ignore_term" else "signal.SIG_DFL"
    code = f"import signal, time; signal.signal(signal.SIGTERM, {action}); time.sleep(3600)"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    log("I", "fake_engine", f"grandchild pid {child.pid}")


def crash() -> NoReturn:
    log("E", "fake_engine", "crashing")
    code = os.environ.get("FAKE_ENGINE_EXIT_CODE")
    if code is not None:
        os._exit(int(code))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sig = int(os.environ.get("FAKE_ENGINE_CRASH_SIGNAL", str(int(signal.SIGSEGV))))
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    time.sleep(10)
    os._exit(70)


def hog_memory() -> NoReturn:
    hoard = []
    while True:
        hoard.append(bytearray(16 * 1024 * 1024))  # zero-filled: every page is touched


def serve(opts: dict[str, Any], mode: str) -> None:
    engine = Engine(opts)
    host = opts["host"]
    server = bind(engine, host, int(opts["port"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if os.environ.get("FAKE_ENGINE_GRANDCHILD"):
        spawn_grandchild(os.environ["FAKE_ENGINE_GRANDCHILD"])
    load_model(opts, mode, engine)
    stop = threading.Event()
    if os.environ.get("FAKE_ENGINE_IGNORE_TERM") != "1":
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    engine.loaded.set()
    log("I", "srv  llama_server", "model loaded")
    where = f"unix://{host}" if host.endswith(".sock") else f"http://{host}:{server.server_address[1]}"
    log("I", "srv  llama_server", f"listening on {where}")
    if mode == "hog":
        hog_memory()
    crash_after_s = int(os.environ.get("FAKE_ENGINE_CRASH_AFTER_MS", "100")) / 1000
    if mode == "crash_after" and not stop.wait(crash_after_s):
        crash()
    while not stop.wait(3600):
        pass
    log("I", "srv    operator()", "operator(): cleaning up before exit...")
    sys.exit(0)


def bind(engine: Engine, host: str, port: int) -> ThreadingHTTPServer:
    """The HTTP server, bound; a port in use exits 1 with llama-server's lines."""
    try:
        if host.endswith(".sock"):
            server: ThreadingHTTPServer = _UnixHTTPServer(host, make_handler(engine))  # type: ignore[arg-type]
        else:
            server = ThreadingHTTPServer((host, port), make_handler(engine))
    except OSError:
        log("E", "srv         start", f"couldn't bind HTTP server socket, hostname: {host}, port: {port}")
        log("I", "srv    operator()", "operator(): cleaning up before exit...")
        log("E", "srv  llama_server", "exiting due to HTTP server error")
        sys.exit(1)
    server.daemon_threads = True
    return server


class _UnixHTTPServer(ThreadingHTTPServer):
    """HTTP on a unix socket (llama-server's `--host PATH.sock`)."""

    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "engine", 0


def load_model(opts: dict[str, Any], mode: str, engine: Engine) -> None:
    """The model load: the failure modes exit (or hang) here, like llama-server's own load errors."""
    model = opts["model"]
    log("I", "srv    load_model", f"loading model '{model}'")
    if mode == "fail_model":
        fail_model(f"gguf_init_from_file: failed to open GGUF file '{model}' (No such file or directory)", model)
    failure = model_failure(model)
    if failure:
        fail_model(failure, model)
    time.sleep(int(os.environ.get("FAKE_ENGINE_LOAD_MS", "30")) / 1000)
    while mode == "hang":
        time.sleep(3600)
    if mode == "oom":
        fail_vram_oom(model)
    n_ctx = int(opts["ctx_size"]) // engine.n_slots
    shape = f"n_slots = {engine.n_slots}, n_ctx_slot = {n_ctx}, kv_unified = 'false'"
    log("I", "srv    load_model", f"initializing, {shape}")


def main() -> None:
    opts = parse_args(sys.argv[1:])
    if "--version" in opts["flags"]:
        sys.stderr.write("version: 0.6.0-dev (build 11434, commit fake)\nbuilt with fake for Linux x86_64\n")
        sys.exit(0)
    mode = model_mode(opts["model"]) or os.environ.get("FAKE_ENGINE_MODE", "ok")
    if os.environ.get("FAKE_ENGINE_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "spillover":
        warn_spillover()
    log("I", "srv  llama_server", "initializing ...")
    if mode == "exit":
        code = int(os.environ.get("FAKE_ENGINE_EXIT_CODE", "1"))
        log("E", "fake_engine", f"exiting with code {code}")
        sys.exit(code)
    serve(opts, mode)


if __name__ == "__main__":
    main()
