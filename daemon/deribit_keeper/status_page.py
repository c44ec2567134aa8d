"""The status page: ``GET /`` on the operations endpoint, one self-contained HTML document.

An operator in an incident wants to see at a glance whether every account is protected, without
reading JSON. The endpoint is often reached only through a tunnel or a port-forward, with no
internet, so the page is one answer with everything inline: no assets, no framework, no build.

It is rendered here from the same document ``/status`` serves, so the first view is complete
even with script off or blocked; then a few lines of script fetch ``/status`` every 2 s and
rebuild the header and the table with the same layout (``SCRIPT``'s functions mirror
``_header``, ``_row`` and ``_gateway``: change one, change the other; a browser test checks
that both read the same).

Every value shown is data, never markup: an account name, an error reason or a channel is
escaped here (``_el``), and the script only ever appends strings as DOM text nodes (never
``innerHTML``). The Content-Security-Policy allows exactly this page's own style and script, by
their SHA-256 computed at import, and fetches to its own origin; nothing else loads or runs.
The status document holds no secret and no token, so neither does the page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final

from .session import SessionState

REFRESH_MS: Final = 2000  # how often the script re-fetches /status
# The script fetches "status" relative to the page, so that behind a proxy serving the endpoint
# under a prefix (/keeper/ -> /keeper/status) it still finds it; at / it is /status.
CONTENT_TYPE: Final = "text/html; charset=utf-8"
DASH: Final = "\u2014"  # shown where there is no value (no link, no error, no gateway)

# The colour of each state; the state's word is always shown too, so the page reads without
# colour. ok: protected; busy: on the way to ready; bad: no protected link; off: not running.
TONES: Final[Mapping[str, str]] = {
    SessionState.READY.value: "ok",
    SessionState.CONNECTING.value: "busy",
    SessionState.AUTHENTICATING.value: "busy",
    SessionState.ENABLING_COD.value: "busy",
    SessionState.LOST.value: "bad",
    SessionState.BACKOFF.value: "bad",
    SessionState.STOPPED.value: "off",
}

STYLE: Final = """
:root{font:14px/1.4 system-ui,"DejaVu Sans",sans-serif;color:#1f2328;background:#f6f8fa}
body{margin:0}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:.3rem 1.2rem;padding:.7rem 1.2rem;
background:#24292f;color:#f6f8fa}
h1{font-size:1.1rem;margin:0}
#updated{margin-left:auto;opacity:.75}
.stale #updated{color:#ff8182;opacity:1}
.stale table{opacity:.55}
table{border-collapse:collapse;margin:1rem 1.2rem;width:calc(100% - 2.4rem);background:#fff;
box-shadow:0 0 0 1px #d0d7de}
th,td{padding:.4rem .6rem;text-align:left;vertical-align:top;border-bottom:1px solid #d0d7de;
white-space:nowrap}
td.gateway{white-space:normal}
th{font-size:.72rem;text-transform:uppercase;letter-spacing:.05em;color:#57606a;background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.name{font-weight:600}
tr.bad td.name{box-shadow:inset 3px 0 #cf222e}
tr.busy td.name{box-shadow:inset 3px 0 #bf8700}
.badge{display:inline-block;padding:0 .55rem;border-radius:1rem;font-weight:600;white-space:nowrap}
.badge.ok{background:#dafbe1;color:#116329}
.badge.busy{background:#fff8c5;color:#7d4e00}
.badge.bad{background:#ffebe9;color:#a40e26}
.badge.off{background:#eaeef2;color:#57606a}
tr.bad{background:#fff5f5}
header .badge{font-size:.9rem}
.muted{color:#57606a;font-size:.85rem}
ul{margin:0;padding:0;list-style:none}
td.gateway li{font-size:.9rem}
"""

# Mirrors the Python renderers below. `el` appends its children with DOM `append`, which makes
# every string a Text node, as textContent would: data is never parsed as markup.
_SCRIPT_TEMPLATE: Final = """
"use strict";
const TONES = __TONES__, DASH = "\\u2014";
function el(tag, cls, ...children) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  node.append(...children);
  return node;
}
function ago(s) {
  if (s === null || s === undefined) return DASH;
  s = Math.max(0, s);
  if (s < 60) return Math.floor(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor(s % 86400 / 3600) + " h";
}
const since = (now, at) => at ? (Date.parse(now) - Date.parse(at)) / 1000 : null;
const count = (n, what) => n + " " + what + (n === 1 ? "" : "s");
function header(doc) {
  const parts = [el("h1", "", "deribit-keeper"),
    el("span", "badge " + (doc.ready === doc.total ? "ok" : "bad"),
       doc.ready + " of " + doc.total + " ready")];
  if (!doc.alive) parts.push(el("span", "badge off", "stopping"));
  parts.push(el("span", "", "version " + doc.version), el("span", "", "up " + ago(doc.uptime_s)),
    el("span", "", "shard " + (doc.shard || "all")));
  const updated = el("span", "", "as of " + doc.now.slice(11, 19) + " UTC");
  updated.id = "updated";
  parts.push(updated);
  return parts;
}
function link(l) {
  const subscribed = l.subscriptions.length ? count(l.subscriptions.length, "subscription") +
    ": " + l.subscriptions.join(", ") : "no subscriptions";
  return el("li", "", el("b", "", l.client_id || "unauthenticated"), " \\u00b7 local COD " +
    (l.cod ? "on" : "off") + " \\u00b7 " + count(l.open_orders, "open order"),
    el("div", "muted", subscribed));
}
function gateway(g) {
  if (!g) return [el("span", "muted", DASH)];
  const items = g.links.map(link);
  for (const [client, n] of Object.entries(g.http_open_orders))
    items.push(el("li", "", el("b", "", client), " over HTTP \\u00b7 " + count(n, "open order")));
  const where = g.listen.slice(0, g.listen.lastIndexOf(":")) + ":" + g.port;
  return [el("div", "muted", g.listening ? "on " + where : g.listen + " not listening"),
    items.length ? el("ul", "", ...items) : el("div", "muted", "no local links")];
}
function row(name, a, now) {
  const tone = Object.hasOwn(TONES, a.state) ? TONES[a.state] : "off", error = a.last_error;
  const tr = el("tr", tone,
    el("td", "name", name),
    el("td", "state", el("span", "badge " + tone, a.state)),
    el("td", "cod", el("div", "", a.cod_scope), el("div", "muted", a.cod_confirmed_at
      ? "confirmed " + ago(since(now, a.cod_confirmed_at)) + " ago" : "not confirmed")),
    el("td", "num quiet", a.seconds_since_last_message === null ? DASH
      : a.seconds_since_last_message.toFixed(1) + " s"),
    el("td", "num reconnects", String(a.reconnects)),
    el("td", "error", ...(error ? [el("div", "", error.reason),
      el("div", "muted", ago(since(now, error.at)) + " ago")] : [el("span", "muted", DASH)])),
    el("td", "gateway", ...gateway(a.gateway)));
  tr.dataset.account = name;
  return tr;
}
function rows(doc) {
  const found = Object.entries(doc.accounts).map(([name, a]) => row(name, a, doc.now));
  if (found.length) return found;
  const empty = el("td", "muted", "no accounts in this keeper");
  empty.colSpan = 7;
  return [el("tr", "", empty)];
}
let lastNow = null;
async function refresh() {
  try {
    const answer = await fetch("status", {cache: "no-store", signal: AbortSignal.timeout(5000)});
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    const doc = await answer.json();
    document.title = "deribit-keeper: " + doc.ready + "/" + doc.total + " ready";
    document.querySelector("header").replaceChildren(...header(doc));
    document.getElementById("accounts").replaceChildren(...rows(doc));
    document.body.classList.remove("stale");
    lastNow = doc.now;
  } catch (error) {
    document.body.classList.add("stale");
    document.getElementById("updated").textContent = "keeper unreachable (" + error.message +
      "); shown as of " + (lastNow ? lastNow.slice(11, 19) + " UTC" : "page load");
  }
}
async function loop() {
  await refresh();
  setTimeout(loop, __REFRESH_MS__);
}
setTimeout(loop, __REFRESH_MS__);
"""
SCRIPT: Final = _SCRIPT_TEMPLATE.replace("__TONES__", json.dumps(TONES)).replace(
    "__REFRESH_MS__", str(REFRESH_MS)
)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Nothing loads but this page's own style and script (by hash: no 'unsafe-inline') and its
# fetches of /status; no frames, forms, images, plugins or base-URI tricks.
CONTENT_SECURITY_POLICY: Final = (
    f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
    "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS: Final = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"referrer-policy", b"no-referrer"),
)


class _Markup(str):
    """Text already escaped by ``_el``: it is inserted as it is; any other ``str`` is escaped."""


def _el(tag: str, cls: str, *children: str, **attrs: str) -> _Markup:
    """``<tag class=cls ...>children</tag>``, every plain string and attribute escaped (quotes too).

    The same shape as the script's ``el``, so the two renderers read alike.
    """
    inner = "".join(c if isinstance(c, _Markup) else html.escape(c) for c in children)
    pairs = ({"class": cls} if cls else {}) | {k.replace("_", "-"): v for k, v in attrs.items()}
    attributes = "".join(f' {name}="{html.escape(value)}"' for name, value in pairs.items())
    return _Markup(f"<{tag}{attributes}>{inner}</{tag}>")


def _ago(seconds: float | None) -> str:
    """A duration as an operator reads it: ``42 s``, ``7 min``, ``3 h 5 min``, ``2 d 4 h``."""
    if seconds is None:
        return DASH
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _since(now: str, at: str | None) -> float | None:
    """Seconds from ``at`` to ``now``, both ISO times of the status document (None: never)."""
    if not at:
        return None
    return (datetime.fromisoformat(now) - datetime.fromisoformat(at)).total_seconds()


def _tenths(seconds: float) -> str:
    """``2.5 s``: ties round up, as the script's ``toFixed(1)`` does (``format`` rounds them to
    even, so 1.25 would read 1.2 here and 1.3 after the first refresh)."""
    return f"{Decimal(seconds).quantize(Decimal('0.1'), ROUND_HALF_UP)} s"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _header(doc: Mapping[str, Any]) -> list[_Markup]:
    ready, total = doc["ready"], doc["total"]
    parts = [
        _el("h1", "", "deribit-keeper"),
        _el("span", "badge " + ("ok" if ready == total else "bad"), f"{ready} of {total} ready"),
    ]
    if not doc["alive"]:
        parts.append(_el("span", "badge off", "stopping"))
    parts += [
        _el("span", "", f"version {doc['version']}"),
        _el("span", "", f"up {_ago(doc['uptime_s'])}"),
        _el("span", "", f"shard {doc['shard'] or 'all'}"),
        _el("span", "", f"as of {doc['now'][11:19]} UTC", id="updated"),
    ]
    return parts


def _link(link: Mapping[str, Any]) -> _Markup:
    channels: list[str] = link["subscriptions"]
    subscribed = (
        f"{_count(len(channels), 'subscription')}: {', '.join(channels)}"
        if channels
        else "no subscriptions"
    )
    text = (
        f" \u00b7 local COD {'on' if link['cod'] else 'off'} \u00b7 "
        f"{_count(link['open_orders'], 'open order')}"
    )
    client = _el("b", "", link["client_id"] or "unauthenticated")
    return _el("li", "", client, text, _el("div", "muted", subscribed))


def _gateway(gateway: Mapping[str, Any] | None) -> list[_Markup]:
    if gateway is None:
        return [_el("span", "muted", DASH)]
    items = [_link(link) for link in gateway["links"]]
    for client, n in gateway["http_open_orders"].items():
        items.append(
            _el("li", "", _el("b", "", client), f" over HTTP \u00b7 {_count(n, 'open order')}")
        )
    # The configured address may say port 0; the bound port is what an engine dials.
    bound = f"on {gateway['listen'].rpartition(':')[0]}:{gateway['port']}"
    where = bound if gateway["listening"] else f"{gateway['listen']} not listening"
    links = _el("ul", "", *items) if items else _el("div", "muted", "no local links")
    return [_el("div", "muted", where), links]


def _row(name: str, account: Mapping[str, Any], now: str) -> _Markup:
    tone = TONES.get(account["state"], "off")
    confirmed = account["cod_confirmed_at"]
    cod = f"confirmed {_ago(_since(now, confirmed))} ago" if confirmed else "not confirmed"
    quiet = account["seconds_since_last_message"]
    error = account["last_error"]
    errors = (
        [
            _el("div", "", error["reason"]),
            _el("div", "muted", f"{_ago(_since(now, error['at']))} ago"),
        ]
        if error
        else [_el("span", "muted", DASH)]
    )
    return _el(
        "tr",
        tone,
        _el("td", "name", name),
        _el("td", "state", _el("span", f"badge {tone}", account["state"])),
        _el("td", "cod", _el("div", "", account["cod_scope"]), _el("div", "muted", cod)),
        _el("td", "num quiet", DASH if quiet is None else _tenths(quiet)),
        _el("td", "num reconnects", str(account["reconnects"])),
        _el("td", "error", *errors),
        _el("td", "gateway", *_gateway(account["gateway"])),
        data_account=name,
    )


def _rows(doc: Mapping[str, Any]) -> Iterable[_Markup]:
    accounts: Mapping[str, Mapping[str, Any]] = doc["accounts"]
    if not accounts:
        return [_el("tr", "", _el("td", "muted", "no accounts in this keeper", colspan="7"))]
    return [_row(name, account, doc["now"]) for name, account in accounts.items()]


_COLUMNS: Final = (
    "Account",
    "State",
    "COD",
    "Quiet for",
    "Reconnects",
    "Last error",
    "Gateway links",
)


def render(doc: Mapping[str, Any]) -> bytes:
    """The whole page for one status document (``/status``'s), as UTF-8.

    Served with ``HEADERS``, whose Content-Security-Policy lets exactly ``STYLE`` and ``SCRIPT``
    run. Raises KeyError if ``doc`` lacks a key ``/status`` always has.
    """
    title = f"deribit-keeper: {doc['ready']}/{doc['total']} ready"
    head = "".join(_el("th", "", column, scope="col") for column in _COLUMNS)
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{_el('title', '', title)}<style>{STYLE}</style></head>\n<body>"
        f"<header>{''.join(_header(doc))}</header>\n"
        f"<main><table><thead><tr>{head}</tr></thead>"
        f'<tbody id="accounts">{"".join(_rows(doc))}</tbody></table>'
        '<noscript><p class="muted">Script is off: reload to update.</p></noscript></main>\n'
        f"<script>{SCRIPT}</script></body></html>\n"
    )
    return page.encode()
