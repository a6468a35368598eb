"""Masking engine: compiling, strategies, JSON/text/SQL/Kubernetes, hash key, streams."""

from __future__ import annotations

import base64
import copy
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons import masking, masking_http
from addons.masking import CompiledMask, MaskingError, compile_mask
from addons.policy import MaskRule, PolicyError, load_policies

KEY = b"k" * 32
ALL = masking.DETECTORS
SECRETS = {
    "credit_card": "4111 1111 1111 1111", "iban": "DE89370400440532013000",
    "ssn": "123-45-6789", "email": "alice@example.com", "phone": "+1 415 555 2671",
    "aws_access_key": "AKIAIOSFODNN7EXAMPLE",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIB\n-----END RSA PRIVATE KEY-----",
    "ip_address": "10.20.30.40",
}


def rule(**kw: object) -> MaskRule:
    base = {"id": "m", "when": {}, "unless": None, "json_paths": (), "columns": (),
            "detectors": (), "strategy": "redact", "file": "p.yaml", "line": 1}
    base.update(kw)
    return MaskRule(**base)  # type: ignore[arg-type]


def det_mask(strategy: str = "redact", detectors: tuple[str, ...] = ALL, mid: str = "pii"
             ) -> CompiledMask:
    return compile_mask(rule(id=mid, detectors=detectors, strategy=strategy))


# --- compiling -------------------------------------------------------------------------------


def test_compile_mask_checks_everything() -> None:
    m = compile_mask(rule(json_paths=("$.users[*].card", "$..ssn"), detectors=("email",),
                          columns=("*.ssn",), strategy="hash"))
    assert (m.id, m.strategy, m.detectors, m.columns) == ("m", "hash", ("email",), ("*.ssn",))
    assert len(m.exprs) == 2
    for bad, msg in ((dict(strategy="shred"), "strategy must be one of"),
                     (dict(detectors=("passport",)), "unknown detector 'passport'"),
                     (dict(json_paths=("$.a[",)), "cannot parse"),
                     (dict(json_paths=("$.a.`len`",)), "named operators"),
                     (dict(json_paths=("$.a + $.b",)), "computes a value"),
                     (dict(columns=("",)), "table.column")):
        with pytest.raises(ValueError, match=msg):
            compile_mask(rule(**bad))


def test_policy_loader_reports_bad_mask_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "masks:\n  - id: ok\n    detectors: [email]\n"
        "  - id: broken\n    json_paths: ['$.a[']\n")
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert e.value.line == 4 and e.value.rule_id == "broken" and "cannot parse" in str(e.value)


