"""Two tokenisations of one text, side by side: aligned token groups, a vocabulary map
(identical strings, else the minimum edit distance) and the collator that builds both.

The alignment works on **character spans** (the tokenizers' offset mappings), never on
decoded strings, so it is exact on Unicode (a character split into several byte tokens
keeps the character's span), whitespace (a tokenizer that drops whitespace, WordPiece,
and one that keeps it in its tokens, byte-level BPE, still cut the words at the same
places) and truncation (text one side did not reach is in no group).

A **cut** is a character position no token of either side straddles. Between two cuts
lies a segment; the tokens of each side whose span ends in the segment form its group.
A segment becomes a group when both sides have a token in it and each side's tokens
cover every non-whitespace character of it (so a truncated or dropped character never
pairs different text). Special tokens (BOS, EOS, separators) have no text: each sits at
the end of the text before it, and the n-th special token at a position on one side is
paired with the n-th at the same position on the other. The first token of a sequence
has no logits before it and is in no group.
"""
from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ...losses.token.cross import TokenGroups

__all__ = ["Tokenised", "encode", "align_token_groups", "align_segment_groups",
           "render_chat", "token_strings", "vocabulary_map", "CrossTokenizerCollator",
           "WORD_START"]

#: the mark of a word-initial token in :func:`token_strings` (SentencePiece's)
WORD_START = "\u2581"


class Tokenised(NamedTuple):
    """One text tokenised: ids, character spans ``(start, end)`` and the special-token
    flags, one entry per token (no padding)."""

    ids: List[int]
    spans: List[Tuple[int, int]]
    special: List[bool]


def _special_positions(tokens: Tokenised) -> List[int]:
    """The character position of each special token: the end of the text before it."""
    positions, last_end = [], 0
    for (start, end), special in zip(tokens.spans, tokens.special):
        positions.append(last_end if special else None)
        if not special and end > start:
            last_end = max(last_end, end)
    return positions


def align_token_groups(text: str, teacher: Tokenised, student: Tokenised
                       ) -> List[Tuple[List[int], List[int]]]:
    """The aligned groups of two tokenisations of ``text``.

    Args:
        text: the text both sides tokenised.
        teacher, student: :class:`Tokenised` of ``text`` (spans index ``text``).

    Returns:
        ``[(teacher_positions, student_positions), ...]`` in text order, each a list of
        token positions (indices into the ids) in increasing order, both non-empty, the
        first of each ≥ 1.

    Raises:
        ValueError: a span outside the text, or lists of different lengths.
    """
    return [(t, s) for t, s in _all_groups(text, teacher, student) if t[0] >= 1 and s[0] >= 1]


def _all_groups(text: str, teacher: Tokenised, student: Tokenised
                ) -> List[Tuple[List[int], List[int]]]:
    """:func:`align_token_groups` before the groups at position 0 are left out."""
    for side, tokens in (("teacher", teacher), ("student", student)):
        if not len(tokens.ids) == len(tokens.spans) == len(tokens.special):
            raise ValueError(f"the {side}'s ids, spans and special flags have different "
                             f"lengths ({len(tokens.ids)}, {len(tokens.spans)}, "
                             f"{len(tokens.special)})")
        for start, end in tokens.spans:
            if not 0 <= start <= end <= len(text):
                raise ValueError(f"the {side} has a token span ({start}, {end}) outside the "
                                 f"text of {len(text)} characters: were both sides "
                                 f"tokenised from the same text?")
    sides = (teacher, student)
    content = [[(position, span) for position, (span, special)
                in enumerate(zip(tokens.spans, tokens.special))
                if not special and span[1] > span[0]] for tokens in sides]
    # a cut is a token boundary that no token of either side straddles
    candidates = sorted({edge for tokens in content for _, span in tokens for edge in span})
    inside = np.zeros(len(text) + 2, dtype=np.int64)  # tokens straddling each position
    for tokens in content:
        for _, (start, end) in tokens:
            inside[start + 1] += 1
            inside[end] -= 1
    straddled = np.cumsum(inside) > 0
    cuts = [c for c in candidates if not straddled[c]]
    covered = []
    for tokens in content:
        mask = np.zeros(len(text), dtype=bool)
        for _, (start, end) in tokens:
            mask[start:end] = True
        covered.append(mask)
    blank = np.array([character.isspace() for character in text], dtype=bool)
    members: Dict[int, List[List[int]]] = {}
    for side, tokens in enumerate(content):
        for position, (_, end) in tokens:
            segment = bisect.bisect_left(cuts, end)  # cuts[segment] == end
            members.setdefault(segment, [[], []])[side].append(position)
    groups = []
    for segment in sorted(members):
        teacher_positions, student_positions = members[segment]
        if not teacher_positions or not student_positions:
            continue
        start, end = cuts[segment - 1] if segment else 0, cuts[segment]
        text_here = ~blank[start:end]
        if not (covered[0][start:end][text_here].all() and covered[1][start:end][text_here]
                .all()):
            continue
        groups.append((start, teacher_positions, student_positions))
    # special tokens: the n-th at a position on one side with the n-th there on the other
    specials = []
    for tokens in sides:
        at: Dict[int, List[int]] = {}
        for position, place in enumerate(_special_positions(tokens)):
            if place is not None:
                at.setdefault(place, []).append(position)
        specials.append(at)
    for place, teacher_positions in specials[0].items():
        for pair in zip(teacher_positions, specials[1].get(place, [])):
            groups.append((place + 0.5, [pair[0]], [pair[1]]))
    groups.sort(key=lambda group: (group[0], group[1][0]))
    return [(t, s) for _, t, s in groups]


