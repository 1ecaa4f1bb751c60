"""Nothing lost, nothing half-read (issue #24): hostile banks, model dirs, corpora, flags,
concurrent and killed writers, full disks, read-only paths and planted links. Every case ends in
a result or in one line `m3: error: …` with exit status 1 — never a traceback, a hang, a memory
blow-up, a corrupt output or a lost old one. The long run is `make hostile` (tests/hostile.py)."""

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hostile
from cli_helpers import assert_user_error, m3
from m3cli.bank import Bank

ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / "samples" / "model"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_m3(*args, stdin=None, timeout=300, preexec_fn=None, **kwargs):
    """`m3 ARGS` as its own process (what a shell runs)."""
    return subprocess.run(
        [sys.executable, "-m", "m3cli", *[str(a) for a in args]],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=ENV,
        preexec_fn=preexec_fn,
        **kwargs,
    )


def one_line_failure(proc, *fragments):
    """A process that failed as m3 promises: exit 1, one stderr line `m3: error: …`, no traceback."""
    err = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
    assert proc.returncode == 1, (proc.returncode, err[-2000:])
    assert err.startswith("m3: error:") and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return hostile.build_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def harness():
    return hostile.Harness()


def rewrite_header(path: Path, **changes) -> None:
    """Change header keys of a bank and recompute every checksum (so only the values are wrong)."""
    blob = path.read_bytes()
    entries, header = hostile.parse(blob)
    header.update(changes)
    path.write_bytes(hostile.assemble(blob, entries, header))


def replace_section(path: Path, name: str, data: bytes) -> None:
    blob = path.read_bytes()
    entries, header = hostile.parse(blob)
    path.write_bytes(hostile.assemble(blob, entries, header, {name: data}))


def copy_seed(seeds, tmp_path, codec="bf16") -> Path:
    path = tmp_path / f"{codec}.m3bank"
    shutil.copy(next(s for s in seeds if codec in s.name), path)
    return path


# --- the generator's contract, sampled ---------------------------------------------------------------
def test_mutated_banks_keep_the_contract(seeds, harness, tmp_path):
    """A sample of the long run: 1,500 mutated banks, every checksum recomputed."""
    blobs = [p.read_bytes() for p in seeds]
    rng = random.Random(24)
    outcomes = {}
    for i in range(1500):
        name, blob = hostile.mutated(rng, blobs)
        path = tmp_path / "case.m3bank"
        path.write_bytes(blob)
        try:
            outcome = harness.check(path)
        except hostile.ContractBroken as e:
            pytest.fail(f"case {i} ({name}): {e}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the generator reaches every stage: refused at open, refused by verify, accepted
    assert {"refused when opened", "refused by verify and by use", "accepted"} <= set(outcomes), outcomes


def test_the_unmutated_seeds_pass_everything(seeds, harness):
    for path in seeds:
        assert harness.check(path) == "accepted"
        result = m3("inspect", path, "--verify", "--model", SAMPLE)
        assert result.exit_code == 0 and "fits the model" in result.stdout, result.output


def test_mutated_banks_through_the_cli(seeds, tmp_path):
    """The same contract as a user meets it: inspect --verify, search, generate."""
    blobs = [p.read_bytes() for p in seeds]
    rng = random.Random(7)
    for i in range(25):
        name, blob = hostile.mutated(rng, blobs)
        path = tmp_path / f"case{i}.m3bank"
        path.write_bytes(blob)
        for args in (
            ("inspect", path, "--verify", "--model", SAMPLE),
            ("inspect", path, "--json"),
            ("search", path, "Ilsa Varenkov", "--embedder", "self", "--model", SAMPLE),
            ("generate", "--bank", path, "--model", SAMPLE, "Ilsa Varenkov was born in", "-n", "2"),
        ):
            result = m3(*args)
            if result.exit_code != 0:
                assert_user_error(result)
            else:
                assert result.exception is None, (name, args)


def test_model_dirs_with_hostile_configs_and_weights(tmp_path):
    rng = random.Random(3)
    seen = set()
    for name, path in hostile.model_dir_cases(rng, SAMPLE, tmp_path, 60):
        seen.add(hostile.check_model_dir(path))
    assert "refused" in seen


@pytest.mark.parametrize("value", [10**6, 1025])
def test_a_config_asking_for_a_million_layers_is_one_line_at_once(tmp_path, value):
    model = tmp_path / "m"
    shutil.copytree(SAMPLE, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "n_layers": value}))
    assert_user_error(m3("generate", "--model", model, "hi", "-n", "1"), "n_layers")


