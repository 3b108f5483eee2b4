"""End to end: notebook 05's explorer in a real JupyterLab, driven in headless Chromium by Playwright.

The most common failure of an ipywidgets app is on the browser side ("Error displaying widget",
"model not found", a JupyterLab without the widgets extension) while every kernel-side test passes.
This test therefore

1. copies ``notebooks/05_explorer.ipynb`` into a temporary directory (the committed notebook is never
   run in place nor saved), starts ``jupyter lab`` there on 127.0.0.1 with a random token and
   JupyterLab's config / data / settings / workspace directories inside the temporary directory;
2. opens the notebook in headless Chromium (Playwright's Python package driving a system Chromium:
   Debian's ``/usr/bin/chromium``, or ``CIRCUITLIB_CHROMIUM=/path/to/chrome``; Playwright's own
   download is used only if it is there), and runs all cells from the Run menu;
3. asserts that every cell ran without an error output and that the explorer rendered (no
   "Error displaying widget"), then changes the relation and the head in the widget's dropdowns and
   asserts, after every change, that what the browser shows is what circuitlib computes in this
   process for that relation and head: the header (score, rank), the OV and suppression tables
   (:meth:`Explorer.select`), the patching table (:meth:`Explorer.patching`), the head dropdown's order
   (:meth:`Explorer.heads`) and both figures, pixel by pixel (:meth:`Explorer.heatmap`,
   :meth:`Explorer.attention_figure`, rendered as the inline backend renders them).

Screenshots (whole window and the explorer alone, after every step; ``failure.png`` and ``failure.log``
on a failure), the timings, the browser console and the server log are written to ``test-artifacts/browser/`` (or
``$CIRCUITLIB_ARTIFACTS/browser``). Every wait is bounded; the server and its kernels are shut down in
the fixture's teardown, and any process of theirs still alive is killed by its id.

Skipped, with the reason, only when no Chromium is found (``.ci/run`` installs Debian's package).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_explorer.ipynb"
ARTIFACTS = Path(os.environ.get("CIRCUITLIB_ARTIFACTS", ROOT / "test-artifacts")) / "browser"

# Chromium flags for a closed network (without the background-networking ones Chromium keeps trying
# to reach Google's hosts); Playwright adds --headless itself and takes the profile directory as an
# argument (a fresh one per run).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Bounds on every wait (seconds).
SERVER_START = 180
PAGE_LOAD = 180
RUN_ALL = 600
WIDGET_UPDATE = 180
SHUTDOWN = 30

# A figure shown in the browser counts as the library's when at most this many pixels differ.
MAX_PIXELS_DIFFERENT = 40  # seen: 0 for the same head; > 400 for the heatmap of another head

# What notebook 05's first cell builds, rebuilt here to compute the expected values. The widget's
# relation dropdown must offer these names (checked, with a clear message, if the notebook changes).
MAPS_RELATIONS = ["name_copying", "country_to_capital_wikidata"]
SUPPRESSION = "name_copying (suppression)"
TASK, N_PROMPTS = "ioi", 16  # the explorer's first task (its default), ioi_batch(tokenizer, 16, seed=0)

# The widget changes the test makes, in order: (dropdown, option). The head is kept across relations.
STEPS = [
    ("relation", "country_to_capital_wikidata"),
    ("head", "0.3"),  # the top capital head (0.94); not 0.6, the view the explorer opens on
    ("relation", SUPPRESSION),
    ("head", "0.2"),  # IOI's top head by activation patching, the model's top name-suppression head (0.90)
]


# -- browser ------------------------------------------------------------------------------------


def _system_chromium() -> str | None:
    path = os.environ.get("CIRCUITLIB_CHROMIUM")
    if path:
        if not os.access(path, os.X_OK):
            pytest.fail(f"CIRCUITLIB_CHROMIUM={path} is not an executable file")
        return path
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    """A fresh headless Chromium profile (Playwright persistent context), closed after the module."""
    from playwright.sync_api import sync_playwright  # a dev dependency: pip install -e ".[dev]"

    executable = _system_chromium()
    with sync_playwright() as p:
        if executable is None:
            bundled = p.chromium.executable_path  # only if `playwright install chromium` worked here
            if not (bundled and os.path.exists(bundled)):
                pytest.skip("no Chromium to drive: install Debian's `chromium` (`.ci/run` does: apt-get install "
                            "chromium), or set CIRCUITLIB_CHROMIUM=/path/to/chrome, or run "
                            "`python -m playwright install chromium` where browser downloads work")
        profile = tmp_path_factory.mktemp("chromium-profile")
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 2000}, timeout=60_000)
        try:
            context.set_default_timeout(60_000)
            yield context
        finally:
            context.close()


# -- JupyterLab ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc; kernels run in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _write_settings(settings: Path) -> None:
    """JupyterLab user settings for the test: no news / update toasts over the screenshots, every cell
    kept in the DOM (no windowing, so the prompts of all cells can be read), and the notebook's kernel
    started without a "Select Kernel" dialog."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings":
            {"windowingMode": "none", "autoStartDefaultKernel": True},
    }
    for name, value in files.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``jupyter lab`` on 127.0.0.1 with a token, serving a temporary copy of notebook 05."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    state = root / ".state"
    _write_settings(state / "settings")
    env = dict(os.environ,
               JUPYTER_CONFIG_DIR=str(state / "config"), JUPYTER_DATA_DIR=str(state / "data"),
               JUPYTER_RUNTIME_DIR=str(state / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(state / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"), IPYTHONDIR=str(state / "ipython"),
               JUPYTER_PLATFORM_DIRS="1", JUPYTER_PREFER_ENV_PATH="1", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), OMP_NUM_THREADS="1")
    env.pop("JUPYTER_PATH", None)
    port, token = _free_port(), uuid.uuid4().hex
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in [*ARTIFACTS.glob("*.png"), *ARTIFACTS.glob("*.log"), *ARTIFACTS.glob("timings.json")]:
        old.unlink()  # this run's artefacts only
    log_path = ARTIFACTS / "jupyter-lab.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],  # CI containers run as root
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    spawned: set[int] = set()
    try:
        deadline = time.monotonic() + SERVER_START
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with code {proc.returncode} before serving; see {log_path}:\n"
                            + log_path.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer on {base} within {SERVER_START} s; see {log_path}")
            time.sleep(0.5)
        yield {"url": base, "token": token, "root": root, "notebook": NOTEBOOK.name, "pid": proc.pid,
               "track": lambda: spawned.update(_children(proc.pid))}
    finally:
        spawned.update(_children(proc.pid) if proc.poll() is None else [])
        if proc.poll() is None:  # a clean shutdown first: the server stops its kernels
            try:
                req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                             headers={"Authorization": f"token {token}"})
                urllib.request.urlopen(req, timeout=10).close()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            try:
                proc.wait(SHUTDOWN)
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(10)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        deadline = time.monotonic() + SHUTDOWN
        while any(_alive(p) for p in spawned) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in spawned:  # kernels (own sessions) the server did not stop: by their id
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log.close()


