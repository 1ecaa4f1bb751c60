"""The .m3bank format: round trips, golden bytes, spec/code sync, hostile files, model binding."""

import hashlib
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch

from m3cli import bank as B
from m3cli.bank import Bank, BankError, require_same_model
from m3cli.bank_writer import BankWriter
from m3cli.errors import M3Error

DATA = Path(__file__).parent / "data"
SPEC = Path(__file__).parent.parent / "format_spec.md"
SHAPE = (2, 2, 1, 3, 4)  # (L, 2, H, K, d)


def golden_header():
    return {
        "m3.memory.layers": 2,
        "m3.memory.layer_ids": [0, 1],
        "m3.memory.kv_heads": 1,
        "m3.memory.top_k": 3,
        "m3.memory.head_dim": 4,
        "m3.memory.reference_length": 128,
        "m3.model.fingerprint": "sha256:" + "ab" * 32,
        "m3.model.name": "golden",
        "m3.model.reference_prefix": "Reference:",
        "m3.model.reference_prefix_ids": [1, 7],
        "m3.model.rope_theta": 10000.0,
        "m3.encode.producer": "m3 test",
        "m3.model.hint": "default",
    }


def write_golden(path: Path, codec: str = "bf16") -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic 2-reference bank: values k/8 - 1 are exact in bf16."""
    kv = (torch.arange(2 * 48, dtype=torch.float32).reshape(2, *SHAPE) % 17) / 8 - 1
    pos = torch.tensor([[[[2, 3, 4]], [[2, 4, -1]]], [[[2, 3, -1]], [[3, -1, -1]]]], dtype=torch.int16)  # (2, L, H, K)
    kv = kv * (pos >= 0)[:, :, None, :, :, None]
    with BankWriter(path, golden_header(), codec, SHAPE) as w:
        w.add_document("doc-1", "First", "unit test", [("Alpha beta gamma.", 3, kv[0], pos[0])])
        w.add_document("doc-2", "Second ✓", "", [("Delta\u00e9.", 2, kv[1], pos[1])])
        w.finish()
    return kv, pos


def test_golden_bytes(tmp_path):
    path = tmp_path / "g.m3bank"
    kv, pos = write_golden(path)
    assert path.read_bytes() == (DATA / "golden-2ref.m3bank").read_bytes(), (
        "the bytes of a 2-reference bank changed: a format change needs a version bump and new golden bytes"
    )
    with Bank(DATA / "golden-2ref.m3bank") as bank:
        assert bank.version == (1, 1) and bank.n_refs == 2 and bank.n_docs == 2
        assert bank.header["m3.model.hint"] == "default"
        mem = bank.memories([1, 0])
        assert torch.equal(mem.kv, kv[[1, 0]])
        assert torch.equal(mem.positions, pos[[1, 0]].long()) and torch.equal(mem.valid, pos[[1, 0]] >= 0)
        assert bank.reference(1).text == "Delta\u00e9." and bank.reference(1).token_count == 2
        doc = bank.document(1)
        assert (doc.id, doc.title, doc.source, doc.first_ref, doc.n_refs) == ("doc-2", "Second ✓", "", 1, 1)
        assert bank.verify() == []


def write_golden_updated(path: Path) -> torch.Tensor:
    """The golden bank after `m3 add` of one document (an appended segment) and `m3 remove` of
    doc-1 (docs.removed): format 1.2. Returns the added reference's memory."""
    from m3cli.bank_update import _append, document_ids, remove_documents

    write_golden(path)
    kv = (torch.arange(48, dtype=torch.float32).reshape(SHAPE) % 13) / 4 - 1
    pos = torch.tensor([[[2, 3, 4]], [[3, 4, -1]]], dtype=torch.int16)
    kv = kv * (pos >= 0)[:, None, :, :, None]
    spool = path.with_name("added.m3bank")
    with BankWriter(spool, golden_header(), "bf16", SHAPE) as w:
        w.add_document("doc-3", "Third", "added", [("Epsilon zeta eta.", 3, kv, pos)])
        w.finish()
    with Bank(path) as bank:
        existing = document_ids(bank)
    _append(path, spool, existing, False, None, False)
    remove_documents(path, ["doc-1"])
    return kv


