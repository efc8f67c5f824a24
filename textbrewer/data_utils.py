"""Token-level data augmentations from TextBrewer 0.2.1.

Each function takes a sequence of tokens (strings or ids) and returns a new augmented list
(:func:`n_gram_sampling` returns a slice of the input). They draw from NumPy's *global*
random state (``np.random``) with exactly the calls, in the order and number that
TextBrewer 0.2.1 made, so a script that seeds ``np.random`` gets the same augmented data
as it did with 0.2.1.

Arguments are checked before anything is drawn: a bad argument raises ``ValueError``
naming it and leaves the random state untouched, and a valid argument changes nothing.
"""
import math
import numbers
from typing import Any, List, Sequence, Union

import numpy as np

__all__ = ["masking", "deleting", "n_gram_sampling", "short_disorder", "long_disorder"]

# np.random.choice accepts probabilities whose sum is within this of 1 (NumPy's own
# tolerance, widened for a float ndarray of lower precision). We accept a hair more, so an
# input NumPy takes is never refused here.
_SUM_ATOL = math.sqrt(np.finfo(np.float64).eps)


def _check_probability(name: str, value: Any) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= number <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_distribution(name: str, p: Any, size: int, size_source: str) -> None:
    """Checks ``p`` as np.random.choice would: 1-D, ``size`` entries, >= 0, sum 1."""
    try:
        values = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a list of probabilities, got {p!r}") from None
    if values.ndim != 1:
        raise ValueError(f"{name} must be a flat list of probabilities, got {p!r}")
    if values.size != size:
        raise ValueError(f"{name} has {values.size} probabilities but {size_source}")
    if np.isnan(values).any():
        raise ValueError(f"{name} contains NaN: {p!r}")
    if (values < 0).any():
        raise ValueError(f"{name} has negative probabilities: {p!r}")
    atol = _SUM_ATOL
    if isinstance(p, np.ndarray) and np.issubdtype(p.dtype, np.floating):
        atol = max(atol, math.sqrt(np.finfo(p.dtype).eps))
    total = math.fsum(values.tolist())
    if abs(total - 1.0) > atol * (1 + 1e-6):
        raise ValueError(f"{name} must sum to 1, sums to {total!r}")


def masking(tokens: Sequence[Any], p: float = 0.1, mask: Any = "[MASK]") -> List[Any]:
    """Replaces each token by ``mask`` with probability ``p``.

    Draws one ``np.random.rand()`` per token, in order (also when ``p`` is 0 or 1); a token
    is masked when its draw is below ``p``.

    Args:
        tokens: tokens or token ids.
        p: probability of masking each token, in [0, 1].
        mask: what a masked token becomes (a token id works too).

    Returns:
        A new list, as long as ``tokens``.

    Raises:
        ValueError: ``p`` is outside [0, 1].

    Example:
        >>> np.random.seed(0)
        >>> masking(['a', 'b', 'c', 'd'], p=0.6)
        ['[MASK]', 'b', 'c', '[MASK]']
    """
    _check_probability("p", p)
    outputs = list(tokens)
    for position in range(len(outputs)):
        if np.random.rand() < p:
            outputs[position] = mask
    return outputs


def deleting(tokens: Sequence[Any], p: float = 0.1) -> List[Any]:
    """Deletes each token with probability ``p``.

    Which tokens stay is one draw, ``np.random.binomial(1, 1 - p, len(tokens))``.

    Args:
        tokens: tokens or token ids.
        p: probability of deleting each token, in [0, 1].

    Returns:
        A new list of the kept tokens, in their order.

    Raises:
        ValueError: ``p`` is outside [0, 1].

    Example:
        >>> np.random.seed(3)
        >>> deleting(['a', 'b', 'c', 'd', 'e', 'f'], p=0.5)
        ['a', 'b', 'd', 'e', 'f']
    """
    _check_probability("p", p)
    keep = np.random.binomial(1, 1 - p, len(tokens))
    return [token for token, kept in zip(tokens, keep) if kept == 1]


def n_gram_sampling(tokens: Sequence[Any],
                    p_ng: Sequence[float] = [0.2, 0.2, 0.2, 0.2, 0.2],
                    l_ng: Union[Sequence[int], int] = [1, 2, 3, 4, 5]) -> Sequence[Any]:
    """A random span of ``tokens`` whose length is drawn from ``l_ng``.

    Draws the length with ``np.random.choice(l_ng, p=p_ng)``, then the start with
    ``np.random.randint(0, len(tokens) - length + 1)``.

    Args:
        tokens: tokens or token ids.
        p_ng: probability of each n-gram length; must sum to 1 (within NumPy's tolerance).
        l_ng: the n-gram lengths, non-negative integers, as many as ``p_ng``. As with
            ``np.random.choice``, an integer ``n`` stands for ``range(n)``.

    Returns:
        ``tokens[start:start + length]`` (a slice, so of the type of ``tokens``).

    Raises:
        ValueError: ``p_ng`` is not a probability distribution, or does not have one entry
            per length in ``l_ng``; ``l_ng`` is empty or holds negative or non-integer
            lengths (checked before any draw). Also when the drawn length is longer than
            ``tokens``: as in 0.2.1 (where NumPy's ``randint`` raised), the length has been
            drawn by then, so the random state has moved by that one draw.

    Example:
        >>> np.random.seed(0)
        >>> n_gram_sampling(list('abcdefgh'), p_ng=[0.5, 0.5], l_ng=[2, 3])
        ['f', 'g', 'h']
    """
    if np.ndim(l_ng) == 0:
        if not isinstance(l_ng, numbers.Integral) or l_ng <= 0:
            raise ValueError(f"l_ng must be a non-empty list of n-gram lengths, got {l_ng!r}")
        size, size_source = int(l_ng), f"l_ng={l_ng!r} stands for {l_ng} lengths"
    else:
        lengths = np.asarray(l_ng)
        if lengths.ndim != 1 or lengths.size == 0:
            raise ValueError(f"l_ng must be a non-empty flat list of n-gram lengths, "
                             f"got {l_ng!r}")
        if lengths.dtype.kind not in "iu" or (lengths < 0).any():
            raise ValueError(f"l_ng must hold non-negative integers, got {l_ng!r}")
        size, size_source = lengths.size, f"l_ng has {lengths.size} lengths"
    _check_distribution("p_ng", p_ng, size, size_source)

    span_length = np.random.choice(l_ng, p=p_ng)
    if span_length > len(tokens):
        raise ValueError(f"drew an n-gram length of {span_length} from l_ng but tokens has "
                         f"only {len(tokens)} elements")
    start = max(0, np.random.randint(0, len(tokens) - span_length + 1))
    return tokens[start:start + span_length]


