"""Masking: sensitive values never reach the agent, the audit log or a recording.

Engine (pure functions over plain data; no mitmproxy, no asyncio, no globals): the caller passes
the compiled masks and the hash key, Rego-style, so the Postgres gateway reuses every function.
- `compile_mask(MaskRule) -> CompiledMask`: strategy, detector names and json_paths (jsonpath-ng)
  are checked and compiled once per policy version; ValueError names what is wrong.
- `mask_json(doc, masks, key) -> MaskResult`: json_paths first, then the detectors on every other
  string value and key (and on integers long enough to be card numbers), whatever the depth.
- `mask_text`, `mask_value` / `mask_cell` (SQL result cells), `mask_k8s_secret`, `scrub`.
Whole HTTP bodies, streams and the mitmproxy addon (`Masking`) are in `addons/masking_http.py`.
Masking never mutates its input: the result is a new document (unchanged sub-trees may be shared
with the input) plus what was touched: paths, columns and mask ids, never values.

Strategies: redact -> "[MASKED:<detector or mask id>]"; partial -> "*" for all but the last four
characters (everything starred below eight characters); hash -> "hash:" + the first 16 hex
digits of HMAC-SHA-256(key, value): stable, so equal values still join; null -> JSON null / SQL
NULL (inside a larger string a null hit nulls the whole string; plain text has no null, there it
redacts).

"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import operator
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from addons import detectors as det
from addons.model import UpstreamFailure
from addons.policy import glob_match

STRATEGIES = ("redact", "partial", "hash", "null")
DETECTORS = det.DETECTORS
K8S_SECRET_RULE = "k8s-secret"  # the built-in mask of Kubernetes Secret values
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_BIG_INT = 10**12  # integers with 13+ digits may be card numbers: scan their decimal form


class MaskingError(UpstreamFailure):
    """A body that must be masked but cannot be: it is refused (502), never passed unmasked."""

    error = "masking_failed"


# ---------------------------------------------------------------------------------------------
# Compiling


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, cached per policy version
class CompiledMask:
    id: str
    strategy: str = "redact"
    detectors: tuple[str, ...] = ()
    json_paths: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    exprs: tuple[Any, ...] = field(default=(), repr=False)


def compile_mask(rule: Any) -> CompiledMask:
    """Check and compile a policy `MaskRule` (or anything with the same attributes)."""
    if isinstance(rule, CompiledMask):
        return rule
    strategy = getattr(rule, "strategy", "redact")
    if strategy is None:
        strategy = "null"  # YAML reads the SPEC's `strategy: null` as a null value
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    detectors = det.check_detectors(getattr(rule, "detectors", ()) or ())
    columns = tuple(getattr(rule, "columns", ()) or ())
    for col in columns:
        if not isinstance(col, str) or not col.strip():
            raise ValueError(f"columns: {col!r} is not a table.column glob")
    paths = tuple(getattr(rule, "json_paths", ()) or ())
    exprs = tuple(compile_json_path(p) for p in paths)
    return CompiledMask(id=rule.id, strategy=strategy, detectors=detectors, json_paths=paths,
                        columns=columns, exprs=exprs)


def compile_json_path(path: str) -> Any:
    from jsonpath_ng.exceptions import JSONPathError
    from jsonpath_ng.ext import parse

    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"json_paths: {path!r} is not a JSONPath")
    if "`" in path:
        # `len`, `parent`, `sub(...)`... compute values or walk up: nothing to mask in place
        raise ValueError(f"json_paths: {path!r}: named operators (`...`) are not supported")
    try:
        expr = parse(path)
    except (JSONPathError, Exception) as e:  # the ply parser raises assorted errors
        raise ValueError(f"json_paths: cannot parse {path!r}: {e}") from e
    if type(expr).__name__ == "Operation":
        raise ValueError(f"json_paths: {path!r} computes a value; it must select one")
    return expr


_COMPILED: dict[int, tuple[Any, CompiledMask]] = {}


def _compiled(mask: Any) -> CompiledMask:
    """Accept policy MaskRules too (compiled once per rule object)."""
    if isinstance(mask, CompiledMask):
        return mask
    hit = _COMPILED.get(id(mask))
    if hit is not None and hit[0] is mask:
        return hit[1]
    if len(_COMPILED) > 4096:
        _COMPILED.clear()
    compiled = compile_mask(mask)
    _COMPILED[id(mask)] = (mask, compiled)  # keeps the rule alive, so its id is not reused
    return compiled


class _Plan(NamedTuple):
    detectors: frozenset[str]
    by_detector: dict[str, CompiledMask]  # the first mask that lists the detector decides
    tokens: dict[str, str | None]  # the fixed replacement of a redacting detector, else None
    nulls: bool  # some detector's strategy is null
    paths: tuple[tuple[CompiledMask, str, Any], ...]


@lru_cache(maxsize=512)
def _plan_for(masks: tuple[CompiledMask, ...]) -> _Plan:
    by_detector: dict[str, CompiledMask] = {}
    paths = []
    for m in masks:
        for d in m.detectors:
            by_detector.setdefault(d, m)
        paths += [(m, src, expr) for src, expr in zip(m.json_paths, m.exprs, strict=True)]
    tokens = {d: f"[MASKED:{d}]" if m.strategy == "redact" else None
              for d, m in by_detector.items()}
    nulls = any(m.strategy == "null" for m in by_detector.values())
    return _Plan(frozenset(by_detector), by_detector, tokens, nulls, tuple(paths))


def _plan(masks: Iterable[Any]) -> _Plan:
    return _plan_for(tuple(_compiled(m) for m in masks))


# ---------------------------------------------------------------------------------------------
# Results and strategies


@dataclass(frozen=True, slots=True)
class MaskResult:
    value: Any
    touched: tuple[str, ...] = ()  # JSON paths, columns or "text"; never values
    rules: tuple[str, ...] = ()  # ids of the masks that changed something
    count: int = 0  # values (or spans of text) replaced

    def summary(self, limit: int = 50) -> dict[str, Any]:
        """For flow metadata and audit: list indices collapsed to [*], at most `limit` paths."""
        return summarize([self], limit)


def summarize(results: Iterable[MaskResult], limit: int = 50) -> dict[str, Any]:
    count = 0
    rules: dict[str, None] = {}
    paths: dict[str, None] = {}
    for r in results:
        count += r.count
        rules.update(dict.fromkeys(r.rules))
        for p in r.touched:
            if len(paths) < limit:
                paths[_collapse(p)] = None
    return {"count": count, "rules": list(rules), "paths": list(paths)}


def _collapse(path: str) -> str:
    out, i = [], 0
    while i < len(path):
        j = path.find("[", i)
        if j < 0:
            out.append(path[i:])
            break
        k = path.find("]", j)
        out.append(path[i:j])
        out.append("[*]" if k > j + 1 and path[j + 1:k].isdigit() else path[j:k + 1])
        i = k + 1 if k >= 0 else len(path)
    return "".join(out)


def redact_token(label: str) -> str:
    return f"[MASKED:{label}]"


def partial(text: str) -> str:
    return "*" * (len(text) - 4) + text[-4:] if len(text) >= 8 else "*" * len(text)


def hash_token(text: str, key: bytes) -> str:
    digest = hmac.new(key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return "hash:" + digest[:16]


def _replacement(strategy: str, text: str, label: str, key: bytes) -> str | None:
    if strategy == "redact":
        return f"[MASKED:{label}]"
    if strategy == "partial":
        return partial(text)
    if strategy == "hash":
        return hash_token(text, key)
    return None


def mask_whole(value: Any, strategy: str, label: str, key: bytes) -> Any:
    """Apply a strategy to a whole value (a json_path match, a masked column)."""
    if value is None:
        return None
    if strategy == "null":
        return None
    if strategy == "redact" or (strategy == "partial" and isinstance(value, (dict, list))):
        return f"[MASKED:{label}]"
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bool, int, float)):
        text = json.dumps(value)
    else:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return partial(text) if strategy == "partial" else hash_token(text, key)


def apply_strategy(value: str | None, mask: Any, key: bytes) -> str | None:
    """A mask's strategy on a whole SQL/text value (the caller decided that the mask applies)."""
    m = _compiled(mask)
    return mask_whole(value, m.strategy, m.id, key)


