"""The building blocks of config/schema.py's declarations: `key(...)`, a dataclass field carrying one key's
schema (TOML types, bound, doc, reload kind), and the bounds (validators) keys share.

How it works: a validator takes the parsed value and returns None when it is acceptable, else what was
expected ("a number > 0"), which config/loader.py turns into "<file>: <section>.<key>: expected ...".
Every numeric bound is finite: inf/nan cannot be stored in state.json and would crash later.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from supervisor.config import names  # noqa: F401  (validators of names live there; re-exported for schema)

LIVE = "live"                  # at once: thresholds read by the decision function at every event
NEXT_ATTEMPT = "next_attempt"  # from the next (re)start of the trainer (argv, environment)
RESTART = "restart"            # only after `systemctl restart`: the key names the job, or opens a source
REQUIRED = object()            # no default: the key must be given (or come from the environment)
UNSET = None                   # TOML has no null: an unset optional key is simply left out
NUMBER = (int, float)
LIMIT = 1e9                    # finite upper bound for durations and counts: inf cannot be stored in JSON


def key(default, check: Callable[[Any], str | None] | None = None, doc: str = "", *, types=NUMBER,
        reload: str = LIVE, default_doc: str | None = None, convert: Callable[[Any], Any] | None = None):
    """Declare one config key (a dataclass field carrying its schema in metadata); `convert` turns a checked
    value into what the program uses (e.g. "0-4" into the folds 0..4)."""
    meta = {"check": check, "doc": doc, "types": types, "reload": reload, "default_doc": default_doc,
            "required": default is REQUIRED, "convert": convert}
    if default is REQUIRED:
        default = None
    return dataclasses.field(default=default, metadata=meta)


# ---- bounds: each returns what was expected, or None when the value is fine -----------------------
def _finite(v) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def positive(v):
    return None if _finite(v) and 0 < v <= LIMIT else "a finite number > 0"


def non_negative(v):
    return None if _finite(v) and 0 <= v <= LIMIT else "a finite number >= 0"


def at_least_one(v):
    return None if 1 <= v <= LIMIT else "an integer >= 1"


def unit_interval(v):
    return None if _finite(v) and 0 < v <= 1 else "a number in (0, 1]"


def unit_interval_or_zero(v):
    return None if _finite(v) and 0 <= v <= 1 else "a number in [0, 1]"


def celsius(v):
    return None if _finite(v) and 0 < v < 200 else "a temperature in (0, 200) C"


def one_of(*choices):
    return lambda v: None if v in choices else "one of " + ", ".join(f'"{c}"' for c in choices)


nonempty = names.no_control  # paths and file names: non-empty, no NUL bytes or other control characters


def str_list(v):
    if not all(isinstance(x, str) for x in v):
        return "a list of strings"
    return None if not any("\0" in x for x in v) else "a list of strings without NUL bytes"


def argv(v):
    if not v or not all(isinstance(x, str) and x for x in v):
        return "a non-empty list of non-empty strings (an argv, not a shell string)"
    return str_list(v)


def fold(v):
    if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1000):
        return None
    return 'an integer >= 0 or "all"'


def gpu_list(v):
    ok = all((isinstance(x, int) and not isinstance(x, bool) and x >= 0) or
             (isinstance(x, str) and x.isascii() and x.isdigit()) for x in v)
    return None if ok else "a list of GPU indices (integers >= 0)"


def env_name_problem(name: str) -> str | None:
    if not name or "=" in name or "\0" in name:
        return "a variable name without '=' or NUL bytes"
    return None




def http_url(v):
    if "\0" in v or not v.startswith(("http://", "https://")) or len(v) < 10:
        return "an http:// or https:// URL"
    return None


def loopback_listen(v):
    """`HOST:PORT` with HOST a loopback IP literal (the endpoint is unauthenticated: never on a public
    interface). A host name is refused, even `localhost` or one starting with `127.`: what it resolves to is
    not this file's to say."""
    import ipaddress

    host, sep, port = v.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # an IPv6 address without brackets: where it ends and the port begins is ambiguous
        host = ""
    try:
        ok_host = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok_host = False
    if not sep or not ok_host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return ('"HOST:PORT" with HOST a loopback IP address (127.0.0.1 or another 127.x.y.z, or [::1]; '
                'not a host name), e.g. "127.0.0.1:9108"')
    return None
