"""Plain data across a process boundary: a tagged JSON form, written on one side and rebuilt on the
other with the exact plain types: no subclass, no custom __eq__, no object of the solution crosses;
anything else is a reference (`ref`) to an object that stays in its process, or an error.
Every reader is defensive: nesting, the digits of a number and the tags are checked.
"""

MAX_DEPTH = 100
MAX_DIGITS = 4300  # CPython's default int_max_str_digits: a longer number is refused, not parsed slowly

class TooManyKeys(ValueError):
    """More set or dict entries than the reader's budget (a guard against hash-collision floods)."""


_PLAIN = "None, bool, int, float, complex, str, bytes, list, tuple, set, dict"
_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def encode(x, ref=None, depth=0):
    """x -> a JSON-able tagged list. An instance of a subclass of a plain type (a Counter, a
    namedtuple, an IntEnum, ...) is sent as the plain value it holds, read with the base type's own
    methods (its overrides of __eq__, __iter__, __repr__ ... play no part). Objects that are not
    plain data become ["ref", ref(x)] when `ref` is given, else raise TypeError."""
    if depth > MAX_DEPTH:
        raise ValueError("a value nested over %d deep" % MAX_DEPTH)
    t = type(x)
    if x is None or t is bool:
        return [t.__name__, x]
    if isinstance(x, str):
        return ["str", str.__str__(x)]
    if isinstance(x, int):
        return ["int", int.__repr__(x)]
    if isinstance(x, float):
        return ["float", float.__repr__(x)]
    if isinstance(x, complex):
        return ["complex", float.__repr__(complex.real.__get__(x)), float.__repr__(complex.imag.__get__(x))]
    if isinstance(x, bytes):
        return ["bytes", bytes.hex(x)]
    for base in (list, tuple, set, frozenset):
        if isinstance(x, base):
            return [base.__name__, [encode(v, ref, depth + 1) for v in base.__iter__(x)]]
    if isinstance(x, dict):
        return ["dict", [[encode(k, ref, depth + 1), encode(v, ref, depth + 1)] for k, v in dict.items(x)]]
    if ref is not None:
        return ["ref", ref(x)]
    raise TypeError("a value of type %s is not plain data (%s)" % (t.__name__, _PLAIN))


def _number(text, kind):
    if type(text) is not str or len(text) > MAX_DIGITS + 2:
        raise ValueError("not an encoded %s" % kind.__name__)
    return kind(text)


def decode(e, ref=None, depth=0, budget=None):
    """The inverse of encode; ["ref", n] -> ref(n) when `ref` is given. Raises ValueError (or
    TypeError) on anything that is not an encoded value. `budget` ([n]): at most n set and dict
    entries in all (TooManyKeys beyond): n colliding keys cost n**2 / 2 probes to build."""
    if depth > MAX_DEPTH:
        raise ValueError("a value nested over %d deep" % MAX_DEPTH)
    if type(e) is not list or not e or type(e[0]) is not str:
        raise ValueError("not an encoded value")
    tag, rest = e[0], e[1:]
    if tag == "NoneType" and rest == [None]:
        return None
    if tag in ("bool", "str") and len(rest) == 1 and type(rest[0]) is {"bool": bool, "str": str}[tag]:
        return rest[0]
    if tag in ("int", "float") and len(rest) == 1:
        return _number(rest[0], {"int": int, "float": float}[tag])
    if tag == "complex" and len(rest) == 2:
        return complex(_number(rest[0], float), _number(rest[1], float))
    if tag == "bytes" and len(rest) == 1 and type(rest[0]) is str:
        return bytes.fromhex(rest[0])
    if tag in _SEQUENCES and len(rest) == 1 and type(rest[0]) is list:
        if budget is not None and tag in ("set", "frozenset"):
            _spend(budget, len(rest[0]))
        return _SEQUENCES[tag](decode(v, ref, depth + 1, budget) for v in rest[0])
    if tag == "dict" and len(rest) == 1 and type(rest[0]) is list:
        if budget is not None:
            _spend(budget, len(rest[0]))
        out = {}
        for pair in rest[0]:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("not an encoded dict")
            out[decode(pair[0], ref, depth + 1, budget)] = decode(pair[1], ref, depth + 1, budget)
        return out
    if tag == "ref" and ref is not None and len(rest) == 1 and type(rest[0]) is int:
        return ref(rest[0])
    raise ValueError("not an encoded value")


def _spend(budget, n):
    budget[0] -= n
    if budget[0] < 0:
        raise TooManyKeys("more set or dict entries than this reader takes")
