"""
Tests for L{txlb.config._tomlpos}: the line of every key path.

The property test generates small documents (tables, arrays of tables and
their sub-tables, dotted keys, inline tables, arrays over several lines,
multi-line strings, comments), writes them with a writer that notes where
each key path goes, and checks that L{keyLines} finds exactly those lines.
L{tomllib} reading the same text back to the generated data proves the
writer wrote what it meant to.
"""

from __future__ import annotations

import datetime
import tomllib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from txlb.config._tomlpos import keyLines, lineOf


def test_tables_keys_and_arrays():
    text = (
        "# a comment\n"
        "[txlb]\n"
        'shutdown_timeout = "30s"\n'
        "\n"
        "[pools.api]\n"
        "servers = [\n"
        '  { name = "s1", address = "127.0.0.1:9001" },\n'
        '  { name = "s2",\n'
        '    address = "127.0.0.1:9002" },\n'
        "]\n"
    )
    assert keyLines(text) == {
        "txlb": 2,
        "txlb.shutdown_timeout": 3,
        "pools": 5,
        "pools.api": 5,
        "pools.api.servers": 6,
        "pools.api.servers[0]": 7,
        "pools.api.servers[0].name": 7,
        "pools.api.servers[0].address": 7,
        "pools.api.servers[1]": 8,
        "pools.api.servers[1].name": 8,
        "pools.api.servers[1].address": 9,
    }


def test_arrays_of_tables_and_their_sub_tables():
    text = (
        "[[services]]\n"
        'name = "a"\n'
        "[services.timeouts]\n"
        'idle = "1s"\n'
        "[[services.routes]]\n"
        'pool = "x"\n'
        "[[services.routes]]\n"
        'pool = "y"\n'
        "[[services]]\n"
        'name = "b"\n'
        "[[services.routes]]\n"
        'pool = "z"\n'
    )
    lines = keyLines(text)
    assert lines["services[0].timeouts.idle"] == 4
    assert lines["services[0].routes[1].pool"] == 8
    assert lines["services[1]"] == 9
    # A nested array starts again at 0 under each element of its parent.
    assert lines["services[1].routes[0].pool"] == 12
    assert "services[1].routes[2]" not in lines and "services[0].routes[2]" not in lines


def test_table_under_a_nested_array_of_tables_follows_its_last_element():
    text = (
        "[[services]]\n"
        "[[services.routes]]\n"
        "[[services.routes]]\n"
        "[services.routes.headers]\n"
        '"X-Tenant" = "blue"\n'
    )
    assert keyLines(text)["services[0].routes[1].headers.X-Tenant"] == 5


def test_quoted_keys_are_decoded_like_tomllib():
    text = '[pools."my.pool"]\n"a\\u0062c" = 1\n\'lit\' = 2\n'
    lines = keyLines(text)
    assert tomllib.loads(text) == {"pools": {"my.pool": {"abc": 1, "lit": 2}}}
    assert lines["pools.my.pool.abc"] == 2
    assert lines["pools.my.pool.lit"] == 3


def test_multi_line_strings_count_their_lines():
    text = 'a = """\none\ntwo"""\nb = \'\'\'x\ny\'\'\'\nc = "d \\" # not a comment"\nd = 1\n'
    assert keyLines(text) == {"a": 1, "b": 4, "c": 6, "d": 7}


def test_scalars_that_the_scanner_splits():
    text = "a = 1.5\nb = 1979-05-27 07:32:00Z\nc = -2e+3\nd = [1.5, 2.5]\ne = 1\n"
    assert keyLines(text) == {"a": 1, "b": 2, "c": 3, "d": 4, "d[0]": 4, "d[1]": 4, "e": 5}


def test_punctuation_inside_strings_is_not_structure():
    text = 'a = "[x] = {y}, #z"\n[t]\nb = \'[[u]]\'\n'
    assert keyLines(text) == {"a": 1, "t": 2, "t.b": 3}


