"""The engine process's reports read without blocking (server/pipe_frames.py).

uvloop makes the descriptors it watches non-blocking; a Connection.recv_bytes then failed with
BlockingIOError on any half-written report, and the server took the engine process for dead (seen under
load with the HTTP stack's uvloop: 383 of 512 requests failed). Here a writer thread sends with
Connection.send_bytes, messages larger than the pipe's buffer included, and the reader, woken by select
as an event loop would be, must return exactly the messages sent, in order, whole."""

import multiprocessing
import os
import select
import threading

from server.pipe_frames import FrameReader


def read_all(reader: FrameReader, timeout: float = 10.0) -> list[bytes]:
    messages = []
    while not reader.closed:
        ready, _, _ = select.select([reader.fd], [], [], timeout)
        assert ready, "the pipe went quiet before its end"
        messages += reader.read()
    return messages


def test_messages_of_every_size_arrive_whole_and_in_order():
    receiving, sending = multiprocessing.Pipe(duplex=False)
    sent = [b"", b"x", os.urandom(70_000), b"y" * 5, os.urandom(3 * 2**20), b"z"]  # past the 64 KiB pipe buffer

    def write():
        for message in sent:
            sending.send_bytes(message)  # blocks mid-message whenever the pipe is full
        sending.close()

    writer = threading.Thread(target=write)
    reader = FrameReader(receiving.fileno())
    writer.start()
    assert read_all(reader) == sent
    writer.join()
    assert not os.get_blocking(receiving.fileno())


def test_a_half_written_message_waits_for_its_end():
    receiving, sending = multiprocessing.Pipe(duplex=False)
    reader = FrameReader(receiving.fileno())
    framed = (5).to_bytes(4, "big") + b"hello"
    os.write(sending.fileno(), framed[:6])  # the length and two bytes
    assert reader.read() == []
    assert reader.read() == []  # nothing new: no BlockingIOError, no end
    os.write(sending.fileno(), framed[6:] + framed)
    assert reader.read() == [b"hello", b"hello"]
    sending.close()
    assert reader.read() == [] and reader.closed


def test_a_message_cut_by_the_end_of_the_pipe_is_dropped():
    receiving, sending = multiprocessing.Pipe(duplex=False)
    reader = FrameReader(receiving.fileno())
    sending.send_bytes(b"whole")
    os.write(sending.fileno(), (100).to_bytes(4, "big") + b"partial")
    sending.close()
    assert read_all(reader) == [b"whole"]


def test_the_long_length_form_is_read():
    """Connection.send_bytes frames messages of 2 GiB and more with -1 and an 8-byte length: the same form,
    on a short body, in two writes."""
    receiving, sending = multiprocessing.Pipe(duplex=False)
    reader = FrameReader(receiving.fileno())
    framed = (-1).to_bytes(4, "big", signed=True) + (3).to_bytes(8, "big") + b"abc"
    os.write(sending.fileno(), framed[:7])
    assert reader.read() == []
    os.write(sending.fileno(), framed[7:])
    assert reader.read() == [b"abc"]