def test_policy_loader_compiles_masks_once(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("masks:\n  - id: cards\n    json_paths: ['$..card']\n")
    policy = load_policies(tmp_path)
    assert isinstance(policy.compiled_masks["cards"], CompiledMask)


# --- strategies -------------------------------------------------------------------------------


def test_strategies_on_a_json_path() -> None:
    doc = {"card": "4111111111111111", "n": 12345, "obj": {"a": 1}}
    out = {s: masking.mask_json(doc, [compile_mask(rule(json_paths=("$.card", "$.n", "$.obj"),
                                                        strategy=s))], KEY).value
           for s in masking.STRATEGIES}
    assert out["redact"] == {"card": "[MASKED:m]", "n": "[MASKED:m]", "obj": "[MASKED:m]"}
    assert out["partial"] == {"card": "************1111", "n": "*****", "obj": "[MASKED:m]"}
    assert out["null"] == {"card": None, "n": None, "obj": None}
    h = out["hash"]
    assert all(str(v).startswith("hash:") and len(str(v)) == 21 for v in h.values())


def test_hash_is_stable_keyed_and_joinable() -> None:
    m = det_mask("hash", ("email",))
    a = masking.mask_json({"x": "alice@example.com", "y": ["alice@example.com"]}, [m], KEY).value
    assert a["x"] == a["y"][0] == masking.hash_token("alice@example.com", KEY)
    other = masking.mask_json({"x": "alice@example.com"}, [m], b"z" * 32).value
    assert other["x"] != a["x"]
    assert masking.hash_token("bob@example.com", KEY) != a["x"]


def test_partial_keeps_last_four_only_when_long_enough() -> None:
    assert masking.partial("4111111111111111") == "************1111"
    assert masking.partial("1234567") == "*******"


def test_detector_strategies_inside_strings() -> None:
    doc = {"note": "mail alice@example.com now"}
    get = lambda s: masking.mask_json(doc, [det_mask(s)], KEY).value["note"]  # noqa: E731
    assert get("redact") == "mail [MASKED:email] now"
    assert get("partial") == "mail *************.com now"
    assert get("hash") == "mail " + masking.hash_token("alice@example.com", KEY) + " now"
    assert get("null") is None  # a null hit nulls the whole value


# --- JSON documents ---------------------------------------------------------------------------


DOC = {
    "users": [
        {"name": "Ann", "email": "ann@example.com", "card": "4111 1111 1111 1111",
         "ssn": "123-45-6789", "order": "1234567890123456", "n": 4111111111111111,
         "tags": ["x", "10.0.0.1"]},
        {"name": "Bob", "contact": {"phone": "+1 415 555 2671", "ssn": "078-05-1121"}},
    ],
    "total": 2,
}


def test_mask_json_paths_then_detectors_and_reports_paths() -> None:
    ssn = compile_mask(rule(id="ssn", json_paths=("$..ssn",), strategy="null"))
    pii = det_mask()
    before = copy.deepcopy(DOC)
    r = masking.mask_json(DOC, [ssn, pii], KEY)
    assert DOC == before  # never mutates its input
    u0, u1 = r.value["users"]
    assert u0["ssn"] is None and u1["contact"]["ssn"] is None
    assert u0["email"] == "[MASKED:email]" and u0["card"] == "[MASKED:credit_card]"
    assert u0["n"] == "[MASKED:credit_card]" and u0["tags"] == ["x", "[MASKED:ip_address]"]
    assert u0["order"] == "1234567890123456"  # fails Luhn: not a card
    assert u1["contact"]["phone"] == "[MASKED:phone]"
    assert r.rules == ("ssn", "pii") and r.count == 7
    assert set(r.touched) == {"$.users[0].ssn", "$.users[1].contact.ssn", "$.users[0].email",
                              "$.users[0].card", "$.users[0].n", "$.users[0].tags[1]",
                              "$.users[1].contact.phone"}
    assert set(r.summary()["paths"]) == {"$.users[*].ssn", "$.users[*].contact.ssn",
                                         "$.users[*].email", "$.users[*].card", "$.users[*].n",
                                         "$.users[*].tags[*]", "$.users[*].contact.phone"}
    assert not any(v in json.dumps(r.summary()) for v in ("ann@", "4111", "123-45"))


def test_first_mask_wins_and_parents_cover_children() -> None:
    a = compile_mask(rule(id="a", json_paths=("$.u",), strategy="redact"))
    b = compile_mask(rule(id="b", json_paths=("$.u.card", "$.u"), strategy="null"))
    r = masking.mask_json({"u": {"card": "x"}}, [a, b], KEY)
    assert r.value == {"u": "[MASKED:a]"} and r.rules == ("a",) and r.count == 1


def test_json_path_filters_indices_and_missing_paths() -> None:
    m = compile_mask(rule(json_paths=("$.u[?(@.vip == true)].card", "$.u[-1].name",
                                      "$.nothing.here"), strategy="redact"))
    doc = {"u": [{"vip": True, "card": "1", "name": "a"}, {"vip": False, "card": "2",
                                                            "name": "b"}]}
    r = masking.mask_json(doc, [m], KEY)
    assert r.value["u"] == [{"vip": True, "card": "[MASKED:m]", "name": "a"},
                            {"vip": False, "card": "2", "name": "[MASKED:m]"}]
    assert r.touched == ("$.u[0].card", "$.u[1].name")


def test_keys_that_are_sensitive_are_masked_without_losing_values() -> None:
    doc = {"by_mail": {"ann@example.com": 1, "bob@example.com": 2}}
    r = masking.mask_json(doc, [det_mask()], KEY)
    assert r.value == {"by_mail": {"[MASKED:email]": 1, "[MASKED:email]#2": 2}}
    assert "ann@" not in "".join(r.touched)


def test_root_scalars_and_untouched_documents() -> None:
    assert masking.mask_json("10.0.0.1", [det_mask()], KEY).value == "[MASKED:ip_address]"
    assert masking.mask_json(None, [det_mask()], KEY).value is None
    doc = {"a": ["b", 1, None, True]}
    r = masking.mask_json(doc, [det_mask()], KEY)
    assert r.value is doc and r.count == 0 and r.touched == ()


def test_nul_inside_a_value_does_not_break_the_single_scan() -> None:
    doc = {"a": "x\x00alice@example.com", "b": "4111111111111111"}
    assert masking.mask_json(doc, [det_mask()], KEY).value == {
        "a": "x\x00[MASKED:email]", "b": "[MASKED:credit_card]"}


def test_mask_json_text_fast_path_keeps_formatting() -> None:
    text = '{\n  "a": "alice@example.com",\n  "b": [1, 2]\n}'
    r = masking.mask_json_text(text, [det_mask()], KEY)
    assert r.value == '{\n  "a": "[MASKED:email]",\n  "b": [1, 2]\n}'
    assert r.touched == ("$..a",)
    clean = '{"a": "nothing here"}'
    assert masking.mask_json_text(clean, [det_mask()], KEY).value is clean


def test_mask_json_text_escapes_numbers_and_nulls() -> None:
    text = json.dumps({"a": "x\n\"DE89370400440532013000\"", "n": 4111111111111111,
                       "u": "caf\u00e9 bob@example.com"}, ensure_ascii=True)
    for strategy in ("redact", "null"):
        out = json.loads(masking.mask_json_text(text, [det_mask(strategy)], KEY).value)
        assert "DE89" not in json.dumps(out) and "4111" not in json.dumps(out)
        assert "bob@" not in json.dumps(out)


def test_mask_json_text_refuses_unparseable_when_a_json_path_applies() -> None:
    m = compile_mask(rule(json_paths=("$.card",)))
    with pytest.raises(MaskingError) as e:
        masking.mask_json_text("{not json", [m], KEY)
    assert e.value.status == 502
    # detectors alone still mask it as text
    r = masking.mask_json_text("{not json alice@example.com", [det_mask()], KEY)
    assert r.value == "{not json [MASKED:email]"


# --- text, scrub, SQL cells -------------------------------------------------------------------


def test_mask_text_and_scrub() -> None:
    r = masking.mask_text("ip 10.0.0.1 mail a@example.com", [det_mask("null")], KEY)
    assert r.value == "ip [MASKED:ip_address] mail [MASKED:email]"  # no null in text
    assert r.count == 2 and r.touched == ("text",)
    argv = "curl -H 'Authorization: Bearer " + SECRETS["jwt"] + "' http://10.0.0.1/"
    assert masking.scrub(argv) == "curl -H 'Authorization: Bearer [MASKED:jwt]' http://[MASKED:ip_address]/"
    assert masking.scrub("") == "" and masking.scrub("plain") == "plain"
    assert masking.redact_detected("a 10.0.0.1 b@example.com", ["email"]) == "a 10.0.0.1 [MASKED:email]"
    assert masking.detect("x 10.0.0.1", ["ip_address"]) and not masking.detect("x", ["email"])


def test_mask_value_for_sql_cells() -> None:
    cards = compile_mask(rule(id="cards", columns=("cards.number", "*.ssn"), strategy="partial"))
    pii = det_mask("hash", ("email",))
    mv = masking.mask_value
    assert mv("4111111111111111", "cards.number", [cards, pii], KEY) == "************1111"
    assert mv("123-45-6789", "people.ssn", [cards], KEY) == "*******6789"
    assert mv("123-45-6789", "public.people.ssn", [cards], KEY) == "*******6789"
    assert mv("123-45-6789", "ssn", [cards], KEY) == "*******6789"  # table unknown
    assert mv("secret", None, [cards], KEY) == "******"  # column unknown: fail closed
    assert mv("x ann@example.com", "people.note", [cards, pii], KEY) == (
        "x " + masking.hash_token("ann@example.com", KEY))
    assert mv("plain", "cards.owner", [cards], KEY) == "plain"
    assert mv(None, "cards.number", [cards], KEY) is None
    null = compile_mask(rule(id="n", columns=("t.c",), strategy="null"))
    assert mv("v", "t.c", [null], KEY) is None
    cell = masking.mask_cell("4111111111111111", ["v.alias", "cards.number"], [cards], KEY)
    assert (cell.touched, cell.rules, cell.count) == (("v.alias",), ("cards",), 1)
    # MaskRules straight from the policy are accepted too
    assert mv("4111111111111111", "cards.number", [rule(columns=("cards.*",))], KEY) == "[MASKED:m]"
    assert masking.apply_strategy("abcdefgh", cards, KEY) == "****efgh"


# --- Kubernetes Secrets -----------------------------------------------------------------------


def _secret(name: str = "db", **extra: object) -> dict[str, object]:
    obj: dict[str, object] = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": name},
                              "type": "Opaque",
                              "data": {"password": base64.b64encode(b"hunter2").decode()},
                              "stringData": {"token": "plain-token"}}
    obj.update(extra)
    return obj