def test_golden_updated_bytes(tmp_path):
    """Format 1.2: an appended segment and a removed document, byte for byte."""
    path = tmp_path / "g.m3bank"
    kv = write_golden_updated(path)
    assert path.read_bytes() == (DATA / "golden-updated.m3bank").read_bytes(), (
        "the bytes of an updated bank changed: a format change needs a version bump and new golden bytes"
    )
    with Bank(DATA / "golden-updated.m3bank") as bank:
        assert bank.version == (1, 2) and (bank.n_refs, bank.n_docs, len(bank.segments)) == (3, 3, 2)
        assert bank.header["m3.bank.segments"] == [{"references": 1, "documents": 1}]
        assert bank.removed.tolist() == [0] and bank.is_removed(0) and not bank.is_removed(2)
        assert (bank.live_docs, bank.removed_refs, list(bank.live_references())) == (2, 1, [1, 2])
        assert torch.equal(bank.memories([2]).kv[0], kv)
        ref, doc = bank.reference(2), bank.document(2)
        assert (ref.text, ref.token_count, ref.doc_index, ref.index_in_doc) == ("Epsilon zeta eta.", 3, 2, 0)
        assert (doc.id, doc.title, doc.source, doc.first_ref, doc.n_refs) == ("doc-3", "Third", "added", 2, 1)
        assert bank.header["m3.bank.tokens"] == 8 and bank.verify() == []


def test_a_version_1_0_bank_still_opens(tmp_path):
    """1.1 added header keys only (m3.model.hint, m3.embed.hint): 1.0 banks read as before."""
    kv, pos = write_golden(tmp_path / "g.m3bank")
    with Bank(DATA / "golden-2ref-v1.0.m3bank") as bank:
        assert bank.version == (1, 0) and bank.n_refs == 2 and "m3.model.hint" not in bank.header
        assert bank.reference(1).text == "Delta\u00e9." and bank.verify() == []
        mem = bank.memories([1, 0])
        assert torch.equal(mem.kv, kv[[1, 0]]) and torch.equal(mem.positions, pos[[1, 0]].long())


def test_preamble_layout_by_hand():
    data = (DATA / "golden-2ref.m3bank").read_bytes()
    assert data[:8] == bytes.fromhex("894D3342414E4B0A")
    major, minor, flags, table_offset, hlen, count = struct.unpack_from("<HHIQQI", data, 8)
    assert (major, minor, flags, count, table_offset) == (1, 1, 0, 6, 64)
    assert struct.unpack_from("<I", data, 60)[0] == zlib.crc32(data[:60])
    name, off, length = struct.unpack_from("<32sQQ", data, 64)
    assert name.rstrip(b"\0") == b"refs.table" and off % 64 == 0 and length == 2 * 32
    assert hashlib.sha256(data[off : off + length]).digest() == data[64 + 96 : 64 + 128]


@pytest.mark.parametrize("codec,tol", [("bf16", 1e-2), ("int8", 2e-2)])
def test_round_trip_random(tmp_path, codec, tol):
    torch.manual_seed(0)
    shape = (3, 2, 2, 8, 16)
    path = tmp_path / f"{codec}.m3bank"
    kvs = [torch.randn(shape) for _ in range(5)]
    pos = torch.arange(3 * 2 * 8).reshape(3, 2, 8).to(torch.int16) % 20 + 2
    header = {
        **golden_header(),
        "m3.memory.layers": 3,
        "m3.memory.layer_ids": [0, 1, 2],
        "m3.memory.kv_heads": 2,
        "m3.memory.top_k": 8,
        "m3.memory.head_dim": 16,
    }
    with BankWriter(path, header, codec, shape) as w:
        for i in range(0, 5, 2):
            w.add_document(f"d{i}", "", "", [("t" * (j + 30), 30, kvs[j], pos) for j in range(i, min(i + 2, 5))])
        w.finish()
    with Bank(path) as bank:
        got = bank.memories(range(5)).kv
        for i in range(5):
            assert (got[i] - kvs[i]).abs().max() <= tol * kvs[i].abs().max()
        assert bank.record_bytes == B.record_bytes(codec, shape)
        assert bank.verify() == []
        assert [bank.document(j).n_refs for j in range(bank.n_docs)] == [2, 2, 1]