# -- expected values (the library, in this process) ---------------------------------------------


@pytest.fixture(scope="module")
def expected():
    """An Explorer built as notebook 05 builds it, for the relations and task the test browses."""
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from circuitlib.models import load_model
    from circuitlib.scoring import static_scores, static_scores_many
    from circuitlib.tasks import ioi_batch
    from circuitlib.widgets import Explorer

    torch.manual_seed(0)
    model = load_model("toy")
    scores = static_scores_many(model, MAPS_RELATIONS)
    scores[SUPPRESSION] = static_scores(model, "name_copying", suppression=True)
    return Explorer(model, scores, {TASK: ioi_batch(model.tokenizer, N_PROMPTS, seed=0)})


def _png(fig) -> np.ndarray:
    """``fig`` as the kernel's inline backend shows it (IPython's print_figure, bbox tight), as pixels."""
    import matplotlib.pyplot as plt
    from IPython.core.pylabtools import print_figure
    from PIL import Image

    try:
        return np.asarray(Image.open(io.BytesIO(print_figure(fig, "png", bbox_inches="tight"))).convert("RGBA"))
    finally:
        plt.close(fig)


def _decode(src: str | None) -> np.ndarray | None:
    from PIL import Image

    if not src or not src.startswith("data:image/png;base64,"):
        return None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGBA"))