class _Touch:
    """Collects what a masking call changed."""

    __slots__ = ("touched", "rules", "count")

    def __init__(self) -> None:
        self.touched: list[str] = []
        self.rules: dict[str, None] = {}
        self.count = 0

    def add(self, where: str, rule: str, n: int = 1) -> None:
        self.touched.append(where)
        self.rules[rule] = None
        self.count += n

    def result(self, value: Any) -> MaskResult:
        return MaskResult(value, tuple(self.touched), tuple(self.rules), self.count)


# ---------------------------------------------------------------------------------------------
# Text


Span = tuple[int, int, str]  # (start, end, detector), as `detectors.scan` returns them


def _mask_spans(text: str, hits: Sequence[Span], plan: _Plan, key: bytes, touch: _Touch,
                nullable: bool) -> str | None:
    """Replace each hit by its mask's strategy. None when a null hit nulls the whole value."""
    out: list[str] = []
    pos = 0
    tokens = plan.tokens
    for start, end, name in hits:
        touch.rules[plan.by_detector[name].id] = None
        touch.count += 1
        rep = tokens[name]
        if rep is None:
            rep = _replacement(plan.by_detector[name].strategy, text[start:end], name, key)
            if rep is None:
                if nullable:
                    return None
                rep = f"[MASKED:{name}]"
        out.append(text[pos:start])
        out.append(rep)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def mask_text(text: str, masks: Iterable[Any], key: bytes) -> MaskResult:
    """Detectors of `masks` on a plain-text body (json_paths do not apply to text)."""
    plan = _plan(masks)
    hits = det.scan(text, plan.detectors) if plan.detectors else []
    if not hits:
        return MaskResult(text)
    touch = _Touch()
    masked = _mask_spans(text, hits, plan, key, touch, nullable=False)
    touch.touched.append("text")
    return touch.result(masked)


