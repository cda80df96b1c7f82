"""What a person does in JupyterLab, as Playwright steps with explicit waits.

Every wait names the element it waits for and has a generous timeout; a missing element
fails the test with the selector in the message, a slow machine only makes it slower.
"""
from __future__ import annotations

import json
import os
import re
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONG = 240_000   # running a whole lab notebook on a 2-core CPU
MEDIUM = 90_000  # spawning a server, opening a notebook, starting a kernel
_MARKER = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n?", re.M)

# What benign console errors look like (none are expected; add one only with a reason).
IGNORED_CONSOLE = ()


def solution_answers(lab: str) -> dict[str, str]:
    """grade_id -> the source notebook's answer (solution markers removed)."""
    with open(os.path.join(REPO, "solutions", lab, f"{lab}.ipynb")) as f:
        nb = json.load(f)
    out = {}
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell["cell_type"] == "code" and meta.get("solution"):
            src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            out[meta["grade_id"]] = _MARKER.sub("", src).rstrip() + "\n"
    return out


def points(lab: str) -> dict[str, float]:
    """grade_id -> points of every graded cell of the source notebook."""
    with open(os.path.join(REPO, "solutions", lab, f"{lab}.ipynb")) as f:
        nb = json.load(f)
    return {c["metadata"]["nbgrader"]["grade_id"]: float(c["metadata"]["nbgrader"].get("points", 0))
            for c in nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("grade")}


def first_line(text: str) -> str:
    return text.strip().splitlines()[0]


def wait_lab(page, timeout: int = MEDIUM) -> None:
    """JupyterLab's shell with its file browser is on screen."""
    page.locator("#jp-main-dock-panel").wait_for(state="visible", timeout=timeout)
    page.locator(".jp-DirListing-content").first.wait_for(state="visible", timeout=timeout)


def filebrowser_item(page, name: str):
    return page.locator(".jp-DirListing-content .jp-DirListing-item").filter(
        has=page.locator(f".jp-DirListing-itemText >> text='{name}'"))


def open_path(page, parts: list[str], timeout: int = MEDIUM) -> None:
    """Double-click through the file browser: folders, then the file."""
    for name in parts:
        item = filebrowser_item(page, name)
        item.wait_for(state="visible", timeout=timeout)
        item.dblclick()


def notebook(page):
    """The notebook panel in front."""
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")


def wait_kernel_idle(page, timeout: int = MEDIUM) -> None:
    notebook(page).locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(
        state="attached", timeout=timeout)


def open_notebook(page, parts: list[str]) -> None:
    open_path(page, parts)
    nb = notebook(page)
    nb.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=MEDIUM)
    wait_kernel_idle(page)


def code_cell(page, starts_with: str):
    """The code cell whose text contains ``starts_with`` (e.g. ``def kv_cache_bytes(``)."""
    cell = notebook(page).locator(".jp-CodeCell").filter(
        has=page.locator(".cm-content", has_text=starts_with))
    cell.first.wait_for(state="visible", timeout=MEDIUM)
    return cell.first


def type_into_cell(page, cell, text: str) -> None:
    """Replace the cell's text as a person would: click, select all, type."""
    editor = cell.locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(text)
    got = editor.evaluate("el => [...el.querySelectorAll('.cm-line')].map(l => l.textContent).join('\\n')")
    got = got.replace("\u00a0", " ").replace("\u200b", "")
    want = text.strip()
    assert got.strip() == want, f"the cell editor holds\n{got!r}\ninstead of\n{want!r}"


def fill_solutions(page, answers: dict[str, str], grade_ids: list[str]) -> None:
    for gid in grade_ids:
        text = answers[gid]
        type_into_cell(page, code_cell(page, first_line(text)), text)


def menu(page, top: str, item: str) -> None:
    """Click a menu-bar entry, then an item of the menu that opens."""
    page.locator(f".lm-MenuBar-itemLabel >> text='{top}'").click()
    entry = page.locator(f".lm-Menu-content .lm-Menu-itemLabel >> text='{item}'").first
    entry.wait_for(state="visible", timeout=MEDIUM)
    entry.click()


_RUN_STATE = """() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!nb) return 'no notebook';
  const prompts = [...nb.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent);
  if (prompts.some(p => p.includes('*'))) return 'running';
  if (nb.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"] .jp-RenderedText, .jp-OutputArea-output .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]')) return 'error';
  return prompts.length && prompts.every(p => /\\[\\d+\\]/.test(p)) ? 'done' : 'waiting';
}"""


def run_all(page, timeout: int = LONG) -> str:
    """Run → Run All Cells; wait until every code cell has run or one has failed."""
    menu(page, "Run", "Run All Cells")
    page.wait_for_function(f"() => ['done', 'error'].includes(({_RUN_STATE})())", timeout=timeout)
    return page.evaluate(f"({_RUN_STATE})()")


def error_outputs(page) -> list[str]:
    return notebook(page).locator(
        ".jp-OutputArea-output .jp-RenderedText[data-mime-type='application/vnd.jupyter.error']"
    ).all_inner_texts()


def save(page, path: str, must_contain: list[str], timeout: float = MEDIUM / 1000) -> None:
    """Ctrl+S, then wait until the server's copy of ``path`` holds every ``must_contain`` line
    (clicking the toolbar's save button every 5 s until it does).

    (The tab's dirty mark is no signal: the kernel's metadata can mark it dirty again.)
    """
    page.keyboard.press("Control+S")
    base = page.url.split("/lab")[0]
    deadline = time.monotonic() + timeout
    next_try = time.monotonic() + 5
    missing = must_contain
    while time.monotonic() < deadline:
        if time.monotonic() > next_try:  # the key press can land where it does nothing: ask again
            button = notebook(page).locator("[data-command='docmanager:save']").first
            if button.count():
                button.click()
            else:
                page.keyboard.press("Control+S")
            next_try = time.monotonic() + 5
        r = page.request.get(f"{base}/api/contents/{path}?content=1&type=notebook")
        if r.ok:
            cells = r.json()["content"]["cells"]
            text = "\n".join(c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                             for c in cells)
            missing = [line for line in must_contain if line not in text]
            if not missing:
                return
        page.wait_for_timeout(500)
    raise AssertionError(f"{path} was not saved with the answers; missing: {missing}")


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1].strip()


def console_errors(errors: list[str]) -> list[str]:
    return [e for e in errors if not any(pat in e for pat in IGNORED_CONSOLE)]
