#!/usr/bin/env python3
"""End-to-end tests of `lmd serve api_server` and `lmd serve api_client` on CPU.

A real server runs on a loopback port with the tiny stories260K model; the official `openai` package
(pip install openai) drives it, and raw sockets send what no well-behaved client would.

    python3 tests/e2e/test_server.py --lmd build/lmd --assets ../shared [-v] [-k PATTERN]
"""
import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
import urllib.request

try:
    import openai
except ImportError:  # the tests that need it are skipped with a message
    openai = None

ARGS = None
API_KEY = "test-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An api_server subprocess; waits until /health says it can generate."""

    def __init__(self, *extra, model="stories260K"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [ARGS.lmd, "serve", "api_server", os.path.join(ARGS.assets, "models", model),
               "--server-port", str(self.port), "--device", "cpu", "--threads", "1", *extra]
        self.log = open(os.path.join(ARGS.log_dir, f"server-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy: " + self.output())

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def request(self, method, path, body=None, headers=None, raw=False):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if raw or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        return resp.status, payload, resp

    def get(self, path, headers=None):
        status, payload, _ = self.request("GET", path, headers=headers)
        return status, payload

    def metric(self, name):
        text = self.get("/metrics")[1].decode()
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(match.group(1))

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def auth():
    return {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


class ServerTest(unittest.TestCase):
    server = None

    @classmethod
    def setUpClass(cls):
        # A session length beyond the model's 512 positions leaves room for the long generations that
        # the disconnect tests need; the batch size keeps the KV pool small.
        cls.server = Server("--api-keys", API_KEY, "--session-len", "4096", "--max-batch-size", "40")
        if openai:
            cls.client = openai.OpenAI(base_url=cls.server.url + "/v1", api_key=API_KEY, max_retries=0)

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        assert code == 0, f"server exited with {code}: {cls.server.output()}"

    def post(self, path, body, headers=None):
        status, payload, _ = self.server.request("POST", path, body, headers=headers or auth())
        return status, json.loads(payload)

    def need_openai(self):
        if openai is None:
            self.skipTest("the openai package is not installed (pip install openai)")

    # ---- through the openai package ----

    def test_models(self):
        self.need_openai()
        models = self.client.models.list()
        self.assertEqual([m.id for m in models.data], ["stories260K"])

    def test_greedy_completion_equals_reference(self):
        self.need_openai()
        with open(os.path.join(ARGS.assets, "models", "stories260K", "greedy_reference.json")) as f:
            ref = json.load(f)
        # An empty prompt is BOS alone, the reference's prompt.
        out = self.client.completions.create(model="stories260K", prompt="", max_tokens=200, temperature=0)
        self.assertEqual(out.choices[0].text, ref["text"])
        self.assertEqual(out.usage.completion_tokens, 200)

    def test_chat_stream_matches_non_stream(self):
        self.need_openai()
        messages = [{"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]}]
        full = self.client.chat.completions.create(model="stories260K", messages=messages, max_tokens=40,
                                                   temperature=0)
        self.assertEqual(full.choices[0].message.role, "assistant")
        self.assertTrue(full.choices[0].message.content)
        stream = self.client.chat.completions.create(model="stories260K", messages=messages, max_tokens=40,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        self.assertEqual(text, full.choices[0].message.content)
        self.assertEqual(finish, full.choices[0].finish_reason)
        self.assertEqual(usage.completion_tokens, full.usage.completion_tokens)

    def test_completion_logprobs_and_echo(self):
        self.need_openai()
        out = self.client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=8,
                                             temperature=0, logprobs=3, echo=True)
        choice = out.choices[0]
        self.assertTrue(choice.text.startswith("Once upon a time"))
        self.assertEqual(len(choice.logprobs.tokens), 8)
        self.assertEqual(len(choice.logprobs.top_logprobs[0]), 3)
        self.assertTrue(all(lp <= 0 for lp in choice.logprobs.token_logprobs))
        chat = self.client.chat.completions.create(model="stories260K", max_tokens=4, temperature=0,
                                                   messages=[{"role": "user", "content": "Lily"}],
                                                   logprobs=True, top_logprobs=2)
        self.assertEqual(len(chat.choices[0].logprobs.content), 4)
        self.assertEqual(len(chat.choices[0].logprobs.content[0].top_logprobs), 2)

    def test_sampling_seed_n_and_stop(self):
        self.need_openai()
        kw = dict(model="stories260K", prompt="Once upon a time", max_tokens=24, temperature=1.0, top_p=0.9,
                  seed=42, n=2)
        a = self.client.completions.create(**kw)
        b = self.client.completions.create(**kw)
        self.assertEqual(len(a.choices), 2)
        self.assertEqual([c.text for c in a.choices], [c.text for c in b.choices])
        greedy = self.client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=30,
                                                temperature=0)
        text = greedy.choices[0].text
        stop = text[12:17]
        for stream in (False, True):
            out = self.client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=30,
                                                 temperature=0, stop=[stop], stream=stream)
            got = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
            self.assertEqual(got, text[:text.index(stop)])

    def test_openai_errors(self):
        self.need_openai()
        bad_key = openai.OpenAI(base_url=self.server.url + "/v1", api_key="wrong", max_retries=0)
        with self.assertRaises(openai.AuthenticationError):
            bad_key.models.list()
        for kwargs in ({"max_tokens": -1}, {"temperature": 5}, {"top_p": "high"}, {"n": 0}):
            with self.subTest(**kwargs), self.assertRaises(openai.BadRequestError) as ctx:
                self.client.chat.completions.create(model="stories260K",
                                                    messages=[{"role": "user", "content": "x"}], **kwargs)
            self.assertEqual(ctx.exception.body["param"], list(kwargs)[0])
        with self.assertRaises(openai.NotFoundError):
            self.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
        with self.assertRaises(openai.BadRequestError):  # longer than the session
            self.client.completions.create(model="stories260K", prompt="Lily " * 5000)
        with self.assertRaises(openai.BadRequestError):  # the base template has no tool syntax
            self.client.chat.completions.create(
                model="stories260K", messages=[{"role": "user", "content": "x"}],
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])

    def test_concurrent_streams_match_sequential(self):
        self.need_openai()
        prompts = [f"Once upon a time there was a {w}" for w in
                   "cat dog girl boy king queen bird fish tree car ball cake sun moon star frog".split()] * 2

        def run(prompt):
            stream = self.client.chat.completions.create(
                model="stories260K", messages=[{"role": "user", "content": prompt}], max_tokens=48,
                temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        sequential = [run(p) for p in prompts]
        results = [None] * len(prompts)

        def worker(i):
            results[i] = run(prompts[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(len(prompts), 32)
        self.assertEqual(results, sequential)

    def test_dropped_stream_frees_blocks(self):
        generated_before = self.server.metric("lmd_generation_tokens_total")
        blocks_before = self.server.metric("lmd_kv_blocks_used")
        sock = socket.create_connection(("127.0.0.1", self.server.port))
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True,
                           "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: " +
                     str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 5:
            received += sock.recv(4096)
        self.assertGreater(self.server.metric("lmd_kv_blocks_used"), blocks_before)
        sock.close()
        deadline = time.time() + 10
        while time.time() < deadline and self.server.metric("lmd_kv_blocks_used") > blocks_before:
            time.sleep(0.05)
        self.assertEqual(self.server.metric("lmd_kv_blocks_used"), blocks_before)
        self.assertEqual(self.server.metric("lmd_requests_running"), 0)
        # Cancelled well before its 4000 tokens.
        self.assertLess(self.server.metric("lmd_generation_tokens_total") - generated_before, 4000)

    # ---- raw HTTP ----

    def test_malformed_requests_get_json_errors(self):
        cases = {
            "truncated JSON": b'{"messages": [{"role": "user", "content": "hi"',
            "not an object": b'[1, 2, 3]',
            "wrong type": b'{"messages": "hello"}',
            "huge number": b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}',
            "huge integer": b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000000000000000000}',
            "negative max_tokens": b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}',
            "non-UTF-8": b'{"messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}',
            "empty body": b'',
            "10 MB body": b'{"messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}',
        }
        for name, body in cases.items():
            with self.subTest(name):
                try:
                    status, payload, _ = self.server.request("POST", "/v1/chat/completions", body,
                                                             headers=auth(), raw=True)
                except (ConnectionResetError, BrokenPipeError):
                    self.fail("the server dropped the connection instead of answering")
                self.assertGreaterEqual(status, 400)
                self.assertLess(status, 500)
                error = json.loads(payload)["error"]
                self.assertTrue(error["message"])
                self.assertIn("type", error)
                self.assertEqual(self.server.get("/health")[0], 200)

    def test_unauthorized_without_key(self):
        status, payload = self.server.get("/v1/models")
        self.assertEqual(status, 401)
        self.assertEqual(json.loads(payload)["error"]["type"], "authentication_error")

    def test_pages_health_metrics_encode(self):
        status, page = self.server.get("/")
        self.assertEqual(status, 200)
        self.assertIn(b"/v1/chat/completions", page)
        self.assertIn(b'href="/chat"', page)
        status, chat = self.server.get("/chat")
        self.assertEqual(status, 200)
        self.assertIn(b"<script>", chat)
        self.assertNotRegex(chat.decode(), r'src="http|href="http')  # no external assets
        metrics = self.server.get("/metrics")[1].decode()
        for name in ("lmd_requests_running", "lmd_requests_waiting", "lmd_prompt_tokens_total",
                     "lmd_generation_tokens_total", "lmd_kv_blocks_used", "lmd_kv_blocks_free",
                     "lmd_time_to_first_token_seconds_bucket", "lmd_time_per_output_token_seconds_bucket"):
            self.assertIn(name, metrics)
        status, out = self.post("/v1/encode", {"input": "Once upon a time"})
        self.assertEqual(status, 200)
        self.assertEqual(out["input_ids"][0], 1)
        self.assertEqual(out["length"], len(out["input_ids"]))

    def test_interactive_sessions(self):
        status, payload, resp = self.server.request(
            "POST", "/v1/chat/interactive",
            {"session_id": 4242, "interactive_mode": True, "prompt": "Lily", "request_output_len": 16,
             "temperature": 0, "stream": True}, headers=auth())
        self.assertEqual(status, 200)
        lines = [json.loads(line) for line in payload.decode().splitlines() if line.strip()]
        self.assertIsNone(lines[0]["finish_reason"])
        self.assertIsNotNone(lines[-1]["finish_reason"])
        self.assertGreater(lines[-1]["history_tokens"], 0)
        # A second request while the first still runs is refused, naming the session.
        long_turn = {"session_id": 4243, "interactive_mode": True, "prompt": "Lily", "request_output_len": 3000,
                     "ignore_eos": True, "stream": True}
        sock = socket.create_connection(("127.0.0.1", self.server.port))
        body = json.dumps(long_turn).encode()
        sock.sendall(b"POST /v1/chat/interactive HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: " +
                     str(len(body)).encode() + b"\r\n\r\n" + body)
        sock.recv(4096)
        status, busy = self.post("/v1/chat/interactive", {"session_id": 4243, "interactive_mode": True,
                                                          "prompt": "Hi"})
        self.assertEqual(status, 400)
        self.assertIn("4243", busy["error"]["message"])
        status, cancelled = self.post("/v1/chat/interactive", {"session_id": 4243, "cancel": True})
        self.assertEqual(status, 200)
        sock.close()
        self.post("/v1/chat/interactive", {"session_id": 4242, "prompt": ""})

    def test_api_client_with_piped_input(self):
        proc = subprocess.run([ARGS.lmd, "serve", "api_client", self.server.url, "--api-key", API_KEY,
                               "--temperature", "0", "--max-new-tokens", "16"],
                              input="Once upon a time\nLily\nend\nTom\nexit\n", capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        replies = [line for line in proc.stdout.splitlines() if line.strip()]
        self.assertIn("(new session)", replies)
        # Leaving ends the session on the server.
        self.assertEqual(self.server.metric("lmd_sessions"), 0)
        self.assertGreaterEqual(len(replies), 4)
        bad = subprocess.run([ARGS.lmd, "serve", "api_client", self.server.url, "--api-key", "nope"],
                             input="hello\n", capture_output=True, text=True, timeout=60)
        self.assertNotEqual(bad.returncode, 0)
        self.assertIn("401", bad.stderr)


class LimitsAndShutdownTest(unittest.TestCase):
    def test_429_then_graceful_sigterm(self):
        server = Server("--max-concurrent-requests", "1", "--session-len", "4096", "--max-batch-size", "4")
        try:
            sock = socket.create_connection(("127.0.0.1", server.port))
            body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True,
                               "stream": True}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            sock.recv(4096)
            status, payload, resp = server.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
            self.assertEqual(status, 429)
            self.assertEqual(resp.getheader("Retry-After"), "1")
            self.assertEqual(json.loads(payload)["error"]["type"], "rate_limit_error")
            start = time.time()
            server.proc.send_signal(signal.SIGTERM)
            self.assertEqual(server.proc.wait(30), 0)
            self.assertLess(time.time() - start, 15)
            sock.close()
        finally:
            server.stop()


class ScriptedServer:
    """lmd_scripted_server: the real server and engine, but the model always writes `reply`."""

    def __init__(self, chat_template, reply):
        self.proc = subprocess.Popen([ARGS.scripted_server, os.path.join(ARGS.assets, "models", "stories260K"),
                                      chat_template, reply], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"lmd_scripted_server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def stop(self):
        self.proc.stdin.close()  # it serves until its stdin closes
        self.proc.stdout.close()
        return self.proc.wait(30)


WEATHER_TOOLS = [{"type": "function", "function": {
    "name": name, "description": f"{name} of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    for name in ("get_weather", "get_time")]


class ToolCallTest(unittest.TestCase):
    """Tool calls through the openai package, streamed and not, from a scripted model reply."""

    # Per template: the scripted reply, and the content and calls (name, arguments) it must come back as.
    CASES = {
        "qwen": ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                 '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome, \\"Italy\\""}}\n'
                 '</tool_call>',
                 "Checking both.", [("get_weather", {"city": "Paris"}), ("get_time", {"city": 'Rome, "Italy"'})]),
        "llama3": ('<function=get_weather>{"city": "Paris"}</function>', None,
                   [("get_weather", {"city": "Paris"})]),
        "internlm2": ('Let me look.<|action_start|><|plugin|>\n{"name": "get_time", "parameters": '
                      '{"city": "Oslo"}}<|action_end|>', "Let me look.", [("get_time", {"city": "Oslo"})]),
    }

    def setUp(self):
        if openai is None:
            self.skipTest("the openai package is not installed (pip install openai)")
        if not ARGS.scripted_server:
            self.skipTest("needs --scripted-server (tests/e2e/scripted_server.cpp)")

    def check_calls(self, message, content, calls):
        self.assertEqual(message.content, content)
        self.assertEqual([(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls], calls)
        self.assertEqual(len({c.id for c in message.tool_calls}), len(calls))
        self.assertTrue(all(c.type == "function" and c.id.startswith("call_") for c in message.tool_calls))

    def check_replies(self, server, request, content, calls):
        """The request's reply, non-streamed and streamed, comes back as `content` and `calls`."""
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        whole = client.chat.completions.create(**request).choices[0]
        self.assertEqual(whole.finish_reason, "tool_calls")
        self.check_calls(whole.message, content, calls)

        # The openai package's own accumulator puts the streamed deltas together.
        argument_pieces = 0
        with client.chat.completions.stream(**request) as stream:
            for event in stream:
                argument_pieces += event.type == "tool_calls.function.arguments.delta"
            final = stream.get_final_completion().choices[0]
        self.assertEqual(final.finish_reason, "tool_calls")
        self.check_calls(final.message, content or None, calls)
        # The arguments arrived in pieces as they were generated, not whole.
        self.assertGreater(argument_pieces, 3 * len(calls))

        # The raw chunks: a call opens with its id, type, name and empty arguments; the pieces after it
        # carry arguments only.
        chunks = client.chat.completions.create(**request, stream=True)
        opened = {}
        for chunk in chunks:
            delta = chunk.choices[0].delta if chunk.choices else None
            for call in (delta.tool_calls or []) if delta else []:
                if call.index not in opened:
                    self.assertTrue(call.id and call.type == "function" and call.function.name)
                    self.assertEqual(call.function.arguments, "")
                    opened[call.index] = call.function.name
                else:
                    self.assertIsNone(call.id)
                    self.assertIsNone(call.function.name)
                    self.assertTrue(call.function.arguments)
        self.assertEqual(list(opened.values()), [name for name, _ in calls])

    def test_tool_calls_stream_as_deltas(self):
        for template, (reply, content, calls) in self.CASES.items():
            with self.subTest(template=template):
                server = ScriptedServer(template, reply)
                try:
                    self.check_replies(server, dict(model="stories260K", tools=WEATHER_TOOLS,
                                                    messages=[{"role": "user", "content": "Weather and time?"}]),
                                       content, calls)
                finally:
                    self.assertEqual(server.stop(), 0)

    # Per template: what the model writes after the prompt's prefilled call opening, for tool_choice
    # required (the opening marker is in the prompt) and for a named function (its name is too).
    FORCED_CASES = {
        "qwen": ('{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>',
                 '{"city": "Oslo"}}\n</tool_call>'),
        "llama3": ('get_time>{"city": "Oslo"}</function>', '{"city": "Oslo"}</function>'),
        "internlm2": ('{"name": "get_time", "parameters": {"city": "Oslo"}}', '{"city": "Oslo"}}'),
    }

    def test_required_and_named_tool_choice_continue_the_prefilled_call(self):
        named = {"type": "function", "function": {"name": "get_time"}}
        for template, (required_reply, named_reply) in self.FORCED_CASES.items():
            for tool_choice, reply in (("required", required_reply), (named, named_reply)):
                with self.subTest(template=template, tool_choice=tool_choice):
                    server = ScriptedServer(template, reply)
                    try:
                        self.check_replies(server, dict(model="stories260K", tools=WEATHER_TOOLS,
                                                        tool_choice=tool_choice,
                                                        messages=[{"role": "user", "content": "Time in Oslo?"}]),
                                           None, [("get_time", {"city": "Oslo"})])
                    finally:
                        self.assertEqual(server.stop(), 0)


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lmd", default="build/lmd", help="the lmd executable")
    parser.add_argument("--assets", default=os.environ.get("LMD_TEST_ASSETS", "../shared"),
                        help="the shared test assets (models/stories260K)")
    parser.add_argument("--log-dir", default=None, help="where server logs go (default: a temporary folder)")
    parser.add_argument("--scripted-server", default=None,
                        help="lmd_scripted_server, for the tool-call tests (skipped without it)")
    ARGS, rest = parser.parse_known_args()
    if not os.path.isdir(os.path.join(ARGS.assets, "models", "stories260K")):
        print(f"shared test assets not found at {ARGS.assets}; skipped")
        return 0
    temporary_logs = ARGS.log_dir is None
    if temporary_logs:
        import tempfile
        ARGS.log_dir = tempfile.mkdtemp(prefix="lmd-server-e2e-")
    os.makedirs(ARGS.log_dir, exist_ok=True)
    if openai is None:
        print("note: the openai package is not installed (pip install openai); its tests are skipped")
    result = unittest.main(argv=[sys.argv[0], *rest], exit=False).result
    return finish(result, ARGS.log_dir, temporary_logs)


def finish(result, log_dir, temporary_logs):
    """Exit code of a run; its server logs are kept where a test failed or the caller chose the folder."""
    if not result.wasSuccessful():
        print(f"server logs: {log_dir}")
        return 1
    if temporary_logs:
        import shutil
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
