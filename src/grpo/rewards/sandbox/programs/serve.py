"""The solution's process: load the solution, then answer the judge's requests about it.

Everything here runs next to untrusted code, which can rewrite any of it: its answers are claims
about the solution's values, read by the judge as such (channel.py). It holds no test and no
expected value: the requests carry names and arguments only.
"""

import contextlib
import io
import json
import os
import signal
import sys

from .channel import MAX_LINE, ChannelError, Lines
from .codec import decode, encode


class Timeout(BaseException):
    pass


def _alarm(*_):
    raise Timeout()


def _why(e, seconds):
    if isinstance(e, Timeout):
        return ["TimeoutError", "timeout: over %g s" % seconds]
    try:
        return [type(e).__name__, str(e)[:300]]
    except BaseException:
        return [type(e).__name__, "?"]


class Server:
    def __init__(self, lines, seconds, code, mode):
        self.lines, self.seconds, self.code, self.mode = lines, seconds, code, mode
        self.ns = {"__name__": "__main__"}
        self.objects = []  # the solution's objects the judge holds a reference to

    def timed(self, fn, *args):
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def load(self):
        exec(compile(self.code, "<solution>", "exec"), self.ns)

    def program(self, stdin_text):
        """Run the solution as a program on `stdin_text`; its output (exit(0) is a normal end)."""
        sys.stdin, buf = io.StringIO(stdin_text), io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                exec(compile(self.code, "<solution>", "exec"), {"__name__": "__main__"})
            except SystemExit as e:
                if e.code not in (None, 0):
                    raise
        return buf.getvalue()

    def ref(self, x):
        self.objects.append(x)
        return len(self.objects) - 1

    def obj(self, ref):
        if type(ref) is not int or not 0 <= ref < len(self.objects):
            raise ValueError("no such object")
        return self.objects[ref]

    def answer(self, req):
        op = req.get("op")
        if op == "get":
            if req.get("name") not in self.ns:
                raise NameError("name %r is not defined by the solution" % req.get("name"))
            return self.ns[req["name"]]
        if op == "run" and self.mode == "io":
            return self.program(str(req.get("stdin")))
        target = self.obj(req.get("ref"))
        if op == "call":
            args = [decode(a, self.obj) for a in req.get("args", [])]
            kwargs = {str(k): decode(v, self.obj) for k, v in dict(req.get("kwargs", {})).items()}
            return target(*args, **kwargs)
        if op == "attr":
            return getattr(target, str(req.get("name")))
        if op == "item":
            return target[decode(req.get("key"), self.obj)]
        if op == "len":
            return len(target)
        if op == "iter":
            return iter(target)
        if op == "next":
            return next(target)
        raise ValueError("unknown request")

    def reply(self, req):
        """The answer to one request, as a line of JSON text."""
        n = req.get("n") if type(req) is dict else None
        try:
            out = {"n": n, "value": self.timed(lambda: encode(self.answer(req), self.ref))}
        except StopIteration:
            out = {"n": n, "stop": True}
        except BaseException as e:  # SystemExit and a timeout included: an answer, not the end
            out = {"n": n, "error": _why(e, self.seconds)}
        try:
            text = json.dumps(out)
        except BaseException as e:
            text = json.dumps({"n": n, "error": _why(e, self.seconds)})
        if len(text) >= MAX_LINE:
            text = json.dumps({"n": n, "error": ["ValueError", "a value over %d bytes" % MAX_LINE]})
        return text

    def serve(self):
        while True:
            try:
                req = self.lines.receive()
            except ChannelError as e:
                if self.lines.broken:
                    return  # the judge is done
                req = {"error": str(e)}
            self.lines.send_text(self.reply(req))


def main():
    job = json.load(open("job.json"))
    os.remove("job.json")
    signal.signal(signal.SIGALRM, _alarm)
    lines = Lines(*job["fds"])
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the solution's prints go nowhere
    server = Server(lines, job["seconds"], open("solution.py").read(), job["mode"])
    if job["mode"] == "asserts":
        try:
            server.timed(server.load)
        except BaseException as e:
            lines.send({"loaded": False, "reason": ": ".join(_why(e, server.seconds))})
            return
    lines.send({"ready": True})
    server.serve()
