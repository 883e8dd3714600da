"""The errors a user can fix, with messages that say how, and the redaction of secrets; imports nothing.

Every class derives from :class:`UserError`, so a command line can catch them all, print the message and
exit 2 without a traceback. :func:`redact` strips passwords and API keys from anything shown or saved.
"""

from __future__ import annotations

import difflib
import os
import re


class UserError(Exception):
    """A mistake in what the user gave (config, file, checkpoint, URL); the message says how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration mistake, with a message that says how to fix it."""


class ImageError(UserError, ValueError):
    """A bad image file; the message names the file."""


class CheckpointError(UserError, RuntimeError):
    """A missing, truncated, foreign or unsafe checkpoint; the message names the file."""


class ExportError(UserError, ValueError):
    """A run that cannot be exported, or an export folder that cannot be loaded; the message says why."""


def suggest(word, choices) -> str:
    """`` Did you mean 'x'?`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name, valid) -> ConfigError:
    """Build the error for an unknown key or name, listing the valid ones."""
    valid = sorted(str(c) for c in valid)
    return ConfigError(f"unknown {kind} '{name}'.{suggest(name, valid)} Valid: {', '.join(valid)}")


_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^:/@\s]*):(?P<secret>[^\s/]*)@")
_KEY_VALUE = re.compile(r"(?i)(?<![/\\.])\b(?P<head>[\w-]*(?:api[_-]?key|token|secret|password|passwd)[\w-]*['\"]?"
                        r"\s*[=:]\s*['\"]?)(?P<secret>[^\s'\",;&}]+)")
MIN_SECRET = 8  # characters: shorter values of secret-looking variables are left alone
_SECRET_ENV = re.compile(r"(?i)(api_?key|token|secret|password|passwd)")


def redact(text) -> str:
    """`text` with secrets replaced by ``***``.

    Covers URL passwords (``scheme://user:***@host``), ``api_key=...``-style
    values and the values of secret-looking environment variables (``*API_KEY*``, ``*TOKEN*``, ``*SECRET*``,
    ``*PASSWORD*``).
    """
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:***@", str(text))
    text = _KEY_VALUE.sub(lambda m: f"{m['head']}***", text)
    for key, value in os.environ.items():
        # whole tokens only, and long enough to be a secret: a variable whose value is a word ("cannot")
        # must not blank that word out of every message
        if len(value) >= MIN_SECRET and _SECRET_ENV.search(key) and value in text:
            text = re.sub(rf"(?<![\w-]){re.escape(value)}(?![\w-])", "***", text)
    return text


def redact_obj(obj):
    """:func:`redact` applied to every string (keys included) inside nested dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return redact(obj) if isinstance(obj, str) else obj
