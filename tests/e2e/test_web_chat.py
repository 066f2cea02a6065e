#!/usr/bin/env python3
"""The /chat page of `lmd serve api_server` in headless Chromium, driven through Selenium.

A real server runs stories260K on a loopback port; the browser types messages, watches the reply
stream in, sends a second turn, stops a reply early and reads the tokens/s display. Needs Debian's
`chromium` and `chromium-driver` and `pip install selenium`; without them it says so and exits 0.

    python3 tests/e2e/test_web_chat.py --lmd build/lmd --assets ../shared [-v]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_server  # noqa: E402  (its Server runs and stops the api_server)

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

# Records what the page sends, and how often the reply being streamed changes on screen.
INSTRUMENT = """
window.sentBodies = [];
const realFetch = window.fetch;
window.fetch = (url, opts) => {
  if (opts && opts.body) window.sentBodies.push(JSON.parse(opts.body));
  return realFetch(url, opts);
};
window.replyUpdates = 0;
new MutationObserver(records => window.replyUpdates += records.length).observe(
    document.getElementById("log"), {childList: true, subtree: true, characterData: true});
"""

# Clicks Stop as soon as the reply shows its first text.
STOP_AT_FIRST_TEXT = """
new MutationObserver((records, observer) => {
  const replies = document.querySelectorAll("#log .assistant");
  if (replies.length && replies[replies.length - 1].textContent) {
    observer.disconnect();
    document.getElementById("stop").click();
  }
}).observe(document.getElementById("log"), {childList: true, subtree: true, characterData: true});
"""


def browser_paths():
    """Chromium and its driver from Debian's packages, or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


class WebChatTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # Room for the long reply that the stop test interrupts.
        cls.server = test_server.Server("--session-len", "2048")
        browser, driver = browser_paths()
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
            options.add_argument(flag)
        # An explicit driver path keeps Selenium from looking for one online.
        cls.browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
        cls.browser.set_script_timeout(30)

    @classmethod
    def tearDownClass(cls):
        cls.browser.quit()
        code = cls.server.stop()
        assert code == 0, f"server exited with {code}: {cls.server.output()}"

    def setUp(self):
        self.browser.get(self.server.url + "/chat")
        self.browser.execute_script(INSTRUMENT)
        self.set_field("temperature", "0")

    def set_field(self, name, value):
        field = self.browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)

    def el(self, name):
        return self.browser.find_element(By.ID, name)

    def replies(self):
        return [e.text for e in self.browser.find_elements(By.CSS_SELECTOR, "#log .assistant")]

    def say(self, text):
        """Types a message, sends it with Enter and waits until the reply is complete."""
        self.el("input").send_keys(text, Keys.ENTER)
        WebDriverWait(self.browser, 30).until(lambda b: not self.el("stop").is_enabled())
        WebDriverWait(self.browser, 30).until(lambda b: self.el("send").is_enabled())

    def reference_reply(self, text, max_tokens):
        """The same request without the browser, not streamed."""
        body = {"messages": [{"role": "user", "content": text}], "temperature": 0, "top_p": 1,
                "max_tokens": max_tokens}
        request = urllib.request.Request(self.server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)["choices"][0]["message"]["content"]

    def test_two_turns_stream_with_tokens_per_second(self):
        self.set_field("max_tokens", "60")
        self.say("Once upon a time")
        replies = self.replies()
        self.assertEqual(len(replies), 1)
        self.assertTrue(replies[0].strip(), "the reply stayed empty")
        # The reply grew on screen in steps (one per streamed delta), not all at once.
        self.assertGreater(self.browser.execute_script("return window.replyUpdates"), 10)
        self.assertEqual(replies[0], self.reference_reply("Once upon a time", 60).strip())
        self.assertRegex(self.el("stats").text, r"^\d+(\.\d+)? tokens/s$")
        self.assertGreater(float(self.el("stats").text.split()[0]), 0)

        self.say("The end")
        self.assertEqual(len(self.replies()), 2)
        self.assertTrue(self.replies()[1].strip())
        self.assertEqual(len(self.browser.find_elements(By.CSS_SELECTOR, "#log .user")), 2)
        # The second request carries the conversation so far, with the page's settings.
        sent = self.browser.execute_script("return window.sentBodies")
        self.assertEqual(len(sent), 2)
        self.assertEqual([m["role"] for m in sent[1]["messages"]], ["user", "assistant", "user"])
        self.assertEqual(sent[1]["messages"][2]["content"], "The end")
        self.assertTrue(sent[1]["stream"])
        self.assertEqual((sent[1]["temperature"], sent[1]["max_tokens"]), (0, 60))

    def test_stop_ends_the_reply_early(self):
        self.set_field("max_tokens", "1500")
        full = self.reference_reply("Once upon a time", 1500).strip()
        self.browser.execute_script(STOP_AT_FIRST_TEXT)
        self.say("Once upon a time")
        stopped = self.replies()[-1]
        self.assertTrue(stopped, "no text arrived before Stop")
        self.assertLess(len(stopped), len(full))
        self.assertTrue(full.startswith(stopped.strip()), f"{stopped!r} is not the start of {full!r}")
        self.assertEqual(self.el("log").find_elements(By.CSS_SELECTOR, ".error"), [])
        # The server cancels the request whose client went away.
        deadline = time.time() + 10
        while self.server.metric("lmd_http_generations_in_flight") > 0 and time.time() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.server.metric("lmd_http_generations_in_flight"), 0)
        # The page is ready for the next message.
        self.assertTrue(self.el("send").is_enabled())
        self.assertFalse(self.el("stop").is_enabled())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lmd", default="build/lmd", help="the lmd executable")
    parser.add_argument("--assets", default=os.environ.get("LMD_TEST_ASSETS", "../shared"),
                        help="the shared test assets (models/stories260K)")
    parser.add_argument("--log-dir", default=None, help="where server logs go (default: a temporary folder)")
    args, rest = parser.parse_known_args()
    if not os.path.isdir(os.path.join(args.assets, "models", "stories260K")):
        print(f"shared test assets not found at {args.assets}; skipped")
        return 0
    if webdriver is None or browser_paths() is None:
        print("web chat test skipped: needs chromium, chromium-driver (apt) and selenium (pip)")
        return 0
    temporary_logs = args.log_dir is None
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="lmd-web-chat-")
    os.makedirs(args.log_dir, exist_ok=True)
    test_server.ARGS = args
    result = unittest.main(argv=[sys.argv[0], *rest], exit=False).result
    return test_server.finish(result, args.log_dir, temporary_logs)


if __name__ == "__main__":
    sys.exit(main())
