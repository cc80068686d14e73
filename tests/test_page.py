"""The web page (page.html, page.js), driven in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) through selenium, against serve.py started as a subprocess on 127.0.0.1, on a tiny model saved
as a train.py run folder. What the page shows is held against what the API itself answers for the same
conversation (greedy, or seeded sampling): the answers, the exact model input, the error lines.

Without /usr/bin/chromium, /usr/bin/chromedriver or selenium the tests are skipped; to run them:
    apt-get install chromium chromium-driver && pip install selenium
Nothing is downloaded at test time: the system's Chromium runs headless with its network features off."""
import base64
import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from conftest import tiny_release
from conversation import Conversation, Turn, layout

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:
    webdriver = None

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MISSING = [what for what, there in ((CHROMIUM, os.path.exists(CHROMIUM)), (CHROMEDRIVER, os.path.exists(CHROMEDRIVER)),
                                    ("selenium", webdriver is not None)) if not there]
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"the browser tests need {', '.join(MISSING)}: "
                                             f"apt-get install chromium chromium-driver && pip install selenium"),
    pytest.mark.usefixtures("one_thread"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTEXT = 1024          # the tiny model's context: room for an answer long enough to be stopped half-way
LONG = 800              # max new tokens of that answer
Q1, Q2, Q3 = "what colour is the square?", "how many circles are there?", "and what shape is on the left?"
HEADER = "You are a careful assistant. Answer in one word."


# ----------------------------------------------------------------------------------------------------------------
# The model, the server, the browser

@pytest.fixture(scope="module")
def run(tmp_path_factory, sp_model, tokenizer):
    """A tiny random model with LoRA saved as a train.py run folder (HF LLaMA dir, OpenFlamingo checkpoint.pt, the
    ViT, lora.pt), two pictures and a file that is not one. Its </s> row of lm_head is zero, so no greedy answer
    ends before max new tokens: every answer here is as long as asked."""
    return tiny_release(tmp_path_factory.mktemp("page"), sp_model, tokenizer, never_ends=True, max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def server(run):
    """serve.py on 127.0.0.1 (a port the system picks), 2 slots and no queue: a third request at once is a 429."""
    with serving(["--ckpt", run["run"], "--model-name", "tiny", "--slots", "2", "--max-waiting", "0"]) as address:
        yield address


@contextlib.contextmanager
def serving(args: list[str]):
    """serve.py as a subprocess on 127.0.0.1, on a port the system picks, on the CPU (a tiny model; and the
    timing of the stop test the same everywhere); its address once it says it."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *args, "--host", "127.0.0.1",
                             "--port", "0", "--device", "cpu", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    said, deadline = [], time.monotonic() + 120
    try:
        while True:
            try:
                said.append(lines.get(timeout=0.2))
            except queue.Empty:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"serve.py did not start:\n{''.join(said)}") from None
                continue
            address = re.search(r"http://127\.0\.0\.1:(\d+)", said[-1])
            if address:
                break
        yield f"http://127.0.0.1:{address.group(1)}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, kept off the network (no background connections, no component updates, no QUIC), with a
    profile of its own that is thrown away after."""
    profile = tempfile.mkdtemp(prefix="mmgpt-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The API, asked directly

def data_url(path: str) -> str:
    """What the page sends for a small picture: the file's own bytes (Chromium types a .png file image/png)."""
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def user(text: str, *pictures: str) -> dict:
    if not pictures:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_url(p)}} for p in pictures),
                                        {"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def post(server: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def api(server: str, messages: list, max_tokens: int | None, **sampling) -> dict:
    """The API's own (non-streamed) answer: {"text", "prompt", "finish"}; greedy unless sampling is given; no
    max_tokens: the room left in the context."""
    status, body = post(server, {"messages": messages, "return_prompt": True, **(sampling or {"temperature": 0}),
                                 **({} if max_tokens is None else {"max_tokens": max_tokens})})
    assert status == 200, body
    choice = body["choices"][0]
    return {"text": choice["message"]["content"], "prompt": body["prompt"], "finish": choice["finish_reason"]}


def metrics(server: str) -> dict:
    with urllib.request.urlopen(server + "/metrics", timeout=10) as r:
        return {k: float(v) for k, v in re.findall(r"^(mmgpt_\w+) ([0-9.e+-]+)$", r.read().decode(), re.M)}


def template(*parts: tuple) -> str:
    """The paper's template, written from the conversation here to check what the page shows: parts are
    (has_picture, [(question, answer), ...]), the last answer "" (open)."""
    return layout([Conversation("p" if pic else None, [Turn(q, a) for q, a in turns]) for pic, turns in parts],
                  open_last=True)[0]


# ----------------------------------------------------------------------------------------------------------------
# The page, driven as a person would

def open_page(browser, server: str):
    browser.get(server + "/")
    wait(browser, "the model's name shown", lambda: browser.find_element(By.ID, "model-name").text == "tiny")


def wait(browser, what: str, ready, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    browser.save_screenshot(os.path.join(tempfile.gettempdir(), "mmgpt-page-timeout.png"))
    raise AssertionError(f"timed out waiting for {what}")


def running(browser) -> bool:
    return browser.execute_script("return document.body.classList.contains('running')")


def set_knobs(browser, **values):
    """Set knobs as a person does: the greedy switch clicked, numbers typed into their boxes."""
    greedy = browser.find_element(By.ID, "greedy")
    if "greedy" in values and greedy.is_selected() != values.pop("greedy"):
        greedy.click()
    for name, value in values.items():
        box = browser.find_element(By.ID, name.replace("_", "-"))
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value))