def scrub(text: str) -> str:
    """Every detector hit redacted as [MASKED:<detector>], whatever the masks: for audit
    summaries and recordings of request bodies, SQL text and exec argv."""
    if not text:
        return text
    return _redact_all(text, det.scan(text, det.DETECTORS))


def _redact_all(text: str, hits: list[Span]) -> str:
    if not hits:
        return text
    out: list[str] = []
    pos = 0
    for start, end, name in hits:
        out += (text[pos:start], f"[MASKED:{name}]")
        pos = end
    out.append(text[pos:])
    return "".join(out)


def detect(text: str, detectors: Iterable[str] = DETECTORS) -> list[det.Hit]:
    """Hits of the named detectors (an empty list is falsy)."""
    return det.find(text, frozenset(detectors)) if text else []


def redact_detected(text: str, detectors: Iterable[str] = DETECTORS) -> str:
    """Every hit of the named detectors replaced by [MASKED:<detector>]."""
    return _redact_all(text, det.scan(text, frozenset(detectors)) if text else [])


# ---------------------------------------------------------------------------------------------
# JSON documents


def mask_json(doc: Any, masks: Iterable[Any], key: bytes) -> MaskResult:
    """json_paths of every mask (the first mask to match a path decides), then the detectors on
    every remaining string value, key and long integer. Raises MaskingError when a json_path
    cannot be evaluated on this document."""
    plan = _plan(masks)
    touch = _Touch()
    value = doc
    if plan.paths:
        value = _mask_paths(value, plan, key, touch)
    if plan.detectors:
        value = _mask_detected(value, plan, key, touch)
    return touch.result(value)


def render_path(path: Sequence[Any]) -> str:
    out = ["$"]
    for k in path:
        if isinstance(k, int):
            out.append(f"[{k}]")
        elif k.isidentifier():
            out.append(f".{k}")
        else:
            out.append(f"[{json.dumps(k, ensure_ascii=False)}]")
    return "".join(out)


def _concrete_path(datum: Any) -> tuple[Any, ...]:
    from jsonpath_ng.jsonpath import Fields, Index, Root, This

    path: list[Any] = []
    d = datum
    while d is not None:
        p = d.path
        if isinstance(p, Fields) and len(p.fields) == 1:
            path.append(p.fields[0])
        elif isinstance(p, Index) and len(p.indices) == 1:
            i = p.indices[0]
            parent = d.context.value if d.context is not None else None
            if i < 0 and isinstance(parent, list):
                i += len(parent)
            path.append(i)
        elif not isinstance(p, (Root, This)):
            raise MaskingError(f"a json_path match has no location ({type(p).__name__})")
        d = d.context
    path.reverse()
    return tuple(path)


def _copy(node: Any) -> Any:
    return dict(node) if type(node) is dict else list(node)


def _replace_at(root: Any, path: tuple[Any, ...], new: Any, fresh: set[int]) -> Any:
    """Copy-on-write: containers on the way are copied once (`fresh` holds the copies)."""
    if not path:
        return new
    if id(root) not in fresh:
        root = _copy(root)
        fresh.add(id(root))
    node = root
    for k in path[:-1]:
        child = node[k]
        if id(child) not in fresh:
            child = _copy(child)
            fresh.add(id(child))
            node[k] = child
        node = child
    node[path[-1]] = new
    return root


