"""Hostile inputs and the contract m3 keeps on them.

A generator of mutated banks — every header field, every section's bytes and records, the
section table, the FAISS index's internals, memory shapes permuted at the same byte size — with
every checksum recomputed (CRCs and SHA-256), so each mutation reaches the checks behind them;
and the contract:

- opening, summarising and verifying a bank ends in a result or in one line of m3's own error
  (M3Error), never another exception, an abort or a huge allocation;
- a bank that passes `m3 inspect --verify` (given the model) is searched and generated from
  without any error: nothing inside the file can make a later command fail;
- a bank that fails verification may still be refused later, but only with one line.

tests/test_hostile.py runs a sample of this in the normal suite. The long run is
`make hostile` (`python tests/hostile.py --cases 100000`); it prints the cases, outcomes,
violations and peak RSS as JSON (docs/hostile.md records a run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "model"
CORPUS = ROOT / "samples" / "corpus.jsonl"

PRE = struct.Struct("<8sHHIQQIII16sI")
ENTRY = struct.Struct("<32sQQQ8sI28s32s")


class ContractBroken(AssertionError):
    """m3 broke its contract on a hostile input."""


# --- seeds ---------------------------------------------------------------------------------------
def build_seeds(workdir: Path) -> list[Path]:
    """Four small banks of the sample model's memories: bf16 with a Flat index, int8 with
    HNSW, vq with IVF, all indexed with the model itself (the `self` embedder); and the bf16
    one grown by `m3 add` and shrunk by `m3 remove` (format 1.2)."""
    from m3cli.embed import load_embedder
    from m3cli.encoding import encode_corpus
    from m3cli.retrieval import index_bank

    corpus = workdir / "corpus.jsonl"
    lines = CORPUS.read_text().splitlines()
    extra = [
        json.dumps(
            {
                "id": f"x{i}",
                "title": f"Extra {i}",
                "text": f"Person {i} was born in Town {i}. They work as a baker in City {i}.",
            }
        )
        for i in range(12)
    ]
    corpus.write_text("\n".join(lines + extra) + "\n")
    embedder = load_embedder("self", model_dir=SAMPLE)
    seeds = []
    for codec, factory in (("bf16", "Flat"), ("int8", "HNSW8"), ("vq", "IVF2,Flat")):
        path = workdir / f"seed-{codec}.m3bank"
        encode_corpus(
            str(corpus),
            SAMPLE,
            path,
            codec=codec,
            show_progress=False,
            model_hint=str(SAMPLE),
            vq_subquantizers=8 if codec == "vq" else None,
        )
        index_bank(path, embedder, factory=factory, show_progress=False)
        seeds.append(path)
    # format 1.2: the bf16 bank after `m3 add` (an appended segment) and `m3 remove` (docs.removed)
    from m3cli.bank_update import add_documents, remove_documents

    grown = workdir / "seed-grown.m3bank"
    shutil.copy(seeds[0], grown)
    more = workdir / "more.jsonl"
    more.write_text(
        "".join(
            json.dumps({"id": f"y{i}", "title": f"Added {i}", "text": f"Person {i} was born in Port {i}."}) + "\n"
            for i in range(3)
        )
    )
    add_documents(grown, str(more), SAMPLE, show_progress=False)
    remove_documents(grown, ["x0", "y1"])
    seeds.append(grown)
    return seeds


# --- the file's layout, and writing it back with every checksum right -----------------------------
def parse(blob: bytes) -> tuple[list[dict], dict]:
    magic, major, minor, flags, toff, hlen, count, *_ = PRE.unpack_from(blob)
    entries = []
    for i in range(count):
        name, off, length, decoded, codec, sflags, res, digest = ENTRY.unpack_from(blob, toff + i * 128)
        entries.append(
            {
                "name": name.rstrip(b"\0").decode(),
                "offset": off,
                "length": length,
                "decoded": decoded,
                "codec": codec,
                "flags": sflags,
                "reserved": res,
                "sha256": digest,
            }
        )
    hoff = toff + count * 128
    return entries, json.loads(blob[hoff : hoff + hlen])


def _align(n: int) -> int:
    return -(-n // 64) * 64


def assemble(
    blob: bytes,
    entries: list[dict],
    header: dict | bytes,
    data: dict[str, bytes] | None = None,
    keep_sha: set[str] = frozenset(),
) -> bytes:
    """The bank `blob` with `entries` (a section table) and `header`; sections named in `data`
    get those bytes (appended). New table and header go at the end; all CRCs and SHA-256s of
    replaced sections are recomputed (except those in keep_sha)."""
    out = bytearray(blob)
    out += b"\0" * (_align(len(out)) - len(out))
    for e in entries:
        if data and e["name"] in data:
            payload = data[e["name"]]
            e.update(
                offset=len(out),
                length=len(payload),
                decoded=len(payload) if e["codec"].rstrip(b"\0") == b"raw" else e["decoded"],
            )
            if e["name"] not in keep_sha:
                e["sha256"] = hashlib.sha256(payload).digest()
            out += payload
            out += b"\0" * (_align(len(out)) - len(out))
    table = b"".join(
        ENTRY.pack(
            e["name"].encode()[:32],
            e["offset"] % 2**64,
            e["length"] % 2**64,
            e["decoded"] % 2**64,
            e["codec"],
            e["flags"] % 2**32,
            e["reserved"],
            e["sha256"],
        )
        for e in entries
    )
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    toff = len(out)
    out += table + header_bytes
    magic, major, minor, flags, _, _, _, _, _, pad, _ = PRE.unpack_from(blob)
    head = struct.pack(
        "<8sHHIQQIII16s",
        magic,
        major,
        minor,
        flags,
        toff,
        len(header_bytes),
        len(entries),
        zlib.crc32(table),
        zlib.crc32(header_bytes),
        pad,
    )
    out[:64] = head + struct.pack("<I", zlib.crc32(head))
    return bytes(out)


def section(blob: bytes, entries: list[dict], name: str) -> bytes:
    e = next(e for e in entries if e["name"] == name)
    return blob[e["offset"] : e["offset"] + e["length"]]


# --- mutations ------------------------------------------------------------------------------------
def _hostile_values(rng: random.Random, old):
    big = [2**31, 2**32, 2**40, 2**53, 2**63, 2**64, 10**30]
    values = [
        None,
        True,
        False,
        -1,
        0,
        1,
        2,
        3,
        7,
        64,
        4096,
        65537,
        -(2**63),
        1e308,
        -0.0,
        0.5,
        math.nan,
        math.inf,
        -math.inf,
        "",
        "x" * rng.choice([1, 100, 100_000]),
        [],
        {},
        [[[[]]]],
        {"a": [1, {"b": None}]},
        "default",
        "/nonexistent/model",
        *big,
    ]
    if isinstance(old, list) and old:
        mutated = list(old)
        how = rng.randrange(6)
        if how == 0:
            mutated.append(mutated[-1])  # duplicate
        elif how == 1:
            mutated.reverse()
        elif how == 2:
            mutated[rng.randrange(len(mutated))] = rng.choice([-1, 2**31 - 1, 4095, 10**6, 0.5, "1", None])
        elif how == 3:
            mutated = mutated[:-1]
        elif how == 4:
            mutated = mutated * 3
        else:
            mutated = [0] * len(mutated)
        values += [mutated] * 10
    if isinstance(old, int) and not isinstance(old, bool):
        values += [old + 1, old - 1, old * 2, old // 2, -old] * 3
    if isinstance(old, str):
        values += [old[:-1], old + "0", old.upper(), old.replace("a", "b")] * 3
    return rng.choice(values)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


SHAPE_KEYS = ("m3.memory.layers", "m3.memory.kv_heads", "m3.memory.top_k", "m3.memory.head_dim")
EXTRA_KEYS = (
    "m3.bank.segments",
    "m3.index.nprobe",
    "m3.index.ef_search",
    "m3.index.count",
    "m3.embed.dim",
    "m3.bank.tokens",
    "m3.model.rope_theta",
    "m3.memory.vq.subquantizers",
    "m3.model.hint",
    "m3.embed.hint",
)


def mutate_header(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    entries, header = parse(blob)
    how = rng.randrange(10)
    if how == 0:  # a raw header: deep nesting, invalid UTF-8, not an object, huge numbers
        raw = rng.choice(
            [
                _deep(100_000).encode(),
                b"\xff\xfe{}",
                b"[]",
                b'{"m3.format": "m3bank"}',
                json.dumps({**header, "m3.bank.references": 10**400}).encode(),
                b"{" * 3,
            ]
        )
        return "header:raw", assemble(blob, entries, raw)
    if how == 1:  # permute the memory shape at the same record size
        a, b = rng.sample(SHAPE_KEYS, 2)
        header[a], header[b] = header[b], header[a]
        if "m3.memory.layers" in (a, b):
            ids = list(range(header["m3.memory.layers"]))
            header["m3.memory.layer_ids"] = ids if rng.random() < 0.7 else header["m3.memory.layer_ids"]
        return f"header:permute {a}<->{b}", assemble(blob, entries, header)
    if how == 2:
        key = rng.choice(sorted(header))
        del header[key]
        return f"header:delete {key}", assemble(blob, entries, header)
    key = rng.choice(sorted(header) + list(EXTRA_KEYS))
    header[key] = _hostile_values(rng, header.get(key))
    if key in SHAPE_KEYS and rng.random() < 0.5 and isinstance(header[key], int) and not isinstance(header[key], bool):
        from m3cli.bank import record_bytes  # keep the record size consistent to get further

        try:
            shape = (
                header["m3.memory.layers"],
                2,
                header["m3.memory.kv_heads"],
                header["m3.memory.top_k"],
                header["m3.memory.head_dim"],
            )
            header["m3.memory.record_bytes"] = record_bytes(
                header["m3.memory.codec"], shape, header.get("m3.memory.vq.subquantizers")
            )
        except Exception:  # noqa: BLE001 - a value record_bytes refuses: the reader must refuse it too
            pass
    return f"header:{key}", assemble(blob, entries, header)


def mutate_entry(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    entries, header = parse(blob)
    e = rng.choice(entries)
    field = rng.choice(["offset", "length", "decoded", "codec", "flags", "name"])
    if field == "codec":
        e["codec"] = rng.choice([b"zstd\0\0\0\0", b"raw\0\0\0\0\0", b"gzip\0\0\0\0", b"\xff" * 8])
    elif field == "name":
        e["name"] = rng.choice(
            ["kv.data", "refs.text", "index.faiss", "x" * 32, "Bad Name", "codec.vq", "s1.kv.data", "s9.kv.data"]
            + ["docs.removed", "s1.index.faiss", "s0.refs.table"]
        )
    else:
        e[field] = rng.choice(
            [
                0,
                1,
                63,
                64,
                65,
                2**31,
                2**32 - 1,
                2**40,
                2**63,
                2**64 - 1,
                e[field] + 64,
                max(0, e[field] - 64),
                rng.randrange(2**64),
            ]
        )
    return f"entry:{e['name']}.{field}", assemble(blob, entries, header)


def _kv_nan(rng: random.Random, data: bytes, header: dict) -> bytes:
    buf = bytearray(data)
    if not buf:
        return bytes(buf)
    codec = header["m3.memory.codec"]
    at = rng.randrange(0, len(buf) - 1) & ~1
    if codec == "bf16":
        buf[at : at + 2] = rng.choice([b"\xc0\x7f", b"\x80\x7f", b"\x80\xff"])  # NaN, +inf, -inf
    elif codec == "int8":  # a scale (the float16 tail of each record) set to NaN/inf
        rb = header["m3.memory.record_bytes"]
        rec = rng.randrange(len(buf) // rb)
        L, H, K, d = (header[k] for k in SHAPE_KEYS)
        tail = rec * rb + L * 2 * H * K * d
        at = tail + rng.randrange(L * 2 * H * K) * 2
        buf[at : at + 2] = rng.choice([b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"])
    else:
        buf[at] = rng.randrange(256)
    return bytes(buf)


from m3cli.bank import segment_name  # noqa: E402


def mutate_section(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    entries, header = parse(blob)
    e = rng.choice(entries)
    name = e["name"]
    data = bytearray(section(blob, entries, name))
    how = rng.randrange(6)
    kind = segment_name(name)[1]  # an appended segment's s<k>.kv.data is mutated as kv.data is
    if kind in ("kv.data",) and how < 3:
        new = _kv_nan(rng, bytes(data), header)
    elif kind == "codec.vq" and how < 3:
        arr = np.frombuffer(bytes(data), dtype="<f4").copy()
        arr[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, 1e38])
        new = arr.tobytes()
    elif kind == "emb.data" and how < 3:
        arr = np.frombuffer(bytes(data), dtype="<f2").copy()
        arr[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, 0, 65504])
        new = arr.tobytes()
    elif kind == "kv.positions" and how < 4:
        arr = np.frombuffer(bytes(data), dtype="<i2").copy()
        arr[rng.randrange(arr.size)] = rng.choice([-32768, -2, -1, 0, 1, 127, 128, 32767])
        new = arr.tobytes()
    elif kind in ("refs.table", "docs.table") and how < 4 and data:
        rec = rng.randrange(len(data) // 32)
        fmt = "<QIIII8s" if kind == "refs.table" else "<QIIIIII"
        fields = list(struct.unpack_from(fmt, data, rec * 32))
        i = rng.randrange(5 if kind == "refs.table" else 6)
        width = 2**64 if i == 0 else 2**32
        fields[i] = rng.choice([0, 1, 2**31, width - 1, fields[i] + 1, max(0, fields[i] - 1), rng.randrange(width)])
        struct.pack_into(fmt, data, rec * 32, *fields)
        new = bytes(data)
    elif kind == "index.faiss" and how < 4:
        return mutate_index(rng, blob, name)
    elif name == "docs.removed" and how < 4:
        arr = np.frombuffer(bytes(data), dtype="<u4").copy()
        if arr.size:
            arr[rng.randrange(arr.size)] = rng.choice([0, 1, 2**31, 2**32 - 1, int(arr[-1]) + 1, int(arr[0])])
        new = arr.tobytes() if rng.random() < 0.8 else arr[::-1].tobytes()
    elif how == 4 and data:  # truncated or grown
        new = (
            bytes(data[: rng.randrange(len(data))]) if rng.random() < 0.5 else bytes(data) + b"\0" * rng.choice([1, 64])
        )
    else:
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        new = bytes(data)
    return f"section:{name}", assemble(blob, entries, header, {name: new})


def mutate_index(rng: random.Random, blob: bytes, name: str | None = None) -> tuple[str, bytes]:
    """Change a FAISS index's internals (ids, graph links, list entries, type, size), re-serialize
    it: the base's index or an appended segment's."""
    import faiss

    entries, header = parse(blob)
    if name is None:
        name = rng.choice([e["name"] for e in entries if segment_name(e["name"])[1] == "index.faiss"])
    raw = section(blob, entries, name)
    from m3cli.retrieval import bounded_address_space

    with bounded_address_space(4 * len(raw) + (512 << 20)):  # the generator's own reading of a mutated index
        index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8).copy())
    inner = faiss.downcast_index(index.index)
    n = index.ntotal
    how = rng.randrange(7)
    if how == 0:  # ids
        ids = faiss.vector_to_array(index.id_map)
        ids[rng.randrange(ids.size)] = rng.choice([-5, n, n + 100, 2**40, ids[0]])
        faiss.copy_array_to_vector(ids, index.id_map)
        what = "ids"
    elif how == 1 and hasattr(inner, "hnsw"):
        nb = faiss.vector_to_array(inner.hnsw.neighbors)
        nb[rng.randrange(nb.size)] = rng.choice([n, n + 1000, 2**31 - 1, -7])
        faiss.copy_array_to_vector(nb, inner.hnsw.neighbors)
        what = "hnsw neighbors"
    elif how == 2 and hasattr(inner, "hnsw"):
        choice = rng.randrange(3)
        if choice == 0:
            inner.hnsw.entry_point = rng.choice([n, -2, 2**31 - 1])
        elif choice == 1:
            inner.hnsw.max_level = rng.choice([30, -1, 1000])
        else:
            lv = faiss.vector_to_array(inner.hnsw.levels)
            lv[rng.randrange(lv.size)] = rng.choice([0, 50, -1])
            faiss.copy_array_to_vector(lv, inner.hnsw.levels)
        what = "hnsw levels"
    elif how == 3 and hasattr(inner, "invlists"):
        inv = inner.invlists
        lists = [i for i in range(inv.nlist) if inv.list_size(i)]
        i = rng.choice(lists)
        ids = faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i))
        ids[rng.randrange(ids.size)] = rng.choice([n, -3, 2**40])
        what = "ivf ids"
    elif how == 4:  # another index type, or another metric, of the right size and dimension
        d = index.d
        vectors = np.random.default_rng(rng.randrange(2**32)).standard_normal((n, d)).astype(np.float32)
        base = rng.choice(
            [
                lambda: faiss.IndexFlatL2(d),
                lambda: faiss.IndexLSH(d, 16),
                lambda: faiss.IndexHNSWFlat(d, 8),
                lambda: faiss.index_factory(d, "PQ4", faiss.METRIC_L2),
            ]
        )()
        if not base.is_trained:
            base.train(vectors)
        index = faiss.IndexIDMap2(base)
        index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
        what = f"type {type(base).__name__}"
    elif how == 5:  # fewer or more vectors than references
        d = index.d
        m = rng.choice([0, 1, n - 1, n + 1])
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if m:
            index.add_with_ids(np.ones((m, d), dtype=np.float32), np.arange(m, dtype=np.int64) % max(n, 1))
        what = f"{m} vectors"
    else:  # bytes inside the serialized index
        buf = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return f"{name}:bytes", assemble(blob, entries, header, {name: bytes(buf)})
    new = faiss.serialize_index(index).tobytes()
    return f"{name}:{what}", assemble(blob, entries, header, {name: new})


def mutate_truncate(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    cut = rng.randrange(len(blob))
    buf = bytearray(blob[:cut] + bytes(rng.randrange(256) for _ in range(rng.choice([0, 0, 8, 64]))))
    if len(buf) >= 64:  # preamble CRC right, so the length checks are what refuses it
        struct.pack_into("<I", buf, 60, zlib.crc32(bytes(buf[:60])))
    return "truncate", bytes(buf)


def mutate_empty(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    """Zero references and documents, consistently (every section empty)."""
    entries, header = parse(blob)
    header.update({"m3.bank.references": 0, "m3.bank.documents": 0, "m3.bank.tokens": 0})
    data = {e["name"]: b"" for e in entries if e["name"] not in ("codec.vq",)}
    for e in entries:
        if e["name"] in data:
            e["codec"] = b"raw" + b"\0" * 5
    return "empty bank", assemble(blob, entries, header, data)


MUTATORS = [
    (mutate_header, 40),
    (mutate_section, 30),
    (mutate_entry, 12),
    (mutate_index, 10),
    (mutate_truncate, 5),
    (mutate_empty, 3),
]


def mutated(rng: random.Random, seeds: list[bytes]) -> tuple[str, bytes]:
    blob = rng.choice(seeds)
    names = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        fn = rng.choices([m for m, _ in MUTATORS], [w for _, w in MUTATORS])[0]
        try:
            name, blob = fn(rng, blob)
        except Exception:  # noqa: BLE001 - a mutation of an already-broken blob that cannot apply
            continue
        names.append(name)
    return " + ".join(names) or "none", blob


# --- model dirs and corpora ---------------------------------------------------------------------
CONFIG_VALUES = [
    None,
    True,
    -1,
    0,
    1,
    3,
    10**6,
    10**9,
    2**63,
    1e9,
    0.5,
    math.nan,
    math.inf,
    "x",
    [],
    {},
    [0, 0],
    [5, 1],
    [-1],
    list(range(2000)),
]


def model_dir_cases(rng: random.Random, base: Path, workdir: Path, n: int):
    """Copies of the sample model dir with one config field (or the file itself, or the weights)
    made hostile; yields (description, dir)."""
    import shutil

    config = json.loads((base / "config.json").read_text())
    for i in range(n):
        target = workdir / f"model-{i % 4}"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(base, target)
        how = rng.randrange(10)
        if how == 0:
            text = rng.choice(
                [_deep(200_000), "{", "[]", '"\\ud800"', "\xff", json.dumps({**config, "n_layers": 10**400}), ""]
            )
            (target / "config.json").write_bytes(
                text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff{"
            )
            yield "config:raw", target
        elif how == 1:
            weights = target / "model.safetensors"
            from safetensors.torch import load_file, save_file

            state = load_file(str(weights))
            key = rng.choice(sorted(state))
            state[key] = rng.choice(
                [
                    lambda t: t.to(__import__("torch").int8),
                    lambda t: t[:1],
                    lambda t: t.to(__import__("torch").float64),
                    lambda t: t.flatten(),
                ]
            )(state[key])
            save_file(state, str(weights))
            yield f"weights:{key}", target
        elif how == 2:
            weights = target / "model.safetensors"
            data = weights.read_bytes()
            weights.write_bytes(data[: rng.randrange(len(data))])
            yield "weights:truncated", target
        else:
            key = rng.choice(sorted(config))
            bad = dict(config)
            bad[key] = rng.choice(CONFIG_VALUES)
            (target / "config.json").write_text(json.dumps(bad))
            yield f"config:{key}={str(bad[key])[:20]}", target


def check_model_dir(path: Path) -> str:
    """A hostile model dir is loaded, or refused in one line."""
    from m3cli.checkpoint import load_model_dir, read_config
    from m3cli.errors import M3Error

    try:
        read_config(path)
        load_model_dir(path)
    except M3Error as e:
        one_line(e)
        return "refused"
    return "loaded"


def corpus_cases(workdir: Path) -> list[tuple[str, Path | bytes]]:
    """Corpora people and attackers give `m3 encode`: (description, file path or stdin bytes)."""
    cases: list[tuple[str, Path | bytes]] = []

    def file(name: str, data: bytes) -> Path:
        path = workdir / name
        path.write_bytes(data)
        return path

    cases.append(("empty file", file("empty.jsonl", b"")))
    cases.append(("blank lines", file("blank.jsonl", b"\n\n  \n")))
    cases.append(("not JSON", file("bad.jsonl", b"{oops\n")))
    cases.append(("JSON array line", file("arr.jsonl", b"[1, 2]\n")))
    cases.append(("no text field", file("notext.jsonl", b'{"title": "x"}\n')))
    cases.append(("text not a string", file("num.jsonl", b'{"text": 5}\n')))
    cases.append(("deep nesting", file("deep.jsonl", b'{"text": ' + _deep(100_000).encode() + b"}\n")))
    cases.append(("huge integer", file("bigint.jsonl", b'{"text": "a", "id": ' + b"9" * 5000 + b"}\n")))
    cases.append(("lone surrogate", file("sur.jsonl", b'{"text": "\\ud800"}\n')))
    cases.append(("invalid UTF-8", file("utf.jsonl", b'{"text": "\xff\xfe"}\n')))
    cases.append(("NUL bytes in a text file", file("nul.txt", b"hello\0world")))
    cases.append(("invalid UTF-8 text file", file("bad.txt", b"caf\xe9 au lait")))
    cases.append(("a line over --max-doc-bytes", file("long.jsonl", b'{"text": "' + b"a" * 200_000 + b'"}\n')))
    cases.append(("CSV without a text column", file("c.csv", b"a,b\n1,2\n")))
    cases.append(("CSV field over the limit", file("big.csv", b"text\n" + b"x" * 200_000 + b"\n")))
    cases.append(("not Parquet", file("x.parquet", b"PAR1garbage")))
    cases.append(("empty directory", (workdir / "emptydir").mkdir() or workdir / "emptydir"))
    cases.append(("NUL bytes on stdin", b"\0" * 4096))
    cases.append(("invalid UTF-8 on stdin", b"\xff" * 100))
    cases.append(("JSONL on stdin with a bad line", b'{"text": "ok."}\n{bad\n'))
    return cases


# --- the contract --------------------------------------------------------------------------------
def one_line(e: Exception) -> None:
    message = str(e).strip()
    if not message or "\n" in message:
        raise ContractBroken(f"an error that is not one line: {message!r}")


class Harness:
    """The sample model, its tokenizer and its `self` embedder, loaded once."""

    def __init__(self) -> None:
        from m3cli.checkpoint import load_model_dir, load_tokenizer, model_fingerprint
        from m3cli.embed import SelfEmbedder

        self.model = load_model_dir(SAMPLE)
        self.tokenizer = load_tokenizer(SAMPLE)
        self.fingerprint = model_fingerprint(SAMPLE)
        self.embedder = SelfEmbedder(self.model, self.tokenizer, self.fingerprint)

    def check(self, path: Path) -> str:
        """Apply the contract to the bank at `path`; returns the outcome, raises ContractBroken."""
        from m3cli.bank import Bank
        from m3cli.errors import M3Error
        from m3cli.generate import Generator, Options
        from m3cli.inspect_bank import bank_summary, reference_detail, verify_problems
        from m3cli.retrieval import Retriever, query_embedder

        try:
            bank = Bank(path)
        except M3Error as e:
            one_line(e)
            return "refused when opened"
        with bank:
            try:
                json.dumps(bank_summary(bank))
                if bank.n_refs:
                    reference_detail(bank, bank.n_refs - 1)
                problems = verify_problems(bank, SAMPLE)
            except M3Error as e:
                one_line(e)
                problems = [str(e)]
            for p in problems:
                if "\n" in p:
                    raise ContractBroken(f"a problem that is not one line: {p!r}")
            try:  # the query embedder the CLI would use for this bank with this model
                embedder = query_embedder(bank, model_dir=SAMPLE, model=self.model, tokenizer=self.tokenizer)
                retriever = Retriever(bank, embedder)
                hits = retriever.search(["Where was Ilsa Varenkov born?"], k=3)
                assert all(0 <= h.ref < bank.n_refs for h in hits[0])
                gen = Generator(self.model, self.tokenizer, retriever, cache_capacity=64)
                out = gen.generate(["Ilsa Varenkov was born in"], Options(max_new_tokens=3, memories=3))
                assert isinstance(out[0].text, str)
            except M3Error as e:
                one_line(e)
                # what verify cannot know: the bank has no index yet, or its embedder dir is elsewhere
                environment = ("has no retrieval index", "pass its directory with --embedder")
                if not problems and not any(text in str(e) for text in environment):
                    raise ContractBroken(f"passed --verify, then failed: {e}") from None
                return "refused by verify and by use" if problems else "unindexed"
            if not problems and (len(bank.segments) > 1 or bank.removed.size):
                self._compacts(path)
            return "accepted" if not problems else "refused by verify, usable"

    def _compacts(self, path: Path) -> None:
        """A changed bank that passes --verify compacts into one that passes it too (or m3 refuses
        with one line: e.g. a factory in the header that cannot be rebuilt)."""
        import shutil

        from m3cli.bank import Bank
        from m3cli.bank_update import compact_bank
        from m3cli.errors import M3Error
        from m3cli.inspect_bank import verify_problems

        copy = path.with_name(path.name + ".compacted.m3bank")
        shutil.copy(path, copy)
        try:
            compact_bank(copy)
        except M3Error as e:
            one_line(e)
            return
        finally:
            for leftover in copy.parent.glob(f".{copy.name}*"):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        with Bank(copy) as compacted:
            problems = verify_problems(compacted, SAMPLE)
        copy.unlink()
        if problems:
            raise ContractBroken(f"passed --verify, compacted into a bank that fails it: {problems[0]}")


def run(cases: int, seed: int, workdir: Path, log=None, every: int = 1000) -> dict:
    """The long run: `cases` mutated banks through the contract; a summary."""
    harness = Harness()
    seeds = [p.read_bytes() for p in build_seeds(workdir)]
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    kinds: Counter = Counter()
    violations = []
    path = workdir / "case.m3bank"
    t0 = time.time()
    growth = []  # cases after which the peak RSS grew by more than 64 MiB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(cases):
        name, blob = mutated(rng, seeds)
        path.write_bytes(blob)
        kinds[name.split(" + ")[0].split(":")[0]] += 1
        try:
            outcomes[harness.check(path)] += 1
        except ContractBroken as e:
            violations.append({"case": i, "mutation": name, "violation": str(e)[:300]})
            outcomes["VIOLATION"] += 1
        except Exception as e:  # noqa: BLE001 - any other exception is a violation too
            violations.append(
                {
                    "case": i,
                    "mutation": name,
                    "violation": f"{type(e).__name__}: {str(e)[:200]}",
                    "traceback": traceback.format_exc()[-1500:],
                }
            )
            outcomes["TRACEBACK"] += 1
        now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if now - peak > 64 * 1024:
            growth.append({"case": i, "mutation": name, "peak_rss_mib": round(now / 1024, 1)})
        peak = now
        if log and (i + 1) % every == 0:
            log(f"{i + 1}/{cases} cases, {time.time() - t0:.0f} s, {dict(outcomes)}")
    return {
        "cases": cases,
        "seed": seed,
        "seconds": round(time.time() - t0, 1),
        "outcomes": dict(outcomes),
        "mutations": dict(kinds),
        "violations": violations[:50],
        "violation_count": len(violations),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_growth": growth[:20],
    }


def long_document(workdir: Path, megabytes: int, log=None) -> dict:
    """Encode one document of `megabytes` MB (a text file, no sentence ends in places) with the
    sample model, beside a corpus of many small documents of a tenth of the size: seconds,
    references per second and the encoding process's peak RSS for each."""
    import subprocess

    rng = random.Random(0)
    words = ["harbour", "tide", "sediment", "Kessel", "marine", "chemistry", "north", "institute", "river"]

    def text(n_bytes: int) -> str:
        parts, size = [], 0
        while size < n_bytes:
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 400)))
            sentence += "." if rng.random() < 0.7 else ""  # some runs have no sentence end for a while
            parts.append(sentence)
            size += len(sentence) + 1
        return " ".join(parts)

    big = workdir / "long.txt"
    big.write_text(text(megabytes << 20))
    small = workdir / "many.jsonl"
    with open(small, "w") as f:
        for i in range(max(1, megabytes * 10)):
            f.write(json.dumps({"id": str(i), "text": text(100_000 // 10)}) + "\n")
    out = {}
    for name, corpus in (("one document", big), ("many documents", small)):
        script = (
            "import resource, subprocess, sys, time; t = time.time(); "
            "r = subprocess.run([sys.executable, '-m', 'm3cli', 'encode', sys.argv[1], '-o', sys.argv[2], "
            "'--model', sys.argv[3], '--index', 'none', '--force', '-q'], capture_output=True, text=True); "
            "print(r.returncode, time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
            "r.stdout.strip().replace(' ', '_'))"
        )
        bank = workdir / "long.m3bank"
        proc = subprocess.run(
            [sys.executable, "-c", script, str(corpus), str(bank), str(SAMPLE)],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        )
        code, seconds, rss, line = proc.stdout.split()
        from m3cli.bank import Bank

        with Bank(bank) as b:
            refs = b.n_refs
        out[name] = {
            "bytes": corpus.stat().st_size,
            "exit": int(code),
            "seconds": round(float(seconds), 1),
            "references": refs,
            "refs_per_s": round(refs / float(seconds), 1),
            "peak_rss_mib": round(int(rss) / 1024, 1),
        }
        if log:
            log(f"{name}: {out[name]}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-doc-mb", type=int, default=20, help="also encode one document this large (0: skip)")
    parser.add_argument("--out", type=Path, help="also write the summary JSON here")
    args = parser.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="m3-hostile-") as tmp:
        summary = run(args.cases, args.seed, Path(tmp), log=log) if args.cases else {"violation_count": 0}
        if args.long_doc_mb:
            summary["long_document"] = long_document(Path(tmp), args.long_doc_mb, log)
            if any(r["exit"] for r in summary["long_document"].values()):
                summary["violation_count"] += 1
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 1 if summary["violation_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