def test_secret_data_is_masked_and_stays_base64() -> None:
    obj = _secret()
    before = copy.deepcopy(obj)
    r = masking.mask_k8s_secret(obj, KEY)
    assert obj == before
    assert base64.b64decode(r.value["data"]["password"]) == b"[MASKED:k8s-secret]"
    assert r.value["stringData"]["token"] == "[MASKED:k8s-secret]"
    assert set(r.touched) == {"$.data.password", "$.stringData.token"}
    hashed = masking.mask_k8s_secret(obj, KEY, "hash").value
    assert base64.b64decode(hashed["data"]["password"]).decode() == masking.hash_token("hunter2", KEY)


def test_secret_in_lists_tables_watch_events_and_last_applied() -> None:
    applied = json.dumps(_secret(), separators=(",", ":"))
    secret = _secret(metadata={"name": "db", "annotations": {masking.LAST_APPLIED: applied}})
    cm = {"kind": "ConfigMap", "data": {"password": "not-a-secret"}}
    docs = [
        {"kind": "SecretList", "items": [{k: v for k, v in secret.items() if k != "kind"}]},
        {"kind": "List", "items": [secret, cm]},
        {"type": "ADDED", "object": secret},
        {"kind": "Table", "rows": [{"cells": ["db"], "object": {
            "kind": "PartialObjectMetadata",
            "metadata": {"annotations": {masking.LAST_APPLIED: applied}}}}]},
    ]
    for doc in docs:
        out = json.dumps(masking.mask_k8s_secret(doc, KEY).value)
        assert "hunter2" not in out and base64.b64encode(b"hunter2").decode() not in out
        assert "plain-token" not in out
    out = masking.mask_k8s_secret(docs[1], KEY).value
    assert out["items"][1] == cm  # a ConfigMap is not a Secret
    kindless = {"items": [{"data": {"a": "YQ=="}}]}
    assert masking.mask_k8s_secret(kindless, KEY).value == kindless
    assert masking.mask_k8s_secret(kindless, KEY, assume_secret=True).value != kindless


