"""Build the multi-domain text corpus the simcache sample models are trained on.

Every text comes from Debian packages (bookworm); nothing is fetched from a model hub:

| domain  | packages |
|---------|----------|
| code    | libpython3.11-stdlib (.py), golang-1.19-src (.go) |
| english | jargon-text, debian-reference-en (HTML), fortunes, manpages (English man pages) |
| poetry  | fortunes-zh (classical Chinese poetry: tang300 and song100) |
| latex   | pari-doc (the PARI/GP manuals in TeX) |
| german  | debian-reference-de, manpages-de |
| french  | debian-reference-fr, manpages-fr |

(Of docs/design.md §9's list, bible-kjv-text stores its text in a binary format of its own, and
linux-libc-dev had no downloadable version matching the archive when this was built; neither is
used.) Documents are split by file; within each domain the files are shuffled with a fixed seed,
about 8 % of them are held out for capture, and the training part is capped so that no domain
dominates. Output: ``OUT/<domain>.train.txt`` and ``OUT/<domain>.heldout.txt`` (UTF-8), and
``OUT/manifest.json`` with sizes and sources.

    mkdir -p /tmp/deb && cd /tmp/deb && apt-get download <packages above>
    python recipes/corpus.py /tmp/deb .carry/corpus
"""

from __future__ import annotations

import gzip
import html
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = {
    "code": ["libpython3.11-stdlib", "golang-1.19-src"],
    "english": ["jargon-text", "debian-reference-en", "fortunes", "manpages"],
    "poetry": ["fortunes-zh"],
    "latex": ["pari-doc"],
    "german": ["debian-reference-de", "manpages-de"],
    "french": ["debian-reference-fr", "manpages-fr"],
}
TRAIN_CAP = 6_000_000  # characters of training text per domain
HELDOUT_SHARE = 0.08
HELDOUT_CAP = 120_000  # characters held out per domain (about 250k tokens in all)
SEED = 0

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TAG = re.compile(r"<[^>]+>")
ROFF = re.compile(r"^\.\S+\s?|\\f[BIRP]|\\\(..|\\[-&e]", re.M)


def extract(deb: Path, into: Path):
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)


def read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def documents(domain: str, root: Path):
    """(name, text) documents of one domain from the extracted packages under ``root``."""
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.is_symlink():
            continue
        name, suffix = f.name, f.suffix
        if "/usr/share/doc/" in str(f) and domain not in ("english", "german", "french"):
            continue  # copyright files and changelogs
        text = None
        if domain == "code" and suffix in (".py", ".go", ".h"):
            text = read(f)
        elif domain == "poetry" and name in ("tang300", "song100"):  # "chinese" is modern prose
            text = ANSI.sub("", read(f)).replace("\n%\n", "\n\n")
        elif domain == "latex" and suffix == ".tex":
            text = read(f)
        elif domain in ("english", "german", "french"):
            if suffix == ".html" or name.endswith(".html.gz"):
                text = html.unescape(TAG.sub(" ", read(f)))
                text = re.sub(r"[ \t]+", " ", text)
                text = re.sub(r"\n\s*\n+", "\n\n", text)
            elif "/man/" in str(f) and name.endswith(".gz"):
                text = ROFF.sub("", read(f))
            elif name == "jargon.txt.gz" or ("/fortunes/" in str(f) and suffix == "" and domain == "english"):
                text = read(f)
        if text and len(text.strip()) > 200:
            yield str(f.relative_to(root)), text


def main(deb_dir: str, out_dir: str):
    deb_dir, out = Path(deb_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for domain, packages in PACKAGES.items():
        with tempfile.TemporaryDirectory() as tmp:
            for pkg in packages:
                debs = sorted(deb_dir.glob(f"{pkg}_*.deb"))
                if not debs:
                    sys.exit(f"missing {pkg}_*.deb in {deb_dir} (apt-get download {pkg})")
                extract(debs[-1], Path(tmp))
            docs = list(documents(domain, Path(tmp)))
        random.Random(SEED).shuffle(docs)
        n_held = max(1, round(HELDOUT_SHARE * len(docs)))
        held, train = docs[:n_held], docs[n_held:]
        if domain == "poetry":  # one small package: hold out the tail of each file instead
            held, train = [], []
            for name, text in docs:
                cut = int(len(text) * (1 - 2 * HELDOUT_SHARE))
                train.append((name, text[:cut]))
                held.append((name, text[cut:]))

        def join(parts, cap):
            buf, size = [], 0
            for _, text in parts:
                if size >= cap:
                    break
                buf.append(text[: cap - size])
                size += len(buf[-1])
            return "\n\n".join(buf)

        train_text, held_text = join(train, TRAIN_CAP), join(held, HELDOUT_CAP)
        (out / f"{domain}.train.txt").write_text(train_text)
        (out / f"{domain}.heldout.txt").write_text(held_text)
        manifest[domain] = {"packages": packages, "documents": len(docs), "train_chars": len(train_text),
                            "heldout_chars": len(held_text)}
        print(f"{domain:8} {len(docs):5} documents, train {len(train_text):>9,} chars, "
              f"held out {len(held_text):>8,} chars")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