def _image_diff(got: np.ndarray | None, want: np.ndarray) -> int | None:
    """How many pixels of ``got`` differ from ``want`` (``None``: no image or another size). The kernel
    and this process render with the same matplotlib and Agg: the same figure gives the same pixels,
    and another head's figure differs in hundreds (its mark, its cell's outline, its title)."""
    if got is None or got.shape != want.shape:
        return None
    return int((np.abs(got.astype(int) - want.astype(int)).max(axis=-1) > 0).sum())


def _same_image(got: np.ndarray | None, want: np.ndarray) -> bool:
    diff = _image_diff(got, want)
    return diff is not None and diff <= MAX_PIXELS_DIFFERENT


def _two_decimals(value: float, signed: bool = False) -> str:
    """How the explorer must print a score: two decimals, a value that rounds to zero as 0.00 / +0.00
    (never "-0.00"). Written out here, not imported, so a change in the widget's formatting shows."""
    rounded = round(value, 2)
    if rounded == 0:
        return "+0.00" if signed else "0.00"
    return f"{rounded:+.2f}" if signed else f"{rounded:.2f}"


def _expected_view(explorer, relation: str, head: str) -> dict:
    """What the widget must show for ``relation`` / ``head``, in the form :func:`_shown` reads it."""
    data = explorer.select(relation, head)
    patching = explorer.patching(TASK, head)

    def rows(view):
        return [{"source": v["source"], "target": v["target"] if v["target"] is not None else "–",
                 "tokens": [t.strip() or repr(t) for t, _ in v["top"]],
                 "highlighted": [t.strip() for t, _ in v["top"] if v["target"] is not None
                                 and t.strip() == v["target"]]} for v in view]

    return {
        "relation": relation, "head": head,
        "header": [relation, f"head {head}", f"score {_two_decimals(data['score'])}",
                   f"rank {data['rank']} of {data['n_heads']}", f"k={data['k']}"],
        "ov": rows(data["ov"]), "suppression": rows(data["suppression"]),
        "patching_head": f"patching scores of head {head} on {TASK}",
        "patching": [[name, _two_decimals(m["score"], signed=True), f"{m['rank']} of {patching['n_heads']}",
                      str(m["direction"])]
                     for name, m in patching["methods"].items()],
        "head_order": explorer.heads(relation),
        "heatmap": _png(explorer.heatmap(relation, head)),
        "attention": _png(explorer.attention_figure(TASK, 0, head)),
    }


# -- reading the page ---------------------------------------------------------------------------

# The explorer has no CSS classes or data attributes of its own: its parts are found by ipywidgets'
# classes and by their text (the dropdowns by their labels, the views by their titles).
READ_EXPLORER = r"""
() => {
  const label = [...document.querySelectorAll('.widget-dropdown > label')]
      .find(l => l.textContent.trim() === 'relation');
  if (!label) return null;
  const root = label.closest('.widget-vbox');
  const select = name => {
    const l = [...root.querySelectorAll('.widget-dropdown > label')].find(x => x.textContent.trim() === name);
    const s = l && l.parentElement.querySelector('select');
    const text = o => o.textContent.replace(/\u00a0/g, ' ');  // ipywidgets shows spaces as &nbsp;
    return s ? {value: s.options[s.selectedIndex] ? text(s.options[s.selectedIndex]) : null,
                options: [...s.options].map(text)} : null;
  };
  const html = [...root.querySelectorAll('.widget-html-content')];
  const views = html.find(h => h.textContent.includes('OV view'));
  const patching = html.find(h => h.textContent.includes('patching scores of head'));
  const tables = views ? [...views.querySelectorAll('table')] : [];
  const rows = t => [...t.querySelectorAll('tr')].map(tr => {
    const td = [...tr.querySelectorAll('td')];
    return {first: td[0] ? td[0].textContent : '', tokens: td[1] ? td[1].textContent : '',
            highlighted: td[1] ? [...td[1].querySelectorAll('b')].map(b => b.textContent) : []};
  });
  const imgs = [...root.querySelectorAll('.widget-output')].map(o => {
    const img = o.querySelector('img');
    return img ? img.getAttribute('src') : null;
  });
  return {
    relation: select('relation'), head: select('head'),
    header: views && views.querySelector('p') ? views.querySelector('p').textContent : null,
    ov: tables[0] ? rows(tables[0]) : null, suppression: tables[1] ? rows(tables[1]) : null,
    patching_head: patching && patching.querySelector('p') ? patching.querySelector('p').textContent : null,
    patching: patching ? [...patching.querySelectorAll('tr')].slice(1)
        .map(tr => [...tr.querySelectorAll('td')].map(td => td.textContent.trim())) : null,
    images: imgs,
  };
}
"""


