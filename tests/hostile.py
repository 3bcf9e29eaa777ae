"""Hostile and mistaken input for ganet-serve, generated here from the bundled photographs: an image fuzz corpus,
crafted bombs, worst-case v2 bodies, and small load generators. Shared by tests/test_serve_reliability.py (the
bounded CI form) and benchmarks/reliability.py (the long form, which writes the report).
"""
from __future__ import annotations

import asyncio
import base64
import json
import random
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

import real_images
from real_images import encode

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "TIFF": "image/tiff", "WEBP": "image/webp",
           "BMP": "image/bmp"}


# --- images ------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def seeds() -> list[tuple[str, bytes]]:
    """Every bundled photograph (downscaled to keep the corpus fast) in every served format: the fuzzer's seeds."""
    out = []
    for name, img in real_images.photos().items():
        small = img.resize((max(8, img.width // 4), max(8, img.height // 4)))
        for fmt in FORMATS:
            kw = {"quality": 85} if fmt in ("JPEG", "WEBP") else {}
            if fmt == "JPEG" and len(out) % 2:
                kw["progressive"] = True
            out.append((f"{name}.{fmt.lower()}", encode(small, fmt, **kw)))
    return out


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of an encoded image (what fuzzers do: flip, cut, splice, repeat, overwrite headers)."""
    b = bytearray(data)
    kind = rng.choice(["flip", "flips", "truncate", "insert", "delete", "repeat", "header", "zero_run", "splice"])
    if kind == "flip":
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == "flips":
        for _ in range(rng.randint(2, 64)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "truncate":
        b = b[:rng.randrange(1, len(b))]
    elif kind == "insert":
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randint(1, 256))
    elif kind == "delete":
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 256)]
    elif kind == "repeat":
        i = rng.randrange(len(b))
        b[i:i] = b[i:i + rng.randint(1, 512)] * rng.randint(2, 16)
    elif kind == "header":  # the first 64 bytes hold sizes, depths, modes: the decoder's most trusted numbers
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(64, len(b)))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif kind == "zero_run":
        i = rng.randrange(len(b))
        b[i:i + rng.randint(16, 4096)] = bytes(min(len(b) - i, 4096))
    else:  # the head of one format on the body of another
        _, other = rng.choice(seeds())
        cut = rng.randrange(1, min(len(b), len(other)))
        b = b[:cut] + bytearray(other[cut:])
    return kind, bytes(b)


def fuzz_corpus(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` mutations spread over every seed image (every format), reproducible from ``seed``."""
    rng = random.Random(seed)
    base = seeds()
    out = []
    for i in range(n):
        name, data = base[i % len(base)]
        kind, mutated = mutate(data, rng)
        out.append((f"{name}:{kind}:{i}", mutated))
    return out


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_of_zeros(width: int, height: int, bit_depth: int = 8, color_type: int = 0, rows: int | None = None) -> bytes:
    """A real, valid PNG of width x height zero pixels (grey 0 / RGB 2 / RGBA 6), compressed to almost nothing:
    100 KB that a decoder expands into gigabytes. ``rows``: encode only that many rows (a truncated stream)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" * (1 + width * channels * bit_depth // 8)  # filter byte 0, then zero samples
    compressor = zlib.compressobj(9)
    parts, remaining = [], height if rows is None else rows
    block = row * max(1, min(remaining, (1 << 22) // len(row)))
    per_block = len(block) // len(row)
    while remaining > 0:
        take = min(per_block, remaining)
        parts.append(compressor.compress(block if take == per_block else row * take))
        remaining -= take
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def png_with_text(text_bytes: int) -> bytes:
    """A small real PNG carrying ``text_bytes`` of zTXt metadata (a text-chunk bomb)."""
    small = png_of_zeros(16, 16)
    z = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * text_bytes, 9))
    return small[:33] + z + small[33:]


def gif_header(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame claim width x height, with one tiny LZW block."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def bmp_header(width: int, height: int) -> bytes:
    """A BMP header claiming width x height 24-bit pixels, with a few bytes of them."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + info + b"\x00" * 64


def jpeg_header(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 marker is rewritten to claim width x height (the scan data stays 64x64)."""
    data = bytearray(real_images.jpeg(real_images.photos("coffee")["coffee"].resize((64, 64))))
    i = data.find(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@lru_cache(maxsize=1)
def crafted() -> list[tuple[str, bytes]]:
    """Bombs and pathological shapes: a client controls every number in a header."""
    from PIL import Image

    photo = real_images.photos("astronaut")["astronaut"]
    tall = encode(photo.resize((8, 4000)), "PNG")
    many_frames = encode(photo.resize((32, 32)), "GIF", save_all=True,
                         append_images=[photo.resize((32, 32)).rotate(i) for i in range(1, 200)])
    grey16 = encode(Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)), "PNG")
    return [
        ("png 100000x100000 header", png_of_zeros(100_000, 100_000, rows=2)),
        ("png 16-bit grey 7000x7000 (zeros)", png_of_zeros(7000, 7000, 16, 0)),
        ("png 16-bit grey 1x50000000", png_of_zeros(1, 50_000_000, 16, 0)),
        ("png 8-bit grey 50000000x1", png_of_zeros(50_000_000, 1, 8, 0)),
        ("png RGBA 7000x7000 (zeros)", png_of_zeros(7000, 7000, 8, 6)),
        ("png 16-bit RGBA 4000x4000", png_of_zeros(4000, 4000, 16, 6)),
        ("png 4 MB zTXt", png_with_text(8 * 2**20)),
        ("png 8x4000", tall),
        ("png 16-bit astronaut", grey16),
        ("gif 65535x65535 header", gif_header(65535, 65535)),
        ("gif 200 frames", many_frames),
        ("bmp 30000x30000 header", bmp_header(30000, 30000)),
        ("bmp -5000x-5000 header", bmp_header(-5000, -5000)),
        ("jpeg 65500x65500 header", jpeg_header(65500, 65500)),
        ("jpeg 7000x7000 header", jpeg_header(7000, 7000)),
        ("webp 16383x16383 header", b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10)
         + b"\x00\x00\x00\x00" + (16382).to_bytes(3, "little") * 2 + b"\x00" * 8),
        ("tiff header 40000x40000", b"II*\x00\x08\x00\x00\x00\x03\x00" + struct.pack("<HHII", 256, 4, 1, 40000)
         + struct.pack("<HHII", 257, 4, 1, 40000) + struct.pack("<HHII", 258, 3, 1, 16) + b"\x00" * 8),
    ]


# --- v2 bodies ----------------------------------------------------------------------------------------------------

def v2_binary(items: list[bytes], shape: list[int] | None = None) -> tuple[bytes, dict[str, str]]:
    """A BYTES request with the binary tensor extension: (body, headers)."""
    raw = b"".join(struct.pack("<I", len(x)) + x for x in items)
    head = json.dumps({"inputs": [{"name": "image", "shape": shape or [len(items)], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def v2_empty_elements(body_bytes: int) -> tuple[bytes, dict[str, str]]:
    """~``body_bytes`` of zero-length BYTES elements declared as one image (the loop-stalling body)."""
    return v2_binary([b""] * (body_bytes // 4), shape=[1])


def v2_json_pixels(batch: int, size: int, rng: random.Random | None = None) -> tuple[bytes, dict[str, str]]:
    """A valid UINT8 JSON request of ``batch`` images of size x size, one digit a value, so that 64 images at 224
    (9.6 million values, ~19 MB of JSON) still fit the default 20 MiB body limit: the most JSON a client may send."""
    rng = rng or random.Random(0)
    values = np.frombuffer(rng.randbytes(batch * 3 * size * size), np.uint8) % 10
    data = ",".join(map(str, values.tolist()))
    body = ('{"inputs":[{"name":"image","shape":[%d,3,%d,%d],"datatype":"UINT8","data":[%s]}]}'
            % (batch, size, size, data)).encode()
    return body, {"Content-Type": "application/json"}


def v2_base64(items: list[bytes]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"inputs": [{"name": "image", "shape": [len(items)], "datatype": "BYTES",
                                   "data": [base64.b64encode(x).decode() for x in items]}]}).encode()
    return body, {"Content-Type": "application/json"}


def multipart(files: list[tuple[str, bytes]], boundary: str = "ganethostileboundary") -> tuple[bytes, dict[str, str]]:
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{n}\"\r\n"
              f"Content-Type: application/octet-stream\r\n\r\n").encode() + d + b"\r\n" for n, d in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


# --- the server process -------------------------------------------------------------------------------------------

def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes: resident now, and its peak."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


# --- load ---------------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a batch of requests got back."""

    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests only
    retry_after_missing: int = 0  # 503s without Retry-After
    hung: int = 0  # no answer within the client's timeout
    errors: Counter = field(default_factory=Counter)  # connection-level failures, by type
    server_errors: list[str] = field(default_factory=list)  # 5xx bodies (first few)

    def add(self, status: int, seconds: float, headers, body: bytes) -> None:
        self.statuses[status] += 1
        self.latencies.append(seconds)
        if status == 503 and "retry-after" not in {k.lower() for k in headers.keys()}:
            self.retry_after_missing += 1
        if status >= 500 and status not in (503, 504) and len(self.server_errors) < 5:
            self.server_errors.append(body[:300].decode("latin-1"))

    def merge(self, other: Outcome) -> None:
        self.statuses.update(other.statuses)
        self.latencies += other.latencies
        self.retry_after_missing += other.retry_after_missing
        self.hung += other.hung
        self.errors.update(other.errors)
        self.server_errors += other.server_errors[:5]

    @property
    def count(self) -> int:
        return sum(self.statuses.values()) + self.hung + sum(self.errors.values())

    def fivexx(self, allowed: tuple[int, ...] = ()) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500 and s not in allowed)

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 1)) if lat else (lambda q: None)
        return {"requests": self.count, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "hung": self.hung, "connection_errors": dict(self.errors),
                "retry_after_missing": self.retry_after_missing, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
                "max_ms": round(lat[-1] * 1e3, 1) if lat else None, "server_errors": self.server_errors}


async def send(client, method: str, path: str, body: bytes | None, headers: dict[str, str], out: Outcome,
               timeout_s: float) -> int | None:
    """One request through an httpx.AsyncClient, recorded in ``out``; the status, or None."""
    import httpx

    start = time.perf_counter()
    try:
        r = await asyncio.wait_for(client.request(method, path, content=body, headers=headers), timeout_s)
    except TimeoutError:
        out.hung += 1
        return None
    except httpx.HTTPError as e:
        out.errors[type(e).__name__] += 1
        return None
    out.add(r.status_code, time.perf_counter() - start, r.headers, r.content)
    return r.status_code


async def closed_loop(url: str, requests: Callable[[int], tuple[str, bytes, dict]], clients: int, seconds: float,
                      timeout_s: float) -> Outcome:
    """``clients`` keep-alive clients, each sending ``requests(i)`` back to back for ``seconds``."""
    import httpx

    out = Outcome()
    stop = time.monotonic() + seconds

    async def client_loop(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s + 5) as client:
            i = c
            while time.monotonic() < stop:
                path, body, headers = requests(i)
                await send(client, "POST", path, body, headers, out, timeout_s)
                i += clients

    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    return out


async def open_loop(url: str, requests: Callable[[int], tuple[str, bytes, dict]], rate: float, seconds: float,
                    timeout_s: float, connections: int = 256, seed: int = 0,
                    keepalive_expiry_s: float = 1.0) -> Outcome:
    """Poisson arrivals at ``rate`` a second for ``seconds``, whatever the server's speed (a flood).

    The client drops a kept-alive connection after ``keepalive_expiry_s``, under the server's ``--keep-alive-s``, as
    any client or proxy in front of a keep-alive server must: reusing a connection the server is closing at that
    moment loses the request to a reset, whoever the server is."""
    import httpx

    out = Outcome()
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                          keepalive_expiry=keepalive_expiry_s)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s + 5, limits=limits) as client:
        tasks, i, start = [], 0, time.monotonic()
        next_at = start
        while next_at < start + seconds:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            path, body, headers = requests(i)
            tasks.append(asyncio.ensure_future(send(client, "POST", path, body, headers, out, timeout_s)))
            i += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return out
