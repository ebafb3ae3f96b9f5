"""Server paths never reach a client: a message that names a file (an upload's copy, a scratch
directory, the storage root) keeps only the file's name."""

from __future__ import annotations

import re

# An absolute (or ~/) path of at least one directory, not one of the API's own routes, and not
# inside a word or a URL (http://host/a/b: the slashes follow ":" , "/" or the host's letters).
_PATH = re.compile(r"(?<![\w.:/~-])~?/(?!v1/|ui/)(?:[^\s/'\"`:;,()\[\]{}<>]+/)+([^\s/'\"`:;,()\[\]{}<>]*)")


def without_paths(text: str) -> str:
    """`text` with every server path replaced by its last part (the file's name)."""
    return _PATH.sub(lambda match: match.group(1) or "…", text)