def test_memory_top_k_of_a_billion_and_deep_nesting_and_int8_weights(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(SAMPLE, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "memory_top_k": 10**9}))
    assert_user_error(m3("inspect", model), "memory_top_k")
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_user_error(m3("inspect", model), "config")
    (model / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    state = load_file(str(model / "model.safetensors"))
    state["embed.weight"] = state["embed.weight"].to(dtype=__import__("torch").int8)
    save_file(state, str(model / "model.safetensors"))
    assert_user_error(m3("generate", "--model", model, "hi", "-n", "1"), "int8")


def test_corpus_edge_cases_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "kb.m3bank"
    for name, source in hostile.corpus_cases(tmp_path):
        stdin = source if isinstance(source, bytes) else None
        result = m3(
            "encode",
            "-" if stdin else source,
            "-o",
            out,
            "--model",
            SAMPLE,
            "--index",
            "none",
            "--max-doc-bytes",
            100_000,
            input=stdin,
        )
        assert_user_error(result)
        assert not out.exists() and not list(tmp_path.glob(".kb.m3bank*")), name


def test_encode_from_dev_zero_stops_at_once(tmp_path):
    with open("/dev/zero", "rb") as zero:
        proc = subprocess.run(
            [sys.executable, "-m", "m3cli", "encode", "-", "-o", str(tmp_path / "kb.m3bank"), "--model", str(SAMPLE)],
            stdin=zero,
            capture_output=True,
            timeout=120,
            env=ENV,
        )
    one_line_failure(proc, "not text")


# --- banks m3 writes, m3 reads ---------------------------------------------------------------------
def test_documents_sharing_one_title_and_source_encode_into_a_readable_bank(tmp_path):
    """A company-handbook export: 1,500 documents, one title and source URL; their strings
    compress beyond the reader's zstd ratio, so the writer stores them raw."""
    import zstandard

    title = "Employee Handbook: Policies, Procedures and Benefits of the Acme Corporation, 2026 edition"
    source = "https://intranet.example.com/hr/policies/employee-handbook/2026/complete-edition/index.html"
    corpus = tmp_path / "handbook.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": f"h{i}", "title": title, "source": source, "text": f"Rule {i}."}) + "\n"
            for i in range(1500)
        )
    )
    corpus2 = tmp_path / "title.jsonl"
    corpus2.write_text(json.dumps({"id": "t", "title": "T" * 100_000, "text": "A short text."}) + "\n")
    for c in (corpus, corpus2):
        out = tmp_path / f"{c.stem}.m3bank"
        result = m3("encode", c, "-o", out, "--model", SAMPLE, "--embedder", "self", "-q")
        assert result.exit_code == 0, result.output
        check = m3("inspect", out, "--verify")
        assert check.exit_code == 0, check.output
        with Bank(out) as bank:
            raw = bank.decoded("docs.strings")
            assert len(raw) > 64 * len(zstandard.ZstdCompressor(level=10).compress(raw))  # the case in point
            assert bank.sections["docs.strings"].codec == "raw"


def test_writing_a_bank_m3_would_refuse_fails_and_leaves_the_old_one(tmp_path, monkeypatch):
    """The writer runs the reader's validation before the rename."""
    from m3cli import bank_writer

    out = tmp_path / "kb.m3bank"
    assert (
        m3("encode", ROOT / "samples" / "corpus.jsonl", "-o", out, "--model", SAMPLE, "--index", "none").exit_code == 0
    )
    before = out.read_bytes()
    real = bank_writer.write_bank_file

    def corrupting(path, header, sections):  # a writer bug: a header the reader refuses
        return real(path, {**header, "m3.memory.layer_ids": [0, 0, 1, 2]}, sections)

    monkeypatch.setattr(bank_writer, "write_bank_file", corrupting)
    result = m3("encode", ROOT / "samples" / "corpus.jsonl", "-o", out, "--model", SAMPLE, "--index", "none", "--force")
    assert_user_error(result, "would not read back")
    assert out.read_bytes() == before and not list(tmp_path.glob(".kb.m3bank.*"))


