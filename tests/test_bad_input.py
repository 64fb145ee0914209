"""Every bad override is one line naming where it is (issue 24 §2): generated overrides for every
config key (values of random types, out of range, unknown keys, unknown group options), checked
the way `alignbench run` checks them before anything runs. Each either validates or raises a bad-
input error whose message is one line starting at the key (or group) it names; never another
exception (a traceback)."""
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from omegaconf import OmegaConf

from alignbench.cli import _bad_input_types, check_inputs_first, compose, one_line
from alignbench.runner import validate

GROUPS = ("data", "model", "method", "train", "eval", "budget", "reward", "stages")


def _leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if OmegaConf.is_dict(value):
            yield from _leaves(value, path + ".")
        else:
            yield path


BASE = ["method=dpo"]  # a method with its own keys
KEYS = sorted(k for k in _leaves(compose(BASE)) if not k.startswith(("hydra", "paths")))

text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="'\"\\,[]{}=$"),
               min_size=1, max_size=8)
values = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(
    lambda f: "nan" if math.isnan(f) else ("inf" if f == math.inf else "-inf" if f == -math.inf else repr(f))),
    st.booleans().map(lambda b: str(b).lower()), st.just("null"), text.map(lambda t: f"'{t}'"),
    st.lists(st.integers(-3, 3), max_size=3).map(lambda xs: "[" + ",".join(map(str, xs)) + "]"))


def _check(overrides: list[str]) -> str | None:
    """None when the overrides validate; else the one-line message (an unexpected exception fails)."""
    try:
        check_inputs_first(overrides)  # composes every variant: an unknown key or option fails here
        validate(compose(overrides))
        return None
    except _bad_input_types() as e:
        return one_line(e, tuple(overrides))


def _is_one_line_at(message: str, names: list[str]) -> bool:
    return "\n" not in message and message.strip() == message and any(message.startswith(n) for n in names)


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(key=st.sampled_from(KEYS), value=values)
def test_any_value_for_any_key_validates_or_is_one_line_naming_the_key(key, value):
    message = _check(BASE + [f"{key}={value}"])
    assert message is None or _is_one_line_at(message, [key, key.split(".")[0]]), message


@SETTINGS
@given(key=st.sampled_from(KEYS), suffix=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6))
def test_an_unknown_key_is_one_line_with_the_closest_known_one(key, suffix):
    bad = f"{key}{suffix}"
    message = _check(BASE + [f"{bad}=1"])
    assert message is not None and _is_one_line_at(message, [bad, bad.split(".")[0]]), message
    assert "no such key" in message or "unknown key" in message, message


@SETTINGS
@given(group=st.sampled_from(GROUPS), option=st.one_of(st.sampled_from(["true", "null", "1", "1.5"]),
                                                      st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)))
def test_an_unknown_group_option_is_one_line_listing_the_valid_ones(group, option):
    message = _check([f"{group}={option}"] + ([] if group == "method" else BASE))
    if message is None:  # the option exists (e.g. method=dpo)
        return
    assert _is_one_line_at(message, [f"{group}={option}", group]), message


@pytest.mark.parametrize("override, expected", [
    ("method=nonexistent", "method=nonexistent: no such option; valid: chain, context_distilled, dpo,"),
    ("train.lrr=1", "train.lrr: no such key; did you mean train.lr?"),
    ("method.betaa=1", "method.betaa: no such key; did you mean method.beta?"),
    ("train.lr=abc", "train.lr: Value 'abc' of type 'str' could not be converted to Float"),
    ("method.beta=x", "method.beta: Value 'x' of type 'str' could not be converted to Float (method dpo)"),
])
def test_known_answers(override, expected):
    overrides = ([override] if override.startswith("method=") else BASE + [override])
    assert _check(overrides).startswith(expected)
