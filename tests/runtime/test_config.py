"""runtime.config: the rules every app's typed config holds its values to, and their messages."""

import pytest

from runtime.config import (DEVICE, FLAG, NULL, as_whole, check_values, integer, list_of, number, one_of, show, text,
                            unknown_key)


class BadValue(Exception):
    pass


@pytest.mark.parametrize(("rule", "good", "bad", "words"), [
    (integer(1), [1, 10**9], [0, -1, 1.0, 2.5, True, "3", None], "an integer >= 1"),
    (integer(0, 9), [0, 9], [-1, 10], "an integer in 0..9"),
    (number(0, lo_open=True), [1e-9, 3, 2.5], [0, -1, float("inf"), float("nan"), False, "1"], "a number > 0"),
    (number(0, 1, hi_open=True), [0, 0.5], [1, 1.5, -0.1], "a number in [0, 1)"),
    (number(0, 1, lo_open=True, hi_open=True), [0.5], [0, 1], "a number in (0, 1)"),
    (one_of("float32", "bfloat16"), ["float32"], ["float16", 32, None], "one of float32, bfloat16"),
    (one_of("auto") | integer(0), ["auto", 0, 5], ["Auto", -1, 1.5], "auto or an integer >= 0"),
    (integer(1) | NULL, [None, 3], [0, "null"], "an integer >= 1 or null"),
    (FLAG, [True, False], [1, 0, "true", None], "true or false"),
    (text(), ["x"], ["", "  ", 3, None], "a non-empty string"),
    (list_of(number(0, 1, hi_open=True), "a pair", length=2), [[0.9, 0.999], [0, 0]], [[2, 3], [0.9], 0.9, None],
     "a pair"),
    (DEVICE, ["auto", "cpu", "cuda", "cuda:3", "mps"], ["tpu9", "cuda:", "cuda:x", "CPU", "", 0], DEVICE.allowed),
])
def test_rules_accept_and_refuse(rule, good, bad, words):
    assert rule.allowed == words
    assert all(rule.ok(v) for v in good), [v for v in good if not rule.ok(v)]
    assert not any(rule.ok(v) for v in bad), [v for v in bad if rule.ok(v)]


def test_check_values_names_the_key_the_value_and_what_is_allowed():
    rules = {"a.width": integer(1), "a.k": integer(1), "lr": number(0, lo_open=True) | NULL, "on": FLAG}
    check_values({"a": {"width": 8, "k": 2}, "lr": None, "on": True}, rules, BadValue)
    for raw, message in [
        ({"a": {"width": 0, "k": 2}, "lr": None, "on": True}, "a.width must be an integer >= 1, got 0"),
        ({"a": {"width": 8, "k": 2}, "lr": "fast", "on": True}, "lr must be a number > 0 or null, got 'fast'"),
        ({"a": {"width": 8, "k": 2}, "lr": None, "on": "yes"}, "on must be true or false, got 'yes'"),
        ({"a": {"widht": 8, "k": 2}, "lr": None, "on": True}, "unknown key 'a.widht'; did you mean 'a.width'?"),
        ({"a": {"width": 8}, "lr": None, "on": True}, "missing config key(s): a.k"),
    ]:
        with pytest.raises(BadValue) as e:
            check_values(raw, rules, BadValue)
        assert str(e.value) == message


def test_unknown_keys_show_and_whole_numbers():
    assert unknown_key("zzz", ["lr", "seed"], "conf/x.yaml") == "unknown key 'zzz' (every key is documented in conf/x.yaml)"
    assert [show(v) for v in (None, True, "a", [1, None], 2.5)] == ["null", "true", "'a'", "[1, null]", "2.5"]
    raw = {"tokens": 5e6, "data": {"n": 2.0, "frac": 0.5}, "x": 1.5}
    as_whole(raw, "tokens", "data.n", "data.frac", "x", "missing.key")
    assert raw == {"tokens": 5_000_000, "data": {"n": 2, "frac": 0.5}, "x": 1.5}
    assert isinstance(raw["tokens"], int)
