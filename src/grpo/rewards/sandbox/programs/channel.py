"""The line protocol between the solution's process (serve.py) and whoever judges it: the judge
process (judge.py) or, for simple asserts and input/output cases, the trainer itself.

One JSON object a line over a pair of pipes. The judge asks ({"n": n, "op": ...}); the solution's
process answers ({"n": n, "value": ...} | {"n": n, "ref": id} | {"n": n, "error": [type, text]} |
{"n": n, "stop": true}), after a first {"ready": true} or {"loaded": false, "reason": ...}. Nothing
the solution's process writes is trusted: a reply is at most a claim about a value of the solution
(what it could have returned anyway); it is read with a deadline and a size limit, and whatever
cannot be read (garbage, a huge or partial line, a closed pipe, a late or missing reply) raises
ChannelError, which fails the case that asked. The verdicts never travel on this channel.
"""

import builtins
import json
import os
import select
import time

from .codec import TooManyKeys, decode, encode

MAX_LINE = 1 << 20  # bytes of one message
MAX_STRAY = 64  # messages that answer no pending request, skipped before the channel counts as broken
CLOSED = "the other side closed the channel"


class ChannelError(Exception):
    """The other side's message is unreadable, too long, late or missing."""


class Lines:
    """JSON messages, one a line, over two pipe fds; every read and write has a deadline."""

    def __init__(self, rfd, wfd, max_line=MAX_LINE):
        self.rfd, self.wfd, self.max_line = rfd, wfd, max_line
        self.buf = bytearray()
        self.broken = None  # why the channel cannot be used any more
        os.set_blocking(wfd, False)
        self.readable, self.writable = select.poll(), select.poll()  # (not select: fds may be over 1024)
        self.readable.register(rfd, select.POLLIN)
        self.writable.register(wfd, select.POLLOUT)

    def fail(self, why):
        self.broken = self.broken or why
        raise ChannelError(self.broken)

    def send(self, message, deadline=None):
        self.send_text(json.dumps(message), deadline)

    def send_text(self, text, deadline=None):
        if self.broken:
            raise ChannelError(self.broken)
        data = memoryview((text + "\n").encode())
        while data:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.fail("the other side did not read within the time limit")
            if self.writable.poll(None if left is None else max(1, int(left * 1000))):
                try:
                    data = data[os.write(self.wfd, data):]
                except BlockingIOError:
                    pass
                except OSError as e:
                    self.fail(CLOSED + " (%s)" % type(e).__name__)

    def receive(self, deadline=None):
        """The next message (any JSON value); ChannelError when there is none by `deadline`
        (time.monotonic()), or the line is too long; unreadable text raises without breaking."""
        if self.broken:
            raise ChannelError(self.broken)
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                break
            if len(self.buf) > self.max_line:
                self.fail("a message over %d bytes" % self.max_line)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.fail("no answer within the time limit")
            if self.readable.poll(None if left is None else max(1, int(left * 1000))):
                try:
                    chunk = os.read(self.rfd, 1 << 16)
                except OSError as e:
                    chunk, _ = b"", e
                if not chunk:
                    self.fail(CLOSED)
                self.buf += chunk
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        if len(line) > self.max_line:
            self.fail("a message over %d bytes" % self.max_line)
        try:
            return json.loads(line)
        except Exception as e:  # RecursionError ("[" * 5000), ValueError (5000 digits), UnicodeError, ...
            raise ChannelError("an unreadable message (%s)" % type(e).__name__) from None


class SolutionError(Exception):
    """An exception the solution raised, of a type that has no builtin counterpart here."""


def remote_exception(error):
    """The judge's side of an exception raised in the solution: the builtin exception of that name
    (so a test's `except ValueError` works), else SolutionError. Never a BaseException that is not
    an Exception (SystemExit, KeyboardInterrupt), nor StopIteration."""
    if type(error) is not list or len(error) != 2 or not all(type(s) is str for s in error):
        return ChannelError("an error reply of no known form")
    name, text = error[0][:100], error[1][:300]
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration, StopAsyncIteration)):
        try:
            return cls(text)
        except Exception:
            pass
    return SolutionError("%s: %s" % (name, text))


