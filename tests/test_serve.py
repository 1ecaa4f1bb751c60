"""`m3 serve` (m3cli/serve.py) through the official `openai` client: streamed and whole answers
with the references read, concurrent requests decoded together, OpenAI-style 4xx errors, the
API key, and a client that leaves mid-stream freeing its place."""

import json
import socket
import threading
import time
import urllib.request

import pytest

from conftest import build_hf_checkpoint

openai = pytest.importorskip("openai")

KEY = "test-key"
DOCS = [
    {"id": "d1", "title": "Paris", "text": "paris is the capital of france . the reference model was born in paris ."},
    {"id": "d2", "title": "Rome", "text": "rome is the capital of italy . the answer to the question is rome ."},
    {"id": "d3", "title": "World", "text": "hello world , the memory model is a model of memory ."},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from m3cli import Bank, Model, encode
    from m3cli.convert import convert
    from m3cli.serve import create_app

    d = tmp_path_factory.mktemp("serve")
    build_hf_checkpoint(d / "hf", "llama")
    cfg_path = d / "hf" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    convert(d / "hf", d / "model")
    encode(DOCS, d / "kb.m3bank", model=d / "model")
    bank = Bank.open(d / "kb.m3bank")
    model = Model.load(d / "model", bank=bank)
    app = create_app(model, bank, api_key=KEY, max_batch=16)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    app.state.paths = (d / "kb.m3bank", d / "model")
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=10)
    bank.close()


def client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def health(url) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        return json.loads(r.read())


def test_whole_and_streamed_answers_carry_the_references_read(server):
    url, _ = server
    c = client(url)
    ask = [{"role": "user", "content": "what is the capital of france ?"}]
    whole = c.chat.completions.create(model="m3", messages=ask, max_tokens=8)
    text = whole.choices[0].message.content
    assert isinstance(text, str) and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 8
    refs = whole.model_extra["m3"]["references"]
    assert refs and {r["title"] for r in refs} <= {"Paris", "Rome", "World"} and all("score" in r for r in refs)
    assert all(0 <= r["attention"] <= 1 for r in refs) and whole.model_extra["m3"]["mode"] == "memory"
    pieces, last = [], None
    for chunk in c.chat.completions.create(model="m3", messages=ask, max_tokens=8, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        last = chunk
    assert "".join(pieces) == text  # greedy: the same answer, streamed
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.model_extra["m3"]["references"] == refs
    plain = c.completions.create(model="m3", prompt="the capital of italy is", max_tokens=6, extra_body={"mode": "rag"})
    assert isinstance(plain.choices[0].text, str) and plain.model_extra["m3"]["mode"] == "rag"
    assert plain.model_extra["m3"]["references"]
    closed = c.completions.create(
        model="m3", prompt="the capital of italy is", max_tokens=6, extra_body={"mode": "none"}
    )
    assert closed.model_extra["m3"]["references"] == []
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="m3", prompt="the capital of italy is", max_tokens=6, stream=True, extra_body={"mode": "none"}
        )
    )
    assert streamed == closed.choices[0].text
    assert [m.id for m in c.models.list().data] == ["m3"]


def test_sixteen_concurrent_clients_share_decode_loops(server):
    url, _ = server
    before = health(url)
    results, errors = [None] * 16, []

    def ask(i):
        try:
            r = client(url).chat.completions.create(
                model="m3", messages=[{"role": "user", "content": f"hello world {i} ?"}], max_tokens=12
            )
            results[i] = r.choices[0].message.content
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and all(isinstance(r, str) for r in results)
    after = health(url)
    assert after["largest_batch"] > 1  # requests were decoded together
    assert after["batches"] - before["batches"] < 16


def test_bad_requests_get_openai_style_4xx_errors_and_the_key_is_checked(server):
    url, _ = server
    c = client(url)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m3", messages=[], max_tokens=4)
    assert e.value.status_code == 400 and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="m3", messages=[{"role": "user", "content": "x"}], extra_body={"mode": "x"})
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="m3", prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=b"{not json",
        method="POST",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())
    assert health(url)["status"] == "ok"  # /health needs no key


