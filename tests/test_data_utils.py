"""textbrewer/data_utils.py: TextBrewer 0.2.1's augmentations, same draws, same results.

Each function is checked against the rule of 0.2.1 written out here by hand, fed with
numbers drawn from a ``RandomState`` seeded like the global one: same output, and the
global state left exactly where the reference left its own (same number of draws).

With ``TEXTBREWER_POST1_SRC`` (or ``TEXTBREWER021_SRC``) pointing at the original's
``src/textbrewer`` folder, the original functions are also run for many seeds and compared
output for output.
"""
import doctest
import importlib.util
import os

import numpy as np
import pytest

from textbrewer import data_utils
from textbrewer.data_utils import deleting, long_disorder, masking, n_gram_sampling, short_disorder

TOKENS = list("abcdefghijklmnopqrstuvwxyz")
# the files read here are the same in 0.2.1.post1 (the reference) and 0.2.1
ORIGINAL_SRC = os.environ.get("TEXTBREWER_POST1_SRC") or os.environ.get("TEXTBREWER021_SRC")


def _assert_same_state(state_a, state_b):
    name_a, keys_a, pos_a, gauss_a, cached_a = state_a
    name_b, keys_b, pos_b, gauss_b, cached_b = state_b
    assert (name_a, pos_a, gauss_a, cached_a) == (name_b, pos_b, gauss_b, cached_b)
    np.testing.assert_array_equal(keys_a, keys_b)


def _run_seeded(seed, func, *args, **kwargs):
    """func(*args) under np.random.seed(seed); returns (output, global state after)."""
    np.random.seed(seed)
    output = func(*args, **kwargs)
    return output, np.random.get_state()


def _choice_index(rs, p):
    """np.random.choice's rule with p: one uniform draw against the normalised cdf."""
    cdf = np.cumsum(np.asarray(p, dtype=np.float64))
    cdf /= cdf[-1]
    return int(np.searchsorted(cdf, rs.random_sample(), side="right"))


# ----------------------------------------------------------- 0.2.1's rules, by hand
def _masking_reference(rs, tokens, p, mask="[MASK]"):
    draws = [rs.rand() for _ in tokens]
    return [mask if draw < p else token for token, draw in zip(tokens, draws)]


def _deleting_reference(rs, tokens, p):
    keep = rs.binomial(1, 1 - p, len(tokens))
    return [token for token, kept in zip(tokens, keep) if kept]


def _n_gram_reference(rs, tokens, p_ng, l_ng):
    span = l_ng[_choice_index(rs, p_ng)]
    start = rs.randint(0, len(tokens) - span + 1)
    return tokens[start:start + span]


_SHORT_PERMUTATIONS = {1: (1, 0, 2), 2: (2, 1, 0), 3: (2, 0, 1), 4: (1, 2, 0)}  # bac cba cab bca


def _short_disorder_reference(rs, tokens, p):
    out, i = list(tokens), 0
    while i < len(out) - 1:
        case = _choice_index(rs, p)
        if case == 0:
            i += 1
        elif i == len(out) - 2:
            out[i:i + 2] = out[i + 1], out[i]
            i += 2
        else:
            order = _SHORT_PERMUTATIONS[case]
            window = out[i:i + 3]
            out[i:i + 3] = [window[k] for k in order]
            i += 2 if case == 1 else 3
    return out