def chips(browser) -> int:
    return len(browser.find_elements(By.CSS_SELECTOR, "#pending .chip"))


def attach(browser, path: str):
    """Pick the file with the page's file input."""
    n = chips(browser)
    browser.find_element(By.ID, "file").send_keys(path)
    wait(browser, "the picture attached", lambda: chips(browser) > n)


def drop(browser, path: str):
    """Drop the file on the page, as a drag from the desktop does (a drop event carrying it)."""
    n = chips(browser)
    with open(path, "rb") as f:
        payload = base64.b64encode(f.read()).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], arguments[1], {type: 'image/png'}));
        for (const kind of ['dragenter', 'dragover', 'drop'])
          document.getElementById('log').dispatchEvent(new DragEvent(kind, {dataTransfer: files, bubbles: true}));
    """, payload, os.path.basename(path))
    wait(browser, "the picture dropped", lambda: chips(browser) > n)


def ask(browser, *keys, paste: str | None = None, done: bool = True):
    """Type the question (keys: text, or Keys.SHIFT + Keys.ENTER + Keys.NULL for a new line), or paste a long
    one, and press Enter."""
    n = len(answers(browser)) + len(notices(browser))
    box = browser.find_element(By.ID, "input")
    if paste is not None:
        browser.execute_script("arguments[0].value = arguments[1];"
                               "arguments[0].dispatchEvent(new Event('input'))", box, paste)
    box.send_keys(*keys)
    box.send_keys(Keys.ENTER)
    if done:
        wait(browser, "the answer", lambda: not running(browser) and len(answers(browser)) + len(notices(browser)) > n)


def answers(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('.msg.assistant .text')].map(e => e.textContent)")


def questions(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('.msg.user .text')].map(e => e.textContent)")


def notices(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('.notice')].map(e => e.textContent)")


def shown_prompt(browser) -> str:
    return browser.execute_script("return document.getElementById('prompt').textContent")


def statuses(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('.msg.assistant .status')].map(e => e.textContent)")


def outside(browser, width: int) -> list:
    """The boxes shown that reach past the sides of the screen (also those that a box around them clips, so the
    page does not scroll but they are cut off)."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#app *')].filter(e => e.getClientRects().length)"
        ".map(e => [e.id || e.className.baseVal || e.className, e.getBoundingClientRect()])"
        ".filter(([name, r]) => r.left < 0 || r.right > arguments[0]).map(([name, r]) => [name, r.left, r.right])",
        width)


def thumbnails(browser) -> list[int]:
    """The natural widths of the pictures shown in the conversation (0: one that did not load)."""
    return browser.execute_script("return [...document.querySelectorAll('.msg.user img')].map(i => i.naturalWidth)")


# ----------------------------------------------------------------------------------------------------------------
# The tests