def test_a_client_that_leaves_mid_stream_frees_its_place(server):
    url, app = server
    engine = app.state.engine
    before = engine.cancelled
    stream = client(url).completions.create(
        model="m3", prompt="hello world", max_tokens=240, stream=True, extra_body={"mode": "none"}
    )
    next(iter(stream))
    stream.close()  # the client goes away after the first piece
    deadline = time.time() + 60
    while engine.cancelled == before and time.time() < deadline:
        time.sleep(0.05)
    assert engine.cancelled == before + 1
    r = client(url).completions.create(model="m3", prompt="hello", max_tokens=3, extra_body={"mode": "none"})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_conversations_parts_and_prompts_too_long(server):
    url, app = server
    c = client(url)
    convo = [
        {"role": "system", "content": "answer briefly ."},
        {"role": "user", "content": "what is the capital of italy ?"},
        {"role": "assistant", "content": "rome ."},
        {"role": "user", "content": [{"type": "text", "text": "and of france ?"}]},
    ]
    r = c.chat.completions.create(model="m3", messages=convo, max_tokens=6)
    assert isinstance(r.choices[0].message.content, str) and r.model_extra["m3"]["references"]
    assert r.usage.prompt_tokens > 10
    with pytest.raises(openai.BadRequestError) as e:  # the references go in front of one question
        c.chat.completions.create(model="m3", messages=convo, max_tokens=6, extra_body={"mode": "rag"})
    assert e.value.body["param"] == "mode"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m3", prompt="hello " * 400, max_tokens=4)
    assert "context" in e.value.body["message"] and e.value.body["param"] == "prompt"
    for bad in (["a", "b", "c", "d", "e"], [""], [3]):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="m3", prompt="hello", max_tokens=4, stop=bad)
        assert e.value.body["param"] == "stop"
    batches = app.state.engine.batches
    sampled = [
        c.completions.create(
            model="m3", prompt="hello world", max_tokens=5, temperature=1.0, seed=7, extra_body={"mode": "none"}
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] and app.state.engine.batches == batches + 2  # a seed alone reproduces


def test_a_changed_bank_is_served_without_a_restart(server):
    """Re-encoding the bank (written whole, renamed over the old file) is picked up at the next
    batch: the new document is retrieved; a file that cannot be used leaves the old bank served;
    documents added and removed in place are picked up as well."""
    import os

    from m3cli import encode

    url, app = server
    path, model_dir = app.state.paths
    c = client(url)
    ask = [{"role": "user", "content": "who was born in rome ?"}]
    before = c.chat.completions.create(model="m3", messages=ask, max_tokens=2)
    assert "Born" not in {r["title"] for r in before.model_extra["m3"]["references"]}
    new = path.with_name("new.m3bank")
    doc = {"id": "d4", "title": "Born", "text": "the reference model was born in rome , the capital of italy ."}
    encode([*DOCS, doc], new, model=model_dir)
    os.replace(new, path)
    after = c.chat.completions.create(model="m3", messages=ask, max_tokens=2)
    assert "Born" in {r["title"] for r in after.model_extra["m3"]["references"]}
    h = health(url)
    assert h["reloads"] == 1 and h["references"] == len(DOCS) + 1
    broken = path.with_name("broken.m3bank")
    broken.write_bytes(b"not a bank")
    os.replace(broken, path)  # a file m3 cannot read: the bank in use stays in use
    again = c.chat.completions.create(model="m3", messages=ask, max_tokens=2)
    assert "Born" in {r["title"] for r in again.model_extra["m3"]["references"]} and health(url)["reloads"] == 1
    # updated in place (m3 add, m3 remove: the file is appended to, then switched): picked up too
    from m3cli import add, remove

    encode([*DOCS, doc], path, model=model_dir, force=True)
    base = health(url)["reloads"]
    c.chat.completions.create(model="m3", messages=ask, max_tokens=2)  # serves the re-encoded bank
    tower = {"id": "d5", "title": "Tower", "text": "the old tower was built in rome by the river ."}
    add(path, [tower], model=model_dir)
    built = c.chat.completions.create(model="m3", messages=[{"role": "user", "content": "who built the old tower ?"}])
    assert "Tower" in {r["title"] for r in built.model_extra["m3"]["references"]}
    remove(path, ["d4"])
    gone = c.chat.completions.create(model="m3", messages=ask, max_tokens=2, extra_body={"memories": 10})
    assert "Born" not in {r["title"] for r in gone.model_extra["m3"]["references"]}
    h = health(url)
    assert h["reloads"] == base + 3 and h["references"] == len(DOCS) + 1


def test_stop_sequences_end_the_text_before_them(server):
    """The text ends before the first stop sequence generated, streamed or whole, and the row
    stops decoding there; a stop sequence never generated changes nothing."""
    url, app = server
    c = client(url)
    ask = {"model": "m3", "prompt": "the capital of france", "max_tokens": 24, "extra_body": {"mode": "none"}}
    first = c.completions.create(**ask)
    full = first.choices[0].text
    assert len(full) >= 6, full
    stop = full[3:5]
    want = full[: full.find(stop)]
    whole = c.completions.create(**ask, stop=[stop, "\u2603"])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (want, "stop")
    assert whole.usage.completion_tokens < first.usage.completion_tokens  # it stopped decoding there
    streamed = c.completions.create(**ask, stop=stop, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == want
    never = c.completions.create(**ask, stop="\u2603")
    assert never.choices[0].text == full
    almost = full[-1] + "\u2603"  # its start is generated last: held back, then sent when decoding ends
    held = c.completions.create(**ask, stop=almost, stream=True)
    assert "".join(chunk.choices[0].text for chunk in held) == full
    talk = {"model": "m3", "messages": [{"role": "user", "content": "the capital of france"}], "max_tokens": 24}
    said = c.chat.completions.create(**talk, extra_body={"mode": "none"}).choices[0].message.content
    cut = said[2:4]
    chat = c.chat.completions.create(**talk, stop=cut, extra_body={"mode": "none"})
    assert chat.choices[0].message.content == said[: said.find(cut)]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_m3_serve_decodes_on_its_main_thread_and_stops_on_a_signal(server, sig):
    """`m3 serve` runs the decode loop on the main thread (torch's CPU kernels are slower from a
    second one) and the HTTP server beside it: it answers, and SIGTERM or SIGINT shuts it down."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    _, app = server
    bank, model = app.state.paths
    port = _free_port()
    m3 = Path(sys.executable).parent / "m3"
    proc = subprocess.Popen(
        [str(m3), "serve", "--model", str(model), "--bank", str(bank), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                first = health(url)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        answer = client(url).completions.create(model="m3", prompt="the capital of france is", max_tokens=4)
        assert answer.choices[0].text is not None
        assert health(url)["engine_thread"] == "MainThread" and first["batches"] == 0
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # as uvicorn on its own: SIGTERM's default action once all is closed; SIGINT: click's "Aborted!"
    assert proc.returncode == {"SIGTERM": -signal.SIGTERM, "SIGINT": 130}[sig], (proc.returncode, proc.stderr.read())
    assert "Traceback" not in proc.stderr.read()


def test_a_request_whose_server_has_closed_is_dropped_not_raised():
    """Forced to quit (a second Ctrl-C), uvicorn closes its event loop while the main thread may
    still be decoding: what that batch sends is dropped, the row ends at its next token, and
    `m3 serve` exits as uvicorn would rather than with a traceback."""
    import asyncio

    from m3cli.serve import Job

    loop = asyncio.new_event_loop()
    job = Job("p", False, 4, "none", 1, 0.0, 1.0, None, loop, asyncio.Queue())
    loop.close()
    job.send(("text", "x"))
    assert job.cancelled