def test_crlf_line_endings():
    assert keyLines("a = 1\r\n[t]\r\nb = 2\r\n") == {"a": 1, "t": 2, "t.b": 3}


def test_never_raises_on_any_text():
    for text in ["[", "[[a", "a = {", "a = [1,", "= 1", "a.", '"', "[a]]\n]", "a = }"]:
        assert isinstance(keyLines(text), dict)


def test_lineOf_falls_back_to_the_nearest_ancestor():
    lines = {"pools": 1, "pools.api": 2, "pools.api.servers[0]": 4}
    assert lineOf(lines, "pools.api.servers[0].name") == 4
    assert lineOf(lines, "pools.api.servers[1].name") == 2
    assert lineOf(lines, "pools.db.retries") == 1
    assert lineOf(lines, "services[0].name") is None
    assert lineOf(lines, "") is None


# The generated documents.

_KEY = st.sampled_from(["a", "b", "name", "pool", "x-y", "k_1", "9", "with space", "ünï", "q\"t"])


def _quote(key: str) -> str:
    if key.replace("-", "").replace("_", "").isascii() and key.replace("-", "").replace("_", "").isalnum():
        return key
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def _scalar(draw) -> tuple[Any, str]:
    """C{(value, toml)}; the TOML text may span lines (multi-line strings)."""
    kind = draw(st.sampled_from(["int", "float", "bool", "str", "lit", "multi", "date"]))
    if kind == "int":
        n = draw(st.integers(-10**6, 10**6))
        return n, str(n)
    if kind == "float":
        x = draw(st.sampled_from([1.5, -2e3, 0.25, 3e-2]))
        return x, repr(x)
    if kind == "bool":
        b = draw(st.booleans())
        return b, "true" if b else "false"
    if kind == "date":
        return (
            datetime.datetime(1979, 5, 27, 7, 32, tzinfo=datetime.timezone.utc),
            draw(st.sampled_from(["1979-05-27T07:32:00Z", "1979-05-27 07:32:00Z"])),
        )
    text = draw(st.text(st.sampled_from("ab #=[]{},.:'\"\\\n"), max_size=8))
    if kind == "lit" and not any(c in text for c in "'\n"):
        return text, f"'{text}'"
    if kind == "multi":
        # A real newline after the opening quotes is dropped by TOML.
        body = text.replace("\\", "\\\\").replace('"', '\\"')
        return "x\n" + text, f'"""\nx\n{body}"""'
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return text, f'"{escaped}"'


_LEAF = _scalar()
_TREE = st.recursive(
    _LEAF.map(lambda v: ("scalar", v)),
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(lambda items: ("array", items)),
        st.dictionaries(_KEY, children, max_size=3).map(lambda d: ("table", d)),
        st.lists(st.dictionaries(_KEY, children, max_size=3), min_size=1, max_size=3).map(
            lambda items: ("tables", items)
        ),
    ),
    max_leaves=12,
)
_DOC = st.dictionaries(_KEY, _TREE, max_size=4)