def test_rounds_pictures_regenerate_and_clear_answer_as_the_api(server, browser, run, tmp_path):
    """Ask about a picture, ask again (a question typed over two lines), bring in a second picture, regenerate the
    last answer with seeded sampling, clear: every answer equals the API's for the same conversation, and the
    model input shown is the API's prompt, the paper's template of that conversation."""
    open_page(browser, server)
    assert browser.find_element(By.ID, "empty").is_displayed()
    set_knobs(browser, greedy=True, max_tokens=16)
    attach(browser, run["pic1"])
    ask(browser, Q1)
    conv = [user(Q1, run["pic1"])]
    a1 = api(server, conv, 16)
    assert a1["finish"] == "length" and a1["text"].strip()
    assert answers(browser) == [a1["text"]]
    assert shown_prompt(browser) == a1["prompt"] == template((True, [(Q1, "")]))
    assert thumbnails(browser) == [40]            # the picture, in the conversation
    assert "cut at max new tokens" in statuses(browser)[0] and "16 tokens" in statuses(browser)[0]

    ask(browser, "how many", Keys.SHIFT + Keys.ENTER + Keys.NULL, "circles?")     # Shift+Enter: a new line
    q2 = "how many\ncircles?"
    conv += [assistant(a1["text"]), user(q2)]
    a2 = api(server, conv, 16)
    assert questions(browser) == [Q1, q2]
    assert answers(browser) == [a1["text"], a2["text"]]
    assert shown_prompt(browser) == a2["prompt"] == template((True, [(Q1, a1["text"]), (q2, "")]))

    attach(browser, run["pic2"])                  # a second picture: its block opens before the next question
    ask(browser, Q3)
    conv += [assistant(a2["text"]), user(Q3, run["pic2"])]
    a3 = api(server, conv, 16)
    assert answers(browser) == [a1["text"], a2["text"], a3["text"]]
    assert shown_prompt(browser) == a3["prompt"] == template((True, [(Q1, a1["text"]), (q2, a2["text"])]),
                                                             (True, [(Q3, "")]))
    assert thumbnails(browser) == [40, 40]

    # Regenerate the last answer with sampling: the knobs the page sends are the API's.
    set_knobs(browser, greedy=False, temperature=0.7, top_p=0.9, top_k=5, seed=1234)
    regen = browser.find_elements(By.CSS_SELECTOR, "button.regen")
    assert [b.is_displayed() for b in regen] == [False, False, True]     # only the last answer's
    regen[-1].click()
    wait(browser, "the regenerated answer", lambda: not running(browser) and len(answers(browser)) == 3)
    sampled = api(server, conv, 16, temperature=0.7, top_p=0.9, top_k=5, seed=1234)
    assert sampled["text"] != a3["text"]          # (so that the check below means something)
    assert answers(browser) == [a1["text"], a2["text"], sampled["text"]]
    browser.save_screenshot(str(tmp_path / "desktop.png"))

    # Clear: a new conversation, which the server sees alone.
    browser.find_element(By.ID, "clear").click()
    assert answers(browser) == [] and questions(browser) == [] and shown_prompt(browser) == ""
    assert browser.find_element(By.ID, "empty").is_displayed()
    set_knobs(browser, greedy=True)
    attach(browser, run["pic1"])
    ask(browser, Q1)
    assert answers(browser) == [a1["text"]] and shown_prompt(browser) == a1["prompt"]


def test_two_tabs_are_two_conversations(server, browser, run):
    """A second tab is a conversation of its own (the server sees only its messages); a picture dropped on the
    page is attached; a header line set there is sent as the system message and replaces the template's."""
    open_page(browser, server)
    set_knobs(browser, greedy=True, max_tokens=12)
    attach(browser, run["pic1"])
    ask(browser, Q1)
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    try:
        open_page(browser, server)
        assert answers(browser) == []             # the new tab starts empty (settings are remembered)
        drop(browser, run["pic2"])
        assert not browser.find_element(By.ID, "drop").is_displayed()
        browser.find_element(By.CSS_SELECTOR, "details.more summary").click()
        browser.find_element(By.ID, "system").send_keys(HEADER)      # the template's first line, replaced
        ask(browser, Q3)
        alone = api(server, [{"role": "system", "content": HEADER}, user(Q3, run["pic2"])], 12)
        assert answers(browser) == [alone["text"]] and shown_prompt(browser) == alone["prompt"]
        assert alone["prompt"] == layout([Conversation("p", [Turn(Q3, "")])], open_last=True, header=HEADER)[0]
        browser.find_element(By.ID, "system").clear()
        browser.find_element(By.ID, "system").send_keys(" ", Keys.BACKSPACE)     # (clear() fires no input event)
    finally:
        browser.close()
        browser.switch_to.window(first)
    assert answers(browser) == [api(server, [user(Q1, run["pic1"])], 12)["text"]]