def _long_disorder_reference(rs, tokens, p, length):
    span = length if int(length) > 1 else len(tokens) * length
    span = int(span)
    span += span % 2  # up to even
    out, i = list(tokens), 0
    while i + span <= len(out):
        if rs.rand() < p:
            first, second = out[i:i + span // 2], out[i + span // 2:i + span]
            out[i:i + span] = second + first
            i += span
        else:
            i += 1
    return out


CASES = [
    ("masking", masking, _masking_reference, {"p": 0.3}),
    ("masking_id", masking, _masking_reference, {"p": 0.5, "mask": 103}),
    ("deleting", deleting, _deleting_reference, {"p": 0.3}),
    ("n_gram", n_gram_sampling, _n_gram_reference,
     {"p_ng": [0.2] * 5, "l_ng": [1, 2, 3, 4, 5]}),
    ("n_gram_skewed", n_gram_sampling, _n_gram_reference,
     {"p_ng": [0.1, 0.0, 0.6, 0.3], "l_ng": [2, 7, 1, 26]}),
    ("short_default", short_disorder, _short_disorder_reference, {"p": [0.9, 0.1, 0, 0, 0]}),
    ("short_all", short_disorder, _short_disorder_reference, {"p": [0.2] * 5}),
    ("long_abs", long_disorder, _long_disorder_reference, {"p": 0.3, "length": 5}),
    ("long_rel", long_disorder, _long_disorder_reference, {"p": 0.5, "length": 0.3}),
]


def _call_reference(reference, rs, tokens, kwargs):
    if reference is _masking_reference:
        return reference(rs, tokens, kwargs["p"], kwargs.get("mask", "[MASK]"))
    if reference is _n_gram_reference:
        return reference(rs, tokens, kwargs["p_ng"], kwargs["l_ng"])
    if reference is _long_disorder_reference:
        return reference(rs, tokens, kwargs["p"], kwargs["length"])
    return reference(rs, tokens, kwargs["p"])


@pytest.mark.parametrize("name, func, reference, kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [0, 1, 7, 2024])
def test_matches_the_rule_and_draw_count(name, func, reference, kwargs, seed):
    output, state = _run_seeded(seed, func, TOKENS, **kwargs)
    rs = np.random.RandomState(seed)
    assert output == _call_reference(reference, rs, TOKENS, kwargs)
    _assert_same_state(state, rs.get_state())


@pytest.mark.parametrize("name, func, reference, kwargs", CASES, ids=[c[0] for c in CASES])
def test_inputs_are_not_modified_and_permutations_keep_tokens(name, func, reference, kwargs):
    tokens = list(TOKENS)
    np.random.seed(3)
    output = func(tokens, **kwargs)
    assert tokens == TOKENS and output is not tokens
    if func in (short_disorder, long_disorder):
        assert sorted(output) == sorted(TOKENS)


# ------------------------------------------------------------------- literal numbers
def test_known_outputs_for_seed_0():
    np.random.seed(0)  # first draws: 0.5488, 0.7152, 0.6028, 0.5449, 0.4237, 0.6459, ...
    assert masking(list("abcdef"), p=0.6) == ["[MASK]", "b", "c", "[MASK]", "[MASK]", "f"]
    np.random.seed(0)
    assert long_disorder(list(range(6)), p=0.6, length=2) == [1, 0, 2, 3, 5, 4]


def test_docstring_examples():
    result = doctest.testmod(data_utils, extraglobs={"np": np})
    assert result.attempted >= 5 and result.failed == 0


def test_long_disorder_docstring_example_keeps_every_token():
    # 0.2.1's docstring printed [2, 3, 0, 1, 6, 7, 4, 5, 8, 9]: the 10 was a typo.
    state = np.random.get_state()
    assert long_disorder(list(range(11)), p=1, length=0.4) == [2, 3, 0, 1, 6, 7, 4, 5, 8, 9, 10]
    rs = np.random.RandomState()
    rs.set_state(state)
    for _ in range(2):  # p = 1: one draw per swapped span (at 0 and at 4), none after 8
        rs.rand()
    _assert_same_state(np.random.get_state(), rs.get_state())


# ------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("func, kwargs", [
    (masking, {"p": 0.5}), (deleting, {"p": 0.5}), (short_disorder, {}),
    (long_disorder, {"p": 0.5}), (long_disorder, {"p": 0.5, "length": 3}),
])
def test_empty_tokens(func, kwargs):
    output, state = _run_seeded(5, func, [], **kwargs)
    assert output == []
    rs = np.random.RandomState(5)
    if func is deleting:
        rs.binomial(1, 0.5, 0)
    _assert_same_state(state, rs.get_state())  # nothing drawn


def test_masking_p_0_and_1_still_draw_once_per_token():
    for p, expected in [(0, list("abcd")), (1, ["[MASK]"] * 4)]:
        output, state = _run_seeded(11, masking, list("abcd"), p=p)
        assert output == expected
        rs = np.random.RandomState(11)
        rs.rand(4)
        _assert_same_state(state, rs.get_state())


@pytest.mark.parametrize("p, expected", [(0, list("abcd")), (1, [])])
def test_deleting_p_0_and_1(p, expected):
    output, state = _run_seeded(11, deleting, list("abcd"), p=p)
    assert output == expected
    rs = np.random.RandomState(11)
    rs.binomial(1, 1 - p, 4)
    _assert_same_state(state, rs.get_state())