def spec_constants() -> dict[str, str]:
    text = SPEC.read_text()
    block = text.split("## Constants", 1)[1].split("##", 1)[0]
    return dict(re.findall(r"^\| `([A-Z_]+)` \| `([^`]+)`", block, flags=re.M))


def test_spec_constants_match_the_code():
    consts = spec_constants()
    assert consts, "no constants table found in format_spec.md"
    assert bytes.fromhex(consts.pop("MAGIC")) == B.MAGIC
    for name, value in consts.items():
        assert int(value) == getattr(B, name), name
    text = SPEC.read_text()
    for section in B.KNOWN_SECTIONS + (B.VQ_SECTION, B.REMOVED_SECTION):
        assert f"**`{section}`**" in text, section
    for codec in B.CODECS:
        assert f"`{codec}`" in text


def test_spec_lists_every_header_key_the_encoder_writes():
    from m3cli.config import preset
    from m3cli.encoding import bank_header

    written = set(bank_header(preset("tiny").replace(reference_prefix_ids=(1,)), "sha256:x"))
    written |= {
        "m3.format",
        "m3.bank.references",
        "m3.bank.documents",
        "m3.bank.tokens",
        "m3.memory.codec",
        "m3.memory.record_bytes",
        "m3.memory.vq.subquantizers",
    }
    text = SPEC.read_text()
    missing = sorted(k for k in written if f"`{k}`" not in text)
    assert not missing, f"header keys missing from format_spec.md: {missing}"


# --- hostile files ------------------------------------------------------------------------------
def patch(data: bytes, offset: int, new: bytes) -> bytearray:
    out = bytearray(data)
    out[offset : offset + len(new)] = new
    return out


def refresh_crcs(buf: bytearray) -> bytes:
    """Recompute table/header/preamble CRCs so that only the deliberate damage remains."""
    toff, hlen, count = struct.unpack_from("<QQI", buf, 16)
    hoff = toff + count * 128 if count < 10**5 else toff
    struct.pack_into("<II", buf, 36, zlib.crc32(bytes(buf[toff:hoff])), zlib.crc32(bytes(buf[hoff : hoff + hlen])))
    struct.pack_into("<I", buf, 60, zlib.crc32(bytes(buf[:60])))
    return bytes(buf)


def entry_offset(i: int) -> int:
    return 64 + i * 128


@pytest.fixture
def golden() -> bytes:
    return (DATA / "golden-2ref.m3bank").read_bytes()


def open_bytes(tmp_path, data: bytes):
    path = tmp_path / "x.m3bank"
    path.write_bytes(data)
    return Bank(path)