def test_stop_cancels_the_answer_on_the_server(server, browser, run):
    """Stop mid-answer (the Stop button, then Escape on the regenerated answer): the page stops, keeps what was
    written (a prefix of the whole answer), the server cancels the request (its slot is free, it wrote far fewer
    tokens than asked), and the next round goes on from what was written."""
    open_page(browser, server)
    set_knobs(browser, greedy=True, max_tokens=LONG)
    before = metrics(server)
    attach(browser, run["pic1"])
    ask(browser, Q1, done=False)
    wait(browser, "the answer to start", lambda: answers(browser) and answers(browser)[0] != "")
    browser.find_element(By.ID, "stop").click()
    wait(browser, "the page to stop", lambda: not running(browser), timeout=10)
    assert browser.find_element(By.ID, "send").is_displayed()
    assert statuses(browser)[0] == "stopped"
    partial = answers(browser)[0]
    wait(browser, "the server to free the slot", lambda: metrics(server)["mmgpt_requests_running"] == 0, timeout=10)
    after = metrics(server)
    assert after["mmgpt_requests_finished_total"] == before["mmgpt_requests_finished_total"] + 1
    written = after["mmgpt_generation_tokens_total"] - before["mmgpt_generation_tokens_total"]
    assert 0 < written < LONG / 2, written
    whole = api(server, [user(Q1, run["pic1"])], LONG)
    assert whole["finish"] == "length" and whole["text"].startswith(partial) and len(partial) < len(whole["text"])

    # Regenerate it, and stop that with Escape.
    browser.find_element(By.CSS_SELECTOR, "button.regen").click()
    wait(browser, "the answer to start again", lambda: running(browser) and answers(browser)[0] != "")
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait(browser, "the page to stop", lambda: not running(browser), timeout=10)
    again = answers(browser)
    assert len(again) == 1 and statuses(browser) == ["stopped"]
    assert whole["text"].startswith(again[0]) and len(again[0]) < len(whole["text"])
    wait(browser, "the server to free the slot", lambda: metrics(server)["mmgpt_requests_running"] == 0, timeout=10)

    set_knobs(browser, max_tokens=12)
    ask(browser, Q2)                              # the stopped answer stays in the conversation, as written
    expected = api(server, [user(Q1, run["pic1"]), assistant(again[0]), user(Q2)], 12)
    assert answers(browser) == [again[0], expected["text"]]
    assert shown_prompt(browser) == expected["prompt"] == template((True, [(Q1, again[0]), (Q2, "")]))