def test_short_disorder_identity_and_forced_cases():
    np.random.seed(0)
    assert short_disorder(list("abcde"), p=[1, 0, 0, 0, 0]) == list("abcde")
    np.random.seed(0)  # bac at 0, bac at 2, then the last one alone stays
    assert short_disorder(list("abcde"), p=[0, 1, 0, 0, 0]) == list("badce")
    np.random.seed(0)  # cba at 0, then 'de' is a pair: cases other than 0 swap it
    assert short_disorder(list("abcde"), p=[0, 0, 1, 0, 0]) == list("cbaed")
    np.random.seed(0)
    assert short_disorder(list("abcdef"), p=[0, 0, 0, 1, 0]) == list("cabfde")
    np.random.seed(0)
    assert short_disorder(list("abcdef"), p=[0, 0, 0, 0, 1]) == list("bcaefd")
    np.random.seed(0)
    assert short_disorder(["x"], p=[0, 0, 0, 0, 1]) == ["x"]


def test_long_disorder_lengths():
    np.random.seed(0)
    assert long_disorder(list(range(8)), p=1, length=3) == [2, 3, 0, 1, 6, 7, 4, 5]  # 3 -> 4
    np.random.seed(0)  # length 1 is relative: the whole (even) sequence
    assert long_disorder(list(range(6)), p=1, length=1) == [3, 4, 5, 0, 1, 2]
    state_before = np.random.get_state()  # odd sequence: span 8 > 7, nothing drawn
    assert long_disorder(list(range(7)), p=1, length=1) == list(range(7))
    _assert_same_state(np.random.get_state(), state_before)
    np.random.seed(0)  # 1.5 is relative too (int(1.5) <= 1): span 9 > 6
    assert long_disorder(list(range(6)), p=1, length=1.5) == list(range(6))
    np.random.seed(0)
    assert long_disorder(list(range(5)), p=1, length=40) == list(range(5))


def test_long_disorder_zero_span_draws_until_a_draw_reaches_p():
    # 4 tokens * 0.2 = 0.8 -> span 0: nothing moves, but 0.2.1 draws at each position
    # until a draw is >= p, then moves on; positions 0..4 (i <= len - 0).
    output, state = _run_seeded(2, long_disorder, list("abcd"), p=0.6, length=0.2)
    assert output == list("abcd")
    rs = np.random.RandomState(2)
    for _ in range(5):
        while rs.rand() < 0.6:
            pass
    _assert_same_state(state, rs.get_state())


def test_n_gram_sampling_whole_sequence_and_too_short():
    np.random.seed(4)
    assert n_gram_sampling(list("abc"), p_ng=[1.0], l_ng=[3]) == list("abc")
    assert n_gram_sampling("abcdef", p_ng=[0, 1], l_ng=[1, 6]) == "abcdef"  # a slice
    np.random.seed(4)
    with pytest.raises(ValueError, match="tokens has only 2"):
        n_gram_sampling(list("ab"), p_ng=[1.0], l_ng=[3])
    rs = np.random.RandomState(4)
    rs.random_sample()  # the length was drawn (as in 0.2.1, whose randint raised)
    _assert_same_state(np.random.get_state(), rs.get_state())


def test_n_gram_sampling_integer_l_ng_is_a_range():
    output, state = _run_seeded(9, n_gram_sampling, TOKENS, p_ng=[0, 0, 0.5, 0.5], l_ng=4)
    rs = np.random.RandomState(9)
    assert output == _n_gram_reference(rs, TOKENS, [0, 0, 0.5, 0.5], [0, 1, 2, 3])
    _assert_same_state(state, rs.get_state())


def test_distributions_numpy_accepts_are_accepted():
    np.random.seed(0)
    n_gram_sampling(TOKENS, p_ng=[0.5, 0.5 + 1e-8], l_ng=[1, 2])
    n_gram_sampling(TOKENS, p_ng=np.array([0.5, 0.5 + 1e-5], dtype=np.float32), l_ng=[1, 2])
    short_disorder(TOKENS, p=(0.7, 0.1, 0.1, 0.05, 0.05))
    n_gram_sampling(TOKENS, p_ng=np.full(3, 1 / 3), l_ng=np.array([1, 2, 3]))


