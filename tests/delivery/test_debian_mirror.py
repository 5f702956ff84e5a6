"""scripts/debian-mirror.py: image-test.sh's Debian mirror comes from the machine's apt
sources (one-line .list files and deb822 .sources), never from a host named in the repo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

SCRIPT = ROOT / "scripts/debian-mirror.py"


def mirror(root: Path, suite: str = "bookworm") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), "--suite", suite],
                          capture_output=True, text=True, timeout=30, check=False)


def apt(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "etc/apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_deb822_sources_skip_security_disabled_and_deb_src(tmp_path):
    root = apt(tmp_path, {"sources.list.d/debian.sources": """\
Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://off.example/debian
Suites: bookworm
Components: main

Types: deb
# a comment line
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
""", "sources.list.d/other.sources.disabled": "Types: deb\nURIs: http://x/\nSuites: bookworm\n"})
    done = mirror(root)
    assert (done.returncode, done.stdout) == (0, "http://mirror.example/debian\n")


def test_one_line_list_with_options_comes_first(tmp_path):
    root = apt(tmp_path, {
        "sources.list": "# deb http://commented.example/debian bookworm main\n"
                        "deb-src http://src.example/debian bookworm main\n",
        "sources.list.d/local.list":
            "deb [arch=amd64 signed-by=/k.gpg] https://local.example/debian bookworm main\n",
        "sources.list.d/z.sources": "Types: deb\nURIs: http://later.example/debian\n"
                                    "Suites: bookworm\n",
    })
    done = mirror(root)
    assert (done.returncode, done.stdout) == (0, "https://local.example/debian\n")


def test_no_source_for_the_suite_fails_naming_the_override(tmp_path):
    root = apt(tmp_path, {"sources.list": "deb http://mirror.example/debian trixie main\n"})
    done = mirror(root)
    assert done.returncode == 1 and done.stdout == ""
    assert "DEBIAN_MIRROR" in done.stderr
    assert mirror(tmp_path / "empty").returncode == 1  # no apt directory at all
