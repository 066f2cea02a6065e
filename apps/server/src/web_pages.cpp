#include "lmd/server/web_pages.h"

namespace lmd::server {

namespace {

std::string html_escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '&':
        out += "&amp;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

constexpr const char* kIndexTemplate = R"HTML(<!doctype html>
<html><head><meta charset="utf-8"><title>lmd api_server</title>
<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
pre{background:#f4f4f4;padding:.6rem;overflow-x:auto}code{background:#f4f4f4}td{padding:.2rem .8rem}</style>
</head><body>
<h1>lmd api_server</h1>
<p>Serving <b>@MODEL@</b>. Try it in the browser: <a href="/chat">web chat</a>.</p>
<table>
<tr><td><code>GET /v1/models</code></td><td>the served model</td></tr>
<tr><td><code>POST /v1/chat/completions</code></td><td>OpenAI chat (stream, tools, logprobs)</td></tr>
<tr><td><code>POST /v1/completions</code></td><td>OpenAI text completion (echo, logprobs)</td></tr>
<tr><td><code>POST /v1/chat/interactive</code></td><td>LMDeploy's stateful chat: the server keeps the session's KV</td></tr>
<tr><td><code>POST /v1/encode</code></td><td>token ids of a text</td></tr>
<tr><td><code>GET /health</code></td><td>200 when it can generate, 503 while loading or shutting down</td></tr>
<tr><td><code>GET /metrics</code></td><td>Prometheus metrics</td></tr>
</table>
<h2>Examples</h2>
<pre>curl @BASE@/v1/chat/completions -H 'Content-Type: application/json' -d '{
  "model": "@MODEL@", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}'</pre>
<pre>curl -N @BASE@/v1/chat/completions -H 'Content-Type: application/json' -d '{
  "model": "@MODEL@", "stream": true, "messages": [{"role": "user", "content": "Tell me a story"}]}'</pre>
<pre>curl @BASE@/v1/completions -H 'Content-Type: application/json' -d '{
  "model": "@MODEL@", "prompt": "Once upon a time", "max_tokens": 32, "logprobs": 2}'</pre>
<pre>curl @BASE@/v1/chat/interactive -H 'Content-Type: application/json' -d '{
  "session_id": 1, "interactive_mode": true, "prompt": "Hi, my name is Ann."}'</pre>
<pre>from openai import OpenAI
client = OpenAI(base_url="@BASE@/v1", api_key="none")
print(client.chat.completions.create(model="@MODEL@",
      messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)</pre>
<p>With <code>--api-keys</code>, send <code>Authorization: Bearer KEY</code>.</p>
</body></html>
)HTML";

void replace_all(std::string& text, const std::string& from, const std::string& to) {
  for (size_t pos = text.find(from); pos != std::string::npos; pos = text.find(from, pos + to.size()))
    text.replace(pos, from.size(), to);
}

}  // namespace

std::string index_page(const std::string& model_name, const std::string& base_url) {
  std::string page = kIndexTemplate;
  replace_all(page, "@MODEL@", html_escape(model_name));
  replace_all(page, "@BASE@", html_escape(base_url));
  return page;
}

const std::string& chat_page() {
  static const std::string page = R"HTML(<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>lmd chat</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;flex-direction:column;height:100vh;color:#222}
header{padding:.5rem 1rem;background:#f0f0f0;display:flex;gap:1rem;flex-wrap:wrap;align-items:center;font-size:.9rem}
header input{width:5rem}
#log{flex:1;overflow-y:auto;padding:1rem}
.msg{white-space:pre-wrap;margin:.4rem 0;padding:.5rem .7rem;border-radius:.4rem;max-width:50rem}
.user{background:#dbeafe;margin-left:auto}.assistant{background:#f3f4f6}.error{background:#fee2e2}
form{display:flex;gap:.5rem;padding:.6rem 1rem;border-top:1px solid #ddd}
textarea{flex:1;height:3.2rem;font:inherit}
#stats{color:#666}
</style></head><body>
<header>
<b>lmd chat</b>
<label>temperature <input id="temperature" type="number" step="0.1" min="0" max="2" value="0.7"></label>
<label>top-p <input id="top_p" type="number" step="0.05" min="0.05" max="1" value="1"></label>
<label>max tokens <input id="max_tokens" type="number" min="1" value="512"></label>
<label>API key <input id="api_key" type="password" style="width:8rem"></label>
<button id="clear" type="button">new chat</button>
<span id="stats"></span>
</header>
<div id="log"></div>
<form id="form"><textarea id="input" placeholder="Message (Enter sends, Shift+Enter: new line)"></textarea>
<button id="send">Send</button><button id="stop" type="button" disabled>Stop</button></form>
<script>
"use strict";
const $ = id => document.getElementById(id);
let history = [], controller = null, model = null;
function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role; div.textContent = text;
  $("log").appendChild(div); $("log").scrollTop = $("log").scrollHeight; return div;
}
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("api_key").value) h["Authorization"] = "Bearer " + $("api_key").value;
  return h;
}
async function modelName() {
  if (model) return model;
  const r = await fetch("/v1/models", {headers: headers()});
  const j = await r.json(); if (!r.ok) throw new Error(j.error ? j.error.message : r.statusText);
  return model = j.data[0].id;
}
async function send(text) {
  history.push({role: "user", content: text}); bubble("user", text);
  const out = bubble("assistant", ""); let reply = "", tokens = 0, start = 0;
  controller = new AbortController(); $("send").disabled = true; $("stop").disabled = false;
  try {
    const body = {model: await modelName(), messages: history, stream: true,
      temperature: +$("temperature").value, top_p: +$("top_p").value, max_tokens: +$("max_tokens").value};
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) { const j = await r.json(); throw new Error(j.error ? j.error.message : r.statusText); }
    const reader = r.body.getReader(), decoder = new TextDecoder(); let buf = "";
    for (;;) {
      const {done, value} = await reader.read(); if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6); if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices.length ? chunk.choices[0].delta : {};
        if (delta.content) {
          if (!start) start = performance.now();
          reply += delta.content; tokens++; out.textContent = reply;
          $("log").scrollTop = $("log").scrollHeight;
          const secs = (performance.now() - start) / 1000;
          if (secs > 0) $("stats").textContent = (tokens / secs).toFixed(1) + " tokens/s";
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { out.className = "msg error"; out.textContent = reply + "\n[" + e.message + "]"; }
  }
  history.push({role: "assistant", content: reply});
  controller = null; $("send").disabled = false; $("stop").disabled = true;
}
$("form").onsubmit = e => { e.preventDefault(); const t = $("input").value.trim();
  if (t && !controller) { $("input").value = ""; send(t); } };
$("input").onkeydown = e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); } };
$("stop").onclick = () => controller && controller.abort();
$("clear").onclick = () => { if (controller) controller.abort(); history = []; $("log").innerHTML = ""; $("stats").textContent = ""; };
</script></body></html>
)HTML";
  return page;
}

}  // namespace lmd::server
