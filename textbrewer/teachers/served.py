"""A teacher behind an OpenAI-compatible completions endpoint (llama.cpp's server, vLLM,
SGLang): the prompt's log-probabilities, position by position, as top-k rows."""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence


from .base import TeacherRows, TeacherSource, empty_rows, row_lengths

__all__ = ["ServedTeacher", "ServedTeacherError"]

Transport = Callable[[str, Dict[str, Any], float], Dict[str, Any]]


class ServedTeacherError(RuntimeError):
    """The server failed, or answered something a teacher source cannot use."""


class _Retryable(Exception):
    pass


def _http_post(url: str, payload: Dict[str, Any], timeout: float,
               api_key: Optional[str] = None) -> Dict[str, Any]:
    """POST JSON, return the decoded JSON answer; 429 / 5xx / connection errors retryable."""
    data = json.dumps(payload).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", "replace")[:500]
        if error.code == 429 or error.code >= 500:
            raise _Retryable(f"HTTP {error.code}: {body}") from None
        raise ServedTeacherError(f"{url} answered HTTP {error.code}: {body}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise _Retryable(f"{type(error).__name__}: {error}") from None


#: the log-probability of an entry with no mass (finite, as the cache stores it, so that
#: p · log p stays 0 in a loss)
EMPTY_LOGPROB = -65504.0


def _fillers(taken: Sequence, count: int) -> List:
    """``count`` entries ``(id, EMPTY_LOGPROB)`` with ids not in ``taken`` (a row's ids
    stay distinct when the server gave fewer than k)."""
    used, out, candidate = {token for token, _ in taken}, [], 0
    while len(out) < count:
        if candidate not in used:
            out.append((candidate, EMPTY_LOGPROB))
        candidate += 1
    return out


class ServedTeacher(TeacherSource):
    """Teacher rows from a completions endpoint that returns prompt log-probabilities.

    Each example is sent as the prompt with ``echo=True``, ``logprobs=k``, ``max_tokens=1``
    and temperature 0: as its list of token ids (``prompt_format='ids'``: vLLM, SGLang, the
    OpenAI API), or as its text (``'text'``: llama-cpp-python's server takes only strings),
    which the server tokenises again; the echoed tokens are then checked against the ids
    (a server that puts one BOS in front is allowed: that position is skipped).
    The answer's ``top_logprobs[t + 1]`` is the teacher's distribution after tokens 0..t:
    row t (the last row is the distribution of the one generated token). Servers that
    return ``prompt_logprobs`` keyed by token id (vLLM) are read by id; otherwise the
    top-log-prob keys are token texts, mapped to ids through ``token_texts`` (a text that
    several ids decode to, e.g. a partial UTF-8 byte, is ambiguous: its mass joins the
    tail).

    Args:
        url: the server's base URL (``http://127.0.0.1:8000``) or its
            ``/v1/completions`` URL.
        k: entries per row (what ``logprobs`` asks for).
        token_texts: ``token_texts[id]`` is the text the server prints for token ``id``
            (for a Hugging Face tokenizer: ``[tok.decode([i]) for i in range(len(tok))]``);
            also used to check that the server's echoed tokens are the prompt's.
        model: the ``model`` field of the request (some servers require it).
        timeout: seconds per request.
        retries: attempts after the first for a timeout, a connection error, HTTP 429 or
            5xx (exponential back-off from ``backoff`` seconds).
        concurrency: requests in flight at once.
        api_key: sent as a bearer token.
        prompt_format: ``'ids'`` or ``'text'`` (above).
        convention: what ``top_logprobs[t]`` of an echoed prompt is: ``'openai'`` (the
            distribution token t was drawn from, so row t is entry t + 1 and the generated
            token's entry is the last row: the OpenAI API, vLLM) or ``'llama_cpp'`` (the
            distribution *after* token t, so row t is entry t, and row 0, whose entry is
            null, has no row: llama-cpp-python's server, 0.3.x; give position 0 no target,
            or put a BOS in front).
        detokenize: ids -> text for ``prompt_format='text'``; default the concatenated
            ``token_texts``.
        transport: ``(url, payload, timeout) -> answer`` instead of HTTP (tests of the
            parsing use it; the real-server test does not).

    Raises (from :meth:`rows`):
        ServedTeacherError: the server failed after the retries, returned no log-probs
            (llama.cpp: start it with ``--logits_all``), echoed other tokens than the
            prompt's (another tokenizer), or too few positions.
    """

    def __init__(self, url: str, k: int, token_texts: Sequence[str], model: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 2, backoff: float = 0.5,
                 concurrency: int = 4, api_key: Optional[str] = None,
                 prompt_format: str = "ids", convention: str = "openai",
                 detokenize: Optional[Callable[[List[int]], str]] = None,
                 transport: Optional[Transport] = None):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if retries < 0 or concurrency < 1 or timeout <= 0:
            raise ValueError(f"need retries >= 0, concurrency >= 1, timeout > 0; got "
                             f"{retries}, {concurrency}, {timeout}")
        if prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be 'ids' or 'text', got {prompt_format!r}")
        if convention not in ("openai", "llama_cpp"):
            raise ValueError(f"convention must be 'openai' or 'llama_cpp', got {convention!r}")
        self.prompt_format, self.convention = prompt_format, convention
        self.detokenize = detokenize or (lambda ids: "".join(self.token_texts[i] for i in ids))
        url = url.rstrip("/")
        self.url = url if url.endswith("/completions") else url + "/v1/completions"
        self.k, self.model, self.timeout = k, model, timeout
        self.retries, self.backoff, self.concurrency = retries, backoff, concurrency
        self.token_texts = list(token_texts)
        self.vocab_size = len(self.token_texts)
        owners: Dict[str, List[int]] = {}
        for index, text in enumerate(self.token_texts):
            owners.setdefault(text, []).append(index)
        self.id_of = {text: ids[0] for text, ids in owners.items() if len(ids) == 1}
        self.transport = transport or (
            lambda target, payload, seconds: _http_post(target, payload, seconds, api_key))
        self.requests = 0

    def _ask(self, ids: List[int]) -> Dict[str, Any]:
        prompt = ids if self.prompt_format == "ids" else self.detokenize(ids)
        payload: Dict[str, Any] = {"prompt": prompt, "echo": True, "logprobs": self.k,
                                   "max_tokens": 1, "temperature": 0.0}
        if self.model is not None:
            payload["model"] = self.model
        delay, last = self.backoff, None
        for attempt in range(self.retries + 1):
            try:
                self.requests += 1
                return self.transport(self.url, payload, self.timeout)
            except _Retryable as error:
                last = error
                if attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
        raise ServedTeacherError(f"{self.url}: no answer after {self.retries + 1} attempts: "
                                 f"{last}")

    def _row_of(self, entry: Any) -> Dict[int, float]:
        """One position's ``{id: logprob}``; unmappable or ambiguous texts are dropped."""
        if entry is None:
            return {}
        if isinstance(entry, Mapping):
            out = {}
            for key, value in entry.items():
                if isinstance(value, Mapping):  # vLLM: {"id": {"logprob": ..., ...}}
                    out[int(key)] = float(value["logprob"])
                elif key in self.id_of:         # OpenAI style: {"text": logprob}
                    out[self.id_of[key]] = float(value)
            return out
        raise ServedTeacherError(f"{self.url}: a top-log-prob entry is a "
                                 f"{type(entry).__name__}, expected a mapping")

    def _positions(self, answer: Dict[str, Any], ids: List[int]) -> List[Dict[int, float]]:
        """``len(ids)`` rows of ``{id: logprob}`` from one answer."""
        choices = answer.get("choices") or []
        if not choices:
            raise ServedTeacherError(f"{self.url}: the answer has no choices: "
                                     f"{str(answer)[:300]}")
        choice = choices[0]
        if choice.get("prompt_logprobs") is not None:  # vLLM: keyed by id, None first
            entries = list(choice["prompt_logprobs"])[1:]
            generated = (choice.get("logprobs") or {}).get("top_logprobs") or []
            entries += list(generated[:1])
        else:
            logprobs = choice.get("logprobs")
            if not logprobs or logprobs.get("top_logprobs") is None:
                raise ServedTeacherError(
                    f"{self.url} returned no log-probabilities for the prompt: the server "
                    f"must support echo with logprobs (llama.cpp's server: start it with "
                    f"--logits_all true; vLLM: prompt_logprobs)")
            echoed = logprobs.get("tokens")
            entries = list(logprobs["top_logprobs"])
            expected = [self.token_texts[i] for i in ids]
            if echoed is not None and len(echoed) == len(ids) + 2 and \
                    echoed[1:len(ids) + 1] == expected:
                echoed, entries = echoed[1:], entries[1:]  # the server's own BOS in front
            if echoed is not None:
                for position, (got, want) in enumerate(zip(echoed, expected)):
                    if got != want:
                        raise ServedTeacherError(
                            f"{self.url} echoed token {got!r} at position {position} where "
                            f"the prompt has {want!r} (id {ids[position]}): the server's "
                            f"tokenizer is not the one token_texts came from")
            entries = entries[1:] if self.convention == "openai" else [None] + entries[1:]
        if len(entries) < len(ids):
            raise ServedTeacherError(f"{self.url} returned {len(entries)} positions of "
                                     f"log-probs for a prompt of {len(ids)} tokens (plus the "
                                     f"generated one)")
        return [self._row_of(entry) for entry in entries[:len(ids)]]

    def rows(self, batch: Mapping, examples: Sequence[Mapping] = ()) -> TeacherRows:
        """The rows of a batch's right-padded ``input_ids`` (B, L) (and ``attention_mask``);
        one request per example."""
        ids = batch["input_ids"]
        size, length = ids.shape
        prompts = [ids[row, :n].tolist() for row, n in enumerate(row_lengths(batch))]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(self._ask, prompts))
        out = empty_rows(size, length, self.k)
        for row, (answer, prompt) in enumerate(zip(answers, prompts)):
            for position, entry in enumerate(self._positions(answer, prompt)):
                best = sorted(entry.items(), key=lambda item: -item[1])[:self.k]
                if not best:
                    continue  # nothing usable at this position: no row
                mass = sum(math.exp(logprob) for _, logprob in best)
                best += _fillers(best, self.k - len(best))
                for slot, (token, logprob) in enumerate(best):
                    out["topk_ids"][row, position, slot] = token
                    out["topk_logprobs"][row, position, slot] = logprob
                out["tail_mass"][row, position] = max(0.0, 1.0 - mass)
                out["mask"][row, position] = True
        return out