def _inside(tokens: Tokenised, start: int, end: int) -> Tuple[Tokenised, List[int]]:
    """The non-special tokens whose spans lie in ``[start, end)``, spans shifted to start
    at 0, and their positions in ``tokens``."""
    kept = [position for position, ((a, b), special) in
            enumerate(zip(tokens.spans, tokens.special))
            if not special and start <= a and b <= end and b > a]
    return Tokenised([tokens.ids[p] for p in kept],
                     [(tokens.spans[p][0] - start, tokens.spans[p][1] - start) for p in kept],
                     [False] * len(kept)), kept


def align_segment_groups(segments: Sequence[Tuple[str, Tuple[int, int], Tuple[int, int]]],
                         teacher: Tokenised, student: Tokenised
                         ) -> List[Tuple[List[int], List[int]]]:
    """Aligned groups of two tokenisations of *different* texts that share segments (the
    same messages rendered by two chat templates).

    Only the shared text is aligned: per segment, the tokens of each side that lie inside
    it (a token that straddles the segment's edge, half template and half message, is
    left out, so the characters it covers pair nothing) are aligned as
    :func:`align_token_groups` aligns one text. Template text and special tokens are in no
    group.

    Args:
        segments: ``(text, (start_T, end_T), (start_S, end_S))`` per shared piece: its
            text and where it sits in the teacher's and the student's texts.
        teacher, student: :class:`Tokenised` of the two texts.

    Returns:
        the groups as :func:`align_token_groups` returns them (positions in ``teacher``
        and ``student``), in segment order.
    """
    groups = []
    for text, (start_T, end_T), (start_S, end_S) in segments:
        if end_T - start_T != len(text) or end_S - start_S != len(text):
            raise ValueError(f"a segment of {len(text)} characters sits at {start_T}..{end_T}"
                             f" (teacher) and {start_S}..{end_S} (student)")
        inner_T, places_T = _inside(teacher, start_T, end_T)
        inner_S, places_S = _inside(student, start_S, end_S)
        for group_T, group_S in _all_groups(text, inner_T, inner_S):
            positions_T = [places_T[p] for p in group_T]
            positions_S = [places_S[p] for p in group_S]
            if positions_T[0] >= 1 and positions_S[0] >= 1:
                groups.append((positions_T, positions_S))
    return groups


# ---------------------------------------------------------------------------------------
# tokenizers: encoding with offsets, and token strings in one convention
# ---------------------------------------------------------------------------------------
def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a Hugging Face fast tokenizer (or itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "to_str"):
        return tokenizer
    raise TypeError(f"cross-tokenizer distillation needs character offsets: a "
                    f"tokenizers.Tokenizer or a Hugging Face *fast* tokenizer, got "
                    f"{type(tokenizer).__name__}")


