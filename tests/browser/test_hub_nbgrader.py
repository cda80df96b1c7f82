"""(2) and (3): the nbgrader cycle on the course hub, in a browser, as its users do it.

(2) The instructor generates and releases lab01 in the formgrader; a student fetches it from
    the Assignments tab, writes two answers in the notebook, saves and submits.
(3) The instructor collects it, autogrades it (the course's autograder behind nbgrader's
    Autograde button), sees the score, generates and releases feedback; the student fetches
    the feedback and reads the score in it.

The two tests share one hub (module-scoped) and run in file order: (3) needs (2)'s submission.
"""
from __future__ import annotations

import glob
import os
import re

import pytest

import jlab

LAB = "lab01_kv_cache"
COURSE = "llm-optimization-labs"
# The student answers two parts (kv_cache_bytes, cached_attention); the rest stays
# `raise NotImplementedError()`, so the score is partial and the autograder's run is short.
ANSWERS = ["kv_cache_bytes_impl", "cached_attention_impl"]
STATE: dict = {}


def login(p, hub: dict, user: str) -> None:
    page = p.page
    page.goto(f"{hub['url']}/hub/login")
    page.locator("#username_input").fill(user)
    page.locator("#password_input").fill(hub["password"])
    page.locator("#login_submit").click()
    # first log-in spawns the user's server: the hub's spawn page, then JupyterLab
    jlab.wait_lab(page, timeout=jlab.LONG)


def nbgrader_menu_items(page) -> list[str]:
    page.locator(".lm-MenuBar-itemLabel >> text='Nbgrader'").click()
    menu = page.locator(".lm-Menu-content").first
    menu.wait_for(state="visible")
    items = [t.strip() for t in menu.locator(".lm-Menu-item:not(.lm-mod-hidden) .lm-Menu-itemLabel").all_inner_texts()]
    page.keyboard.press("Escape")
    return [t for t in items if t]


def open_formgrader(page):
    jlab.menu(page, "Nbgrader", "Formgrader")
    fg = page.frame_locator("iframe[src*='/formgrader']")
    return fg


def assignment_row(fg):
    return fg.locator("#main-table tr").filter(has=fg.locator("td.name", has_text=LAB))


def formgrader_action(fg, row, cell: str, timeout: int = jlab.LONG) -> str:
    """Click the row's action in column ``cell``; wait for nbgrader's result dialog; close it."""
    link = row.locator(f"td.{cell} a")
    link.wait_for(state="visible", timeout=jlab.MEDIUM)
    link.click()
    dialog = fg.locator("#success-modal, #error-modal")
    dialog.wait_for(state="visible", timeout=timeout)
    text = dialog.inner_text()
    ok = fg.locator("#success-modal").count() > 0
    dialog.locator("button.btn-primary").click()
    dialog.wait_for(state="detached", timeout=jlab.MEDIUM)
    assert ok, f"the formgrader's {cell} failed:\n{text[-3000:]}"
    return text


def open_assignments_tab(page) -> None:
    tab = page.locator(".lm-TabBar-tab", has_text="Assignments")
    if tab.count():
        tab.first.click()
    else:
        jlab.menu(page, "Nbgrader", "Assignment List")
    page.locator("#assignments").first.wait_for(state="visible", timeout=jlab.MEDIUM)


def test_student_fetches_and_submits_on_the_hub(hub, new_page):
    # --- the instructor releases lab01 ---------------------------------------------------
    teacher = new_page("2-hub-instructor")
    login(teacher, hub, "instructor")
    assert "Formgrader" in nbgrader_menu_items(teacher.page)
    fg = open_formgrader(teacher.page)
    row = assignment_row(fg)
    row.wait_for(state="visible", timeout=jlab.MEDIUM)
    teacher.shot("01-formgrader")
    formgrader_action(fg, row, "assign")           # Generate: solutions/ -> labs/, gradebook
    formgrader_action(fg, row, "release")          # Release: labs/ -> the exchange
    row.locator("td.status", has_text="released").wait_for(timeout=jlab.MEDIUM)
    teacher.shot("02-released")

    # --- the student fetches, answers, submits ---------------------------------------------
    student = new_page("2-hub-student")
    page = student.page
    login(student, hub, "student1")
    items = nbgrader_menu_items(page)
    assert "Assignment List" in items and "Formgrader" not in items, items
    jlab.menu(page, "Nbgrader", "Assignment List")
    released = page.locator("#released_assignments_list .list_item", has_text=LAB)
    released.wait_for(state="visible", timeout=jlab.MEDIUM)
    student.shot("01-assignments")
    released.locator("button", has_text="Fetch").click()
    fetched = page.locator("#fetched_assignments_list .list_item", has_text=LAB).first
    fetched.wait_for(state="visible", timeout=jlab.MEDIUM)
    student.shot("02-fetched")

    fetched.locator("a.assignment-notebooks-link").click()
    nb_link = page.locator("#fetched_assignments_list .nested_list_item a", has_text=LAB).first
    nb_link.wait_for(state="visible", timeout=jlab.MEDIUM)
    nb_link.click()
    jlab.notebook(page).locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=jlab.MEDIUM)
    jlab.wait_kernel_idle(page)
    answers = jlab.solution_answers(LAB)
    jlab.fill_solutions(page, answers, ANSWERS)
    jlab.save(page, f"{LAB}/{LAB}.ipynb", [jlab.last_line(answers[g]) for g in ANSWERS])
    student.shot("03-answers-saved")

    open_assignments_tab(page)
    submit = page.locator("#fetched_assignments_list .list_item", has_text=LAB).first.locator(
        "button", has_text="Submit")
    submit.click()
    submitted = page.locator("#submitted_assignments_list .list_item", has_text=LAB).first
    submitted.wait_for(state="visible", timeout=jlab.MEDIUM)
    student.shot("04-submitted")
    inbound = glob.glob(os.path.join(hub["exchange"], COURSE, "inbound", f"student1+{LAB}+*"))
    assert inbound, "the submission is not in the exchange's inbound folder"
    STATE["submitted"] = True


