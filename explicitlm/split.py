"""The one split by subject, shared by the pipeline and every benchmark: every fact of a subject
lands on the same side, so no held-out subject is ever trained on.
"""

from __future__ import annotations

import hashlib


def subject_side(subject: str, held_out: dict[str, float]) -> str:
    """Deterministic side of a subject: the held-out side (name -> share, in order) whose slice of
    the hash range it falls in, else "train"."""
    h = int(hashlib.sha256(subject.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    edge = 0.0
    for name, share in held_out.items():
        edge += share
        if h < edge:
            return name
    return "train"


def subject_split(subject: str, val_fraction: float) -> str:
    """ "val" for a val_fraction share of subjects, else "train"."""
    return subject_side(subject, {"val": val_fraction})