def _mask_paths(doc: Any, plan: _Plan, key: bytes, touch: _Touch) -> Any:
    fresh: set[int] = set()
    done: set[tuple[Any, ...]] = set()
    value = doc
    for mask, source, expr in plan.paths:
        try:
            found = expr.find(value)
            paths = [_concrete_path(d) for d in found]
        except MaskingError:
            raise
        except Exception as e:  # jsonpath-ng filters raise assorted errors on odd documents
            raise MaskingError(f"json_path {source!r} of mask {mask.id} failed on this body "
                               f"({type(e).__name__})") from e
        for path in paths:
            if any(path[:i] in done for i in range(len(path) + 1)):
                continue  # an earlier mask already replaced this value or a parent of it
            current = _resolve(value, path, source)
            done.add(path)
            if current is None:
                continue
            value = _replace_at(value, path, mask_whole(current, mask.strategy, mask.id, key),
                                fresh)
            touch.add(render_path(path), mask.id)
    return value


def _resolve(doc: Any, path: tuple[Any, ...], source: str) -> Any:
    node = doc
    try:
        for k in path:
            node = node[k]
    except (KeyError, IndexError, TypeError) as e:
        raise MaskingError(f"json_path {source!r} matched a location that does not exist") from e
    return node


class _Owners:
    """Where each scanned string lives: parallel lists, and each container's parent."""

    __slots__ = ("texts", "owners", "parents", "keys")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.owners: list[tuple[Any, Any]] = []  # (container, key or index)
        self.parents: dict[int, tuple[Any, Any]] = {}
        self.keys: set[str] = set()


def _collect(root: Any) -> _Owners:
    o = _Owners()
    texts, owners, parents, keys = o.texts, o.owners, o.parents, o.keys
    stack = [root]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            keys.update(node)
            items: Iterable[tuple[Any, Any]] = node.items()
        else:
            items = enumerate(node)
        for k, v in items:
            t = type(v)
            if t is str:
                texts.append(v)
                owners.append((node, k))
            elif t is dict or t is list:
                parents[id(v)] = (node, k)
                stack.append(v)
            elif t is int and not -_BIG_INT < v < _BIG_INT:
                texts.append(str(v))
                owners.append((node, k))
    return o


def _scan_all(texts: list[str], detectors: frozenset[str]) -> list[tuple[int, Span]]:
    """Hits as (index of the text, hit within that text), with ONE scan of all texts."""
    joined = "\x00".join(texts)
    if joined.count("\x00") != len(texts) - 1:  # a text holds a NUL itself: scan one by one
        return [(i, h) for i, t in enumerate(texts) for h in det.scan(t, detectors)]
    out: list[tuple[int, Span]] = []
    index, prev = 0, 0
    for start, end, name in det.scan(joined, detectors, "joined"):
        index += joined.count("\x00", prev, start)
        base = joined.rfind("\x00", 0, start) + 1
        out.append((index, (start - base, end - base, name)))
        prev = start
    return out


def _mask_detected(doc: Any, plan: _Plan, key: bytes, touch: _Touch) -> Any:
    t = type(doc)
    if t is str or (t is int and not -_BIG_INT < doc < _BIG_INT):
        text = doc if t is str else str(doc)
        hits = det.scan(text, plan.detectors)
        if not hits:
            return doc
        touch.touched.append("$")
        return _mask_spans(text, hits, plan, key, touch, nullable=True)
    if t is not dict and t is not list:
        return doc
    o = _collect(doc)
    keys = list(o.keys)
    found = _scan_all(o.texts + keys, plan.detectors)  # (text index, span) pairs
    if not found:
        return doc
    n_values = len(o.texts)
    by_text: dict[int, list[Span]] = {}
    for i, h in found:
        by_text.setdefault(i, []).append(h)
    copies: dict[int, Any] = {}  # id(original container) -> its copy
    root = [doc]
    renamed: dict[str, str] = {}
    for i, spans in by_text.items():
        if i >= n_values:
            k = keys[i - n_values]
            renamed[k] = _masked_key(k, spans, plan, key, touch)
    # id(original dict) -> {old key: new key}, for the dicts whose keys were masked
    key_map: dict[int, dict[str, str]] = {}
    if renamed:
        _rename_keys(doc, renamed, o, copies, root, key_map, touch)
    paths: dict[int, str] = {}
    for i, spans in by_text.items():
        if i >= n_values:
            continue
        node, k = o.owners[i]
        new = _mask_spans(o.texts[i], spans, plan, key, touch, nullable=True)
        k = key_map[id(node)].get(k, k) if id(node) in key_map else k
        _writable(node, o, copies, root, key_map)[k] = new
        touch.touched.append(_path_of(node, k, o, key_map, paths))
    return root[0]