def _mismatches(shown: dict | None, want: dict) -> list[str]:
    """What differs between the page (``shown``) and the library (``want``); empty when all agree."""
    if shown is None:
        return ["the explorer (a dropdown labelled 'relation') is not on the page"]
    bad = []
    if shown["relation"] is None or shown["relation"]["value"] != want["relation"]:
        bad.append(f"relation dropdown shows {shown['relation'] and shown['relation']['value']!r}, "
                   f"want {want['relation']!r}")
    head_opts = [o.split()[0] for o in (shown["head"] or {}).get("options", [])]
    if head_opts != want["head_order"]:
        bad.append(f"head dropdown order {head_opts[:6]}..., want {want['head_order'][:6]}... (best score first)")
    if not shown["head"] or not shown["head"]["value"] or shown["head"]["value"].split()[0] != want["head"]:
        bad.append(f"head dropdown shows {shown['head'] and shown['head']['value']!r}, want {want['head']!r}")
    header = shown["header"] or ""
    missing = [part for part in want["header"] if part not in header]
    if missing:
        bad.append(f"views header {header!r} lacks {missing}")
    for key in ("ov", "suppression"):
        got = shown[key] or []
        if len(got) != len(want[key]):
            bad.append(f"{key} table has {len(got)} rows, want {len(want[key])}")
            continue
        for i, (g, w) in enumerate(zip(got, want[key])):
            if not (w["source"] in g["first"] and w["target"] in g["first"]):
                bad.append(f"{key} row {i}: {g['first']!r}, want source {w['source']!r} -> {w['target']!r}")
            if g["tokens"] != ", ".join(w["tokens"]):
                bad.append(f"{key} row {i}: tokens {g['tokens']!r}, want {', '.join(w['tokens'])!r}")
            if g["highlighted"] != w["highlighted"]:
                bad.append(f"{key} row {i}: highlighted {g['highlighted']}, want {w['highlighted']}")
    if not (shown["patching_head"] or "").startswith(want["patching_head"]):
        bad.append(f"patching header {shown['patching_head']!r}, want it to start with {want['patching_head']!r}")
    if shown["patching"] != want["patching"]:
        bad.append(f"patching rows {shown['patching']}, want {want['patching']}")
    images = shown["images"] + [None, None]
    for name, src in (("heatmap", images[0]), ("attention", images[1])):
        got = _decode(src)
        if not _same_image(got, want[name]):
            bad.append(f"{name} figure differs from the library's for {want['relation']} / head {want['head']} "
                       f"(shown {None if got is None else got.shape}, want {want[name].shape}; "
                       f"{_image_diff(got, want[name])} pixels differ)")
    return bad


def _save_images(shown: dict | None, want: dict, what: str) -> None:
    """On a failure: the figures the page shows and the library's, as PNG artefacts to look at."""
    from PIL import Image

    images = ((shown or {}).get("images") or []) + [None, None]
    for name, src in (("heatmap", images[0]), ("attention", images[1])):
        got = _decode(src)
        if got is not None and not _same_image(got, want[name]):
            Image.fromarray(got.astype(np.uint8)).save(ARTIFACTS / f"mismatch-{name}-shown.png")
            Image.fromarray(want[name].astype(np.uint8)).save(ARTIFACTS / f"mismatch-{name}-library.png")