def test_mask_json_text_applies_secret_masking_for_kubernetes() -> None:
    text = json.dumps(_secret())
    r = masking.mask_json_text(text, [], KEY, k8s=True)
    assert "hunter2" not in r.value and "aHVudGVyMg" not in r.value and r.rules == ("k8s-secret",)
    assert masking.mask_json_text(text, [], KEY).value == text  # not a Kubernetes target


# --- hash key ---------------------------------------------------------------------------------


def test_load_hash_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTCULLIS_MASK_KEY", raising=False)
    key = masking.load_hash_key(tmp_path / "state")
    path = tmp_path / "state" / "mask-hash.key"
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert masking.load_hash_key(tmp_path / "state") == key
    monkeypatch.setenv("PORTCULLIS_MASK_KEY", "an environment key of some length")
    assert masking.load_hash_key(tmp_path / "state") == b"an environment key of some length"
    monkeypatch.setenv("PORTCULLIS_MASK_KEY", "short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        masking.load_hash_key(tmp_path / "state")
    monkeypatch.delenv("PORTCULLIS_MASK_KEY")
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        masking.load_hash_key(tmp_path / "state")


# --- streams ----------------------------------------------------------------------------------


def test_line_masker_text_chunks_and_pem_across_lines() -> None:
    stream = (b"start a@example.com\n-----BEGIN RSA PRIVATE KEY-----\nMIIEsecret\nQUJD\n"
              b"-----END RSA PRIVATE KEY----- tail 10.0.0.1\nlast line without newline")
    whole = masking_http.LineMasker([det_mask()], KEY, json_lines=False)
    out = whole.feed(stream) + whole.close()
    split = masking_http.LineMasker([det_mask()], KEY, json_lines=False)
    pieces = b"".join(split.feed(stream[i:i + 1]) for i in range(len(stream))) + split.close()
    assert out == pieces
    assert b"MIIEsecret" not in out and b"QUJD" not in out and b"a@example" not in out
    assert out.endswith(b"tail [MASKED:ip_address]\nlast line without newline")
    assert whole.summary()["count"] == 6


def test_line_masker_json_lines_and_limits() -> None:
    lm = masking_http.LineMasker([det_mask()], KEY, json_lines=True, k8s=True)
    ev = json.dumps({"type": "ADDED", "object": _secret()}).encode()
    pod = json.dumps({"type": "MODIFIED", "object": {"kind": "Pod",
                                                     "status": {"podIP": "10.1.2.3"}}}).encode()
    out = lm.feed(ev + b"\n" + pod[:10]) + lm.feed(pod[10:] + b"\n")
    assert b"hunter2" not in out and b"aHVudGVyMg" not in out and b"10.1.2.3" not in out
    assert out.count(b"\n") == 2
    with pytest.raises(MaskingError):
        masking_http.LineMasker([], KEY, json_lines=False, max_line=10).feed(b"x" * 11)
    paths = masking_http.LineMasker([compile_mask(rule(json_paths=("$.a",)))], KEY, json_lines=True)
    with pytest.raises(MaskingError):
        paths.feed(b"not json\n")


# --- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=25)


@settings(max_examples=150, deadline=None)
@given(json_values, st.sampled_from(masking.STRATEGIES))
def test_mask_json_never_raises_nor_mutates(doc: object, strategy: str) -> None:
    before = copy.deepcopy(doc)
    masks = [det_mask(strategy), compile_mask(rule(id="p", json_paths=("$..a",),
                                                   strategy=strategy))]
    r = masking.mask_json(doc, masks, KEY)
    assert doc == before
    text = json.dumps(r.value)
    masking.mask_json_text(json.dumps(doc), masks, KEY)
    if strategy == "redact":  # what is left has no detector hit
        assert masking.mask_json(json.loads(text), [det_mask()], KEY).count == 0


filler = st.text(alphabet="abcdefghij klmnop,;!", max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(SECRETS)), filler, filler), min_size=1,
                max_size=5),
       st.sampled_from(["redact", "partial", "hash", "null"]), st.booleans())
