"""Redaction: mask secrets and apply attribute allow/deny lists before anything leaves the assembler.

Pure functions over ``normalizers.canonical`` models and the :class:`~normalizers.envelope.Envelope`; inputs are
never modified (unchanged items are returned as the same objects, changed ones as copies).

What is masked (all on by default, each rule can be disabled by name):

* **Secrets inside text** — every ``str`` value anywhere in an attribute value (nested lists and maps included), a
  log record's body, a span's name and status message, and every string of the agent-run view. Text is scanned
  as-is, so secrets inside JSON-string attributes such as ``gen_ai.input.messages`` are found in the raw JSON text;
  the replacement keeps the JSON valid (quotes and escapes around a masked value are preserved, and the mask
  contains no character JSON would escape). :data:`TEXT_RULES` lists the rules: provider API keys (OpenAI,
  Anthropic, AWS access key ids, GitHub, Slack, Google, Stripe, Hugging Face), bearer tokens and
  ``Authorization`` header values, JWTs, PEM private keys, ``user:password@`` in URLs, signed-URL query secrets,
  and ``password``/``api_key``/``secret``/``*_token`` assignments (``k=v``, ``k: v``, ``"k": "v"``).
* **Values of secret-named keys** (rule ``secret-attribute``) — when an attribute key, or a key of a map nested in a
  value, names a secret (see :func:`is_secret_key`), every string under it is replaced whole. Numbers and booleans
  are kept: they are token counts and flags far more often than secrets.

A masked occurrence becomes ``[REDACTED:<rule>]`` and is counted per rule in the envelope's
:class:`~normalizers.envelope.RedactionReport`; a mask is never masked or counted again, so redacting twice
changes nothing.

Allow/deny lists (``fnmatch`` globs, case-sensitive, matched against whole keys) apply to the top-level keys of
every attribute map — span, span event, span link, log record, resource and scope attributes. A key matching the
deny list is dropped; with an allow list set, a key matching none of its globs is dropped. Resource and scope
attributes repeat on every span and log event, and every occurrence is counted.

Conventions: key formats as the providers publish them (the prefixes GitHub secret scanning and gitleaks also look
for); ``key=value`` / ``"key": "value"`` assignment rules in the style of gitleaks. Text shorter than
:data:`MIN_TEXT_LENGTH` is not scanned (no rule can match it), which keeps the many short attribute values cheap.
Each rule also names what all its matches contain (:class:`TextRule` ``gate``/``needles``): a text is scanned only
for the rules whose substrings it holds, so most prose and JSON needs no regex pass at all, with the same result as
scanning for every rule (``tests/test_redact.py`` compares the two). A :class:`Redactor` remembers its results for
short strings (names, models, ids), which repeat across traces.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from functools import lru_cache
from typing import Any, Iterable, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from normalizers.agent_run import AgentRun
from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.envelope import Envelope, RedactionReport

#: Rule name for values masked because their key names a secret.
SECRET_ATTRIBUTE_RULE = "secret-attribute"

#: Strings shorter than this are never scanned: the shortest text rule match (``pwd=x``, ``pwd: x``) is 5 characters.
MIN_TEXT_LENGTH = 5

_MASK_FORMAT = "[REDACTED:{}]"
# The only non-ASCII characters that Python's re matches case-insensitively to an ASCII letter (U+0130 and U+0131 to
# i, U+017F to s, U+212A to k): text holding one is scanned without the prefilter (Redactor._pattern_for).
_FOLDS_TO_ASCII = ("\u0130", "\u0131", "\u017f", "\u212a")
# Redactor memo bounds: strings up to this length are remembered across passes (see Redactor._text); a memo that
# reaches _MEMO_SIZE entries starts over.
_MEMO_MAX_LENGTH = 128
_MEMO_SIZE = 8192
_MASK_RE = re.compile(r"\[REDACTED:[a-z0-9-]+\]")


class TextRule(NamedTuple):
    """One text rule: a match is one character of ``first`` (taken literally) followed by the regex ``rest``; its
    secret part is ``rest``'s group ``v`` if it has one, else the whole match.

    Why the split: in the combined scan every rule becomes one branch per character of ``first``, and a branch that
    opens with a plain character is rejected with one comparison (Python's ``re`` checks a branch's leading literal
    before entering it, and skips positions whose character starts no branch), while a branch opening with a
    lookbehind or a group costs a full attempt at every position: several times slower. Word-boundary lookbehinds
    therefore sit at the start of ``rest`` and look back over the first character too (the ``.`` in
    ``(?<![A-Za-z0-9].)``).
    """

    name: str
    first: str
    rest: str
    #: Prefilter (an optimization only; see :meth:`Redactor._pattern_for`): a match of this rule contains at least one
    #: character of ``gate`` (when set) and at least one of ``needles`` (when set). A needle with an upper-case
    #: letter is compared as is, one without against the lower-cased text (so it also covers ``(?i:...)`` parts).
    #: Both must hold for *every* possible match; a rule with neither is always scanned for.
    gate: str = ""
    needles: tuple[str, ...] = ()


# After a one-character ``first``: it starts a word (no letter/digit before it) or a camelCase word ("clientSecret").
_WORD_START = r"(?:(?<![A-Za-z0-9].)|(?<=[a-z0-9][A-Z]))"


def _assignment(keyword_rest: str, bare_min: int) -> str:
    """``rest`` of a ``<key word><suffix> = value`` rule (``=`` or ``:``), in the spellings seen in text and JSON.

    The key may be quoted, also with escaped quotes (JSON inside a JSON string). The value (group ``v``) is a
    double-quoted string with escapes, an escaped-quote string, a single-quoted string, or a bare word of at least
    ``bare_min`` characters that does not open an object or list (so ``"password": {"type": "string"}`` in a tool
    schema is not a password). ``v`` includes the value's quotes; the masker puts them back around the mask.
    """
    return (rf"{_WORD_START}(?i:{keyword_rest})[A-Za-z0-9_-]*\\?[\"']?[ \t]*[:=][ \t]*"
            r"(?P<v>\"(?:[^\"\\\n]|\\.)+\"|\\\"(?:(?!\\\")[^\n])+\\\"|'[^'\n]+'"
            rf"|(?![\[{{\"'\\])[^\s\"'\\&,;<>{{}}\[\]]{{{bare_min},}})")


#: The text rules in priority order: where two rules match at the same position the earlier one wins. A name may
#: appear on several rules (one per first character of its key words).
TEXT_RULES: tuple[TextRule, ...] = (
    # A PEM block; a truncated one (no END line, e.g. a clipped attribute) is masked to the end of its base64 body.
    TextRule("private-key", "-", r"----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:(?s:.*?)-----END[A-Z0-9 ]*"
                                 r"PRIVATE KEY(?: BLOCK)?-----|(?:[A-Za-z0-9+/=:,\t\r\n -]|\\[nrt])*)",
             "-", ("-----BEGIN",)),
    TextRule("anthropic-api-key", "s", r"(?<![A-Za-z0-9_-].)k-ant-[A-Za-z0-9_-]{20,}", "-", ("sk-",)),
    TextRule("openai-api-key", "s", r"(?<![A-Za-z0-9_-].)k-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
             "-", ("sk-",)),
    TextRule("aws-access-key-id", "A", r"(?<![A-Za-z0-9].)(?:KIA|SIA|BIA|CCA)[A-Z0-9]{16}(?![A-Za-z0-9])",
             "A", ("AKIA", "ASIA", "ABIA", "ACCA")),
    TextRule("github-token", "g", r"(?<![A-Za-z0-9_].)(?:h[pousr]_[A-Za-z0-9]{36,}|ithub_pat_[A-Za-z0-9_]{22,})",
             "_", ("gh", "github_pat_")),
    TextRule("slack-token", "x", r"(?<![A-Za-z0-9].)ox[abposr]-[A-Za-z0-9-]{10,}", "-", ("xox",)),
    TextRule("google-api-key", "A", r"(?<![A-Za-z0-9_-].)Iza[0-9A-Za-z_-]{35}", "A", ("AIza",)),
    TextRule("stripe-api-key", "rs", r"(?<![A-Za-z0-9].)k_(?:live|test)_[A-Za-z0-9]{16,}", "_", ("k_",)),
    TextRule("huggingface-token", "h", r"(?<![A-Za-z0-9_].)f_[A-Za-z0-9]{30,}", "_", ("hf_",)),
    # Header or header-like text ("Authorization: Basic ..."); the scheme word stays readable.
    TextRule("authorization-header", "Aa", _WORD_START + r"(?i:uthorization)\\?[\"']?[ \t]*[:=][ \t]*\\?[\"']?"
             r"(?:(?i:basic|bearer|digest|token|negotiate|ntlm)[ \t]+)?(?P<v>[^\s\"'\\,;]{8,})", ":=",
             ("authorization",)),
    # RFC 6750 token characters, 16+ of them (real tokens are long, while "Bearer of bad news" must stay), not
    # ending in "." (the end of a sentence).
    TextRule("bearer-token", "Bb", r"(?<![A-Za-z0-9].)(?i:earer)[ \t]+(?P<v>[A-Za-z0-9._~+/-]{15,}[A-Za-z0-9_~+/-]=*)",
             " \t", ("bearer",)),
    TextRule("jwt", "e", r"(?<![A-Za-z0-9_-].)yJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*", "J",
             (".eyJ",)),
    # scheme://user:password@host: anchored on "://" (a scheme-first rule would be tried at every letter); the user
    # name stays.
    TextRule("url-password", ":", r"//[^\s/?#@:\"'\\]*:(?P<v>[^\s/?#@\"'\\]+)@", "@", ("://",)),
    TextRule("url-query-secret", "?&",
             r"(?i:token|sig|signature|x-amz-signature|x-amz-security-token|x-goog-signature)=(?P<v>[^&\s\"'\\#]+)",
             "=", ("token=", "sig=", "signature=")),
    TextRule("password", "Pp", _assignment(r"ass(?:word|wd|phrase)|wd", 1), ":=", ("pass", "pwd")),
    TextRule("generic-api-key", "Aa", _assignment(r"pi[_-]?key", 8), ":=", ("api",)),
    # Plain "token" is left out: {"token": "Hello", "logprob": -0.1} is model output, not a credential.
    TextRule("secret-assignment", "Ss", _assignment(r"ecret|ession[_-]?token", 8), ":=", ("secret", "session")),
    TextRule("secret-assignment", "Pp", _assignment(r"rivate[_-]?key", 8), ":=", ("private",)),
    TextRule("secret-assignment", "Aa", _assignment(r"(?:ccess|uth|pi)[_-]?token", 8), ":=", ("token",)),
    TextRule("secret-assignment", "Rr", _assignment(r"efresh[_-]?token", 8), ":=", ("refresh",)),
    TextRule("secret-assignment", "Ii", _assignment(r"d[_-]?token", 8), ":=", ("token",)),
)

#: Every rule name a :class:`RedactionConfig` can disable.
RULE_NAMES: tuple[str, ...] = tuple(dict.fromkeys(r.name for r in TEXT_RULES)) + (SECRET_ATTRIBUTE_RULE,)

# Words (see is_secret_key) that make a key secret wherever they appear, and adjacent word pairs that do.
_SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "pwd", "secret", "secrets", "authorization",
                           "cookie", "cookies", "credential", "credentials", "apikey", "privatekey"})
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key"), ("signing", "key")})
_KEY_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


@lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Whether an attribute (or nested map) key names a secret, so its string values are masked whole.

    The key is split into lower-case words at non-alphanumerics and camelCase boundaries
    (``http.request.header.x-api-key`` -> ``http request header x api key``). Secret: a word of
    ``password passwd passphrase pwd secret(s) authorization cookie(s) credential(s) apikey privatekey``, an adjacent
    pair ``api key`` / ``private key`` / ``access key`` / ``signing key``, or ``token`` as the *last* word
    (``access_token``, ``x-auth-token``). ``token`` elsewhere or plural is a count or a type, never a credential:
    ``gen_ai.usage.input_tokens``, ``llm.token_count.prompt``, ``gen_ai.token.type``, ``ai.usage.promptTokens``.
    """
    words = [w.lower() for w in _KEY_WORD_RE.findall(key)]
    if not words:
        return False
    if words[-1] == "token" or any(w in _SECRET_WORDS for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


class RedactionConfig(BaseModel):
    """What :class:`Redactor` does. The default masks every rule of :data:`RULE_NAMES` and drops nothing.

    ``allow_attributes``/``deny_attributes``: ``fnmatch`` globs matched case-sensitively against whole attribute
    keys (``"gen_ai.*"``, ``"http.request.header.*"``). Raises ``pydantic.ValidationError`` for an unknown rule name
    in ``disabled_rules``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mask_secrets: bool = Field(True, description="Mask secrets at all; False leaves content as received.")
    disabled_rules: frozenset[str] = Field(frozenset(), description="Rule names (RULE_NAMES) not to apply.")
    allow_attributes: tuple[str, ...] | None = Field(None, description=(
        "If set, only attributes whose key matches one of these globs are kept."))
    deny_attributes: tuple[str, ...] = Field((), description="Attributes whose key matches one of these are dropped.")

    @field_validator("disabled_rules")
    @classmethod
    def _known_rules(cls, v: frozenset[str]) -> frozenset[str]:
        unknown = sorted(v - set(RULE_NAMES))
        if unknown:
            raise ValueError(f"unknown redaction rule(s) {unknown}; known: {list(RULE_NAMES)}")
        return v


class Redacted(NamedTuple):
    """Result of :meth:`Redactor.redact`."""

    spans: list[CanonicalSpan]
    log_events: list[CanonicalLogEvent]
    report: RedactionReport


def _glob_matcher(globs: Iterable[str]):
    """One compiled regex for a list of globs (``fnmatch`` syntax); its ``match`` tests a key. No globs: never."""
    return re.compile("|".join(fnmatch.translate(g) for g in globs) or "(?!)").match


class _Tally:
    """Counts of one redaction pass, plus a cache of scanned strings (resource values repeat on every span)."""

    def __init__(self) -> None:
        self.masked: Counter[str] = Counter()
        self.by_allow = 0
        self.by_deny = 0
        self.seen: dict[str, tuple[str, Counter[str] | None]] = {}
        # id(map) -> (map, result, masked counts, dropped by allow list, dropped by deny list); see _shared_attributes.
        self.shared: dict[int, tuple[dict, dict, Counter[str] | None, int, int]] = {}

    def report(self, masking_applied: bool, base: RedactionReport | None = None) -> RedactionReport:
        masked = self.masked.copy()
        if base is not None:
            masked.update(base.masked)
        return RedactionReport(
            masking_applied=masking_applied, masked=dict(sorted(masked.items())),
            dropped_by_allow_list=self.by_allow + (base.dropped_by_allow_list if base else 0),
            dropped_by_deny_list=self.by_deny + (base.dropped_by_deny_list if base else 0))


class Redactor:
    """Applies one :class:`RedactionConfig`. Build once and reuse: construction compiles the rules.

    Recommended order in the assembler: :meth:`redact` the spans and log events *before* the dialect readers build
    the agent-run view, so the allow/deny lists also decide what the view can see; or :meth:`redact_envelope` on a
    finished envelope, which additionally masks secrets in the agent-run view (the lists cannot apply there: it
    has no attribute maps).
    """

    def __init__(self, config: RedactionConfig | None = None) -> None:
        self.config = config or RedactionConfig()
        rules = [r for r in TEXT_RULES if r.name not in self.config.disabled_rules] if self.config.mask_secrets else []
        # One alternation scanned once per string, one branch per (rule, first character) in rule order: branch k is
        # "<char>(?P<r{k}>rest)", so "r{k}" is the last group to close and names the branch; the secret part (if
        # any) is group "v{k}".
        branches = [(r, c) for r in rules for c in r.first]
        self._branch_rule = [r.name for r, _ in branches]
        self._branch_source = [f"{re.escape(c)}(?P<r{k}>{r.rest.replace('(?P<v>', f'(?P<v{k}>')})"
                               for k, (r, c) in enumerate(branches)]
        self._text_re = re.compile("|".join(self._branch_source)) if branches else None
        # Prefilter (see _pattern_for), on bit masks of branches: rules without a prefilter are always scanned for;
        # the others are grouped by gate, each needle (as is / lower-cased) naming the branches it makes possible.
        self._always = 0
        groups: dict[str, dict[str, int]] = {}
        for k, (r, _) in enumerate(branches):
            if not r.gate and not r.needles:
                self._always |= 1 << k
            for needle in r.needles or (("",) if r.gate else ()):
                needles = groups.setdefault(r.gate, {})
                needles[needle] = needles.get(needle, 0) | 1 << k
        self._prefilter = tuple(
            (tuple(gate), tuple((n, bits) for n, bits in needles.items() if n != n.lower()),
             tuple((n, bits) for n, bits in needles.items() if n == n.lower()))
            for gate, needles in groups.items())
        self._subset_re: dict[int, re.Pattern] = {}
        # _text results of short strings (see _text), and key -> "values under it are masked whole".
        self._memo: dict[str, tuple[str, Counter[str] | None]] = {}
        self._secret_keys: dict[str, bool] = {}
        self._mask_keys = self.config.mask_secrets and SECRET_ATTRIBUTE_RULE not in self.config.disabled_rules
        # None = no list, so the common no-lists case skips rebuilding every attribute map.
        self._denied = _glob_matcher(self.config.deny_attributes) if self.config.deny_attributes else None
        self._allowed = (_glob_matcher(self.config.allow_attributes)
                         if self.config.allow_attributes is not None else None)

    # -- text ------------------------------------------------------------------------------------------------------

    def mask_text(self, text: str) -> tuple[str, dict[str, int]]:
        """``text`` with every secret replaced by ``[REDACTED:<rule>]``, and the number of masks per rule."""
        tally = _Tally()
        return self._text(text, tally), dict(tally.masked)

    def _text(self, text: str, tally: _Tally) -> str:
        if self._text_re is None or len(text) < MIN_TEXT_LENGTH:
            return text
        # Short strings (names, models, ids) repeat across traces: remembered by the redactor; longer ones per pass.
        memo = self._memo if len(text) <= _MEMO_MAX_LENGTH else tally.seen
        hit = memo.get(text)
        if hit is None:
            pattern = self._pattern_for(text)
            if pattern is None:
                hit = (text, None)
            else:
                counts: Counter[str] = Counter()
                masked = pattern.sub(lambda m: self._replace(m, counts), text)
                hit = (masked, counts) if counts else (text, None)
            if memo is self._memo and len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[text] = hit
        if hit[1] is None:
            # The same object when nothing was masked (callers detect "unchanged" by identity): this very one, as an
            # equal string seen before may be another object.
            return text
        tally.masked.update(hit[1])
        return hit[0]

    def _pattern_for(self, text: str) -> re.Pattern | None:
        """The alternation of only those branches that can match somewhere in ``text``, by the rules' prefilters
        (:class:`TextRule` ``gate``/``needles``); ``None`` when none can. Dropping a branch that matches nowhere
        changes no match of the alternation, so the result equals scanning with the full one. Lower-cased needles
        are looked up in ``text.lower()``, which covers every ``(?i:...)`` match unless ``text`` holds one of the
        four non-ASCII characters Python's ``re`` folds onto ASCII letters: then the full alternation is used."""
        if not text.isascii() and any(c in text for c in _FOLDS_TO_ASCII):
            return self._text_re
        lower = text.lower()
        possible = self._always
        for gate, as_is, lowered in self._prefilter:
            if gate:
                for c in gate:
                    if c in text:
                        break
                else:
                    continue
            for needle, bits in as_is:
                if needle in text:
                    possible |= bits
            for needle, bits in lowered:
                if needle in lower:
                    possible |= bits
        if not possible:
            return None
        pattern = self._subset_re.get(possible)
        if pattern is None:
            pattern = re.compile("|".join(src for k, src in enumerate(self._branch_source) if possible >> k & 1))
            if len(self._subset_re) < 1024:
                self._subset_re[possible] = pattern
        return pattern

    def _replace(self, m: re.Match, counts: Counter[str]) -> str:
        k = int(m.lastgroup[1:])  # "r{k}" encloses "v{k}", so it is the last group to close
        name = self._branch_rule[k]
        v = f"v{k}"
        has_value = v in m.re.groupindex and m.start(v) >= 0
        start, end = (m.start(v), m.end(v)) if has_value else m.span()
        secret = m.string[start:end]
        if _MASK_RE.search(secret):  # a mask from an earlier pass: leave it, so redacting twice changes nothing
            return m.group()
        # Keep the quotes of a quoted value (see _assignment) so JSON text stays JSON.
        quote = next((q for q in ('\\"', '"', "'") if len(secret) >= 2 * len(q) and secret.startswith(q)
                      and secret.endswith(q)), "")
        counts[name] += 1
        mask = quote + _MASK_FORMAT.format(name) + quote
        return m.string[m.start():start] + mask + m.string[end:m.end()]

    # -- values and attribute maps ---------------------------------------------------------------------------------

    def _value(self, value: Any, secret: bool, tally: _Tally) -> Any:
        """A JSON value with secrets masked; ``secret``: the value sits under a secret-named key."""
        if isinstance(value, str):
            if secret:
                if not value or _MASK_RE.fullmatch(value):
                    return value
                tally.masked[SECRET_ATTRIBUTE_RULE] += 1
                return _MASK_FORMAT.format(SECRET_ATTRIBUTE_RULE)
            return self._text(value, tally)
        if isinstance(value, list):
            out = [self._value(x, secret, tally) for x in value]
            return value if all(a is b for a, b in zip(out, value)) else out
        if isinstance(value, dict):
            return self._dict(value, secret, tally)
        return value

    def _secret_key(self, key: str) -> bool:
        s = self._secret_keys.get(key)
        if s is None:
            s = bool(self._mask_keys and is_secret_key(key))
            if len(self._secret_keys) >= _MEMO_SIZE:
                self._secret_keys.clear()
            self._secret_keys[key] = s
        return s

    def _dict(self, value: dict[str, Any], secret: bool, tally: _Tally) -> dict[str, Any]:
        """:meth:`_value` of a map: the same dict when nothing changed, else a copy with the changed values (same keys,
        same order). Short strings, numbers, booleans and nulls under keys that are not secret are left alone without
        a call: no rule can change them."""
        out = None
        scan = self._text_re is not None
        secret_keys = self._secret_keys
        memo = self._memo
        for k, x in value.items():
            tx = type(x)
            if tx is int or tx is float or tx is bool or x is None:
                continue
            s = secret or secret_keys.get(k)
            if s is None:
                s = self._secret_key(k)
            if tx is str and not s:
                n = len(x)
                if not scan or n < MIN_TEXT_LENGTH:
                    continue
                if n <= _MEMO_MAX_LENGTH and (hit := memo.get(x)) is not None and hit[1] is None:
                    continue  # a short string known to hold nothing to mask (see _text)
                y = self._text(x, tally)
            else:
                y = self._value(x, s, tally)
            if y is not x:
                if out is None:
                    out = dict(value)
                out[k] = y
        return value if out is None else out

    def _attributes(self, attrs: dict[str, Any], tally: _Tally) -> dict[str, Any]:
        """An attribute map after the allow/deny lists and masking (the same dict when nothing changed)."""
        kept = attrs
        if self._denied is not None or self._allowed is not None:
            kept = {}
            for k, v in attrs.items():
                if self._denied is not None and self._denied(k):
                    tally.by_deny += 1
                elif self._allowed is not None and not self._allowed(k):
                    tally.by_allow += 1
                else:
                    kept[k] = v
        out = self._value(kept, False, tally)
        return attrs if out is kept and len(kept) == len(attrs) else out

    # -- models ----------------------------------------------------------------------------------------------------

    def _shared_attributes(self, attrs: dict[str, Any], tally: _Tally) -> dict[str, Any]:
        """:meth:`_attributes` of a map that many items share (resource and scope attributes: one dict per OTLP
        resource/scope, see ``normalizers.canonical``), computed once per pass and its counts replayed per item."""
        hit = tally.shared.get(id(attrs))
        if hit is None or hit[0] is not attrs:
            outer, by_allow, by_deny = tally.masked, tally.by_allow, tally.by_deny
            tally.masked = masked = Counter()
            try:
                out = self._attributes(attrs, tally)
            finally:
                tally.masked = outer
            hit = (attrs, out, masked or None, tally.by_allow - by_allow, tally.by_deny - by_deny)
            tally.shared[id(attrs)] = hit
            tally.by_allow, tally.by_deny = by_allow, by_deny
        if hit[2]:
            tally.masked.update(hit[2])
        tally.by_allow += hit[3]
        tally.by_deny += hit[4]
        return hit[1]

    def _resource_and_scope(self, item: CanonicalSpan | CanonicalLogEvent, tally: _Tally) -> dict[str, Any]:
        """Updates shared by spans and log events: resource and scope attributes."""
        update: dict[str, Any] = {}
        resource = self._shared_attributes(item.resource, tally)
        if resource is not item.resource:
            update["resource"] = resource
        scope_attrs = self._shared_attributes(item.scope.attributes, tally)
        if scope_attrs is not item.scope.attributes:
            update["scope"] = item.scope.model_copy(update={"attributes": scope_attrs})
        return update

    def _span(self, span: CanonicalSpan, tally: _Tally) -> CanonicalSpan:
        update = self._resource_and_scope(span, tally)
        text = span.name
        if (masked := self._text(text, tally)) is not text:
            update["name"] = masked
        text = span.status_message
        if (masked := self._text(text, tally)) is not text:
            update["status_message"] = masked
        attrs = self._attributes(span.attributes, tally)
        if attrs is not span.attributes:
            update["attributes"] = attrs
        for field in ("events", "links"):
            items = getattr(span, field)
            if items:
                new = [self._with_attributes(x, tally) for x in items]
                if any(a is not b for a, b in zip(new, items)):
                    update[field] = new
        return span.model_copy(update=update) if update else span

    def _with_attributes(self, item: BaseModel, tally: _Tally) -> BaseModel:
        attrs = self._attributes(item.attributes, tally)
        return item if attrs is item.attributes else item.model_copy(update={"attributes": attrs})

    def _log_event(self, event: CanonicalLogEvent, tally: _Tally) -> CanonicalLogEvent:
        update = self._resource_and_scope(event, tally)
        attrs = self._attributes(event.attributes, tally)
        if attrs is not event.attributes:
            update["attributes"] = attrs
        body = self._value(event.body, False, tally)
        if body is not event.body:
            update["body"] = body
        return event.model_copy(update=update) if update else event

    # -- public entry points ---------------------------------------------------------------------------------------

    def redact(self, spans: Iterable[CanonicalSpan],
               log_events: Iterable[CanonicalLogEvent] = ()) -> Redacted:
        """Spans and log events with the lists applied and secrets masked, in the same order, with their report."""
        tally = _Tally()
        out_spans = [self._span(s, tally) for s in spans]
        out_events = [self._log_event(e, tally) for e in log_events]
        return Redacted(out_spans, out_events, tally.report(self.config.mask_secrets))

    def redact_envelope(self, envelope: Envelope) -> Envelope:
        """A copy of ``envelope`` with spans, log events, resource and agent-run view redacted.

        The returned report adds this pass's counts to those already in ``envelope.redaction`` (so redacting the
        spans first and the envelope afterwards reports each occurrence once: masks are not re-counted), and
        ``masking_applied`` is true when this pass or an earlier one ran with masking on. The idempotency key is
        unchanged: redaction never touches span ids, end times or status codes.
        """
        tally = _Tally()
        spans = [self._span(s, tally) for s in envelope.spans]
        events = [self._log_event(e, tally) for e in envelope.log_events]
        resource = self._attributes(envelope.resource, tally)
        run = envelope.agent_run
        dumped = run.model_dump()
        masked_run = self._value(dumped, False, tally)
        if masked_run is not dumped:
            run = AgentRun.model_validate(masked_run)
        report = tally.report(self.config.mask_secrets or envelope.redaction.masking_applied, envelope.redaction)
        return envelope.model_copy(update={"spans": spans, "log_events": events, "resource": resource,
                                           "agent_run": run, "redaction": report})
