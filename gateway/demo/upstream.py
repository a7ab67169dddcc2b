"""Demo upstream app: a stand-in for PatentLLM that knows nothing about billing.

It carries the kinds of traffic PatentLLM sends through the gate: an HTML page, a JSON API,
a server-sent-event stream, a WebSocket and streamed uploads. The endpoints that exist only
for the gate's tests and benchmarks (``/api/echo``, deterministic bytes, several
``Set-Cookie``, any status, gzip, slow answers) are not part of it: they live with the tests
(``tests/probes.py``), which add them to this app.

Run standalone with ``python -m gateway.demo.upstream --port 8081``.
"""

import argparse
import asyncio
import hashlib
import logging
from typing import Any

from aiohttp import MultipartReader, WSCloseCode, WSMsgType, web

from gateway.demo.common import CHUNK_SIZE, favicon_handler, float_param, hash_stream, int_param

__all__ = ["PATENTS", "WS_PROTOCOLS", "create_upstream_app", "main"]

log = logging.getLogger(__name__)

WS_PROTOCOLS = ("chat.v1", "chat.v2")


PATENTS: tuple[dict[str, str], ...] = (
    {
        "id": "US-10452978-B2",
        "title": "Attention-based neural networks for sequence transduction",
        "abstract": "A transformer model using self-attention for machine translation of text.",
    },
    {
        "id": "US-11113518-B2",
        "title": "Retrieval-augmented language model for patent search",
        "abstract": "Dense vector retrieval combined with a large language model to rank patents.",
    },
    {
        "id": "US-9876543-B1",
        "title": "Lithium-ion battery cathode with nickel-rich layered oxide",
        "abstract": "A cathode material improving energy density and cycle life of batteries.",
    },
    {
        "id": "US-10987654-B2",
        "title": "Solid-state electrolyte for lithium metal battery",
        "abstract": "A sulfide solid electrolyte suppressing dendrite growth in lithium batteries.",
    },
    {
        "id": "US-11234567-B1",
        "title": "CRISPR-based gene editing delivery system",
        "abstract": "Lipid nanoparticles delivering Cas9 ribonucleoprotein for gene editing.",
    },
    {
        "id": "US-10555444-B2",
        "title": "Autonomous vehicle lidar sensor fusion",
        "abstract": "Fusing lidar and camera data with a neural network for object detection.",
    },
    {
        "id": "US-11777888-B2",
        "title": "Semantic search over patent claims using embeddings",
        "abstract": "Claim text is embedded and searched by cosine similarity for prior art.",
    },
    {
        "id": "US-10222333-B1",
        "title": "Wireless charging coil for wearable devices",
        "abstract": "A flexible coil enabling inductive charging of smart watches.",
    },
    {
        "id": "US-11999000-B2",
        "title": "Large language model summarization of technical documents",
        "abstract": "A language model produces claim-by-claim summaries of patent documents.",
    },
    {
        "id": "US-10101010-B2",
        "title": "Perovskite solar cell with improved stability",
        "abstract": "An encapsulation layer protects perovskite solar cells from moisture.",
    },
)

_ANALYSIS_TEXT = (
    "The claims describe a method combining known elements in a new arrangement . "
    "Prior art shows partial overlap , but the independent claim adds a distinct step . "
    "Novelty appears plausible ; obviousness depends on the motivation to combine . "
    "Recommend a focused search on the dependent claims before filing ."
)
_ANALYSIS = tuple(_ANALYSIS_TEXT.split())

_INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>PatentLLM (demo)</title>
<link rel="icon" href="/favicon.ico" type="image/svg+xml">
<style>
 body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }
 section { border: 1px solid #ddd; border-radius: 6px; padding: 1rem; margin: 1rem 0; }
 #stream { white-space: pre-wrap; min-height: 2rem; }
 .muted { color: #666; }
</style>
</head>
<body>
<h1>PatentLLM (demo)</h1>
<p class="muted">A demo patent search and analysis app. It knows nothing about billing.
 Search comes with every plan; each LLM analysis counts against the plan's analyses of the
 month (the gate's USAGE_RULES and PRICE_QUOTAS: in the demo, 20 on Basic, 500 on Pro and
 then $0.10 each).</p>

<section>
 <h2>Search</h2>
 <form id="search-form" method="get" action="/">
  <input id="q" name="q" type="search" placeholder="e.g. battery, language model" autofocus>
  <button id="search-btn" type="submit">Search</button>
 </form>
 <ul id="results"></ul>
</section>

<section>
 <h2>Analyze <span class="muted" id="metered">(counted)</span></h2>
 <button id="analyze-btn" type="button">Analyze</button>
 <span id="stream-status" class="muted">idle</span>
 <span id="quota" class="muted"></span>
 <div id="stream"></div>
</section>

<section>
 <h2>Chat</h2>
 <span id="ws-status" class="muted">connecting</span>
 <input id="ws-input" type="text" placeholder="say something">
 <button id="ws-send" type="button">Send</button>
 <ul id="ws-log"></ul>
</section>

<section>
 <h2>Upload</h2>
 <form id="upload-form" method="post" action="/api/upload" enctype="multipart/form-data">
  <input id="upload-file" name="file" type="file">
  <button id="upload-btn" type="submit">Upload</button>
 </form>
 <pre id="upload-result"></pre>
</section>

<script>
"use strict";
const $ = (id) => document.getElementById(id);

async function search(q) {
  const resp = await fetch("/api/search?q=" + encodeURIComponent(q),
                           {headers: {"Accept": "application/json"}});
  const list = $("results");
  list.replaceChildren();
  if (!resp.ok) {
    const li = document.createElement("li");
    li.textContent = "error " + resp.status;
    list.append(li);
    return;
  }
  const data = await resp.json();
  for (const r of data.results) {
    const li = document.createElement("li");
    li.dataset.id = r.id;
    li.textContent = r.id + " - " + r.title + " (" + r.score.toFixed(2) + ")";
    list.append(li);
  }
}

$("search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("q").value;
  history.replaceState(null, "", "?q=" + encodeURIComponent(q));
  search(q);
});

// The analysis streams over SSE (fetch, to read the answer's status too). A refusal is the
// gate's JSON (the app knows nothing about billing): its message and the link it names.
const GATE_LINKS = [["upgrade_url", "Upgrade to Pro"], ["subscribe_url", "Subscribe"],
                    ["login_url", "Sign in"]];

// The gate's quota answer (429 quota_exceeded: meter, limit, used, resets_at, upgrade_url),
// in the gate's words: "You've used your 20 analyses this period · resets on 6 Jan 2027".
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                "Dec"];
function plural(word, n) {
  if (n === 1) { return word; }
  if (word.endsWith("is")) { return word.slice(0, -2) + "es"; }
  if (/[^aeiou]y$/.test(word)) { return word.slice(0, -1) + "ies"; }
  if (/(s|x|ch|sh)$/.test(word)) { return word + "es"; }
  return word + "s";
}
function quotaMessage(body) {
  const at = body.resets_at ? new Date(body.resets_at) : null;
  const resets = at ? at.getUTCDate() + " " + MONTHS[at.getUTCMonth()] + " " +
    at.getUTCFullYear() : "";
  const what = plural(String(body.meter).replace(/[_-]/g, " "), body.limit);
  return "You've used your " + body.limit + " " + what + " this period" +
    (resets ? " · resets on " + resets : "") + " ·";
}

async function showRefusal(resp) {
  let body = {};
  try { body = await resp.json(); } catch (e) { body = {}; }
  const out = $("stream");
  const text = body.error === "quota_exceeded" ? quotaMessage(body)
    : (body.message || "The request was refused.");
  out.replaceChildren(document.createTextNode(text + " "));
  const quota = body.error === "quota_exceeded";
  for (const [key, label] of GATE_LINKS) {
    if (typeof body[key] === "string" && body[key].startsWith("/")) {
      const link = document.createElement("a");
      link.href = body[key];
      link.id = "stream-" + key.replace("_url", "");
      link.textContent = quota && key === "upgrade_url" ? "Upgrade" : label;
      out.append(link);
      break;
    }
  }
  $("stream-status").textContent = "refused (" + resp.status + ")";
}

