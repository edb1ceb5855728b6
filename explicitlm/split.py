"""The one split by subject, shared by the pipeline and every benchmark: every fact of a subject
lands on the same side, so no validation subject is ever trained on.
"""

from __future__ import annotations

import hashlib


def subject_split(subject: str, val_fraction: float) -> str:
    """Deterministic split by subject: every fact of a subject lands on the same side."""
    h = int(hashlib.sha256(subject.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"
