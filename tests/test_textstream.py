"""Stop strings held back across token boundaries, and UTF-8 split across tokens."""

from __future__ import annotations

from server.engine.textstream import StopTextStream


def run(stops: list[str], pieces: list[bytes]) -> tuple[list[str], bool]:
    stream = StopTextStream(stops)
    out = [stream.feed(p) for p in pieces]
    out.append(stream.flush())
    return [o for o in out if o], stream.stopped


def test_stop_split_across_pieces_never_leaks() -> None:
    out, stopped = run(["###"], [b"Hello #", b"#", b"# more"])
    assert "".join(out) == "Hello " and stopped


def test_partial_stop_that_does_not_complete_is_released() -> None:
    out, stopped = run(["###"], [b"a #", b"# b"])
    assert out == ["a ", "## b"] and not stopped


def test_held_back_prefix_flushed_at_end() -> None:
    out, stopped = run(["<end>"], [b"x <en"])
    assert out == ["x ", "<en"] and not stopped


def test_earliest_of_several_stops_wins() -> None:
    out, _ = run(["b", "abc"], [b"xxabc"])
    assert out == ["xx"]  # "abc" starts before "b"


def test_multibyte_character_split_across_pieces() -> None:
    data = "日本😀".encode()
    pieces = [data[i:i + 1] for i in range(len(data))]
    out, _ = run([], pieces)
    assert "".join(out) == "日本😀"
    assert all("\ufffd" not in piece for piece in out)
    assert out == ["日", "本", "😀"]


def test_unfinished_character_at_the_end_is_dropped() -> None:
    out, _ = run([], [b"ok", "😀".encode()[:2]])
    assert out == ["ok"]