class Solution:
    """The judge's handle on the solution's process: its names as Remote objects or plain values."""

    def __init__(self, lines, call_seconds, deadline, max_keys=None):
        self.lines, self.call_seconds, self.deadline = lines, call_seconds, deadline
        self.max_keys = max_keys  # set and dict entries decoded per answer (None: no limit)
        self.n = 0

    def hello(self):
        """None when the solution loaded, else why not (its own words, or the channel's)."""
        try:
            first = self.lines.receive(self.deadline)
        except ChannelError as e:
            self.lines.broken = self.lines.broken or str(e)
            return str(e)
        if type(first) is dict and first.get("ready") is True:
            return None
        if type(first) is dict and first.get("loaded") is False:
            return str(first.get("reason"))[:300]
        return "an unreadable first message"

    def get(self, name):
        return self.ask(op="get", name=name)

    def ask(self, **request):
        """Send one request, return the value it answers (plain data, or a Remote), or raise."""
        self.n += 1
        request["n"] = self.n
        deadline = min(self.deadline, time.monotonic() + self.call_seconds)
        self.lines.send(request, deadline)
        for _ in range(MAX_STRAY):  # replies to earlier requests (late, or forged) are skipped
            reply = self.lines.receive(deadline)
            if type(reply) is dict and reply.get("n") == self.n and type(reply.get("n")) is int:
                break
        else:
            self.lines.fail("too many messages that answer nothing")
        if "value" in reply:
            budget = None if self.max_keys is None else [self.max_keys]
            try:
                return decode(reply["value"], ref=self.remote, budget=budget)
            except TooManyKeys:
                raise
            except Exception as e:
                raise ChannelError("an unreadable value (%s)" % type(e).__name__) from None
        if reply.get("stop") is True and request["op"] == "next":
            raise StopIteration
        if "error" in reply:
            raise remote_exception(reply["error"])
        raise ChannelError("a reply of no known form")

    def remote(self, ref):
        return Remote(self, ref, "object")

    def pack(self, x):
        """An argument for the solution: plain data, or a Remote of its own."""
        return encode(x, ref=self._ref_of)

    @staticmethod
    def _ref_of(x):
        if type(x) is Remote:
            return object.__getattribute__(x, "_ref")
        raise TypeError("only plain data (or the solution's own objects) can be passed to the solution, not %s" % type(x).__name__)


class Remote:
    """An object of the solution, in its process: calls, attributes, items, len and iteration are
    asked of it (each answer a claim, like a return value); comparisons, hashing and truth are NOT
    forwarded (an object that equals everything cannot pass), so they are identity, or an error."""

    __slots__ = ("_solution", "_ref", "_what")

    def __init__(self, solution, ref, what):
        object.__setattr__(self, "_solution", solution)
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_what", what)

    def _ask(self, op, **kw):
        return object.__getattribute__(self, "_solution").ask(op=op, ref=object.__getattribute__(self, "_ref"), **kw)

    def __call__(self, *args, **kwargs):
        s = object.__getattribute__(self, "_solution")
        return self._ask("call", args=[s.pack(a) for a in args], kwargs={str(k): s.pack(v) for k, v in kwargs.items()})

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask("attr", name=name)

    def __getitem__(self, key):
        return self._ask("item", key=object.__getattribute__(self, "_solution").pack(key))

    def __len__(self):
        n = self._ask("len")
        if type(n) is not int:
            raise TypeError("len() of the solution's object is not an int")
        return n

    def __iter__(self):
        return self._ask("iter")

    def __next__(self):
        return self._ask("next")

    def __bool__(self):
        raise TypeError("the solution's %s has no truth value here: return plain data" % object.__getattribute__(self, "_what"))

    def __repr__(self):
        return "<the solution's %s>" % object.__getattribute__(self, "_what")