def _writable(node: Any, o: _Owners, copies: dict[int, Any], root: list[Any],
              key_map: dict[int, dict[str, str]]) -> Any:
    """The copy of `node` (made, with copies of its ancestors, on first use)."""
    c = copies.get(id(node))
    if c is not None:
        return c
    c = _copy(node)
    copies[id(node)] = c
    parent = o.parents.get(id(node))
    if parent is None:
        root[0] = c
    else:
        pnode, pkey = parent
        pcopy = _writable(pnode, o, copies, root, key_map)
        if id(pnode) in key_map:
            pkey = key_map[id(pnode)].get(pkey, pkey)
        pcopy[pkey] = c
    return c


def _masked_key(k: str, spans: list[Span], plan: _Plan, key: bytes, touch: _Touch) -> str:
    new = _mask_spans(k, spans, plan, key, touch, nullable=False)
    assert new is not None
    return new


def _rename_keys(doc: Any, renamed: dict[str, str], o: _Owners, copies: dict[int, Any],
                 root: list[Any], key_map: dict[int, dict[str, str]], touch: _Touch) -> None:
    """Rare path: keys that are sensitive values themselves (an e-mail used as a key)."""
    stack = [doc]
    while stack:
        node = stack.pop()
        children = node.values() if type(node) is dict else node
        stack += [v for v in children if type(v) is dict or type(v) is list]
        if type(node) is not dict or not renamed.keys() & node.keys():
            continue
        c = _writable(node, o, copies, root, key_map)
        items = list(c.items())
        c.clear()
        mapping: dict[str, str] = {}
        for k, v in items:
            new = base = renamed.get(k, k)
            n = 2
            while new in c:  # two keys masked to the same text: keep both values
                new = f"{base}#{n}"
                n += 1
            c[new] = v
            if new != k:
                mapping[k] = new
        key_map[id(node)] = mapping  # parents come first (depth-first from the root)
        touch.touched += [_path_of(node, new, o, key_map, {}) for new in mapping.values()]


def _path_of(node: Any, k: Any, o: _Owners, key_map: dict[int, dict[str, str]],
             cache: dict[int, str]) -> str:
    """The path of `node[k]` with masked keys as they are in the output."""
    base = cache.get(id(node))
    if base is None:
        chain: list[Any] = []
        cur = node
        while id(cur) in o.parents:
            parent, pk = o.parents[id(cur)]
            chain.append(key_map[id(parent)].get(pk, pk) if id(parent) in key_map else pk)
            cur = parent
        chain.reverse()
        base = render_path(chain)
        cache[id(node)] = base
    return base + render_path([k])[1:]


def mask_json_text(text: str, masks: Iterable[Any], key: bytes, *, k8s: bool = False,
                   assume_secret: bool = False) -> MaskResult:
    """A JSON body as text in, masked text out (the same text when nothing was masked).

    With no json_path and no Kubernetes Secret in play, the raw text is masked in place (see
    `_mask_raw_json`): no parse, no re-serialisation, formatting kept. Otherwise, and for bodies
    with \\u escapes, the document is parsed, masked as a tree and re-serialised. Raises
    MaskingError when json_paths (or Secret masking) apply and the body is not JSON."""
    plan = _plan(masks)
    secret = k8s and (assume_secret or "Secret" in text or LAST_APPLIED in text)
    if not plan.paths and not secret:
        if not plan.detectors:
            return MaskResult(text)
        raw = _mask_raw_json(text, plan, key)
        if raw is not None:
            return raw
    try:
        doc = json.loads(text)
    except ValueError as e:
        if plan.paths or secret:
            raise MaskingError("the response is not valid JSON, so its json_paths cannot be "
                               "masked") from e
        return mask_text(text, masks, key)  # detectors do not need the structure
    results = []
    if secret:
        results.append(mask_k8s_secret(doc, key, assume_secret=assume_secret))
        doc = results[-1].value
    results.append(mask_json(doc, masks, key))
    if not any(r.count for r in results):
        return MaskResult(text)
    out = json.dumps(results[-1].value, ensure_ascii=False, separators=(",", ":"))
    return MaskResult(out, tuple(p for r in results for p in r.touched),
                      tuple(dict.fromkeys(i for r in results for i in r.rules)),
                      sum(r.count for r in results))