def test_masked_output_never_contains_a_detected_value(
        parts: list[tuple[str, str, str]], strategy: str, ascii_only: bool) -> None:
    values = [f"{a} {SECRETS[name]} {b}" for name, a, b in parts]
    doc = {"list": values, "nested": {"v": values[0]}, "k": {SECRETS["email"]: values[-1]}}
    text = json.dumps(doc, ensure_ascii=ascii_only)
    for out in (json.dumps(masking.mask_json(doc, [det_mask(strategy)], KEY).value),
                masking.mask_json_text(text, [det_mask(strategy)], KEY).value):
        for name, _, _ in parts:
            secret = SECRETS[name]
            assert secret not in out and json.dumps(secret)[1:-1] not in out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(SECRETS)), filler), max_size=6),
       st.booleans())
def test_raw_fast_path_equals_tree_path(parts: list[tuple[str, str]], pretty: bool) -> None:
    doc = {"items": [{"f": f, "v": f"{f} {SECRETS[n]}"} for n, f in parts], "n": len(parts)}
    text = json.dumps(doc, indent=2 if pretty else None, ensure_ascii=False)
    raw = json.loads(masking.mask_json_text(text, [det_mask()], KEY).value)
    assert raw == masking.mask_json(doc, [det_mask()], KEY).value