@pytest.mark.parametrize(
    "damage,fragment",
    [
        (lambda d: d[:40], "too short"),
        (lambda d: b"NOTABANK" + d[8:], "bad magic"),
        (lambda d: refresh_crcs(patch(d, 8, struct.pack("<H", 2))), "version 2.1"),
        (lambda d: refresh_crcs(patch(d, 12, struct.pack("<I", 4))), "unknown file flags"),
        (lambda d: patch(d, 100, b"\xff"), "section table checksum"),
        (lambda d: patch(d, 20, b"\x01"), "preamble checksum"),
        (lambda d: refresh_crcs(patch(d, 24, struct.pack("<Q", 2**40))), "header length"),
        (lambda d: refresh_crcs(patch(d, 32, struct.pack("<I", 10**6))), "section count"),
        (lambda d: refresh_crcs(patch(d, entry_offset(4) + 40, struct.pack("<Q", 2**50))), "outside the file"),
        (
            lambda d: refresh_crcs(patch(d, entry_offset(4) + 32, struct.pack("<Q", 64 * 3))),
            "table and header .*overlap",
        ),
        (lambda d: refresh_crcs(patch(d, 16, struct.pack("<Q", 2**40))), "section table offset"),
        (lambda d: refresh_crcs(patch(d, 16, struct.pack("<Q", 65))), "section table offset"),
        (lambda d: refresh_crcs(patch(d, entry_offset(4) + 32, struct.pack("<Q", 1))), "outside the file"),
        (lambda d: refresh_crcs(patch(d, entry_offset(1), b"refs.table\0")), "duplicate section"),
        (lambda d: refresh_crcs(patch(d, entry_offset(5), b"kv.future\0\0\0")), "unknown to this m3"),
        (lambda d: refresh_crcs(patch(d, entry_offset(2) + 56, b"lz4\0\0")), "unknown codec"),
    ],
)
def test_hostile_files_are_refused(tmp_path, golden, damage, fragment):
    with pytest.raises(BankError, match=fragment):
        open_bytes(tmp_path, damage(golden))


def test_overlapping_sections_are_refused(tmp_path, golden):
    off = struct.unpack_from("<Q", golden, entry_offset(0) + 32)[0]
    data = refresh_crcs(patch(golden, entry_offset(1) + 32, struct.pack("<Q", off)))
    with pytest.raises(BankError, match="overlap|has .* bytes"):
        open_bytes(tmp_path, data)


def test_unknown_optional_section_is_ignored(tmp_path, golden):
    data = refresh_crcs(
        patch(patch(golden, entry_offset(5), b"x.later\0\0\0\0\0\0"), entry_offset(5) + 64, struct.pack("<I", 0))
    )
    with pytest.raises(BankError, match="required sections missing: kv.positions"):
        open_bytes(tmp_path, data)  # it was kv.positions: now missing, but the unknown name itself is fine


def test_sizes_must_match_the_header(tmp_path, golden):
    toff, hlen = struct.unpack_from("<QQ", golden, 16)
    hoff = toff + 6 * 128
    header = golden[hoff : hoff + hlen].replace(b'"m3.bank.references":2', b'"m3.bank.references":3')
    data = refresh_crcs(patch(golden, hoff, header))
    with pytest.raises(BankError, match="header implies"):
        open_bytes(tmp_path, data)


def test_record_offsets_are_checked_and_verify_finds_damage(tmp_path, golden):
    table_off = struct.unpack_from("<Q", golden, entry_offset(0) + 32)[0]
    data = patch(golden, table_off + 32, struct.pack("<Q", 10**9))  # reference 1's text offset
    bank = open_bytes(tmp_path, bytes(data))
    with pytest.raises(BankError, match="invalid record"):
        bank.reference(1)
    assert any("SHA-256 mismatch" in p for p in bank.verify())
    bank.close()
    kv_off = struct.unpack_from("<Q", golden, entry_offset(4) + 32)[0]
    bank = open_bytes(tmp_path, bytes(patch(golden, kv_off + 5, b"\x7f")))
    assert bank.verify() == ["section kv.data: SHA-256 mismatch"]
    with pytest.raises(M3Error, match="out of range"):
        bank.memories([2])
    bank.close()


def test_writer_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "b.m3bank"
    with pytest.raises(RuntimeError):
        with BankWriter(path, golden_header(), "bf16", SHAPE) as w:
            w.add_document("d", "", "", [])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_bank_is_bound_to_its_model():
    with Bank(DATA / "golden-2ref.m3bank") as bank:
        require_same_model(bank, "sha256:" + "ab" * 32)
        with pytest.raises(M3Error, match="sha256:abab.*sha256:cdcd"):
            require_same_model(bank, "sha256:" + "cd" * 32)
        require_same_model(bank, "sha256:" + "cd" * 32, allow_mismatch=True)