_ESCAPE = re.compile(r'\\["\\/bfnrt]')
_DETECTOR = operator.itemgetter(2)  # of a hit (start, end, detector)


def _mask_raw_json(text: str, plan: _Plan, key: bytes) -> MaskResult | None:
    """Detectors on the raw text of a JSON document, replaced in place; None when the tree
    path must be taken (\\u escapes, or a hit in a number).

    Why this is exact: two-character escapes are first replaced by two \\x01 (same length,
    so offsets stay; like the characters they stand for, \\x01 is in no detector's class and
    no escaped '"' remains). Then every '"' opens or closes a string, a string's text is its
    value, and a '"' bounds a hit exactly like the start or end of a value (mode "json": no hit
    spans a '"'). So the hits are those of every value and key, found in one scan. Paths are
    reported as `$..key` (the member's key), `$..[*]` for an array item, `$..*` for a key."""
    scan = text
    if "\\" in text:  # (one character: a much faster search than the two of "\\u")
        if "\\u" in text:
            return None
        scan = _ESCAPE.sub("\x01\x01", text)
    hits = det.scan(scan, plan.detectors, "json")
    if not hits:
        return MaskResult(text)
    if plan.nulls:
        return _mask_raw_json_nulls(text, scan, hits, plan, key)
    tokens, by_detector = plan.tokens, plan.by_detector
    out: list[str] = []
    touched: list[str] = []
    names: dict[str, str] = {}
    # the hot loop (~90 hits per 10 KB of PII-dense JSON): bound methods, no helper calls for
    # the usual member `"key": "...value..."`
    count, rfind = scan.count, scan.rfind
    add, emit, get = touched.append, out.append, names.get
    pos = quotes = prev = 0
    for start, end, name in hits:
        quotes += count('"', prev, start)
        if not quotes & 1:
            return None  # outside every string: a long number, let the tree handle it
        prev = start
        rep = tokens[name]
        if rep is None:
            rep = _replacement(by_detector[name].strategy, text[start:end], name, key)
        emit(text[pos:start])
        emit(rep)  # type: ignore[arg-type]  # no null strategy here
        pos = end
        # the string's opening quote (most often right before the hit: a value that is a hit)
        q1 = start - 1 if scan[start - 1] == '"' else rfind('"', 0, start)
        if q1 >= 3 and scan[q1 - 3:q1] == '": ':  # "k": "v"
            kq = q1 - 3
        elif q1 >= 2 and scan[q1 - 2:q1] == '":':  # "k":"v"
            kq = q1 - 2
        else:
            add(_raw_path(scan, text, q1, end, names))
            continue
        member = text[rfind('"', 0, kq) + 1:kq]
        add(get(member) or _key_path(member, names))
    emit(text[pos:])
    rules = dict.fromkeys(by_detector[n].id for n in dict.fromkeys(map(_DETECTOR, hits)))
    return MaskResult("".join(out), tuple(touched), tuple(rules), len(hits))


def _mask_raw_json_nulls(text: str, scan: str, hits: list[Span], plan: _Plan, key: bytes
                         ) -> MaskResult | None:
    """As the fast path, by string literal: a null hit makes its whole value null."""
    groups: list[tuple[int, int, list[Span]]] = []
    quotes = prev = 0
    for h in hits:
        quotes += scan.count('"', prev, h[0])
        prev = h[0]
        if not quotes & 1:
            return None
        if groups and groups[-1][1] > h[0]:
            groups[-1][2].append(h)
        else:
            groups.append((scan.rfind('"', 0, h[0]), scan.find('"', h[1]), [h]))
    touch = _Touch()
    out: list[str] = []
    pos = 0
    names: dict[str, str] = {}
    for q1, q2, spans in groups:
        is_key = _next_char(scan, q2 + 1) == ":"
        local = [(s - q1 - 1, e - q1 - 1, n) for s, e, n in spans]
        masked = _mask_spans(text[q1 + 1:q2], local, plan, key, touch, nullable=not is_key)
        out.append(text[pos:q1])
        out.append("null" if masked is None else f'"{masked}"')
        pos = q2 + 1
        touch.touched.append(_raw_path(scan, text, q1, spans[-1][1], names))
    out.append(text[pos:])
    return touch.result("".join(out))


