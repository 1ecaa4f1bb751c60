"""Fuzzing the bank reader: mutated and truncated banks produce only m3's own error type
(BankError/M3Error, one line) — never another exception, a hang or a huge allocation."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3cli.bank import Bank
from m3cli.bank_writer import BankWriter, update_bank
from m3cli.errors import M3Error

SHAPE = (2, 2, 1, 3, 8)


def header():
    return {
        "m3.memory.layers": 2,
        "m3.memory.layer_ids": [0, 1],
        "m3.memory.kv_heads": 1,
        "m3.memory.top_k": 3,
        "m3.memory.head_dim": 8,
        "m3.memory.reference_length": 128,
        "m3.model.fingerprint": "sha256:" + "0" * 64,
        "m3.model.name": "fuzz",
        "m3.model.reference_prefix": "R:",
        "m3.model.reference_prefix_ids": [1],
        "m3.model.rope_theta": 10000.0,
    }


def make_seed_banks(tmp: Path) -> list[bytes]:
    """A bf16 bank, and a vq bank that also carries embeddings and a FAISS index."""
    from m3cli.retrieval import EMB_SECTION, INDEX_SECTION, build_index

    torch.manual_seed(0)
    out = []
    for codec in ("bf16", "vq"):
        path = tmp / f"{codec}.m3bank"
        with BankWriter(path, header(), codec, SHAPE, vq_subquantizers=2) as w:
            for i in range(6):
                pos = torch.tensor([[[1, 2, 3 if i % 2 else -1]]] * 2, dtype=torch.int16)
                w.add_document(f"d{i}", f"title {i}", "src", [(f"text {i} ü", 3, torch.randn(SHAPE), pos)])
            w.finish()
        if codec == "vq":
            emb = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            import faiss

            blob = faiss.serialize_index(build_index(emb, "Flat")).tobytes()
            update_bank(
                path,
                {EMB_SECTION: emb.astype("<f2").tobytes(), INDEX_SECTION: blob},
                {
                    "m3.embed.name": "hf:x",
                    "m3.embed.dim": 4,
                    "m3.embed.pooling": "mean",
                    "m3.embed.fingerprint": "sha256:" + "1" * 64,
                    "m3.index.factory": "Flat",
                },
            )
        out.append(path.read_bytes())
    return out


def refresh_crcs(buf: bytearray) -> bytes:
    """Make table/header/preamble CRCs match again, so mutations reach the deeper checks."""
    if len(buf) < 64:
        return bytes(buf)
    toff, hlen, count = struct.unpack_from("<QQI", buf, 16)
    if count <= 256 and toff + count * 128 + hlen <= len(buf):
        hoff = toff + count * 128
        struct.pack_into("<II", buf, 36, zlib.crc32(bytes(buf[toff:hoff])), zlib.crc32(bytes(buf[hoff : hoff + hlen])))
    struct.pack_into("<I", buf, 60, zlib.crc32(bytes(buf[:60])))
    return bytes(buf)


def exercise(path: Path) -> None:
    """Everything a user command may do with a bank."""
    from m3cli.inspect_bank import bank_summary, reference_detail
    from m3cli.retrieval import INDEX_SECTION, embeddings_of, load_index

    try:
        with Bank(path) as bank:
            bank_summary(bank)
            bank.verify()
            for i in range(min(bank.n_refs, 8)):
                reference_detail(bank, i)
            if bank.n_refs:
                bank.memories(range(min(bank.n_refs, 8)))
            if INDEX_SECTION in bank.sections:
                embeddings_of(bank)
                load_index(bank)
    except M3Error as e:
        assert "\n" not in str(e).strip()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return make_seed_banks(tmp_path_factory.mktemp("seeds"))


FUZZ = settings(max_examples=1500, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(data=st.data())
def test_mutated_banks(seeds, tmp_path_factory, data):
    seed = bytearray(data.draw(st.sampled_from(seeds)))
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.integers(0, len(seed) - 1))
        # bias half the mutations towards the preamble, table and header, where the lengths live
        if data.draw(st.booleans()):
            where = data.draw(st.integers(0, min(len(seed) - 1, 2048)))
        seed[where] = data.draw(st.integers(0, 255))
    blob = refresh_crcs(seed) if data.draw(st.booleans()) else bytes(seed)
    path = tmp_path_factory.mktemp("m") / "x.m3bank"
    path.write_bytes(blob)
    exercise(path)


@FUZZ
@given(data=st.data())
def test_truncated_and_extended_banks(seeds, tmp_path_factory, data):
    seed = data.draw(st.sampled_from(seeds))
    cut = data.draw(st.integers(0, len(seed)))
    tail = data.draw(st.binary(max_size=64))
    blob = seed[:cut] + tail
    if data.draw(st.booleans()):
        blob = refresh_crcs(bytearray(blob))
    path = tmp_path_factory.mktemp("t") / "x.m3bank"
    path.write_bytes(blob)
    exercise(path)


@FUZZ
@given(data=st.data())
def test_mutated_length_fields(seeds, tmp_path_factory, data):
    """Targeted: overwrite preamble and section-table integers with extreme values."""
    seed = bytearray(data.draw(st.sampled_from(seeds)))
    count = struct.unpack_from("<I", seed, 32)[0]
    fields = [16, 24, 32] + [64 + i * 128 + f for i in range(count) for f in (32, 40, 48)]
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.sampled_from(fields))
        value = data.draw(
            st.sampled_from(
                [0, 1, 63, 64, 65, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1, data.draw(st.integers(0, 2**64 - 1))]
            )
        )
        width = 4 if at == 32 else 8
        struct.pack_into("<I" if width == 4 else "<Q", seed, at, value % (2 ** (8 * width)))
    path = tmp_path_factory.mktemp("l") / "x.m3bank"
    path.write_bytes(refresh_crcs(seed))
    exercise(path)