def test_key_path_cache_never_keeps_a_sensitive_key() -> None:
    text = json.dumps({"alice@example.com": "bob@example.com", "contact": "carol@example.com",
                       "contact2": "dave@example.com"})
    for _ in range(2):  # the second time from the cache
        r = masking.mask_json_text(text, [det_mask()], KEY)
        assert r.touched == ("$..*", "$..*", "$..contact", "$..contact2")
        assert r.count == 4 and "example.com" not in r.value
    assert masking._KEY_PATHS.get("contact") == "$..contact"
    assert not any("@" in k or "@" in v for k, v in masking._KEY_PATHS.items())


def test_long_pii_dense_bodies_fast_path_equals_tree_path() -> None:
    # Bodies over the detectors' CANDIDATES_MIN take the candidate scan when digit runs are
    # sparse and the combined scan when they are dense: both must mask like the tree path.
    sparse = {"items": [{"name": f"web-{i:04x}abc", "podIP": f"10.244.{i}.7",
                         "note": "lorem ipsum dolor sit amet " * 3} for i in range(20)]}
    dense = {"users": [{"card": "4111 1111 1111 1111", "phone": "+1 415 555 2671",
                        "ip": f"10.0.0.{i}", "order": "1234567890123456",
                        "ssn": "123-45-6789", "mail": f"u{i}@example.com"} for i in range(20)]}
    for doc in (sparse, dense):
        text = json.dumps(doc)
        fast = masking.mask_json_text(text, [det_mask()], KEY)
        tree = masking.mask_json(json.loads(text), [det_mask()], KEY)
        assert json.loads(fast.value) == tree.value
        assert fast.count == tree.count > 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(SECRETS)), filler, st.integers(0, 3)),
                min_size=1, max_size=12),
       st.sampled_from([(None, (", ", ": ")), (None, (",", ":")), (2, (",", ": "))]),
       st.sampled_from(["redact", "null"]), st.permutations(["a", "b"]))
def test_raw_fast_path_equals_tree_path_with_several_masks(
        parts: list[tuple[str, str, int]], layout: tuple[int | None, tuple[str, str]],
        strategy: str, order: list[str]) -> None:
    # Values that are a hit, hits inside text, array items, keys, and long numbers (which
    # send the body to the tree path), formatted compact, with ": " and indented; two masks
    # that share detectors (the first listed decides).
    items: list[object] = []
    for name, text, shape in parts:
        secret = SECRETS[name]
        items.append([{name: secret}, {"note": f"{text} {secret}\n{text}"}, [secret, text],
                      {secret: text, "n": 4111111111111111}][shape])
    masks = {"a": det_mask(strategy, ("email", "credit_card", "phone", "ip_address"), "a"),
             "b": det_mask("redact", ALL, "b")}
    ordered = [masks[k] for k in order]
    indent, separators = layout
    text = json.dumps({"items": items}, indent=indent, separators=separators)
    fast = masking.mask_json_text(text, ordered, KEY)
    tree = masking.mask_json(json.loads(text), ordered, KEY)
    assert json.loads(fast.value) == tree.value
    assert fast.count == tree.count and set(fast.rules) == set(tree.rules)
    assert len(fast.touched) >= 1


def test_raw_fast_path_reports_member_paths_for_every_layout() -> None:
    # "k": "v", "k":"v" (a hit that is the whole value or inside it), an array item, a key,
    # and two spaces after the colon (found by the general path).
    text = ('{"a": "alice@example.com", "b":"x 10.0.0.1", "c": ["+1 415 555 2671"], '
            '"bob@example.com": 1, "d":  "4111 1111 1111 1111"}')
    r = masking.mask_json_text(text, [det_mask()], KEY)
    assert r.value == ('{"a": "[MASKED:email]", "b":"x [MASKED:ip_address]", '
                       '"c": ["[MASKED:phone]"], "[MASKED:email]": 1, '
                       '"d":  "[MASKED:credit_card]"}')
    assert r.touched == ("$..a", "$..b", "$..[*]", "$..*", "$..d")
    assert r.rules == ("pii",) and r.count == 5