def _next_char(text: str, i: int) -> str:
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    return text[i] if i < n else ""


def _descendant(k: str | None) -> str:
    if k is None:
        return "*"
    return k if k.isidentifier() else f"[{json.dumps(k, ensure_ascii=False)}]"


def _raw_path(scan: str, text: str, q1: int, end: int, names: dict[str, str]) -> str:
    """`$..key` for the string literal opening at q1 (never repeats a sensitive key)."""
    j = q1 - 1
    if j >= 0 and scan[j] != ":":
        while j >= 0 and scan[j] in " \t\r\n":
            j -= 1
    if j < 0:
        return "$"
    if scan[j] != ":":
        q2 = scan.find('"', end)
        return "$..*" if _next_char(scan, q2 + 1) == ":" else "$..[*]"
    kq2 = scan.rfind('"', 0, j)
    kq1 = scan.rfind('"', 0, kq2)
    name = text[kq1 + 1:kq2]
    return names.get(name) or _key_path(name, names)


_KEY_PATHS: dict[str, str] = {}  # "$..key" of keys seen before (never of a sensitive key)


def _key_path(name: str, names: dict[str, str]) -> str:
    path = _KEY_PATHS.get(name)
    if path is None:
        # a key that is itself a sensitive value is not repeated, nor remembered
        sensitive = bool(det.scan(name, det.DETECTORS))
        path = "$..*" if sensitive else "$.." + _descendant(name)
        if not sensitive and len(name) <= 64:
            if len(_KEY_PATHS) >= 4096:
                _KEY_PATHS.clear()
            _KEY_PATHS[name] = path
    names[name] = path
    return path


# ---------------------------------------------------------------------------------------------
# SQL result cells


def _column_covered(patterns: Sequence[str], names: Sequence[str]) -> bool:
    for name in names:
        if glob_match(patterns, name):
            return True
        parts = name.split(".")
        if len(parts) == 1 and any(glob_match([p.rsplit(".", 1)[-1]], name) for p in patterns):
            return True  # table unknown: a pattern's column part decides (fail closed)
        if len(parts) > 2 and glob_match(patterns, ".".join(parts[-2:])):
            return True  # schema.table.column against table.column patterns
    return False


def mask_cell(value: str | None, column: str | Sequence[str] | None, masks: Iterable[Any],
              key: bytes) -> MaskResult:
    """One SQL result value. `column` is "table.column" (or every name the column is known
    by; None when unknown, and then every `columns:` mask applies: fail closed). A covering
    `columns:` mask applies its strategy to the whole value; otherwise the detectors run."""
    if value is None:
        return MaskResult(None)
    ms = [_compiled(m) for m in masks]
    names = [column] if isinstance(column, str) else list(column or ())
    label = names[0] if names else "?"
    for m in ms:
        if m.columns and (not names or _column_covered(m.columns, names)):
            return MaskResult(mask_whole(value, m.strategy, m.id, key), (label,), (m.id,), 1)
    plan = _plan(ms)
    hits = det.scan(value, plan.detectors) if plan.detectors else []
    if not hits:
        return MaskResult(value)
    touch = _Touch()
    new = _mask_spans(value, hits, plan, key, touch, nullable=True)
    touch.touched.append(label)
    return touch.result(new)


def mask_value(value: str | None, column: str | Sequence[str] | None, masks: Iterable[Any],
               key: bytes) -> str | None:
    """`mask_cell(...).value`: the masked value only (str, or None for SQL NULL)."""
    return mask_cell(value, column, masks, key).value


# ---------------------------------------------------------------------------------------------
# Kubernetes Secrets