# A short fingerprint of what the explorer shows (dropdowns, texts, images): the test re-reads the page
# only when it changes.
EXPLORER_FINGERPRINT = r"""
() => {
  const label = [...document.querySelectorAll('.widget-dropdown > label')]
      .find(l => l.textContent.trim() === 'relation');
  if (!label) return '';
  const root = label.closest('.widget-vbox');
  const selects = [...root.querySelectorAll('select')].map(s => s.selectedIndex + ':' + s.options.length
      + ':' + (s.options[s.selectedIndex] ? s.options[s.selectedIndex].textContent : '')).join('|');
  const texts = [...root.querySelectorAll('.widget-html-content')].map(h => h.textContent).join('|');
  const imgs = [...root.querySelectorAll('.widget-output img')].map(i => {
      const src = i.getAttribute('src') || ''; return src.length + ':' + src.slice(-48); }).join('|');
  return selects + '#' + texts + '#' + imgs;
}
"""


def _wait_for_view(page, want: dict, timeout: float, what: str) -> dict:
    """Wait until the page shows ``want`` (bounded by ``timeout``); fail listing the differences.

    No fixed sleeps: after every read that does not match, the browser is asked to wait until the
    explorer's fingerprint (dropdowns, texts, images) changes, then the page is read again."""
    deadline, bad, shown = time.monotonic() + timeout, ["not read yet"], None
    while True:
        before = page.evaluate(f"({EXPLORER_FINGERPRINT})()")
        shown = page.evaluate(READ_EXPLORER)
        bad = _mismatches(shown, want)
        if not bad:
            return shown
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            page.wait_for_function(f"(before) => ({EXPLORER_FINGERPRINT})() !== before", arg=before,
                                   timeout=remaining * 1000, polling=100)
        except _playwright_timeout():
            break
    _save_images(shown, want, what)
    raise AssertionError(f"{what}: after {timeout} s the explorer still differs from circuitlib:\n  "
                         + "\n  ".join(bad))


