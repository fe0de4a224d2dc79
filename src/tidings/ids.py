"""Message ids: what one may be, and a fresh one.

The server's frame validation and the Python client must agree on both, and
the client imports this without the server's modules (pydantic among them).
"""

from __future__ import annotations

import re
import secrets

ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The same rule as a JSON Schema pattern, for docs/asyncapi.yaml.
ID_PATTERN = f"^{ID.pattern}$"
ID_RULE = "1-64 characters of A-Z, a-z, 0-9, '_' or '-'"


def new_id() -> str:
    """A fresh message id: 22 URL-safe characters, inside the alphabet above."""
    return secrets.token_urlsafe(16)
