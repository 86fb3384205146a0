"""Downloading a manifest's image URLs (`dalle build-shards` from a CSV of URLs): http(s) only, a deadline per
attempt covering the whole download, bounded retries with exponential back-off on transient failures
(timeouts, connection errors, 408/425/429/5xx), and a size cap. Every failure is a `Rejected` with a reason
code, which build-shards counts and reports; it never stops the build.
"""
from __future__ import annotations

import http.client
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from dallecli.data.images import Rejected

USER_AGENT = "dallecli-build-shards/0.1 (+https://github.com/; image-caption dataset builder)"
_RETRY_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class FetchConfig:
    timeout: float = 10.0        # seconds per attempt (connect + whole download)
    retries: int = 2             # extra attempts after a timeout, connection error, 429 or 5xx
    backoff: float = 0.5         # seconds before retry k: backoff · 2^(k-1)
    max_bytes: int = 64 << 20    # larger downloads are rejected
    threads: int = 16            # concurrent downloads per worker


def is_url(text: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text) is not None


def fetch_url(url: str, config: FetchConfig) -> bytes:
    """GET an http(s) URL with a per-attempt deadline and bounded retries on transient failures."""
    if not url.lower().startswith(("http://", "https://")):
        raise Rejected("url-bad-scheme", f"only http and https URLs are fetched: {url[:200]}")
    failure = Rejected("url-error", url)
    for attempt in range(config.retries + 1):
        if attempt:
            time.sleep(config.backoff * 2 ** (attempt - 1))
        try:
            return _fetch_once(url, config)
        except urllib.error.HTTPError as exc:
            failure = Rejected(f"url-http-{exc.code}", f"HTTP {exc.code} {exc.reason} from {url[:200]}")
            if exc.code not in _RETRY_HTTP:
                break
        except TimeoutError:
            failure = Rejected("url-timeout", f"no complete answer within {config.timeout:g} s "
                                              f"({attempt + 1} tries): {url[:200]}")
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                failure = Rejected("url-timeout", f"no answer within {config.timeout:g} s "
                                                  f"({attempt + 1} tries): {url[:200]}")
            else:
                failure = Rejected("url-unreachable", f"{reason} ({attempt + 1} tries): {url[:200]}")
    raise failure


def _fetch_once(url: str, config: FetchConfig) -> bytes:
    deadline = time.monotonic() + config.timeout
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    chunks, size = [], 0
    with urllib.request.urlopen(request, timeout=config.timeout) as response:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(url)
            chunk = response.read(1 << 16)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > config.max_bytes:
                raise Rejected("url-too-large", f"more than {config.max_bytes:,} bytes: {url[:200]}")
            chunks.append(chunk)