# ------------------------------------------------------------------------ validation
@pytest.mark.parametrize("call, argument", [
    (lambda: masking(TOKENS, p=-0.1), "p"),
    (lambda: masking(TOKENS, p=1.5), "p"),
    (lambda: masking(TOKENS, p=float("nan")), "p"),
    (lambda: deleting(TOKENS, p=2), "p"),
    (lambda: deleting(TOKENS, p=-1), "p"),
    (lambda: n_gram_sampling(TOKENS, p_ng=[0.5, 0.4], l_ng=[1, 2]), "p_ng"),
    (lambda: n_gram_sampling(TOKENS, p_ng=[0.5, 0.5], l_ng=[1, 2, 3]), "p_ng"),
    (lambda: n_gram_sampling(TOKENS, p_ng=[1.5, -0.5], l_ng=[1, 2]), "p_ng"),
    (lambda: n_gram_sampling(TOKENS, p_ng=[float("nan"), 1], l_ng=[1, 2]), "p_ng"),
    (lambda: n_gram_sampling(TOKENS, p_ng=[[0.5, 0.5]], l_ng=[1, 2]), "p_ng"),
    (lambda: n_gram_sampling(TOKENS, p_ng=[], l_ng=[]), "l_ng"),
    (lambda: n_gram_sampling(TOKENS, p_ng=[0.5, 0.5], l_ng=[1, -2]), "l_ng"),
    (lambda: n_gram_sampling(TOKENS, p_ng=[0.5, 0.5], l_ng=[1.0, 2.0]), "l_ng"),
    (lambda: n_gram_sampling(TOKENS, p_ng=[1.0], l_ng=0), "l_ng"),
    (lambda: short_disorder(TOKENS, p=[0.5, 0.5]), "p"),
    (lambda: short_disorder(TOKENS, p=[0.5, 0.5, 0.5, 0, 0]), "p"),
    (lambda: short_disorder(TOKENS, p=[1.2, -0.2, 0, 0, 0]), "p"),
    (lambda: long_disorder(TOKENS, p=1.1), "p"),
    (lambda: long_disorder(TOKENS, p=0.5, length=-3), "length"),
    (lambda: long_disorder(TOKENS, p=0.5, length=float("inf")), "length"),
    (lambda: long_disorder(TOKENS, p=1, length=0), "length"),  # 0.2.1 looped forever
    (lambda: long_disorder([], p=1, length=0.5), "length"),  # 0.2.1 looped forever
])
def test_bad_arguments_raise_naming_them_and_draw_nothing(call, argument):
    np.random.seed(123)
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        call()
    _assert_same_state(np.random.get_state(), np.random.RandomState(123).get_state())


def test_non_numeric_probability_is_a_type_error():
    with pytest.raises(TypeError, match="p must be"):
        masking(TOKENS, p="high")


# -------------------------------------------------- the original 0.2.1, when available
@pytest.fixture(scope="module")
def original():
    if not ORIGINAL_SRC:
        pytest.skip("neither TEXTBREWER_POST1_SRC nor TEXTBREWER021_SRC is set")
    path = os.path.join(ORIGINAL_SRC, "data_utils.py")
    if not os.path.isfile(path):
        pytest.skip(f"no data_utils.py in {ORIGINAL_SRC}")
    spec = importlib.util.spec_from_file_location("textbrewer021_data_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ORIGINAL_CASES = [
    ("masking", {"p": 0.25}), ("masking", {"p": 0}), ("masking", {"p": 1, "mask": 0}),
    ("deleting", {"p": 0.25}), ("deleting", {"p": 0.9}), ("deleting", {}),
    ("n_gram_sampling", {}), ("n_gram_sampling", {"p_ng": [0.5, 0.3, 0.2], "l_ng": [3, 1, 8]}),
    ("short_disorder", {}), ("short_disorder", {"p": [0.3, 0.2, 0.2, 0.2, 0.1]}),
    ("short_disorder", {"p": [0, 0, 0, 0, 1]}),
    ("long_disorder", {}), ("long_disorder", {"p": 0.4, "length": 4}),
    ("long_disorder", {"p": 0.3, "length": 7}), ("long_disorder", {"p": 0.5, "length": 0.3}),
    ("long_disorder", {"p": 0.5, "length": 1}), ("long_disorder", {"p": 0.7, "length": 0.01}),
]


@pytest.mark.parametrize("name, kwargs", ORIGINAL_CASES)
def test_same_as_textbrewer021(original, name, kwargs):
    ours, theirs = getattr(data_utils, name), getattr(original, name)
    for seed in range(150):
        length = seed % 23  # lengths 0..22, some shorter than the n-grams and spans
        tokens = list(range(100, 100 + length))
        np.random.seed(seed)
        try:
            expected, expected_error = theirs(list(tokens), **kwargs), None
        except ValueError as error:  # n_gram longer than tokens: numpy's randint raises
            expected, expected_error = None, error
        expected_state = np.random.get_state()
        np.random.seed(seed)
        if expected_error is not None:
            with pytest.raises(ValueError):
                ours(list(tokens), **kwargs)
        else:
            assert ours(list(tokens), **kwargs) == expected, (seed, tokens)
        _assert_same_state(np.random.get_state(), expected_state)


def test_docstring_example_same_as_textbrewer021(original):
    tokens = list(range(11))
    assert long_disorder(tokens, p=1, length=0.4) == original.long_disorder(tokens, p=1,
                                                                            length=0.4)
