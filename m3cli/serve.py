"""`m3 serve`: a model and its bank behind the OpenAI-compatible HTTP API (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events, or
whole), GET /v1/models and GET /health. Every completion carries an `m3` field that standard
clients ignore: the mode and the references the model read (bank reference ids, document ids and
titles, retrieval scores, share of the memory attention). A request may set `mode` (memory, rag,
none) and `memories` beside the standard fields.

Concurrent requests share one decode loop: a worker thread takes every waiting request whose
sampling settings match the oldest one's (up to --batch-size) and generates them as one batch
(`Generator.generate` with per-request token limits); a request whose client went away stops at
its next token. Requests with other settings wait for a later batch, keeping their place in line.
"""

import asyncio
import hmac
import math
import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import M3Error

MODES = ("memory", "rag", "none")
MAX_TOKENS_DEFAULT = 128


class RequestError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Job:
    """One request in the engine: its prompt and settings, and where its output goes."""

    prompt: str
    chat: bool
    max_tokens: int
    mode: str
    memories: int
    temperature: float
    top_p: float
    seed: int | None  # None: a fresh seed (a seeded request is reproducible when it runs alone)
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # ("text", piece) ..., then ("done", Completion) or ("error", RequestError)
    stream: bool = False
    templated: bool = False  # the prompt is a conversation already in the chat template
    sent: str = ""  # the text passed on so far (a stop sequence's possible start is held back)
    cancelled: bool = False
    stops: tuple[str, ...] = ()  # stop sequences: the text ends before the first one generated
    stopped: bool = False  # a stop sequence was generated: the row ends at its next token
    text: str = ""  # all the text generated so far
    created: float = field(default_factory=time.time)

    def key(self) -> tuple:
        """Requests with the same key can share a batch."""
        return (self.mode, self.memories, self.temperature, self.top_p, self.seed, self.chat, self.templated)

    def send(self, item: tuple) -> None:
        """Hand an item to the request's event loop; nothing when that loop has closed (the server
        was forced to quit while this request decoded)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # "Event loop is closed"
            self.cancelled = True

    def piece(self, text: str) -> None:
        """A piece of generated text: passed on to a streaming client, remembered either way. With
        stop sequences, text that may be the start of one waits until it is known not to be."""
        if self.stopped:
            return
        self.text += text
        ready = self.text
        if self.stops:
            ready = cut_at_stop(self.text, self.stops)
            self.stopped = len(ready) < len(self.text)
            if not self.stopped:  # hold back a tail that could still become a stop sequence
                held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
                ready = self.text[: len(self.text) - held]
        new = ready[len(self.sent) :]
        if new:
            self.sent = ready
            if self.stream:
                self.send(("text", new))

    def finish(self, completion):
        """The completion as the client sees it: cut before a stop sequence ("stop")."""
        if not self.stops:
            return completion
        import dataclasses

        text = cut_at_stop(completion.text, self.stops)
        if len(text) == len(completion.text):
            return completion
        return dataclasses.replace(completion, text=text, finish_reason="stop")


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to the first place any stop sequence starts (all of it when none does)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else text


class Engine:
    """The model, its bank and the decode loop that batches requests (`run`): on a thread of its
    own, or with `thread=False` on the caller's. `m3 serve` runs it on the main thread, the HTTP
    server on another: on a CPU, torch's OpenMP workers answer a second thread's parallel regions
    slowly once the main thread has its own (measured, default model in bfloat16, 2 cores: 64
    tokens in 2.5 s from a second thread against 1.4 s from the main one; float32 2.95 against 2.5)."""

    def __init__(self, model, bank, max_batch: int = 16, thread: bool = True) -> None:
        self.model, self.bank, self.max_batch = model, bank, max_batch
        self.reloads = 0  # times a changed bank file was opened again
        self._bank_stat = self._stat()
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.pending: list[Job] = []  # taken from the queue, waiting for a batch with their settings
        self.batches = 0  # decode loops run (a test reads it: concurrent requests share them)
        self.largest_batch = 0
        self.cancelled = 0  # requests stopped early because their client went away
        self._stop = threading.Event()
        self.thread_name: str | None = None  # the thread the decode loop runs on, once it runs
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self.run, name="m3-engine", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        """Stop the decode loop after the batch it is on (waits for its own thread, if it has one)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _take_batch(self) -> list[Job]:
        """The oldest waiting request and, up to max_batch, the next ones with its settings;
        the others keep their places (arrival order), so none waits behind later arrivals."""
        if not self.pending:
            self.pending.append(self.jobs.get(timeout=0.1))
            time.sleep(0.005)  # requests that arrive together start together
        while True:
            try:
                self.pending.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        key = self.pending[0].key()
        batch = [j for j in self.pending if j.key() == key][: self.max_batch]
        taken = {id(j) for j in batch}
        self.pending = [j for j in self.pending if id(j) not in taken]
        return [j for j in batch if not j.cancelled]

    def run(self) -> None:
        """The decode loop, until `close`."""
        self.thread_name = threading.current_thread().name
        while not self._stop.is_set():
            try:
                batch = self._take_batch()
            except queue.Empty:
                continue
            if batch:
                self.reload_if_changed()
                self._serve(batch)

    def _stat(self):
        if self.bank is None:
            return None
        try:
            st = os.stat(self.bank.path)
            if os.path.isdir(self.bank.path):  # a bank set: its manifest names what it holds
                with open(os.path.join(self.bank.path, "manifest.json"), "rb") as f:
                    return (f.read(1 << 24),)  # (the directory's own times change with any spool in it)
            else:
                with open(self.bank.path, "rb") as f:  # an in-place update's last step rewrites these 64 bytes
                    preamble = f.read(64)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, preamble)

    def reload_if_changed(self) -> None:
        """Between batches: a bank file that changed (re-encoded and renamed, re-indexed in place) is
        opened again and used from the next batch on; in-flight requests finish on the old one. A
        file m3 cannot read, or one another model encoded, leaves the old bank in use."""
        now = self._stat()
        if self.bank is None or now is None or now == self._bank_stat:
            return
        from .api import Bank

        old = self.bank
        try:
            new = Bank.open(old.path, embedder=old._embedder_dir, device=old._device)
            try:
                self.model.generator(new)  # checks the model and loads the retriever now
            except Exception:
                new.close()
                raise
        except Exception as e:  # noqa: BLE001 — keep serving the bank that works
            print(
                f"m3: warning: {old.path} changed but cannot be used ({e}); still serving the old one", file=sys.stderr
            )
            self._bank_stat = now
            return
        self.bank, self._bank_stat = new, now
        self.reloads += 1
        self.model._generators.pop(old, None)  # its retriever and memory cache go with it
        old.close()

    def _serve(self, batch: list[Job]) -> None:
        """Generate one batch; a request m3 refuses (a prompt longer than the context) fails alone."""
        from .generate import Options

        first = batch[0]
        opts = Options(
            mode=first.mode,
            max_new_tokens=max(j.max_tokens for j in batch),
            temperature=first.temperature,
            top_p=first.top_p,
            seed=first.seed if first.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1,
            memories=first.memories,
            chat=first.chat,
            templated=first.templated,
            cite=first.mode == "memory",
        )
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            gen = self.model.generator(self.bank if first.mode != "none" else None)
            done = gen.generate(
                [j.prompt for j in batch],
                opts,
                on_text=lambda b, piece: batch[b].piece(piece),
                max_new_tokens=[j.max_tokens for j in batch],
                stop=lambda b: batch[b].cancelled or batch[b].stopped or self._stop.is_set(),
            )
        except M3Error as e:
            if len(batch) > 1:  # whose was it? those that have no text yet run again, each alone
                for job in batch:
                    if job.sent or job.cancelled:
                        job.send(("error", RequestError(500, str(e), kind="server_error")))
                    else:
                        job.text, job.stopped = "", False  # nothing reached the client: start over
                        self._serve([job])
                return
            first.send(("error", RequestError(400, str(e).replace("prompt 1 ", "the prompt "))))
            return
        except Exception as e:  # noqa: BLE001 — a bug: every request of the batch gets a 500
            for job in batch:
                job.send(("error", RequestError(500, f"internal error: {e}", kind="server_error")))
            return
        for job, completion in zip(batch, done):
            completion = job.finish(completion)
            self.cancelled += completion.finish_reason == "cancelled"
            job.send(("done", completion))


