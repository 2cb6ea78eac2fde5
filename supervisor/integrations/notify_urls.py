"""Where [notify]'s URLs come from, and what of them may be shown: URLs often carry tokens.

How it works: `load_urls(cfg)` reads `notify.urls` and `notify.webhook`, `urls_file` (one URL a line,
`webhook=URL` for the webhook; refused when others can read it or anyone else can write it) and systemd's
`LoadCredential=` ($CREDENTIALS_DIRECTORY/<credential>, same format), and returns the problems it found
instead of raising. Log lines only ever carry `redact(url)` (the scheme and, for http(s), host and port),
and error texts go through `scrub()`, which replaces each URL and each part of it that may be a token.
"""
from __future__ import annotations

import os
import re
import stat
import urllib.parse
from pathlib import Path


def redact(url: str) -> str:
    """What a log line may show of a URL: the scheme, and for http(s) the host and port."""
    try:
        p = urllib.parse.urlsplit(url)
        if p.scheme in ("http", "https") and p.hostname:
            port = f":{p.port}" if p.port else ""
            return f"{p.scheme}://{p.hostname}{port}/..."
    except ValueError:
        pass
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return f"{scheme}://..." if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,31}", scheme) else "<url>"


def _resolve(cfg, p: str) -> Path:
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else Path(cfg.path).parent / q


def _parse_lines(text: str, urls: list[str], hooks: list[str]) -> None:
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("webhook="):
            hooks.append(line[len("webhook="):].strip())
        else:
            urls.append(line)


def load_urls(cfg, env=None) -> tuple[list[str], list[str], list[str]]:
    """(apprise urls, webhook urls, problems) from the config, urls_file and the systemd credential."""
    env = os.environ if env is None else env
    n = cfg.notify
    urls, hooks, problems = list(n.urls), [n.webhook] if n.webhook else [], []
    if n.urls_file:
        path = _resolve(cfg, n.urls_file)
        try:
            st = path.stat()
            # group-readable is allowed (root:cardiacseg 0640); others reading, or others writing, is not
            if st.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
                problems.append(f"notify.urls_file {path}: refused, mode {stat.S_IMODE(st.st_mode):04o} lets "
                                f"others read or change it (it holds tokens): chmod 600 {path}")
            else:
                _parse_lines(path.read_text(), urls, hooks)
        except OSError as e:
            problems.append(f"notify.urls_file {path}: cannot read: {e.strerror or e}")
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        path = Path(creds) / n.credential
        try:
            _parse_lines(path.read_text(), urls, hooks)
        except FileNotFoundError:
            pass  # the credential is optional: a unit without LoadCredential= has none
        except OSError as e:
            problems.append(f"credential {n.credential}: cannot read: {e.strerror or e}")
    bad = [h for h in hooks if not h.startswith(("http://", "https://"))]
    problems += [f"webhook {redact(h)}: expected an http:// or https:// URL" for h in bad]
    return urls, [h for h in hooks if h not in bad], problems


def scrub(text: str, secrets: list[str]) -> str:
    """Replace each URL, and each part of it that may be a token, in an error text."""
    for s in secrets:
        text = text.replace(s, redact(s))
        rest = s.split("://", 1)[-1]
        userinfo = rest.split("/", 1)[0].rpartition("@")[0]
        parts = [rest, userinfo, *userinfo.split(":"), *re.split(r"[/?&=#@:]", rest)]
        for part in sorted({p for p in parts if len(p) >= 4 and not p.replace(".", "").isdigit()},
                           key=len, reverse=True):
            if part not in ("http", "https", "localhost"):
                text = text.replace(part, "***")
    return text
