from __future__ import annotations

import json

import pytest

from shardwise.data.loaders import load_text
from shardwise.errors import DataError


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _error(**kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_text(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_text_file_is_read_as_bytes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("héllo\nworld\n".encode())
    assert load_text(str(path)) == "héllo\nworld\n".encode()


def test_text_file_is_capped_at_max_bytes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("x" * 100)
    assert load_text(str(path), max_bytes=10) == b"x" * 10


def test_jsonl_documents_are_joined_with_newlines(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "id": 1}, {"text": "two"}])
    with open(path, "a") as file:
        file.write("\n")  # blank lines are skipped
    assert load_text(str(path)) == b"one\ntwo\n"
    other = _write_jsonl(tmp_path / "b.jsonl", [{"body": "x"}])
    assert load_text(str(other), jsonl_field="body") == b"x\n"


def test_jsonl_reading_stops_at_max_bytes(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "abcd"}] * 3 + [{"oops": 1}])
    assert load_text(str(path), max_bytes=7) == b"abcd\nab"


def test_explicit_format_overrides_the_extension(tmp_path):
    path = _write_jsonl(tmp_path / "a.txt", [{"text": "doc"}])
    assert load_text(str(path), format="jsonl") == b"doc\n"
    assert load_text(str(path), format="text") == b'{"text": "doc"}\n'


def test_directory_reads_txt_and_jsonl_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.jsonl").write_text('{"text": "ay"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_text(str(tmp_path)) == b"ay\nbee\nsea\n"


def test_missing_path():
    assert _error(path="x.txt") == "data.path='x.txt' does not exist"


def test_path_not_set():
    assert "data.path is not set" in _error(path=None)


def test_empty_file(tmp_path):
    path = tmp_path / "e.txt"
    path.write_text("")
    assert _error(path=str(path)) == f"data.path={str(path)!r} is empty"


def test_directory_of_empty_files(tmp_path):
    (tmp_path / "e.txt").write_text("")
    assert "only empty" in _error(path=str(tmp_path))


def test_directory_without_data_files(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    assert "no .txt or .jsonl files" in _error(path=str(tmp_path))


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    message = _error(path=str(path))
    assert message.startswith(f"data file {str(path)!r} line 2 is not valid JSON")


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["text"]\n')
    assert "line 1 is a JSON list, not an object" in _error(path=str(path))


def test_missing_field_lists_the_fields(tmp_path):
    path = _write_jsonl(tmp_path / "f.jsonl", [{"text": "ok"}, {"a": 1, "b": "x"}])
    message = _error(path=str(path))
    assert "line 2 has no field 'text'; fields: a, b" in message


def test_field_that_is_not_a_string(tmp_path):
    path = _write_jsonl(tmp_path / "n.jsonl", [{"text": 3}])
    assert "field 'text' is a int, not a string" in _error(path=str(path))