def test_errors_are_lines_in_the_conversation_and_the_page_goes_on(server, browser, run, tmp_path):
    """A file that is not a picture, a busy server, a conversation too long for the context: each a readable line
    with the server's message; the refused question is left out of the conversation and the page goes on. (Max
    new tokens that do not fit after a long question: the answer takes the room left.)"""
    open_page(browser, server)
    set_knobs(browser, greedy=True, max_tokens=12)

    attach(browser, run["broken"])
    assert browser.find_elements(By.CSS_SELECTOR, "#pending .chip .nopic")     # shown as a tile with its name
    ask(browser, "what is this?")
    status, refused = post(server, {"messages": [user("what is this?", run["broken"])], "max_tokens": 12})
    error = refused["error"]
    assert status == 400 and error["param"] == "messages[0].content[0].image_url"
    said = error["message"].removeprefix(error["param"] + ": ")
    address = re.compile(r" at 0x[0-9a-f]+")      # PIL names the in-memory file by its address
    (line,) = notices(browser)
    assert address.sub("", line) == address.sub("", f"The picture broken.png could not be used: {said}")
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user.failed")
    assert answers(browser) == [] and not browser.find_elements(By.CSS_SELECTOR, ".notice button")   # no retry

    attach(browser, run["pic1"])                  # the page goes on; the refused question is not sent again
    ask(browser, Q1)
    a1 = api(server, [user(Q1, run["pic1"])], 12)
    assert answers(browser) == [a1["text"]] and shown_prompt(browser) == a1["prompt"]

    # Busy: both slots taken by long answers streamed to someone else, no queue.
    others = [urllib.request.urlopen(urllib.request.Request(
        server + "/v1/chat/completions", json.dumps({"messages": [user(Q3, run["pic2"])], "max_tokens": LONG,
                                                     "temperature": 0, "stream": True}).encode(),
        {"Content-Type": "application/json"}), timeout=60) for _ in range(2)]
    try:
        for r in others:
            r.readline()                          # streaming: each holds its slot
        ask(browser, Q2)
        status, refused = post(server, {"messages": [user(Q2)], "max_tokens": 12})
        assert status == 429
        assert notices(browser)[-1] == f"The server is busy: {refused['error']['message']}" + "Retry"   # + its button
        browser.save_screenshot(str(tmp_path / "errors.png"))
    finally:
        for r in others:
            r.close()                             # they go away: the server frees their slots
    wait(browser, "the slots to be free", lambda: metrics(server)["mmgpt_requests_running"] == 0, timeout=10)
    browser.find_element(By.CSS_SELECTOR, ".notice:last-child button").click()      # Retry
    wait(browser, "the retried answer", lambda: not running(browser) and len(answers(browser)) == 2)
    conv = [user(Q1, run["pic1"]), assistant(a1["text"]), user(Q2)]
    a2 = api(server, conv, 12)
    assert answers(browser) == [a1["text"], a2["text"]]

    # A long question: the conversation fits the context, but not with max new tokens more. The server caps
    # max_tokens to the room left (its default), so the answer takes the room left, as without max_tokens.
    set_knobs(browser, max_tokens=100)
    long = "x" * 850 + " " + Q3                   # 'x' is a byte token of the tiny tokenizer: 850 tokens
    ask(browser, paste=long)
    conv += [assistant(a2["text"]), user(long)]
    a3 = api(server, conv, None)
    assert a3 == api(server, conv, 100) and a3["finish"] == "length" and 0 < len(a3["text"])
    assert answers(browser) == [a1["text"], a2["text"], a3["text"]] and shown_prompt(browser) == a3["prompt"]
    assert statuses(browser)[-1].startswith("cut at the end of the context")

    # Now the conversation alone fills the context: the next question is refused, and says why.
    ask(browser, Q1)
    conv += [assistant(a3["text"]), user(Q1)]
    status, refused = post(server, {"messages": conv})
    assert status == 400 and refused["error"]["code"] == "context_length_exceeded"
    assert notices(browser)[-1] == (f"Too long for the model: {refused['error']['message']}. "
                                    f"Clear the conversation, or ask a shorter question.")
    assert questions(browser) == ["what is this?", Q1, Q2, long, Q1]     # the refused ones stay visible, dimmed
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user.failed")) == 2
    assert len(answers(browser)) == 3