def _select(page, label: str, wanted: str) -> None:
    """Choose the option of the widget dropdown ``label`` whose text starts with ``wanted``
    (head options read "0.3  (0.94)": name, then the score)."""
    dropdown = page.locator(".widget-dropdown").filter(
        has=page.locator("label", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")))
    select = dropdown.locator("select")
    options = [text.replace("\xa0", " ") for text in select.locator("option").all_text_contents()]
    matches = [i for i, text in enumerate(options) if text == wanted or text.split()[0] == wanted]
    assert matches, f"the {label!r} dropdown has no option {wanted!r}; it offers {options}"
    select.select_option(index=matches[0])


def _playwright_timeout():
    from playwright.sync_api import TimeoutError as timeout_error

    return timeout_error


def _menu(page, menu: str, item: str) -> None:
    """Click ``menu`` in JupyterLab's menu bar, then its entry ``item``."""
    page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(rf"^{re.escape(menu)}$")).click()
    page.locator(".lm-Menu .lm-Menu-itemLabel", has_text=re.compile(rf"^{re.escape(item)}$")).click()


# Resolves once every image of the element is decoded and two frames have been painted since.
PAINTED = r"""
async (el) => {
  await Promise.all([...el.querySelectorAll('img')].map(i => i.decode().catch(() => null)));
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
}
"""


def _shot(page, name: str, explorer_too: bool = True) -> list[Path]:
    """Screenshots ``name.png`` (the window, the explorer scrolled to its top) and ``name-explorer.png``
    (the explorer alone), taken once its images are decoded and painted."""
    root = page.locator(".widget-vbox").filter(has=page.locator(".widget-dropdown > label", has_text="relation"))
    present = explorer_too and root.count() > 0
    if present:
        root.first.evaluate("el => el.scrollIntoView({block: 'start'})")
        root.first.evaluate(PAINTED)
    paths = [ARTIFACTS / f"{name}.png"]
    page.screenshot(path=str(paths[0]))
    if present:
        paths.append(ARTIFACTS / f"{name}-explorer.png")
        root.first.screenshot(path=str(paths[1]))
    return paths


# -- the test -----------------------------------------------------------------------------------


def test_explorer_renders_and_follows_the_library_in_jupyterlab(browser_context, lab, expected):
    console: list[str] = []
    page = browser_context.new_page()
    page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
    page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        page.goto(f"{lab['url']}/lab/tree/{lab['notebook']}?token={lab['token']}", timeout=PAGE_LOAD * 1000)
        # the notebook is open and its kernel is up: the toolbar names it and reads idle
        page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=PAGE_LOAD * 1000)
        page.wait_for_function(
            r"""() => { const name = document.querySelector('.jp-NotebookPanel .jp-Toolbar-kernelName');
                        const status = document.querySelector('.jp-NotebookPanel .jp-Notebook-ExecutionIndicator');
                        return name && /python/i.test(name.textContent) && status
                               && status.getAttribute('data-status') === 'idle'; }""",
            timeout=PAGE_LOAD * 1000, polling=250)
        timings["open"] = time.monotonic() - t0
        n_code = page.locator(".jp-NotebookPanel .jp-CodeCell").count()
        assert n_code > 0, "no code cells in the notebook"

        _shot(page, "00-opened", explorer_too=False)

        # Edit > Clear Outputs of All Cells (the stored outputs and execution counts go: what is shown
        # next comes from this run), then Run > Run All Cells, as a user would
        _menu(page, "Edit", "Clear Outputs of All Cells")
        page.wait_for_function(
            r"""() => { const p = [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')];
                        return p.length > 0 && p.every(x => !/\d/.test(x.textContent))
                               && !document.querySelector('.jp-NotebookPanel .jp-OutputArea-output'); }""",
            timeout=60_000, polling=250)
        _menu(page, "Run", "Run All Cells")
        page.wait_for_function(
            r"""() => { const p = [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')];
                        return p.length > 0 && p.every(x => /^\[\d+\]:$/.test(x.textContent.trim())); }""",
            timeout=RUN_ALL * 1000, polling=500)
        lab["track"]()  # note the kernel's pid: the teardown kills it by id if the server does not
        timings["run all"] = time.monotonic() - t0 - timings["open"]

        errors = page.locator(".jp-NotebookPanel .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
        assert errors.count() == 0, "a cell raised:\n" + "\n".join(errors.all_inner_texts())[:3000]
        outputs = "\n".join(page.locator(".jp-NotebookPanel .jp-OutputArea-output").all_inner_texts())
        assert "Error displaying widget" not in outputs, "the widget did not render: " + outputs[:2000]

        # the explorer as it first renders: first relation, its best head
        relations = page.evaluate(READ_EXPLORER)
        assert relations is not None, "the explorer did not render (no 'relation' dropdown on the page)"
        offered = relations["relation"]["options"]
        for name in MAPS_RELATIONS + [SUPPRESSION]:
            assert name in offered, f"the explorer offers {offered}; this test expects {name!r} (notebook 05 changed?)"
        relation = relations["relation"]["value"]
        head = expected.heads(relation)[0]
        t = time.monotonic()
        _wait_for_view(page, _expected_view(expected, relation, head), WIDGET_UPDATE, "after Run All")
        timings["first view"] = time.monotonic() - t
        _shot(page, "01-after-run-all")

        previous = page.evaluate(READ_EXPLORER)["images"]
        for i, (label, value) in enumerate(STEPS, start=2):
            # one change at a time, each awaited: a head picked while the head list is being re-sorted
            # for a new relation is picked by its index in the old list (ipywidgets syncs the index)
            _select(page, label, value)
            if label == "relation":
                relation = value  # the chosen head is kept
            else:
                head = value
            t = time.monotonic()
            shown = _wait_for_view(page, _expected_view(expected, relation, head), WIDGET_UPDATE,
                                   f"step {i}: {label} -> {value} (relation {relation!r}, head {head})")
            timings[f"step {i}"] = time.monotonic() - t
            assert shown["images"][0] != previous[0], f"step {i}: the heatmap did not change"
            previous = shown["images"]
            slug = re.sub(r"[^a-z0-9]+", "-", f"{relation}-{head}".lower()).strip("-")
            _shot(page, f"{i:02d}-{slug}")
        timings["total"] = time.monotonic() - t0
    except BaseException as exc:
        (ARTIFACTS / "failure.log").write_text(f"{type(exc).__name__}: {exc}\n")
        try:
            _shot(page, "failure")
        except Exception:
            pass
        raise
    finally:
        (ARTIFACTS / "browser-console.log").write_text("\n".join(console) + "\n")
        (ARTIFACTS / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=1))
        page.close()
    widget_errors = [line for line in console if "model not found" in line.lower()
                     or "could not create" in line.lower() and "view" in line.lower()]
    assert not widget_errors, "widget errors in the browser console:\n" + "\n".join(widget_errors)