def test_vq_bank_needs_intact_codebooks(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vq.m3bank"
    with BankWriter(path, golden_header(), "vq", SHAPE, vq_subquantizers=2) as w:
        for i in range(30):
            w.add_document(
                f"d{i}", "", "", [("text", 3, torch.randn(SHAPE), torch.full((2, 1, 3), 2, dtype=torch.int16))]
            )
        w.finish()
    data = path.read_bytes()
    with Bank(path) as bank:
        assert bank.codec == "vq" and bank.record_bytes == 2 * 2 * 1 * 3 * 2
        assert bank.memories([0]).kv.shape == (1, *SHAPE)
        entries = {bank.sections[n].name: i for i, n in enumerate(bank.sections)}
        books = bank.sections["codec.vq"]
    damaged = patch(data, books.offset + 8, b"\x55\x55")
    bank = open_bytes(tmp_path, bytes(damaged))
    with pytest.raises(BankError, match="codec.vq: SHA-256 mismatch"):
        bank.memories([0])
    bank.close()
    renamed = refresh_crcs(patch(data, entry_offset(entries["codec.vq"]), b"codec.vx\0"))
    with pytest.raises(BankError, match="unknown to this m3"):
        open_bytes(tmp_path, renamed)


def header_patched(golden: bytes, new_header: bytes) -> bytes:
    """The golden bank with its header replaced (table CRCs refreshed; sections unchanged)."""
    toff, hlen = struct.unpack_from("<QQ", golden, 16)
    hoff = toff + 6 * 128
    assert len(new_header) <= hlen
    buf = bytearray(golden)
    buf[hoff : hoff + hlen] = new_header.ljust(hlen, b" ")
    return refresh_crcs(buf)


@pytest.mark.parametrize(
    "header,fragment",
    [
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"m3.format":"m3bank","x":' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_hostile_header_json(tmp_path, golden, header, fragment):
    toff, hlen = struct.unpack_from("<QQ", golden, 16)
    hoff = toff + 6 * 128
    body = bytearray(golden[:hoff]) + header + golden[hoff + hlen :]
    struct.pack_into("<Q", body, 24, len(header))
    data = bytearray(body)
    # move every section by the size change so that the file stays consistent
    delta = len(header) - hlen
    for i in range(6):
        off = struct.unpack_from("<Q", data, entry_offset(i) + 32)[0]
        struct.pack_into("<Q", data, entry_offset(i) + 32, off + delta)
    pad = (-delta) % 64
    data = data[: hoff + len(header)] + b"\0" * pad + data[hoff + len(header) :]
    for i in range(6):
        off = struct.unpack_from("<Q", data, entry_offset(i) + 32)[0]
        struct.pack_into("<Q", data, entry_offset(i) + 32, off + pad)
    with pytest.raises(BankError, match=fragment):
        open_bytes(tmp_path, refresh_crcs(data))


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"m3.memory.layer_ids": [{}, 1]}, "layer_ids"),
        ({"m3.memory.layer_ids": 7}, "layer_ids"),
        ({"m3.model.reference_prefix_ids": 5}, "reference_prefix_ids"),
        ({"m3.memory.layer_ids": ["\x1b[31m", 1]}, "layer_ids"),
    ],
)
def test_header_values_are_validated(tmp_path, golden, change, fragment):
    toff, hlen = struct.unpack_from("<QQ", golden, 16)
    hoff = toff + 6 * 128
    header = json.loads(golden[hoff : hoff + hlen])
    new = json.dumps({**header, **change}, separators=(",", ":")).encode()
    if len(new) > hlen:
        new = json.dumps(
            {**header, **change, "m3.model.name": "", "m3.encode.producer": ""}, separators=(",", ":")
        ).encode()
    with pytest.raises(BankError, match=fragment):
        open_bytes(tmp_path, header_patched(golden, new))


