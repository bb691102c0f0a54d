"""Secrets kept out of every line cmce prints: a server's error message can echo the request's credentials
(an MLflow registry answering 401 with `bad credentials: Bearer <token>` had the token printed on stderr)."""

from __future__ import annotations

import base64
import binascii
import os
import re

# variables whose values are credentials, wherever they appear in a message
SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "DATABRICKS_TOKEN", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN")
# a value is hidden where it stands as a whole word: a shorter one, or one inside a longer word, is common text
# (LocalStack's key `test` hid `tests/latest/`); the header patterns below still apply to those
MIN_SECRET_CHARS = 8
# an HTTP credential as a header carries it: `Bearer <token>` or `Authorization: Token <token>` (a token of 8 or
# more characters with a digit or symbol: `Bearer authentication` and `max token 512` are prose), `Basic <base64 of
# user:password>`, and the signature or session token of an AWS request or pre-signed URL
_BEARER = re.compile(r"\b(Bearer|Authorization:\s*Token)(\s+)(?=[A-Za-z]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,}",
                     re.IGNORECASE)
_BASIC = re.compile(r"\b(Basic)(\s+)([A-Za-z0-9+/]+={0,2})", re.IGNORECASE)
_SIGNED = re.compile(r"\b(Signature|X-Amz-Signature|X-Amz-Security-Token|X-Amz-Credential)=[^\s&,;\"']+",
                     re.IGNORECASE)
HIDDEN = "***"
# a URL's user-info; not after models:// or runs://, where NAME@ALIAS is a registered model, not a user
# (to the last `@` before the host, as URL parsers read it: `bob:pa@ss@host` is user bob, password pa@ss)
_USERINFO = re.compile(r"(\b(?!(?:models|runs)://)[a-z][a-z0-9+.-]*://)[^/?#\s]*@", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace the user-info part of every URL in `text` (``scheme://user:secret@host`` → ``scheme://***@host``)."""
    return _USERINFO.sub(r"\1***@", text)


def conceal(text: str) -> str:
    """`text` with every credential it holds replaced by ***: the user-info of URLs, the values of SECRET_ENV
    (and MLflow's user:password as Basic sends it), bearer tokens, Basic credentials and AWS signatures."""
    text = redact(text)
    for secret in _secrets():
        text = re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", HIDDEN, text)
    text = _BEARER.sub(rf"\1\2{HIDDEN}", text)
    text = _BASIC.sub(lambda m: f"{m[1]}{m[2]}{HIDDEN}" if _is_basic_credential(m[3]) else m[0], text)
    return _SIGNED.sub(lambda m: f"{m[1]}={HIDDEN}", text)


def _secrets() -> list[str]:
    values = [os.environ.get(name, "") for name in SECRET_ENV]
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME", ""), os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user or password:
        values.append(base64.b64encode(f"{user}:{password}".encode()).decode())
    # longest first: a secret holding another is hidden whole
    return sorted({v for v in values if len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True)


def _is_basic_credential(token: str) -> bool:
    try:
        return b":" in base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return False
