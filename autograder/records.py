"""The trusted end of the records channel: frames in, a read-only record folder out.

The kernel writes its records into a FIFO (``autograder.record``); a thread of the grader,
outside the sandbox, reads the other end and stores every case in a folder the kernel
cannot see (``<result>/records/``). Whatever the kernel does after a check — rewrite files,
patch the recorder, send the same case again — cannot change a record already stored:

- the first frame of a (check, case) wins; a later one is dropped and counted;
- a header that is not one JSON line of the expected fields ends the stream (the rest is
  drained and dropped: a student who corrupts the channel loses only their own records);
- a payload over ``MAX_CASE_BYTES`` or past the run's ``MAX_RUN_BYTES`` is drained unstored
  and its case marked as too large.

Layout: ``records/<check>/<case>.safetensors`` and ``records/<check>.json`` (the index:
errors and timings per case), files mode 0444.
"""
from __future__ import annotations

import json
import os
import select
import stat
import threading

from .record import MAX_CASE_BYTES, NAME

MAX_HEADER_BYTES = 4096
MAX_RUN_BYTES = 512 * 2**20  # everything one run may store
MAX_CASES = 1000


class RecordStore:
    """Cases as they arrive, written once each, into ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.index: dict[str, dict[int, dict]] = {}
        self.stored_bytes = 0
        self.dropped = 0  # frames that repeated a case already stored
        self.corrupt = ""  # why the stream was cut, if it was

    def has(self, check: str, case: int) -> bool:
        return case in self.index.get(check, {})

    def put(self, check: str, case: int, error, seconds, payload: bytes | None) -> None:
        if self.has(check, case):
            self.dropped += 1
            return
        entry = {"error": error, "seconds": seconds}
        if payload is not None and error is None:
            path = os.path.join(self.folder, check, f"{case}.safetensors")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            self.stored_bytes += len(payload)
        self.index.setdefault(check, {})[case] = entry
        self._write_index(check)

    def _write_index(self, check: str) -> None:
        path = os.path.join(self.folder, f"{check}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"check": check, "cases": {str(k): v for k, v in self.index[check].items()}}, f)
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)


def _header(line: bytes) -> dict:
    """Parse and validate one frame header; ValueError if it is not one."""
    h = json.loads(line.decode("ascii"))
    if not isinstance(h, dict) or set(h) != {"check", "case", "error", "seconds", "nbytes"}:
        raise ValueError("unexpected header fields")
    if not isinstance(h["check"], str) or not NAME.match(h["check"]):
        raise ValueError("bad check name")
    for key in ("case", "nbytes"):
        if not isinstance(h[key], int) or isinstance(h[key], bool) or h[key] < 0:
            raise ValueError(f"bad {key}")
    if h["case"] >= MAX_CASES:
        raise ValueError("case index out of range")
    if h["error"] is not None and not isinstance(h["error"], str):
        raise ValueError("bad error")
    if not isinstance(h["seconds"], (int, float)) or isinstance(h["seconds"], bool):
        raise ValueError("bad seconds")
    h["error"] = None if h["error"] is None else h["error"][:2000]
    return h


class FrameParser:
    """Feed bytes in any chunking; complete frames go to the store."""

    def __init__(self, store: RecordStore):
        self.store = store
        self.buf = bytearray()
        self.header: dict | None = None
        self.payload: bytearray | None = None
        self.skip = 0  # payload bytes to drain unstored
        self.dead = False

    def feed(self, data: bytes) -> None:
        if self.dead:
            return
        self.buf += data
        while self.buf and not self.dead:
            if self.skip:
                n = min(self.skip, len(self.buf))
                del self.buf[:n]
                self.skip -= n
                continue
            if self.header is None:
                end = self.buf.find(b"\n", 0, MAX_HEADER_BYTES + 1)
                if end < 0:
                    if len(self.buf) > MAX_HEADER_BYTES:
                        self._cut("a frame header is over 4 KiB")
                    return
                try:
                    h = _header(bytes(self.buf[:end]))
                except (ValueError, UnicodeDecodeError) as exc:
                    self._cut(f"unreadable frame header ({exc})")
                    return
                del self.buf[:end + 1]
                too_big = h["nbytes"] > MAX_CASE_BYTES + 2**20 or \
                    self.store.stored_bytes + h["nbytes"] > MAX_RUN_BYTES
                if too_big:
                    self.store.put(h["check"], h["case"], "outputs too large to store", h["seconds"], None)
                    self.skip = h["nbytes"]
                    continue
                self.header, self.payload = h, bytearray()
            need = self.header["nbytes"] - len(self.payload)
            take = self.buf[:need]
            self.payload += take
            del self.buf[:len(take)]
            if len(self.payload) == self.header["nbytes"]:
                h = self.header
                self.store.put(h["check"], h["case"], h["error"], h["seconds"], bytes(self.payload))
                self.header = self.payload = None

    def _cut(self, why: str) -> None:
        self.dead = True
        self.store.corrupt = why
        self.buf.clear()


class ChannelReader:
    """A FIFO at ``path`` for the sandbox to write into, read by a thread of the grader.

    ``start()`` creates the FIFO (mode 0622: the sandbox's uid may write, only the grader
    reads) and starts reading; ``finish()`` — after the sandbox is gone — reads what is
    left and returns the store.
    """

    def __init__(self, path: str, store: RecordStore):
        self.path, self.store = path, store
        self.parser = FrameParser(store)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "ChannelReader":
        if os.path.lexists(self.path):
            os.unlink(self.path)
        os.mkfifo(self.path, 0o600)
        os.chmod(self.path, 0o622)
        self._rfd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(self.path, os.O_WRONLY)  # no EOF before finish(), however often writers come and go
        self._thread = threading.Thread(target=self._loop, name="records", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        poll = select.poll()
        poll.register(self._rfd, select.POLLIN)
        while True:
            events = poll.poll(200)
            if not events:
                if self._stop.is_set():
                    return
                continue
            try:
                data = os.read(self._rfd, 1 << 20)
            except BlockingIOError:
                continue
            if not data:  # every writer is gone (finish() closed the last one)
                return
            self.parser.feed(data)

    def finish(self, timeout: float = 30) -> RecordStore:
        os.close(self._keep)
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(5)
        os.close(self._rfd)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        return self.store


def read_index(folder: str, check: str) -> dict[int, dict] | None:
    """The stored index of ``check`` (None: nothing arrived)."""
    path = os.path.join(folder, f"{check}.json")
    if not os.path.exists(path) or not stat.S_ISREG(os.lstat(path).st_mode):
        return None
    with open(path) as f:
        return {int(k): v for k, v in json.load(f)["cases"].items()}