def test_instructor_autogrades_and_student_reads_feedback(hub, new_page):
    if not STATE.get("submitted"):
        pytest.fail("needs the submission of test_student_fetches_and_submits_on_the_hub")
    teacher = new_page("3-hub-instructor")
    page = teacher.page
    login(teacher, hub, "instructor")
    fg = open_formgrader(page)
    row = assignment_row(fg)
    row.wait_for(state="visible", timeout=jlab.MEDIUM)
    formgrader_action(fg, row, "collect")
    count = row.locator("td.num-submissions a")
    count.wait_for(state="visible", timeout=jlab.MEDIUM)
    assert count.inner_text().strip() == "1"
    teacher.shot("01-collected")

    # Autograde: the course's autograder runs the notebook and scores the hidden checks.
    count.click()
    sub = fg.locator("#main-table tr").filter(has=fg.locator("td.student-id", has_text="student1"))
    sub.wait_for(state="visible", timeout=jlab.MEDIUM)
    formgrader_action(fg, sub, "autograde", timeout=jlab.LONG)
    score = sub.locator("td.score")
    score.filter(has_text="/").wait_for(timeout=jlab.MEDIUM)
    text = score.inner_text().strip()
    m = re.fullmatch(r"([\d.]+) / ([\d.]+)", text)
    assert m, f"no score in the formgrader: {text!r}"
    got, out_of = float(m.group(1)), float(m.group(2))
    pts = jlab.points(LAB)
    want = sum(pts[f"check_{gid.removesuffix('_impl')}"] for gid in ANSWERS)
    assert (got, out_of) == (want, sum(pts.values())), \
        f"expected {want:g} / {sum(pts.values()):g} (the two answered parts), the formgrader shows {text}"
    teacher.shot("02-autograded-score")

    # Feedback: generate and release (Manage Assignments page).
    fg.locator("a", has_text="Manage Assignments").first.click()
    row = assignment_row(fg)
    row.wait_for(state="visible", timeout=jlab.MEDIUM)
    formgrader_action(fg, row, "generate-feedback")
    formgrader_action(fg, row, "release-feedback")
    teacher.shot("03-feedback-released")

    # The student fetches the feedback and opens it.
    student = new_page("3-hub-student")
    spage = student.page
    login(student, hub, "student1")
    jlab.menu(spage, "Nbgrader", "Assignment List")
    item = spage.locator("#submitted_assignments_list .list_item", has_text=LAB).first
    item.wait_for(state="visible", timeout=jlab.MEDIUM)
    item.locator("button", has_text="Fetch Feedback").click()
    item.locator("a", has_text="view feedback").wait_for(state="visible", timeout=jlab.MEDIUM)
    student.shot("01-feedback-fetched")
    # "(view feedback)" moves the file browser to the feedback folder; open the page there.
    item.locator("a", has_text="view feedback").click()
    html = jlab.filebrowser_item(spage, f"{LAB}.html")
    html.wait_for(state="visible", timeout=jlab.MEDIUM)
    html.dblclick()
    frame = spage.frame_locator(".jp-HTMLViewer iframe, .jp-RenderedHTML iframe").first
    frame.locator("body", has_text="Score").first.wait_for(timeout=jlab.MEDIUM)
    body = frame.locator("body").inner_text()
    assert re.search(rf"Score:\s*{want:.1f}\s*/\s*{out_of:.1f}", body), \
        f"the feedback does not show the score {want:g} / {out_of:g}:\n{body[:1500]}"
    assert "BEGIN HIDDEN TESTS" not in body and "from autograder import check" not in body, \
        "the feedback shows hidden tests"
    student.shot("02-feedback-open")