def short_disorder(tokens: Sequence[Any],
                   p: Sequence[float] = [0.9, 0.1, 0, 0, 0]) -> List[Any]:
    """Locally reorders tokens: at each position, maybe permutes the next 2 or 3.

    Walking from the left, at each position ``i`` (while two tokens remain) one case is
    drawn with ``np.random.choice([0, 1, 2, 3, 4], p=p)``; with ``abc`` the tokens at
    ``i, i+1, i+2``:

    ====  ===========  =====
    case  result       skip
    ====  ===========  =====
    0     abc          1
    1     bac          2
    2     cba          3
    3     cab          3
    4     bca          3
    ====  ===========  =====

    At the next-to-last position, where only ``ab`` is left, every case but 0 swaps the
    two. The walk continues after the tokens a permutation touched (``skip``).

    Args:
        tokens: tokens or token ids.
        p: probabilities of the five cases; must sum to 1 (within NumPy's tolerance).

    Returns:
        A new list, a permutation of ``tokens``.

    Raises:
        ValueError: ``p`` is not a distribution over exactly five cases.

    Example:
        >>> np.random.seed(0)
        >>> short_disorder(list('abcdefg'), p=[0.4, 0.3, 0.1, 0.1, 0.1])
        ['b', 'a', 'e', 'd', 'c', 'g', 'f']
    """
    _check_distribution("p", p, 5, "there are 5 cases (abc, bac, cba, cab, bca)")
    outputs = list(tokens)
    count = len(outputs)
    i = 0
    while i < count - 1:
        case = np.random.choice([0, 1, 2, 3, 4], p=p)
        if case == 0:
            i += 1
        elif case == 1 or i == count - 2:  # only two tokens left: any change is a swap
            outputs[i], outputs[i + 1] = outputs[i + 1], outputs[i]
            i += 2
        else:
            a, b, c = outputs[i:i + 3]
            outputs[i:i + 3] = {2: (c, b, a), 3: (c, a, b), 4: (b, c, a)}[int(case)]
            i += 3
    return outputs


def long_disorder(tokens: Sequence[Any], p: float = 0.1,
                  length: Union[int, float] = 20) -> List[Any]:
    """Swaps the two halves of spans of ``length`` tokens, each with probability ``p``.

    The span length is ``length`` if ``int(length) > 1``, else ``len(tokens) * length``
    (a relative length); either way it is then truncated to an integer and rounded up to
    an even number. Walking from the left while a whole span fits, one ``np.random.rand()``
    is drawn per position: below ``p``, the span starting there has its halves swapped and
    the walk jumps past it; otherwise it moves on by one.

    Quirks kept from 0.2.1 (so seeded results stay the same):

    * The test is ``int(length) <= 1``, so ``length=1`` (and ``1.5``) is relative: the span
      is the whole sequence (rounded up to even, so an odd-length sequence is left alone).
    * A relative span that rounds to 0 (``len(tokens) * length < 1``, or empty ``tokens``)
      swaps nothing, but still draws until a draw is at least ``p``. With ``p = 1`` 0.2.1
      looped forever; here that raises ``ValueError``.
    * 0.2.1's docstring showed ``[2, 3, 0, 1, 6, 7, 4, 5, 8, 9]`` for the example below,
      dropping the final ``10``: no token is ever dropped.

    Args:
        tokens: tokens or token ids.
        p: probability of swapping the halves of a span at each position, in [0, 1].
        length: span length (absolute if ``int(length) > 1``, else relative); >= 0.

    Returns:
        A new list, a permutation of ``tokens``.

    Raises:
        ValueError: ``p`` outside [0, 1]; ``length`` negative or not finite; a span that
            rounds to 0 with ``p = 1``.

    Example:
        >>> long_disorder([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], p=1, length=0.4)
        [2, 3, 0, 1, 6, 7, 4, 5, 8, 9, 10]
    """
    _check_probability("p", p)
    if (not isinstance(length, numbers.Real) or isinstance(length, bool)
            or not math.isfinite(length) or length < 0):
        raise ValueError(f"length must be a finite number >= 0, got {length!r}")
    outputs = list(tokens)
    span = length if int(length) > 1 else len(outputs) * length
    span = (int(span) + 1) // 2 * 2
    if span == 0 and p >= 1:
        raise ValueError(f"length={length!r} gives a span of 0 tokens for {len(outputs)} "
                         f"tokens; with p={p!r} TextBrewer 0.2.1 looped forever")
    half = span // 2
    i = 0
    while i <= len(outputs) - span:
        if np.random.rand() < p:
            outputs[i:i + span] = outputs[i + half:i + span] + outputs[i:i + half]
            i += span
        else:
            i += 1
    return outputs