def encode(tokenizer: Any, texts: Sequence[str], max_length: Optional[int] = None,
           add_special_tokens: bool = True) -> List[Tokenised]:
    """Each text tokenised with its character spans (see :class:`Tokenised`).

    ``tokenizer``: a ``tokenizers.Tokenizer`` or a Hugging Face fast tokenizer.
    ``max_length`` keeps the first tokens of each text.
    """
    backend = _backend(tokenizer)
    encodings = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    # a special token written in the text (a chat template's markers) is special too,
    # although the post-processor did not add it
    special_ids = {index for index, token in backend.get_added_tokens_decoder().items()
                   if token.special}
    out = []
    for encoding in encodings:
        keep = len(encoding.ids) if max_length is None else max_length
        out.append(Tokenised(list(encoding.ids[:keep]),
                             [tuple(span) for span in encoding.offsets[:keep]],
                             [bool(flag) or index in special_ids for flag, index
                              in zip(encoding.special_tokens_mask[:keep],
                                     encoding.ids[:keep])]))
    return out


def _special_strings(backend: Any) -> set:
    """The strings of the tokenizer's special tokens."""
    return {token.content for token in backend.get_added_tokens_decoder().values()
            if token.special}


def _bytes_of_byte_level() -> Dict[str, int]:
    """The byte-level BPE alphabet: each printable stand-in character to its byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
                 + list(range(0xAE, 0xFF + 1)))
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[chr(byte)] = byte
        else:
            stand_ins[chr(256 + extra)] = byte
            extra += 1
    return stand_ins


def _decoder_kinds(backend: Any) -> Dict[str, Any]:
    """What the tokenizer's decoder says about its token strings (from its JSON)."""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" \
        else [decoder]
    kinds: Dict[str, Any] = {}
    for part in parts:
        kind = part.get("type")
        if kind == "ByteLevel":
            kinds["byte_level"] = True
        elif kind == "WordPiece":
            kinds["continuation"] = part.get("prefix", "##")
        elif kind == "Metaspace":
            kinds["word_start"] = part.get("replacement", WORD_START)
        elif kind == "Replace" and part.get("content") == " ":
            kinds["word_start"] = part.get("pattern", {}).get("String", WORD_START)
    return kinds


def token_strings(tokenizer: Any) -> Dict[int, str]:
    """Every token's text in one convention: word-initial tokens start with ``'▁'``.

    Byte-level BPE (``'Ġworld'``), WordPiece (``'world'`` / ``'##ld'``) and SentencePiece
    (``'▁world'``) tokens all become ``'▁world'`` / ``'ld'``. Special tokens keep their
    strings.

    Returns:
        ``{id: string}`` for every id of the tokenizer's vocabulary.
    """
    backend = _backend(tokenizer)
    kinds = _decoder_kinds(backend)
    special = _special_strings(backend)
    stand_ins = _bytes_of_byte_level() if kinds.get("byte_level") else None
    strings = {}
    for token, index in backend.get_vocab(with_added_tokens=True).items():
        if token in special:
            strings[index] = token
            continue
        if stand_ins is not None:
            raw = bytes(stand_ins.get(character, 0x3F) for character in token)
            text = raw.decode("utf-8", errors="backslashreplace")
            text = WORD_START + text[1:] if text.startswith(" ") else text
        elif "continuation" in kinds:
            prefix = kinds["continuation"]
            text = token[len(prefix):] if token.startswith(prefix) and token != prefix \
                else WORD_START + token
        else:
            text = token.replace(kinds.get("word_start", WORD_START), WORD_START)
        strings[index] = text
    return strings


def _nearest_by_edit_distance(query: str, codes: np.ndarray, lengths: np.ndarray
                              ) -> Tuple[int, int]:
    """(row, distance) of the candidate nearest ``query`` in Levenshtein distance (the
    lowest row among ties). ``codes``: (n, L) code points, padded; ``lengths``: (n,)."""
    n, width = codes.shape
    previous = np.broadcast_to(np.arange(width + 1), (n, width + 1)).copy()
    for i, character in enumerate(query, start=1):
        current = np.empty_like(previous)
        current[:, 0] = i
        differs = codes != ord(character)
        for j in range(1, width + 1):
            current[:, j] = np.minimum(np.minimum(previous[:, j] + 1, current[:, j - 1] + 1),
                                       previous[:, j - 1] + differs[:, j - 1])
        previous = current
    distances = previous[np.arange(n), lengths]
    row = int(np.argmin(distances))
    return row, int(distances[row])