def mask_k8s_secret(obj: Any, key: bytes, strategy: str = "redact", *,
                    assume_secret: bool = False) -> MaskResult:
    """Mask the values of `data` and `stringData` of every Secret in a Kubernetes response: a
    Secret, a SecretList / List, a Table's row objects, a watch event {"type", "object"}, and
    the `last-applied-configuration` annotation that repeats them. `data` values stay valid
    base64 (of the token), so typed clients still decode them. `assume_secret`: the request
    was for secrets, so kind-less objects (list items) and metadata-only rows are Secrets."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    touch = _Touch()
    value = _k8s(obj, (), key, strategy, assume_secret, touch)
    return touch.result(value)


def _k8s(obj: Any, path: tuple[Any, ...], key: bytes, strategy: str, secret: bool,
         touch: _Touch) -> Any:
    if type(obj) is not dict:
        return obj
    kind = obj.get("kind")
    new = obj
    if kind is None and "object" in obj and "type" in obj:  # a watch event
        child = _k8s(obj["object"], (*path, "object"), key, strategy, secret, touch)
        return obj if child is obj["object"] else {**obj, "object": child}
    items = obj.get("items")
    if type(items) is list and (kind is None or str(kind).endswith("List")):
        in_secrets = secret or kind == "SecretList"
        masked = [_k8s(it, (*path, "items", i), key, strategy, in_secrets, touch)
                  for i, it in enumerate(items)]
        if any(a is not b for a, b in zip(masked, items, strict=True)):
            new = {**new, "items": masked}
    rows = obj.get("rows")
    if kind == "Table" and type(rows) is list:
        out_rows = []
        for i, row in enumerate(rows):
            if type(row) is dict and "object" in row:
                child = _k8s(row["object"], (*path, "rows", i, "object"), key, strategy, secret,
                             touch)
                row = row if child is row["object"] else {**row, "object": child}
            out_rows.append(row)
        if any(a is not b for a, b in zip(out_rows, rows, strict=True)):
            new = {**new, "rows": out_rows}
    is_secret = kind == "Secret" or (secret and kind in (None, "PartialObjectMetadata"))
    if is_secret:
        for field_name, encoded in (("data", True), ("stringData", False)):
            values = obj.get(field_name)
            if type(values) is not dict or not values:
                continue
            masked_values = {}
            for k, v in values.items():
                masked_values[k] = _k8s_value(v, encoded, key, strategy)
                if v is not None:
                    touch.add(render_path((*path, field_name, k)), K8S_SECRET_RULE)
            new = {**new, field_name: masked_values}
    meta = obj.get("metadata")
    annotations = meta.get("annotations") if type(meta) is dict else None
    if (type(meta) is dict and type(annotations) is dict
            and isinstance(annotations.get(LAST_APPLIED), str)):
        applied = _k8s_last_applied(annotations[LAST_APPLIED], key, strategy, is_secret, touch)
        if applied is not annotations[LAST_APPLIED]:
            new = {**new, "metadata": {**meta, "annotations": {**annotations,
                                                               LAST_APPLIED: applied}}}
            touch.touched.append(render_path((*path, "metadata", "annotations", LAST_APPLIED)))
    return new


def _k8s_value(v: Any, encoded: bool, key: bytes, strategy: str) -> Any:
    if v is None:
        return None
    plain = str(v)
    if encoded:
        try:
            plain = base64.b64decode(plain, validate=True).decode("utf-8", "surrogateescape")
        except (binascii.Error, ValueError):
            pass
    token = _replacement(strategy, plain, K8S_SECRET_RULE, key)
    if token is None or not encoded:
        return token
    return base64.b64encode(token.encode()).decode()


def _k8s_last_applied(text: str, key: bytes, strategy: str, is_secret: bool, touch: _Touch
                      ) -> str:
    try:
        applied = json.loads(text)
    except ValueError:
        # Unreadable: when it belongs to a Secret it may repeat the values, so drop it all.
        if is_secret:
            touch.rules[K8S_SECRET_RULE] = None
            touch.count += 1
            return f"[MASKED:{K8S_SECRET_RULE}]"
        return text
    inner = _Touch()
    masked = _k8s(applied, (), key, strategy, is_secret, inner)
    if masked is applied:
        return text
    touch.rules.update(inner.rules)
    touch.count += inner.count
    return json.dumps(masked, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Hash key


def load_hash_key(state_dir: str | Path, env: str = "PORTCULLIS_MASK_KEY") -> bytes:
    """The HMAC key of the hash strategy: the env var when set (at least 16 bytes), otherwise
    `state_dir/mask-hash.key`, created once with 32 random bytes and mode 0600."""
    from_env = os.environ.get(env)
    if from_env:
        raw = from_env.encode()
        if len(raw) < 16:
            raise ValueError(f"{env} must hold at least 16 bytes (32 random bytes recommended)")
        return raw
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / "mask-hash.key"
    if not path.exists():
        tmp = directory / f".mask-hash.key.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic: a concurrent start-up keeps the first key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if path.stat().st_mode & 0o077:
        raise ValueError(f"{path} is readable by other users: chmod 600 it")
    key = path.read_bytes()
    if len(key) < 16:
        raise ValueError(f"{path} must hold at least 16 bytes")
    return key