def test_reindexing_does_not_grow_the_file(seeds, tmp_path):
    path = copy_seed(seeds, tmp_path)
    sizes = []
    for factory in ("Flat", "HNSW8", "Flat", "HNSW8", "Flat", "HNSW8"):
        result = m3("index", path, "--embedder", "self", "--model", SAMPLE, "--factory", factory, "-q")
        assert result.exit_code == 0, result.output
        sizes.append(path.stat().st_size)
    assert max(sizes) <= 1.3 * min(sizes), sizes
    assert m3("inspect", path, "--verify").exit_code == 0


# --- values behind valid checksums --------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, fragment, use_fragment",
    [
        ({"m3.index.nprobe": 2**40}, "m3.index.nprobe", "m3.index.nprobe"),
        ({"m3.index.ef_search": 2**40}, "m3.index.ef_search", "m3.index.ef_search"),
        ({"m3.memory.layer_ids": [0, 0, 1, 2]}, "layer_ids", "layer_ids"),
        ({"m3.model.rope_theta": float("nan")}, "rope_theta", "rope_theta"),
        ({"m3.index.metric": "l2"}, "m3.index.metric", "m3.index.metric"),
        # valid in a bank of its own, wrong for its model: verify (with the model) and generate refuse,
        # search (which reads no memory) answers
        ({"m3.memory.layer_ids": [0, 1, 2, 5000]}, "memory layers", None),
        ({"m3.model.rope_theta": 12345.0}, "rope_theta", None),
    ],
)
def test_header_values_are_checked_before_use(seeds, tmp_path, changes, fragment, use_fragment):
    path = copy_seed(seeds, tmp_path)
    rewrite_header(path, **changes)
    assert_user_error(m3("inspect", path, "--verify"), fragment)
    generate = m3("generate", "--bank", path, "--model", SAMPLE, "Ilsa Varenkov was born in", "-n", "2")
    assert_user_error(generate, use_fragment or "does not fit this model")
    search = m3("search", path, "Ilsa", "--embedder", "self", "--model", SAMPLE)
    if use_fragment:
        assert_user_error(search, use_fragment)
    else:
        assert search.exit_code == 0, search.output


def test_a_permuted_memory_shape_of_the_same_size_fails_verify_and_generate(seeds, tmp_path):
    path = copy_seed(seeds, tmp_path)
    with Bank(path) as bank:
        L, _, H, K, d = bank.memory_shape
    assert L != H  # the sample model: 4 memory layers, 2 KV heads
    rewrite_header(path, **{"m3.memory.layers": H, "m3.memory.kv_heads": L, "m3.memory.layer_ids": list(range(H))})
    assert_user_error(m3("inspect", path, "--verify", "--model", SAMPLE), "memories of shape")
    assert_user_error(m3("inspect", path, "--verify"), "memories of shape")  # the model the bank names
    assert_user_error(
        m3("generate", "--bank", path, "--model", SAMPLE, "Ilsa Varenkov was born in", "-n", "2"),
        "does not fit this model",
    )


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_nan_in_memories_is_found_by_verify_and_refused_by_generate(seeds, tmp_path, codec):
    path = copy_seed(seeds, tmp_path, codec)
    with Bank(path) as bank:
        data = bytearray(bank.raw("kv.data"))
        shape, record = bank.memory_shape, bank.record_bytes
    nan = {"bf16": b"\xc0\x7f", "int8": b"\x00\x7e"}[codec]
    values = shape[0] * 2 * shape[2] * shape[3] * shape[4]
    for i in range(len(data) // record):  # every reference, so generation must meet one
        at = i * record + (0 if codec == "bf16" else values)
        data[at : at + 2] = nan
    replace_section(path, "kv.data", bytes(data))
    assert_user_error(m3("inspect", path, "--verify"), "not finite")
    assert_user_error(
        m3("generate", "--bank", path, "--model", SAMPLE, "Ilsa Varenkov was born in", "-n", "2"), "not finite"
    )


def test_a_bank_with_no_references(seeds, tmp_path):
    path = copy_seed(seeds, tmp_path)
    blob = path.read_bytes()
    _, blob = hostile.mutate_empty(random.Random(0), blob)
    path.write_bytes(blob)
    assert_user_error(m3("inspect", path, "--verify"), "no references")
    assert_user_error(m3("search", path, "Ilsa", "--embedder", "self", "--model", SAMPLE), "no references")
    assert_user_error(m3("generate", "--bank", path, "--model", SAMPLE, "Ilsa", "-n", "2"), "no references")


def test_verify_loads_the_index(seeds, tmp_path):
    path = copy_seed(seeds, tmp_path)
    with Bank(path) as bank:
        raw = bytearray(bank.raw("index.faiss"))
    raw[4:8] = b"\xff\xff\xff\xff"  # inside the serialized index, checksum recomputed
    replace_section(path, "index.faiss", bytes(raw))
    assert_user_error(m3("inspect", path, "--verify"), "index")


def test_an_index_whose_graph_links_outside_is_refused(seeds, tmp_path):
    """An HNSW graph with a neighbour past the end would make FAISS read out of bounds."""
    import faiss
    import numpy as np

    path = copy_seed(seeds, tmp_path, "int8")  # indexed with HNSW8
    with Bank(path) as bank:
        index = faiss.deserialize_index(np.frombuffer(bank.raw("index.faiss"), dtype=np.uint8).copy())
    inner = faiss.downcast_index(index.index)
    links = faiss.vector_to_array(inner.hnsw.neighbors)
    links[3] = 10**6
    faiss.copy_array_to_vector(links, inner.hnsw.neighbors)
    replace_section(path, "index.faiss", faiss.serialize_index(index).tobytes())
    # refused by FAISS's own reader or by m3's structure checks, in one line either way
    assert_user_error(m3("inspect", path, "--verify"), "index.faiss")
    assert_user_error(m3("search", path, "Ilsa", "--embedder", "self", "--model", SAMPLE), "index.faiss")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--memories", "100000"), "--memories"),
        (("--temperature", "nan"), "--temperature"),
        (("--temperature", "inf"), "--temperature"),
        (("-n", str(10**9)), "--max-new-tokens"),
        (("--batch-size", str(10**6)), "--batch-size"),
    ],
)
def test_flags_are_bounded(seeds, args, fragment):
    bank = next(s for s in seeds if "bf16" in s.name)
    assert_user_error(m3("generate", "--bank", bank, "--model", SAMPLE, "Ilsa", *args), fragment)


