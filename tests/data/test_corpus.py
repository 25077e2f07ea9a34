from __future__ import annotations

import re
import sysconfig
import time
from pathlib import Path

from shardwise.data.corpus import embedded_corpus, stdlib_source_paths

_HEADER = re.compile(rb"^# file: (.+)$", re.MULTILINE)
_EXCLUDED = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}


def test_corpus_is_deterministic():
    assert embedded_corpus(300_000) == embedded_corpus(300_000)


def test_corpus_is_capped_at_max_bytes():
    assert len(embedded_corpus(1)) == 1
    small = embedded_corpus(1000)
    assert len(small) == 1000
    assert small.startswith(b"# file: __future__.py\n")
    # A smaller cap is a prefix of a larger one: truncation, not a different selection.
    assert embedded_corpus(250_000).startswith(small)


def test_corpus_files_are_sorted_pure_library_sources():
    corpus = embedded_corpus(8_000_000)
    paths = [p.decode() for p in _HEADER.findall(corpus)]
    assert len(paths) > 100
    assert paths == sorted(paths)
    for path in paths:
        assert path.endswith(".py") and not path.startswith("/")
        assert not _EXCLUDED & set(path.split("/")), path


def test_source_list_leaves_out_build_specific_and_non_library_files():
    paths = stdlib_source_paths(Path(sysconfig.get_paths()["stdlib"]))
    assert paths == sorted(paths)
    assert "os.py" in paths and "json/__init__.py" in paths
    for path in paths:
        parts = path.split("/")
        assert not _EXCLUDED & set(parts), path
        assert not parts[0].startswith("config-") and "_sysconfigdata_" not in path


def test_default_size_loads_fast():
    start = time.perf_counter()
    corpus = embedded_corpus(8_000_000)
    elapsed = time.perf_counter() - start
    assert len(corpus) == 8_000_000
    assert elapsed < 1.0, f"8 MB corpus took {elapsed:.2f} s"
