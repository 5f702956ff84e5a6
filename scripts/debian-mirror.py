"""Print the Debian mirror this machine's apt uses for SUITE (default bookworm).

scripts/image-test.sh bootstraps its base image from it, so the build reaches the same
mirror apt does here (a proxy or a local mirror included) and names no host itself.
Reads /etc/apt/sources.list and /etc/apt/sources.list.d/*.list (one-line format) and
/etc/apt/sources.list.d/*.sources (deb822). Exit 1 with a message when no enabled
`deb` entry serves SUITE.

    python3 scripts/debian-mirror.py [--suite bookworm] [--root /]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path


def one_line_entries(text: str) -> Iterator[tuple[str, list[str]]]:
    """(uri, [suite]) of each `deb` line of the one-line format."""
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            yield words[0], [words[1]]


def deb822_entries(text: str) -> Iterator[tuple[str, list[str]]]:
    """(uri, suites) of each enabled `deb` stanza of the deb822 format."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            if line[0] in " \t" and key:  # a folded continuation line
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        for uri in fields.get("uris", "").split():
            yield uri, suites


def mirror(root: Path, suite: str) -> str | None:
    """The first enabled source that serves ``suite`` itself (not -security or -updates)."""
    apt = root / "etc/apt"
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    sources = sorted((apt / "sources.list.d").glob("*.sources"))
    for path in files + sources:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        entries = deb822_entries(text) if path.suffix == ".sources" else one_line_entries(text)
        for uri, suites in entries:
            if suite in suites and uri.startswith(("http://", "https://", "file:/")):
                return uri.rstrip("/")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="bookworm")
    parser.add_argument("--root", default="/", type=Path, help="read ROOT/etc/apt")
    args = parser.parse_args(argv)
    found = mirror(args.root, args.suite)
    if found is None:
        print(f"no enabled apt source for {args.suite} under {args.root / 'etc/apt'}: "
              "set DEBIAN_MIRROR", file=sys.stderr)
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