def test_more_memories_than_the_bank_holds_gives_all_it_has(seeds):
    bank = next(s for s in seeds if "bf16" in s.name)
    with Bank(bank) as b:
        n = b.n_refs
    result = m3(
        "generate",
        "--bank",
        bank,
        "--model",
        SAMPLE,
        "Ilsa Varenkov was born in",
        "-n",
        "2",
        "--memories",
        str(min(256, n + 5)),
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["chunks"][0]["references"]) == n


# --- documents of any size -----------------------------------------------------------------------------
def test_a_long_document_streams_in_bounded_memory():
    """20 MB of text without a sentence end is cut into references piece by piece: the peak of
    Python allocations stays far below the document's size."""
    import tracemalloc

    from m3cli.checkpoint import load_tokenizer
    from m3cli.corpus import iter_references

    tokenizer = load_tokenizer(SAMPLE)
    piece = ("word " * 200_000)[: 1 << 20]

    def pieces():
        for _ in range(20):
            yield piece

    tracemalloc.start()
    count = 0
    for text, ids in iter_references(pieces(), tokenizer, 128):
        assert 0 < len(ids) <= 128
        count += 1
        if count >= 4000:  # the first ~4 MB: enough to see the memory bound, in seconds
            break
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 4000 and peak < 8 << 20, (count, peak)


def test_streamed_sentences_match_the_whole_text():
    from m3cli.corpus import _SENTENCE_END, _sentences

    rng = random.Random(0)
    words = "alpha beta. gamma! delta? x。 y\n\nz  . w".split(" ")
    for _ in range(300):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 200)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert list(_sentences(pieces)) == [s.strip() for s in _SENTENCE_END.split(text.strip()) if s]


def test_a_large_text_file_encodes_like_the_same_text_in_one_piece(tmp_path, monkeypatch):
    """A text file over the streaming threshold gives the same bank as the same text read whole."""
    import m3cli.corpus as corpus

    text = " ".join(f"Person {i} was born in Town {i % 97}." for i in range(3000))
    (tmp_path / "big.txt").write_text(text)
    monkeypatch.setattr(corpus, "STREAM_BYTES", 4096)
    streamed, whole = tmp_path / "s.m3bank", tmp_path / "w.m3bank"
    assert m3("encode", tmp_path / "big.txt", "-o", streamed, "--model", SAMPLE, "--index", "none", "-q").exit_code == 0
    monkeypatch.setattr(corpus, "STREAM_BYTES", 1 << 40)
    assert m3("encode", tmp_path / "big.txt", "-o", whole, "--model", SAMPLE, "--index", "none", "-q").exit_code == 0
    assert streamed.read_bytes() == whole.read_bytes()


