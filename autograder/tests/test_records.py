"""The records channel: frames in any chunking, first record wins, hostile streams cost
only their own records (``autograder.records``; no kernel needed)."""
import json
import os
import threading

import pytest
import torch
from safetensors.torch import save

from autograder.record import frame
from autograder.records import (MAX_CASE_BYTES, ChannelReader, FrameParser, RecordStore,
                                read_index)


def payload(**tensors):
    return save({k: torch.as_tensor(v) for k, v in tensors.items()})


def stored(folder, check, case):
    with open(os.path.join(folder, check, f"{case}.safetensors"), "rb") as f:
        return f.read()


def test_frames_arrive_whole_in_any_chunking(tmp_path):
    a, b = payload(x=[1.0, 2.0]), payload(y=[[3]])
    wire = frame("one", 0, a, None, 0.5) + frame("one", 1, b) + frame("two", 0, b"", "ValueError: no")
    for chunk in (1, 7, len(wire)):
        store = RecordStore(str(tmp_path / str(chunk)))
        parser = FrameParser(store)
        for i in range(0, len(wire), chunk):
            parser.feed(wire[i:i + chunk])
        assert stored(store.folder, "one", 0) == a and stored(store.folder, "one", 1) == b
        assert read_index(store.folder, "two") == {0: {"error": "ValueError: no", "seconds": 0.0}}
        assert read_index(store.folder, "three") is None


def test_the_first_record_of_a_case_wins(tmp_path):
    store = RecordStore(str(tmp_path))
    FrameParser(store).feed(frame("c", 0, payload(x=[1])) + frame("c", 0, payload(x=[2])))
    assert stored(store.folder, "c", 0) == payload(x=[1]) and store.dropped == 1
    assert oct(os.stat(os.path.join(store.folder, "c", "0.safetensors")).st_mode & 0o777) == "0o444"


@pytest.mark.parametrize("garbage", [b"not json\n", b"x" * 5000,
                                     json.dumps({"check": "../up", "case": 0, "error": None,
                                                 "seconds": 0, "nbytes": 0}).encode() + b"\n",
                                     json.dumps({"check": "c", "case": -1, "error": None,
                                                 "seconds": 0, "nbytes": 0}).encode() + b"\n"])
def test_a_corrupt_stream_is_cut_and_keeps_what_came_before(tmp_path, garbage):
    store = RecordStore(str(tmp_path))
    FrameParser(store).feed(frame("c", 0, payload(x=[1])) + garbage + frame("c", 1, payload(x=[2])))
    assert store.corrupt and read_index(store.folder, "c") == {0: {"error": None, "seconds": 0.0}}
    assert not os.path.exists(os.path.join(str(tmp_path), "up"))


def test_an_oversized_payload_is_drained_not_stored(tmp_path):
    store = RecordStore(str(tmp_path))
    parser = FrameParser(store)
    n = MAX_CASE_BYTES + 2**20 + 1
    header = json.dumps({"check": "c", "case": 0, "error": None, "seconds": 0, "nbytes": n}).encode()
    parser.feed(header + b"\n")
    for _ in range(n // 2**20 + 1):
        parser.feed(b"\0" * min(2**20, n))
        n -= min(2**20, n)
    parser.feed(frame("c", 1, payload(x=[1])))
    index = read_index(store.folder, "c")
    assert index[0]["error"] == "outputs too large to store" and index[1]["error"] is None
    assert not os.path.exists(os.path.join(store.folder, "c", "0.safetensors"))


def test_the_fifo_channel_carries_writers_that_come_and_go(tmp_path):
    reader = ChannelReader(str(tmp_path / "records.fifo"), RecordStore(str(tmp_path / "records"))).start()
    assert oct(os.stat(tmp_path / "records.fifo").st_mode & 0o777) == "0o622"

    def writer(case):
        with open(tmp_path / "records.fifo", "wb", buffering=0) as f:
            f.write(frame("c", case, payload(x=list(range(1000)))))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
        t.join()  # one after another: frames from one open() are never interleaved
    store = reader.finish()
    assert sorted(read_index(store.folder, "c")) == [0, 1, 2]
    assert not os.path.exists(tmp_path / "records.fifo")