$("analyze-btn").addEventListener("click", async () => {
  $("stream").textContent = "";
  $("stream-status").textContent = "streaming";
  const url = "/api/stream?n=20&delay=0.1&q=" + encodeURIComponent($("q").value);
  try {
    const resp = await fetch(url, {headers: {"Accept": "text/event-stream"}});
    if (!resp.ok) { await showRefusal(resp); return; }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) { break; }
      buffered += value;
      let end;
      while ((end = buffered.indexOf("\\n\\n")) >= 0) {
        const event = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        const data = event.split("\\n").filter((l) => l.startsWith("data: "))
          .map((l) => l.slice(6));
        if (event.includes("event: done")) { $("stream-status").textContent = "done"; return; }
        if (event.includes("event: quota")) {  // the gate's X-Gate-Quota, as the app saw it
          $("quota").textContent = "used " + data.join(" ");
          continue;
        }
        if (data.length) { $("stream").textContent += data.join(" ") + " "; }
      }
    }
    $("stream-status").textContent = "ended";
  } catch (e) {
    $("stream-status").textContent = "error (the connection failed)";
  }
});

const wsScheme = location.protocol === "https:" ? "wss://" : "ws://";
const ws = new WebSocket(wsScheme + location.host + "/ws", ["chat.v1", "chat.v2"]);
ws.onopen = () => { $("ws-status").textContent = "open"; };
ws.onclose = (ev) => {
  $("ws-status").textContent = "closed " + ev.code + (ev.reason ? " (" + ev.reason + ")" : "");
  // 4401/4402: the gate ended the socket (signed out, subscription ended); a reload lands on
  // the gate's page, which says why and what to do.
  if (ev.code === 4401 || ev.code === 4402) {
    const again = document.createElement("a");
    again.href = location.href;
    again.id = "ws-reload";
    again.textContent = " Reload";
    $("ws-status").append(again);
  }
};
ws.onmessage = (ev) => {
  const li = document.createElement("li");
  li.textContent = typeof ev.data === "string" ? ev.data : "[binary]";
  $("ws-log").append(li);
};
$("ws-send").addEventListener("click", () => {
  if (ws.readyState === WebSocket.OPEN) { ws.send($("ws-input").value); $("ws-input").value = ""; }
});
$("ws-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter") { $("ws-send").click(); }
});

$("upload-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const resp = await fetch("/api/upload", {method: "POST", body: new FormData($("upload-form"))});
  $("upload-result").textContent = resp.status + " " + await resp.text();
});

const initial = new URLSearchParams(location.search).get("q");
if (initial !== null) { $("q").value = initial; search(initial); }
</script>
</body>
</html>
"""


def search_patents(query: str) -> list[dict[str, Any]]:
    """Score the fake patents by the share of query words found in title + abstract."""
    words = [w for w in query.lower().split() if w]
    results: list[dict[str, Any]] = []
    for patent in PATENTS:
        text = f"{patent['title']} {patent['abstract']}".lower()
        if words:
            hits = sum(1 for w in words if w in text)
            if hits == 0:
                continue
            score = round(hits / len(words), 3)
        else:
            score = 0.0
        results.append({"id": patent["id"], "title": patent["title"], "score": score})
    results.sort(key=lambda r: (-r["score"], r["id"]))
    return results


async def index(request: web.Request) -> web.Response:
    """The app's single HTML page; the query (``?q=``) is read by its script."""
    return web.Response(text=_INDEX_HTML, content_type="text/html")


async def healthz(request: web.Request) -> web.Response:
    """Liveness probe."""
    return web.Response(text="ok")


async def api_search(request: web.Request) -> web.Response:
    """Search the in-memory patent list."""
    query = request.query.get("q", "")
    return web.json_response({"query": query, "results": search_patents(query)})