# --- writers: concurrency, kills, full disks, read-only paths, links ----------------------------------
def wait_for(path: Path, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, "the writer ended before taking its lock"
        time.sleep(0.02)


def test_two_forced_encodes_of_one_path(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": str(i), "text": f"Person {i} lives in Town {i}. " * 12}) + "\n" for i in range(1000))
    )  # about 15 s of encoding: the second starts meanwhile
    out = tmp_path / "kb.m3bank"
    assert (
        run_m3(
            "encode", ROOT / "samples" / "corpus.jsonl", "-o", out, "--model", SAMPLE, "--index", "none", "-q"
        ).returncode
        == 0
    )
    old = out.read_bytes()
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "m3cli",
            "encode",
            str(corpus),
            "-o",
            str(out),
            "--model",
            str(SAMPLE),
            "--index",
            "none",
            "--force",
            "-q",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(tmp_path / ".kb.m3bank.lock", first)
    second = run_m3("encode", corpus, "-o", out, "--model", SAMPLE, "--index", "none", "--force", "-q")
    assert first.poll() is None, "the first writer finished before the second ended: no overlap to test"
    one_line_failure(second, "another m3 process is writing")
    assert out.read_bytes() == old  # the first has not finished: the old bank is whole
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    with Bank(out) as bank:
        assert bank.n_docs == 1000 and bank.verify() == []
    assert not (tmp_path / ".kb.m3bank.lock").exists()


def test_sigkill_during_encode_and_index_leaves_the_old_bank(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": str(i), "text": f"Person {i} lives in Town {i}. " * 20}) + "\n" for i in range(600))
    )
    out = tmp_path / "kb.m3bank"
    assert (
        run_m3(
            "encode", ROOT / "samples" / "corpus.jsonl", "-o", out, "--model", SAMPLE, "--embedder", "self", "-q"
        ).returncode
        == 0
    )
    old = out.read_bytes()
    env = {**ENV, "M3_CHECKPOINT_SECONDS": "0"}
    for marker in (".kb.m3bank.partial/state.json", ".kb.m3bank.emb.partial"):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "m3cli",
                "encode",
                str(corpus),
                "-o",
                str(out),
                "--model",
                str(SAMPLE),
                "--embedder",
                "self",
                "--force",
                "-q",
                "--batch-size",
                "4",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if marker.endswith("emb.partial"):  # kill while indexing: the encoded bank is in place by then
            wait_for(out.with_name(".kb.m3bank.emb.partial"), proc, timeout=300)
        else:
            wait_for(tmp_path / marker, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Bank(out) as bank:  # whichever bank is there is whole
            assert bank.verify() == []
        if not marker.endswith("emb.partial"):
            assert out.read_bytes() == old
    # a stale lock file of a killed writer does not block the next one
    result = run_m3("index", out, "--embedder", "self", "--model", SAMPLE, "-q")
    assert result.returncode == 0, result.stderr.decode()
    assert run_m3("inspect", out, "--verify").returncode == 0


def test_a_full_disk_is_one_line_and_the_old_bank_survives(tmp_path):
    out = tmp_path / "kb.m3bank"
    assert (
        run_m3(
            "encode", ROOT / "samples" / "corpus.jsonl", "-o", out, "--model", SAMPLE, "--index", "none", "-q"
        ).returncode
        == 0
    )
    old = out.read_bytes()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = run_m3(
        "encode",
        ROOT / "samples" / "corpus.jsonl",
        "-o",
        out,
        "--model",
        SAMPLE,
        "--index",
        "none",
        "--force",
        "-q",
        preexec_fn=small_files,
    )
    one_line_failure(proc, "File too large")
    assert out.read_bytes() == old and not list(tmp_path.glob(".kb.m3bank*"))


def immutable(path: Path):
    """Make `path` unwritable even for root (chattr +i); returns the undo, or None if the file
    system cannot."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        return lambda: path.chmod(mode)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        return None
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_directory_and_immutable_bank(seeds, tmp_path):
    bank = copy_seed(seeds, tmp_path)
    before = bank.read_bytes()
    ro = tmp_path / "ro"
    ro.mkdir()
    undo_dir, undo_bank = immutable(ro), immutable(bank)
    if undo_dir is None or undo_bank is None:  # no chattr here: the same OS errors, raised where m3 writes
        pytest.xfail("this file system has no immutable flag")
    try:
        one_line_failure(
            run_m3(
                "encode",
                ROOT / "samples" / "corpus.jsonl",
                "-o",
                ro / "kb.m3bank",
                "--model",
                SAMPLE,
                "--index",
                "none",
            )
        )
        one_line_failure(run_m3("index", bank, "--embedder", "self", "--model", SAMPLE, "--factory", "HNSW8", "-q"))
    finally:
        undo_dir()
        undo_bank()
    assert bank.read_bytes() == before and not list(ro.iterdir())


def test_planted_links_are_never_followed(seeds, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    bank = copy_seed(seeds, tmp_path)
    (tmp_path / f".{bank.name}.emb.partial").symlink_to(victim)
    (tmp_path / f".{bank.name}.emb.partial.json").symlink_to(victim)
    result = m3("index", bank, "--embedder", "self", "--model", SAMPLE, "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "kb.m3bank"
    (tmp_path / ".kb.m3bank.partial").symlink_to(tmp_path)  # a link where the spool goes
    result = m3(
        "encode", ROOT / "samples" / "corpus.jsonl", "-o", out, "--model", SAMPLE, "--index", "none", "--force", "-q"
    )
    assert result.exit_code == 0, result.output
    (tmp_path / ".x.m3bank.lock").symlink_to(victim)  # a link where the lock goes
    result = m3(
        "encode",
        ROOT / "samples" / "corpus.jsonl",
        "-o",
        tmp_path / "x.m3bank",
        "--model",
        SAMPLE,
        "--index",
        "none",
        "-q",
    )
    assert_user_error(result, "symbolic link")
    assert victim.read_text() == "precious" and not victim.is_symlink() and tmp_path.is_dir()
    assert m3("inspect", bank, "--verify").exit_code == 0 and m3("inspect", out, "--verify").exit_code == 0


def test_a_part_with_no_references_is_written_and_a_bank_too_large_to_read_is_refused_first(tmp_path):
    """The part of a sharded encode whose share was empty is a valid (empty) bank; a memory shape
    whose records a reader would refuse is refused when the writer is made, before any work."""
    from m3cli.bank_writer import BankWriter
    from m3cli.errors import M3Error

    header = {
        "m3.memory.layers": 1,
        "m3.memory.layer_ids": [0],
        "m3.memory.kv_heads": 1,
        "m3.memory.top_k": 2,
        "m3.memory.head_dim": 4,
        "m3.memory.reference_length": 8,
        "m3.model.fingerprint": "sha256:" + "0" * 64,
        "m3.model.name": "t",
        "m3.model.reference_prefix": "R:",
        "m3.model.reference_prefix_ids": [1],
        "m3.model.rope_theta": 10000.0,
    }
    with BankWriter(tmp_path / "part.m3bank", header, "bf16", (1, 2, 1, 2, 4)) as w:
        w.finish()
    with Bank(tmp_path / "part.m3bank") as bank:
        assert bank.n_refs == 0 and bank.verify(allow_empty=True) == []
    big = {**header, "m3.memory.layers": 40, "m3.memory.layer_ids": list(range(40))}
    with pytest.raises(M3Error, match="bytes per reference"):
        BankWriter(tmp_path / "big.m3bank", big, "bf16", (40, 2, 8, 1024, 128))
    assert not list(tmp_path.glob(".big*"))


def test_factories_m3_would_refuse_after_embedding_are_refused_before(seeds, tmp_path):
    path = copy_seed(seeds, tmp_path)
    for factory in ("IVF4_HNSW8,Flat", "OPQ4,IVF4,PQ4", "IDMap2,Flat", "HNSW8,PQ4"):
        assert_user_error(
            m3("index", path, "--embedder", "self", "--model", SAMPLE, "--factory", factory, "-q"), factory
        )
    assert not (tmp_path / f".{path.name}.emb.partial").exists()


def test_indexing_through_a_link_updates_the_bank_it_points_to(seeds, tmp_path):
    real = copy_seed(seeds, tmp_path)
    link = tmp_path / "link.m3bank"
    link.symlink_to(real)
    for factory in ("HNSW8", "Flat", "HNSW8", "Flat"):  # in place and rewritten whole
        assert m3("index", link, "--embedder", "self", "--model", SAMPLE, "--factory", factory, "-q").exit_code == 0
        assert link.is_symlink()
        with Bank(real) as bank:
            assert bank.header["m3.index.factory"] == factory and bank.verify() == []