def vocabulary_map(tokenizer_T: Any, tokenizer_S: Any, *, vocab_size_T: Optional[int] = None,
                   vocab_size_S: Optional[int] = None, fallback: Optional[str] = "mined"
                   ) -> torch.Tensor:
    """The student token for each teacher token, for ``token_alignment='span'``.

    Tokens are compared by :func:`token_strings` (one convention for word-initial and
    continuation pieces). A teacher token whose string the student's vocabulary has maps
    to it; the rest map to the student token at the minimum edit distance (MinED, Wan et
    al. 2024; ties: the lowest id), or to −1 with ``fallback=None``. Special tokens map
    only to a student special token with the same string, else −1.

    Args:
        tokenizer_T, tokenizer_S: ``tokenizers.Tokenizer`` or Hugging Face fast tokenizers.
        vocab_size_T: the teacher model's vocabulary (rows of its output embedding),
            if larger than the tokenizer's: ids past the tokenizer map to −1.
        vocab_size_S: the student model's vocabulary (a map into ids ≥ it is an error).
        fallback: ``'mined'`` or None.

    Returns:
        (V_T,) int64: a student id per teacher id, −1 = unmapped (its probability is
        dropped, the rest renormalised).

    Raises:
        ValueError: an unknown ``fallback``, or a vocabulary size smaller than its tokenizer.
    """
    if fallback not in ("mined", None):
        raise ValueError(f"fallback must be 'mined' or None, got {fallback!r}")
    strings_T, strings_S = token_strings(tokenizer_T), token_strings(tokenizer_S)
    size_T = max(strings_T) + 1 if vocab_size_T is None else int(vocab_size_T)
    size_S = max(strings_S) + 1 if vocab_size_S is None else int(vocab_size_S)
    for side, size, strings in (("teacher", size_T, strings_T), ("student", size_S, strings_S)):
        if size <= max(strings):
            raise ValueError(f"vocab_size_{side[0].upper()}={size} is smaller than the "
                             f"{side}'s tokenizer (ids up to {max(strings)})")
    special_T, special_S = _special_strings(_backend(tokenizer_T)), \
        _special_strings(_backend(tokenizer_S))
    by_string: Dict[str, int] = {}
    for index in sorted(strings_S):
        by_string.setdefault(strings_S[index], index)
    result = torch.full((size_T,), -1, dtype=torch.int64)
    unmatched = []
    for index, text in strings_T.items():
        if text in special_T:
            if text in special_S:
                result[index] = by_string[text]
            continue
        if text in by_string and text not in special_S:
            result[index] = by_string[text]
        else:
            unmatched.append(index)
    if fallback == "mined" and unmatched:
        candidates = [index for index in sorted(strings_S) if strings_S[index] not in special_S]
        texts = [strings_S[index] for index in candidates]
        lengths = np.array([len(text) for text in texts])
        codes = np.full((len(texts), max(lengths)), -1, dtype=np.int64)
        for row, text in enumerate(texts):
            codes[row, :len(text)] = [ord(character) for character in text]
        for index in unmatched:
            row, _ = _nearest_by_edit_distance(strings_T[index], codes, lengths)
            result[index] = candidates[row]
    return result


# ---------------------------------------------------------------------------------------
# the collator
# ---------------------------------------------------------------------------------------
def _messages_of(example: Any) -> Optional[List[Mapping]]:
    """The chat of a ``{'messages': [{'role', 'content'}, ...]}`` example, else None."""
    if isinstance(example, Mapping) and "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, Sequence) or not all(
                isinstance(m, Mapping) and isinstance(m.get("content"), str)
                and isinstance(m.get("role"), str) for m in messages):
            raise ValueError("'messages' must be a list of {'role': str, 'content': str}")
        return list(messages)
    return None