def test_phone_sized_screen_has_no_horizontal_scrolling(server, browser, run, tmp_path):
    """390 px wide (a phone): the conversation, a long unbroken question, the composer and the settings drawer
    all fit the width; the settings open as a drawer and close with Escape."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        open_page(browser, server)
        fits = "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        assert browser.execute_script("return window.innerWidth") == 390
        assert not browser.find_element(By.ID, "panel").is_displayed()
        browser.find_element(By.ID, "settings-toggle").click()
        assert browser.find_element(By.ID, "panel").is_displayed()
        set_knobs(browser, greedy=True, max_tokens=24)
        browser.switch_to.active_element.send_keys(Keys.ESCAPE)
        wait(browser, "the drawer to close", lambda: not browser.find_element(By.ID, "panel").is_displayed(), 5)

        attach(browser, run["pic1"])
        ask(browser, "x" * 120 + " " + Q1)        # a word wider than the screen must wrap, not scroll
        assert answers(browser)[0] and thumbnails(browser) == [40]
        width, client = browser.execute_script(fits)
        assert client == 390 and width <= client
        assert outside(browser, 390) == []
        assert browser.execute_script("return document.getElementById('log').scrollWidth") <= 390
        browser.save_screenshot(str(tmp_path / "phone.png"))

        browser.find_element(By.ID, "settings-toggle").click()
        width, client = browser.execute_script(fits)
        assert width <= client and outside(browser, 390) == []
        assert shown_prompt(browser).endswith(f"{'x' * 120} {Q1}\n\n### Response:\n")
        browser.save_screenshot(str(tmp_path / "phone-settings.png"))
        with open(tmp_path / "phone.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_a_server_with_an_api_key(run, browser):
    """serve.py --api-key: the page loads without it, asks for it (a wrong one is a line saying so), and with it
    answers as the API does."""
    with serving(["--ckpt", run["run"], "--model-name", "tiny", "--slots", "1", "--api-key", "sesame"]) as address:
        browser.get(address + "/")
        wait(browser, "the page to ask for the key", lambda: browser.find_element(By.ID, "model-name").text == "API key needed")
        key = browser.find_element(By.ID, "api-key")
        assert key.is_displayed()                 # its box opened
        set_knobs(browser, greedy=True, max_tokens=12)
        key.send_keys("wrong")
        attach(browser, run["pic1"])
        ask(browser, Q1)
        assert notices(browser)[-1].startswith("The server wants an API key (Settings): a wrong or missing API key")
        key.send_keys(Keys.CONTROL, "a")
        key.send_keys("sesame")
        wait(browser, "the model's name", lambda: browser.find_element(By.ID, "model-name").text == "tiny")
        browser.find_element(By.CSS_SELECTOR, ".notice button").click()      # Retry, with the key
        wait(browser, "the answer", lambda: not running(browser) and len(answers(browser)) == 1)
        request = urllib.request.Request(address + "/v1/chat/completions", json.dumps(
            {"messages": [user(Q1, run["pic1"])], "max_tokens": 12, "temperature": 0}).encode(),
            {"Content-Type": "application/json", "Authorization": "Bearer sesame"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert answers(browser) == [json.loads(r.read())["choices"][0]["message"]["content"]]


# ----------------------------------------------------------------------------------------------------------------
# The README's screenshot: the page answering the demo's picture (made with runs/demo, after `python train.py`)

SCREENSHOT = os.environ.get("MMGPT_PAGE_SCREENSHOT")      # where to write it, e.g. docs/page.png


@pytest.mark.skipif(not SCREENSHOT, reason="MMGPT_PAGE_SCREENSHOT=docs/page.png retakes the README's screenshot "
                                           "(with runs/demo, after `python train.py`)")
def test_readme_screenshot(browser):
    demo = os.path.join(ROOT, "runs", "demo")
    picture = os.path.join(demo, "samples", "0.png")
    assert os.path.exists(picture), "train the demo first: python train.py"
    with serving(["--ckpt", demo, "--model-name", "demo", "--slots", "4"]) as address:
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        try:
            browser.get(address + "/")
            wait(browser, "the model's name", lambda: browser.find_element(By.ID, "model-name").text == "demo")
            browser.find_element(By.ID, "reset-settings").click()
            set_knobs(browser, greedy=True, max_tokens=16)
            attach(browser, picture)
            conv = []
            for i, question in enumerate(("What colour is the shape?", "What shape is it?",
                                          "How many shapes are there?", "Where are they?")):
                ask(browser, question)
                conv.append(user(question, picture) if i == 0 else user(question))
                expected = api(address, conv, 16)
                assert answers(browser)[-1] == expected["text"]
                conv.append(assistant(expected["text"]))
            browser.find_element(By.ID, "input").send_keys("And what colour")
            browser.save_screenshot(SCREENSHOT)
        finally:
            browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    # A few colours are enough for the page: a 256-colour palette keeps the file small (the README's ~200 KB).
    Image.open(SCREENSHOT).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(SCREENSHOT, optimize=True)
    assert os.path.getsize(SCREENSHOT) < 200_000