def test_zstd_sections_are_verified_and_bounded(tmp_path, golden):
    import zstandard

    with Bank(DATA / "golden-2ref.m3bank") as bank:
        i = list(bank.sections).index("docs.strings")
        s = bank.sections["docs.strings"]
    # a frame that claims 2**40 bytes in a section whose table entry says 34
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 34)
    bomb = bytearray(bomb)
    data = bytearray(golden)
    data[s.offset : s.offset + s.length] = bytes(s.length)  # zero the old bytes
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 34)
    assert len(frame) <= 64
    data[s.offset : s.offset + len(frame)] = frame
    struct.pack_into("<QQ8s", data, entry_offset(i) + 40, len(frame), 34, b"zstd")
    data[entry_offset(i) + 96 : entry_offset(i) + 128] = hashlib.sha256(
        bytes(data[s.offset : s.offset + len(frame)])
    ).digest()
    bank = open_bytes(tmp_path, refresh_crcs(data))
    assert bank.decoded("docs.strings") == b"x" * 34  # a proper frame decodes
    bank.close()
    # the same frame with the checksum in the table zeroed is refused before decompression
    data[entry_offset(i) + 96 : entry_offset(i) + 128] = bytes(32)
    bank = open_bytes(tmp_path, refresh_crcs(data))
    with pytest.raises(BankError, match="SHA-256 mismatch"):
        bank.document(0)
    bank.close()
    # declared expansions beyond the ratio cap, and zstd where only raw is allowed
    struct.pack_into("<Q", data, entry_offset(i) + 48, 2**40)
    with pytest.raises(BankError, match="expands implausibly"):
        open_bytes(tmp_path, refresh_crcs(data))
    j = list(bank.sections).index("refs.text")
    with pytest.raises(BankError, match="zstd is not allowed"):
        open_bytes(tmp_path, refresh_crcs(patch(golden, entry_offset(j) + 56, b"zstd")))


def test_verify_is_linear_and_bounded(tmp_path):
    """Documents whose ranges overlap are reported, fast, with a capped list."""
    n = 3000
    path = tmp_path / "many.m3bank"
    with BankWriter(path, golden_header(), "bf16", SHAPE) as w:
        for i in range(n):
            w.add_document(f"d{i}", "", "", [("t", 1, torch.zeros(SHAPE), torch.full((2, 1, 3), 2, dtype=torch.int16))])
        w.finish()
    data = bytearray(path.read_bytes())
    with Bank(path) as bank:
        table = bank.sections["docs.table"].offset
    for j in range(n):  # every document claims all references
        struct.pack_into("<II", data, table + j * 32 + 20, 0, n)
    import time

    bank = open_bytes(tmp_path, bytes(data))
    t = time.perf_counter()
    problems = bank.verify()
    assert time.perf_counter() - t < 20
    assert any("SHA-256" in p for p in problems)
    bank.close()


def test_vq_encode_matches_brute_force_and_decode_inverts_centroids():
    from m3cli import vq

    torch.manual_seed(0)
    kv = torch.randn(30, 2, 2, 3, 4, 8)  # 360 vectors per codebook: more than 256 centroids, so no ties
    books = vq.train(kv.permute(1, 2, 0, 3, 4, 5).reshape(2, 2, -1, 8), 4)
    codes = vq.encode(kv, books)
    assert codes.dtype == torch.uint8 and codes.shape == (30, 2, 2, 3, 4, 4)
    assert torch.equal(codes, vq.encode_reference(kv, books))
    decoded = vq.decode(codes, books)
    assert torch.equal(vq.encode(decoded, books), codes)  # centroids are fixed points
    assert float((decoded - kv).norm() / kv.norm()) < 0.5