def _references(completion) -> list[dict]:
    out = []
    for rec in completion.chunks:
        for j, h in enumerate(rec.hits):
            r = {"ref": h.ref, "doc_id": h.doc_id, "title": h.title, "score": round(h.score, 6), "chunk": rec.chunk}
            if rec.attention is not None and j < len(rec.attention):
                r["attention"] = round(rec.attention[j], 6)
            out.append(r)
    return out


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256


def create_app(
    model, bank=None, api_key: str | None = None, model_id: str = "m3", max_batch: int = 16, engine_thread: bool = True
):
    """The FastAPI app serving `model` (m3cli.api.Model) with `bank` (m3cli.api.Bank or None).
    engine_thread=False: the caller runs the decode loop, `app.state.engine.run()` (see `Engine`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    import contextlib

    engine = Engine(model, bank, max_batch=max_batch, thread=engine_thread)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="m3", version=_version(), lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return JSONResponse(
            RequestError(400, f"{where}: {first.get('msg', 'invalid request')}", where or None).body(), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse(RequestError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                err = RequestError(
                    401, "invalid or missing API key (Authorization: Bearer KEY)", kind="authentication_error"
                )
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": str(model.path),
            "fingerprint": model.fingerprint,
            "bank": str(engine.bank.path) if engine.bank is not None else None,
            "references": engine.bank.references if engine.bank is not None else 0,
            "reloads": engine.reloads,
            "batches": engine.batches,
            "largest_batch": engine.largest_batch,
            "cancelled": engine.cancelled,
            "engine_thread": engine.thread_name,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "m3"}]}

    async def _body(request: Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError, or an integer of thousands of digits
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def _job(body: dict, prompt: str, chat: bool) -> Job:
        def number(name, default, lo, hi, kind=float):
            v = body.get(name, default)
            if v is None:
                v = default
            try:
                bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                bad = bad or (kind is int and not float(v).is_integer())
            except OverflowError:  # an integer too large for a float
                bad = True
            if bad:
                raise RequestError(400, f"{name} must be a number in range", name)
            if not lo <= v <= hi:
                raise RequestError(400, f"{name} must be in [{lo}, {hi}]", name)
            return kind(v)

        if body.get("model") not in (None, model_id):
            raise RequestError(
                404,
                f"model {body.get('model')!r} does not exist; this server has {model_id!r}",
                "model",
                kind="invalid_request_error",
            )
        if body.get("n", 1) not in (1, None):
            raise RequestError(400, "n must be 1", "n")
        stops = body.get("stop") or ()
        stops = (stops,) if isinstance(stops, str) else stops
        if (
            not isinstance(stops, (list, tuple))
            or len(stops) > MAX_STOPS
            or not all(isinstance(x, str) and 1 <= len(x) <= MAX_STOP_CHARS for x in stops)
        ):
            raise RequestError(
                400,
                f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings of up to "
                f"{MAX_STOP_CHARS} characters",
                "stop",
            )
        mode = body.get("mode") or ("memory" if bank is not None else "none")
        if mode not in MODES:
            raise RequestError(400, f"mode must be one of {', '.join(MODES)}", "mode")
        if mode != "none" and bank is None:
            raise RequestError(400, f"mode {mode} needs a bank; this server has none (m3 serve --bank)", "mode")
        from .generate import MAX_MEMORIES

        if not isinstance(body.get("stream", False), (bool, type(None))):
            raise RequestError(400, "stream must be true or false", "stream")
        return Job(
            prompt=prompt,
            chat=chat,
            stream=bool(body.get("stream")),
            max_tokens=number(
                "max_tokens"
                if body.get("max_tokens") is not None or body.get("max_completion_tokens") is None
                else "max_completion_tokens",
                MAX_TOKENS_DEFAULT,
                1,
                model.config.context_length,
                int,
            ),
            mode=mode,
            memories=number("memories", 5, 1, MAX_MEMORIES, int),
            temperature=number("temperature", 0.0, 0.0, 2.0),
            top_p=number("top_p", 1.0, 1e-6, 1.0),
            seed=None if body.get("seed") is None else number("seed", 0, 0, 2**63 - 1, int) % (2**31),
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
            stops=tuple(stops),
        )

    async def _complete(request: Request, job: Job, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        engine.submit(job)

        def extra(c) -> dict:
            return {"mode": job.mode, "references": _references(c)}

        def usage(c) -> dict:
            return {
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": len(c.token_ids),
                "total_tokens": c.prompt_tokens + len(c.token_ids),
            }

        if not job.stream:
            try:
                while True:
                    try:
                        kind, item = await asyncio.wait_for(job.out.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():  # the client left: free its place
                            job.cancelled = True
                            raise RequestError(499, "the client closed the request") from None
                        continue
                    if kind == "error":
                        raise item
                    if kind == "done":
                        break
            except asyncio.CancelledError:
                job.cancelled = True
                raise
            c = item
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": FINISH[c.finish_reason],
                }
                if chat
                else {"index": 0, "text": c.text, "logprobs": None, "finish_reason": FINISH[c.finish_reason]}
            )
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model_id,
                "choices": [choice],
                "usage": usage(c),
                "m3": extra(c),
            }

        async def events():
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield _sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_id,
                        "choices": [first],
                    }
                )
            while True:
                if await request.is_disconnected():
                    job.cancelled = True
                    return
                try:
                    kind, item = await asyncio.wait_for(job.out.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                if kind == "error":
                    yield _sse(item.body())
                    return
                if kind == "text":
                    choice = (
                        {"index": 0, "delta": {"content": item}, "finish_reason": None}
                        if chat
                        else {"index": 0, "text": item, "logprobs": None, "finish_reason": None}
                    )
                    yield _sse(
                        {
                            "id": rid,
                            "object": obj + (".chunk" if chat else ""),
                            "created": created,
                            "model": model_id,
                            "choices": [choice],
                        }
                    )
                    continue
                c = item
                tail = c.text[len(job.sent) :] if c.text.startswith(job.sent) else ""  # held back while decoding
                choice = (
                    {"index": 0, "delta": {"content": tail} if tail else {}, "finish_reason": FINISH[c.finish_reason]}
                    if chat
                    else {"index": 0, "text": tail, "logprobs": None, "finish_reason": FINISH[c.finish_reason]}
                )
                yield _sse(
                    {
                        "id": rid,
                        "object": obj + (".chunk" if chat else ""),
                        "created": created,
                        "model": model_id,
                        "choices": [choice],
                        "usage": usage(c),
                        "m3": extra(c),
                    }
                )
                yield "data: [DONE]\n\n"
                return

        async def guarded():
            try:
                async for event in events():
                    yield event
            except (asyncio.CancelledError, GeneratorExit):
                job.cancelled = True
                raise

        return StreamingResponse(guarded(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "prompt must be a non-empty string", "prompt")
        job = _job(body, prompt, chat=False)
        _check_length(job, len(model.tokenizer(prompt)["input_ids"]))
        return await _complete(request, job, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and isinstance(_content(m.get("content")), str)
                and m.get("role") in ("system", "developer", "user", "assistant")
                for m in messages
            )
        ):
            raise RequestError(
                400,
                "messages must be a non-empty list of {role, content} objects (roles system, user, assistant)",
                "messages",
            )
        if messages[-1]["role"] != "user":
            raise RequestError(400, "the last message must be the user's", "messages")
        tok = model.tokenizer
        if not getattr(tok, "chat_template", None):
            raise RequestError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [
            {"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m["content"])}
            for m in messages
        ]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 — the template refuses the conversation (roles, order)
            raise RequestError(400, f"the model's chat template refuses these messages: {e}", "messages") from None
        if len(messages) == 1:  # the question alone: its own tokens retrieve (m3 generate --chat)
            job = _job(body, messages[0]["content"], chat=True)
        else:  # a conversation, already in the template: its chunks retrieve with their own text
            job = _job(body, text, chat=False)
            job.templated = True
            if job.mode == "rag":
                raise RequestError(400, "mode rag takes one user message (the references go in front of it)", "mode")
        _check_length(job, len(tok(text, add_special_tokens=False)["input_ids"]))
        return await _complete(request, job, chat=True)

    def _check_length(job: Job, n: int) -> None:
        """A prompt that leaves no room in the context is refused here, before it waits for a batch."""
        if n >= model.config.context_length:
            raise RequestError(
                400,
                f"the prompt has {n} tokens; the model's context is {model.config.context_length}",
                "messages" if job.chat else "prompt",
            )

    return app


def _content(content) -> str | None:
    """A message's content: a string, or OpenAI's list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _version() -> str:
    from . import __version__

    return __version__
