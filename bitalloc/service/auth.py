"""API tokens: random secrets handed out once, stored as their sha256.

A token is 32 random bytes, so a plain (unsalted) sha256 cannot be reversed or guessed and
lets a request find its token by an indexed equality lookup; a slow password hash would
only add latency to every request.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from bitalloc.service.models import TokenRecord, utcnow

PREFIX = "bat_"


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, name: str) -> tuple[TokenRecord, str]:
    """A new token row and its secret (the only time the secret exists in clear)."""
    if not name.strip():
        raise ValueError("name: a token needs a name")
    secret = PREFIX + secrets.token_urlsafe(32)
    token = TokenRecord(name=name.strip(), token_hash=hash_token(secret), prefix=secret[:10])
    session.add(token)
    session.flush()
    return token, secret


def find_token(session: Session, secret: str) -> TokenRecord | None:
    """The live token with this secret, or None (unknown or revoked)."""
    token = session.scalar(select(TokenRecord).where(TokenRecord.token_hash == hash_token(secret)))
    return token if token is not None and token.revoked_at is None else None


def revoke_tokens(session: Session, name: str) -> int:
    """Revoke every live token with this name; returns how many."""
    tokens = session.scalars(select(TokenRecord).where(TokenRecord.name == name, TokenRecord.revoked_at.is_(None))).all()
    for token in tokens:
        token.revoked_at = utcnow()
    return len(tokens)