def render_chat(tokenizer: Any, messages: Sequence[Mapping], side: str
                ) -> Tuple[str, List[Tuple[str, int, int]]]:
    """``messages`` rendered by ``tokenizer``'s chat template, and where each message's
    content sits in the rendering.

    Args:
        tokenizer: a Hugging Face tokenizer with a ``chat_template``.
        messages: ``[{'role': ..., 'content': ...}, ...]``.
        side: ``'teacher'`` or ``'student'``, for the error messages.

    Returns:
        ``(text, [(role, start, end), ...])``, one entry per message, in order.

    Raises:
        ValueError: the tokenizer has no chat template, or its rendering does not hold a
            message's content verbatim and in order (the message is named).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the {side}'s tokenizer ({type(tokenizer).__name__}) has no "
                         f"chat_template: chat examples are rendered with each side's own "
                         f"template (set tokenizer.chat_template)")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    places, cursor = [], 0
    for index, message in enumerate(messages):
        start = text.find(message["content"], cursor)
        if start < 0:
            raise ValueError(f"the {side}'s chat template does not reproduce message {index} "
                             f"({message['role']!r}: {message['content'][:30]!r}) verbatim "
                             f"after character {cursor}: the two sides can only be compared "
                             f"on text both renderings hold")
        cursor = start + len(message["content"])
        places.append((message["role"], start, cursor))
    return text, places


def _text_of(example: Any, text_key: str) -> str:
    if isinstance(example, str):
        return example
    if isinstance(example, Mapping):
        if "teacher" in example and "student" in example:
            text_T, text_S = example["teacher"], example["student"]
            if text_T != text_S:
                where = next((i for i, (a, b) in enumerate(zip(text_T, text_S)) if a != b),
                             min(len(text_T), len(text_S)))
                raise ValueError(f"the teacher's and the student's texts differ from "
                                 f"character {where}: {text_T[where:where + 20]!r} vs "
                                 f"{text_S[where:where + 20]!r}; cross-tokenizer "
                                 f"distillation compares the two models on the same text")
            return text_T
        if text_key in example:
            return example[text_key]
        raise ValueError(f"an example dict needs {text_key!r} (or 'teacher' and 'student' "
                         f"texts), got keys {sorted(example)}")
    raise TypeError(f"examples must be strings or dicts, got {type(example).__name__}")


def _padded(rows: List[List[int]], value: int) -> torch.Tensor:
    width = max((len(row) for row in rows), default=0)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows],
                        dtype=torch.int64).reshape(len(rows), width)


class CrossTokenizerCollator:
    """Texts (or chats) to a batch for ``LMDistillationConfig(token_alignment='span' | 'uld')``.

    Each text is tokenised by both tokenizers (with character offsets) and the two
    tokenisations aligned (:func:`align_token_groups`). The batch::

        {'teacher': {'input_ids': (B, L_T), 'attention_mask': (B, L_T)},
         'student': {'input_ids': (B, L_S), 'attention_mask': (B, L_S),
                     'labels': (B, L_S)},           # padding = ignore_index
         'token_groups': TokenGroups}

    A chat example, ``{'messages': [{'role': ..., 'content': ...}, ...]}``, is rendered by
    each side's own chat template (Hugging Face tokenizers with a ``chat_template``), so
    each model reads the prompt format it was trained on; only the messages' contents,
    which both renderings hold verbatim, are aligned (:func:`align_segment_groups`), and
    the template's own text and tokens are in no group. A rendering that changes a
    content is an error naming the message.

    Args:
        tokenizer_T, tokenizer_S: ``tokenizers.Tokenizer`` or Hugging Face fast tokenizers.
        max_length: tokens kept per side (the groups end where the shorter side's text
            does); None: all.
        text_key: where a dict example keeps its text (a dict with ``'teacher'`` and
            ``'student'`` texts must have the same text in both: an error names where
            they differ).
        pad_id_T, pad_id_S: padding ids (masked everywhere).
        ignore_index: the student's label at padding.
        add_special_tokens: let each tokenizer add its own BOS/EOS to plain texts (a chat
            template writes its own).
        train_on: chats only: ``'all'`` (every student token is a target) or
            ``'assistant'`` (the contents of assistant messages, each with the first
            special token after it, the end of the turn; the rest gets ``ignore_index``,
            so only those positions are distilled too).
    """

    def __init__(self, tokenizer_T: Any, tokenizer_S: Any, max_length: Optional[int] = None,
                 text_key: str = "text", pad_id_T: int = 0, pad_id_S: int = 0,
                 ignore_index: int = -100, add_special_tokens: bool = True,
                 train_on: str = "all"):
        _backend(tokenizer_T), _backend(tokenizer_S)
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be None or an integer >= 2, got {max_length!r}")
        if train_on not in ("all", "assistant"):
            raise ValueError(f"train_on must be 'all' or 'assistant', got {train_on!r}")
        self.tokenizer_T, self.tokenizer_S = tokenizer_T, tokenizer_S
        self.max_length, self.text_key = max_length, text_key
        self.pad_id_T, self.pad_id_S = pad_id_T, pad_id_S
        self.ignore_index, self.add_special_tokens = ignore_index, add_special_tokens
        self.train_on = train_on

    def _render(self, examples: Sequence[Any], role: str
                ) -> Tuple[List[str], Optional[List[List[Tuple[str, int, int]]]]]:
        """Each example's text for ``role``, and for chats where each message sits."""
        chats = [_messages_of(example) for example in examples]
        if all(chat is None for chat in chats):
            if self.train_on != "all":
                raise ValueError("train_on='assistant' needs chat examples ({'messages': "
                                 "[...]}); plain texts have no roles")
            return [_text_of(example, self.text_key) for example in examples], None
        if any(chat is None for chat in chats):
            raise ValueError("a batch mixes chat examples ({'messages': [...]}) and plain "
                             "texts; give one kind per batch")
        tokenizer = self.tokenizer_T if role == "teacher" else self.tokenizer_S
        rendered = [render_chat(tokenizer, chat, role) for chat in chats]
        return [text for text, _ in rendered], [places for _, places in rendered]

    def _targets(self, tokens: Tokenised, places: List[Tuple[str, int, int]]) -> List[bool]:
        """Which student tokens are targets under ``train_on='assistant'``: those that cover
        characters of an assistant message's content (a word-initial token that also holds
        the template's space before it counts), and the first special token after them
        (before the next message's text), which ends the turn."""
        target = [False] * len(tokens.ids)
        in_a_message = [any(start <= a < end for _, start, end in places) and b > a
                        for a, b in tokens.spans]
        for role, start, end in places:
            if role != "assistant":
                continue
            inside = [position for position, ((a, b), special)
                      in enumerate(zip(tokens.spans, tokens.special))
                      if not special and b > a and a < end and b > start]
            for position in inside:
                target[position] = True
            for position in range(inside[-1] + 1 if inside else len(tokens.ids),
                                  len(tokens.ids)):
                if tokens.special[position]:
                    target[position] = True
                    break
                if in_a_message[position]:
                    break
        return target

    def _side(self, texts: List[str], role: str,
              places: Optional[List[List[Tuple[str, int, int]]]] = None
              ) -> Tuple[List[Tokenised], Dict[str, Any]]:
        """One side's tokenisations and its padded model inputs."""
        tokenizer, pad_id = ((self.tokenizer_T, self.pad_id_T) if role == "teacher"
                             else (self.tokenizer_S, self.pad_id_S))
        tokenised = encode(tokenizer, texts, self.max_length,
                           self.add_special_tokens and places is None)
        ids = _padded([tokens.ids for tokens in tokenised], pad_id)
        mask = _padded([[1] * len(tokens.ids) for tokens in tokenised], 0)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if role == "student":
            labels = ids.masked_fill(mask == 0, self.ignore_index)
            if places is not None and self.train_on == "assistant":
                chosen = _padded([[int(t) for t in self._targets(tokens, where)]
                                  for tokens, where in zip(tokenised, places)], 0)
                labels = labels.masked_fill(chosen == 0, self.ignore_index)
            inputs["labels"] = labels
        return tokenised, inputs

    def one_side(self, examples: Sequence[Any], role: str) -> Dict[str, torch.Tensor]:
        """The ``'teacher'`` or ``'student'`` part of the batch alone (no alignment): for
        a model trained or scored on its own tokens, with the same tensors as in a
        cross-tokenizer batch."""
        if role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
        texts, places = self._render(examples, role)
        return self._side(texts, role, places)[1]

    def __call__(self, examples: Sequence[Any]) -> Dict[str, Any]:
        texts_T, places_T = self._render(examples, "teacher")
        texts_S, places_S = self._render(examples, "student")
        teacher, inputs_T = self._side(texts_T, "teacher", places_T)
        student, inputs_S = self._side(texts_S, "student", places_S)
        batch_index, positions_T, positions_S = [], [], []
        for row, (tokens_T, tokens_S) in enumerate(zip(teacher, student)):
            if places_T is None:
                found = align_token_groups(texts_T[row], tokens_T, tokens_S)
            else:
                found = align_segment_groups(
                    [(texts_T[row][a:b], (a, b), (c, d)) for (_, a, b), (_, c, d)
                     in zip(places_T[row], places_S[row])], tokens_T, tokens_S)
            for group_T, group_S in found:
                batch_index.append(row)
                positions_T.append(group_T)
                positions_S.append(group_S)
        groups = TokenGroups(torch.tensor(batch_index, dtype=torch.int64),
                             _padded(positions_T, -1), _padded(positions_S, -1))
        return {"teacher": inputs_T, "student": inputs_S, "token_groups": groups}
