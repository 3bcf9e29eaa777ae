"""The control messages between a front end and the model owner (``ganet-serve --frontends``), over a socketpair.

Fixed little-endian structs, no pickle: the pixels are already in the shared-memory ring (``ganet.serve.shm_ring``),
so a request is 16 bytes and an answer 32 bytes plus the logits (float32, num_classes of them) or an error message.

front end -> owner, ``REQUEST`` (16 bytes): kind, slot, seconds left until the request's deadline
    SUBMIT   run the image in ``slot``; the owner answers exactly once for every SUBMIT
    STARTED  this front end serves HTTP (slot and seconds unused)
owner -> front end, ``ANSWER`` (32 bytes) + payload: kind, status, slot, batch size, queue s, inference s, length
    RESULT   the answer for ``slot``: status OK + float32 logits, or a refusal + a UTF-8 message
    READY    the owner is warmed up and every front end has started: /v2/health/ready may turn 200
"""
from __future__ import annotations

import struct

__all__ = ["REQUEST", "ANSWER", "SUBMIT", "STARTED", "RESULT", "READY", "OK", "QUEUE_FULL", "EXPIRED", "FAILED",
           "STATUS_NAMES"]

REQUEST = struct.Struct("<B3xId")  # kind, slot, seconds left
ANSWER = struct.Struct("<BBxxIIddI")  # kind, status, slot, batch size, queue s, inference s, payload bytes

SUBMIT, STARTED = 1, 2  # front end -> owner
RESULT, READY = 1, 2  # owner -> front end
OK, QUEUE_FULL, EXPIRED, FAILED = 0, 1, 2, 3  # RESULT status
STATUS_NAMES = {OK: "ok", QUEUE_FULL: "queue_full", EXPIRED: "expired", FAILED: "failed"}

assert REQUEST.size == 16 and ANSWER.size == 32