async def api_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``n`` token events ``delay`` seconds apart, then ``event: done``."""
    n = int_param(request, "n", 10, 0, 100_000)
    delay = float_param(request, "delay", 0.2, 0.0, 60.0)
    # A newline in the query would end the SSE field early and let it inject events.
    query = " ".join(request.query.get("q", "").split())
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            # Ask nginx-style buffering proxies in front of us to pass events through at once.
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    sent = 0
    try:
        quota = " ".join(request.headers.get("X-Gate-Quota", "").split())
        if quota:  # the gate's usage of this customer's quotas (METER=USED/LIMIT,…)
            await resp.write(f"event: quota\ndata: {quota}\n\n".encode())
        for i in range(n):
            if i:
                await asyncio.sleep(delay)
            token = query if (i == 0 and query) else _ANALYSIS[i % len(_ANALYSIS)]
            # write() hands each event straight to the transport (no response buffering) and
            # waits for the socket to drain once more than 64 KiB is pending.
            await resp.write(f"id: {i}\ndata: {token}\n\n".encode())
            sent += 1
        await resp.write(b"event: done\ndata: end\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        # The client went away mid-stream; that ends the stream, nothing to report to anyone.
        log.debug("event=sse_client_gone sent=%d of=%d", sent, n)
    return resp


def _close_code_for_echo(code: int | None) -> int:
    # 0 means "no status code in the close frame"; 1005/1006/1015 must never be sent on the wire.
    if code is None or code in (0, 1005, 1006, 1015) or not 1000 <= code <= 4999:
        return int(WSCloseCode.OK)
    return code


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    """WebSocket echo: text as text, binary as binary, close code and reason mirrored.

    A text message ``close:CODE:REASON`` makes the server close with that code and reason.
    """
    ws = web.WebSocketResponse(protocols=WS_PROTOCOLS, autoclose=False)
    await ws.prepare(request)
    # An explicit receive loop, not `async for`: iteration stops at CLOSE and hides its code.
    while not ws.closed:
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT:
            text = msg.data
            if text.startswith("close:"):
                code_s, _, reason = text.removeprefix("close:").partition(":")
                try:
                    code = int(code_s)
                except ValueError:
                    code = int(WSCloseCode.OK)
                await ws.close(code=_close_code_for_echo(code), message=reason.encode())
                break
            await ws.send_str(text)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            await ws.close(code=_close_code_for_echo(msg.data), message=(msg.extra or "").encode())
            break
        elif msg.type is WSMsgType.ERROR:
            log.warning("event=ws_error error=%r", ws.exception())
            break
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED):
            break
    return ws


async def _walk_multipart(
    reader: MultipartReader, total: "hashlib._Hash", parts: list[dict[str, Any]]
) -> int:
    size = 0
    while (part := await reader.next()) is not None:
        if isinstance(part, MultipartReader):
            size += await _walk_multipart(part, total, parts)
            continue
        digest = hashlib.sha256()
        part_size = 0
        while chunk := await part.read_chunk(CHUNK_SIZE):
            part_size += len(chunk)
            digest.update(chunk)
            if part.filename is not None:
                total.update(chunk)
        if part.filename is not None:
            size += part_size
        parts.append(
            {
                "name": part.name,
                "filename": part.filename,
                "bytes": part_size,
                "sha256": digest.hexdigest(),
            }
        )
    return size


async def api_upload(request: web.Request) -> web.Response:
    """Hash a streamed upload without holding it in memory.

    Raw bodies: ``bytes``/``sha256`` cover the whole body. Multipart bodies: they cover the
    concatenated contents of the file parts, and ``parts`` lists every part.
    """
    if request.content_type.startswith("multipart/"):
        total = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        size = await _walk_multipart(await request.multipart(), total, parts)
        return web.json_response(
            {"mode": "multipart", "bytes": size, "sha256": total.hexdigest(), "parts": parts}
        )
    size, digest = await hash_stream(request)
    return web.json_response({"mode": "raw", "bytes": size, "sha256": digest.hexdigest()})


def create_upstream_app() -> web.Application:
    """Build the demo upstream application."""
    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/favicon.ico", favicon_handler("P", "#2563eb"))
    app.router.add_get("/api/search", api_search)
    app.router.add_get("/api/stream", api_stream)
    app.router.add_get("/ws", ws_echo)
    app.router.add_post("/api/upload", api_upload)
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the demo upstream app until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    web.run_app(
        create_upstream_app(),
        host=args.host,
        port=args.port,
        access_log=log if args.access_log else None,
        print=None,
    )


if __name__ == "__main__":
    main()