class _Writer:
    """
    Writes a generated tree as TOML, choosing a style for each part with
    C{draw}, and notes the line of each key path: where it or anything
    under it is first written.
    """

    def __init__(self, draw) -> None:
        self.draw = draw
        self.out: list[str] = []
        self.expected: dict[str, int] = {}

    @property
    def line(self) -> int:
        return len(self.out) + 1

    def note(self, path: str, line: int) -> None:
        """C{path} and its ancestors are first written on C{line}, if not before."""
        while path:
            self.expected.setdefault(path, line)
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""

    def emit(self, lines: list[str]) -> None:
        self.out.extend(lines)

    def noise(self) -> None:
        if self.draw(st.integers(0, 5)) == 0:
            self.out.append(self.draw(st.sampled_from(["", "# comment", "   ", "# [not] = a {table}"])))

    def value(self, node, path: str, value: list[str]) -> Any:
        """
        Append the TOML of an inline value (scalar, array, inline table) to
        C{value}, the lines being built (the last one unfinished), and
        return the Python value L{tomllib} will read.
        """
        here = self.line + len(value) - 1
        self.note(path, here)
        kind, data = node
        if kind == "scalar":
            python, text = data
            first, *rest = text.split("\n")
            value[-1] += first
            value.extend(rest)
            return python
        if kind == "tables":  # an array of inline tables
            kind, data = "array", [("table", item) for item in data]
        if kind == "array":
            multi = self.draw(st.booleans())
            value[-1] += "["
            items = []
            for i, item in enumerate(data):
                if multi:
                    value.append("  ")
                elif i:
                    value[-1] += ", "
                items.append(self.value(item, f"{path}[{i}]", value))
                if multi:
                    value[-1] += "," + (" # c" if self.draw(st.booleans()) else "")
            if multi:
                value.append("")
            value[-1] += "]"
            return items
        value[-1] += "{ "
        table = {}
        for i, (key, child) in enumerate(data.items()):
            if i:
                value[-1] += ", "
            self.note(f"{path}.{key}", self.line + len(value) - 1)
            value[-1] += f"{_quote(key)} = "
            table[key] = self.value(child, f"{path}.{key}", value)
        value[-1] += " }"
        return table

    def keyValue(self, keys: list[str], node, path: str) -> Any:
        """C{key = value} or C{a.b.key = value}; C{path} is the full one."""
        value = [".".join(map(_quote, keys)) + " = "]
        python = self.value(node, path, value)
        self.emit(value)
        self.noise()
        return python

    def body(self, data: dict, header: str, path: str, double: bool) -> dict:
        """
        A table: its header when it needs one, key/value lines (dotted for
        some sub-tables), then sub-tables and arrays of tables as sections
        of their own.  A table holding only sections may leave its header
        out; TOML defines it implicitly.
        """
        styles = {}
        for key, node in data.items():
            kind = node[0]
            if kind in ("table", "tables") and self.draw(st.booleans()):
                styles[key] = "section"
            elif kind == "table" and node[1] and self.draw(st.booleans()):
                styles[key] = "dotted"
            else:
                styles[key] = "inline"
        if header and (double or not data or "section" not in styles.values() or any(
            style != "section" for style in styles.values()
        ) or self.draw(st.booleans())):
            self.note(path, self.line)
            self.emit([f"[[{header}]]" if double else f"[{header}]"])
        out: dict = {}
        for key, node in data.items():
            keyPath = f"{path}.{key}" if path else key
            if styles[key] == "dotted":
                out[key] = self.dotted([key], node[1], keyPath)
            elif styles[key] == "inline":
                out[key] = self.keyValue([key], node, keyPath)
        for key, node in data.items():
            if styles[key] != "section":
                continue
            kind, child = node
            childHeader = f"{header}.{_quote(key)}" if header else _quote(key)
            childPath = f"{path}.{key}" if path else key
            if kind == "table":
                out[key] = self.body(child, childHeader, childPath, False)
            else:
                out[key] = [
                    self.body(item, childHeader, f"{childPath}[{i}]", True)
                    for i, item in enumerate(child)
                ]
        return out

    def dotted(self, keys: list[str], data: dict, path: str) -> dict:
        """C{a.b.c = 1} lines for a table written without a header."""
        out: dict = {}
        for key, node in data.items():
            if node[0] == "table" and node[1]:
                out[key] = self.dotted(keys + [key], node[1], f"{path}.{key}")
            else:
                out[key] = self.keyValue(keys + [key], node, f"{path}.{key}")
        return out


@st.composite
def _documents(draw) -> tuple[str, dict, dict[str, int]]:
    writer = _Writer(draw)
    data = writer.body(draw(_DOC), "", "", False)
    return "\n".join(writer.out) + "\n", data, writer.expected


@settings(max_examples=300, deadline=None)
@given(_documents())
def test_every_key_path_gets_the_line_it_was_written_on(document):
    text, data, expected = document
    assert tomllib.loads(text) == data, text
    assert keyLines(text) == expected, text
