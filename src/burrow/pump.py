"""Moving bytes between two streams, with back-pressure and half-close.

A :class:`Splice` joins a visitor's stream to a data connection (at the
relay) or a data connection to the local server (at the agent). Each
direction ends on its own EOF; the splice closes both streams once both
directions have ended, or aborts both when either side resets.
"""

from __future__ import annotations

from collections.abc import Callable

from burrow.stream import Stream


class Splice:
    """Two streams joined end to end."""

    def __init__(
        self,
        a: Stream,
        b: Stream,
        *,
        on_done: Callable[[Splice], None] | None = None,
    ) -> None:
        self.a = a
        self.b = b
        self._on_done = on_done
        self._ended: set[int] = set()  # ids of streams whose incoming direction ended
        self.done = False
        self.bytes_a_to_b = 0
        self.bytes_b_to_a = 0

    def start(self, *, a_first: bytes = b"", b_first: bytes = b"") -> None:
        """Begin moving bytes; ``*_first`` are bytes already read from that side."""
        if a_first:
            self.on_data(self.a, a_first)
        if b_first:
            self.on_data(self.b, b_first)
        self.a.set_receiver(self)
        self.b.set_receiver(self)
        # Whatever ended while the streams waited to be joined ends here too.
        for stream in (self.a, self.b):
            if stream.closed:
                self.on_close(stream, None)
            elif stream.peer_eof:
                self.on_eof(stream)
        if not self.done:
            self.a.resume_reading()
            self.b.resume_reading()

    def _other(self, stream: Stream) -> Stream:
        return self.b if stream is self.a else self.a

    def on_data(self, stream: Stream, data: bytes) -> None:
        if stream is self.a:
            self.bytes_a_to_b += len(data)
        else:
            self.bytes_b_to_a += len(data)
        self._other(stream).write(data)

    def on_eof(self, stream: Stream) -> None:
        if id(stream) in self._ended:
            return
        self._ended.add(id(stream))
        self._other(stream).write_eof()
        if len(self._ended) == 2:
            self._finish(abort=False)

    def on_close(self, stream: Stream, exc: BaseException | None) -> None:
        # A reset is passed on as a reset; a plain close as a plain close,
        # after the bytes already buffered for the other side.
        self._finish(abort=exc is not None)

    def on_pause_writing(self, stream: Stream) -> None:
        # ``stream`` cannot take more for now: stop reading what feeds it.
        self._other(stream).pause_reading()

    def on_resume_writing(self, stream: Stream) -> None:
        self._other(stream).resume_reading()

    def close(self) -> None:
        """End the splice from outside (its tunnel was closed)."""
        self._finish(abort=True)

    def _finish(self, *, abort: bool) -> None:
        if self.done:
            return
        self.done = True
        for stream in (self.a, self.b):
            if abort:
                stream.abort()
            else:
                stream.close()
        if self._on_done is not None:
            self._on_done(self)
