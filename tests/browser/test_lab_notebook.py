"""(1) A student opens lab01 from labs/ in JupyterLab, writes the answers, runs every cell.

The KV-cache widget renders and moving its slider changes the picture, the time-per-token
figure appears, and the browser console stays free of errors.
"""
from __future__ import annotations

import jlab

LAB = "lab01_kv_cache"
ANSWERS = ["kv_cache_bytes_impl", "cached_attention_impl", "KVCache_impl", "generate_impl",
           "max_batch_size_impl", "reservation_waste_impl"]


def widget_image_src(widget) -> str:
    return widget.locator(".widget-output img, .jupyter-widgets-output-area img").first.get_attribute("src") or ""


def test_student_runs_lab01_in_jupyterlab(jupyterlab, new_page):
    base, token, _root = jupyterlab
    p = new_page("1-lab")
    page = p.page
    page.goto(f"{base}/lab?token={token}")
    jlab.wait_lab(page)
    jlab.filebrowser_item(page, LAB).wait_for(state="visible", timeout=jlab.MEDIUM)
    p.shot("01-jupyterlab")

    jlab.open_notebook(page, [LAB, f"{LAB}.ipynb"])
    p.shot("02-notebook-open")

    answers = jlab.solution_answers(LAB)
    jlab.fill_solutions(page, answers, ANSWERS)
    p.shot("03-answers-typed")

    state = jlab.run_all(page)
    p.shot("04-all-cells-run")
    assert state == "done", f"a cell failed:\n" + "\n---\n".join(jlab.error_outputs(page))
    assert not jlab.error_outputs(page)

    # The widget: play button, slider and the matplotlib picture the slider drives.
    nb = jlab.notebook(page)
    widget = nb.locator(".jp-OutputArea-output .widget-vbox").filter(
        has=page.locator(".widget-slider")).first
    widget.wait_for(state="visible", timeout=jlab.MEDIUM)
    widget.locator(".widget-play, .jupyter-widgets.widget-play, button").first.wait_for(state="visible")
    img = widget.locator(".widget-output img, .jupyter-widgets-output-area img").first
    img.wait_for(state="visible", timeout=jlab.MEDIUM)
    widget.scroll_into_view_if_needed()
    p.shot("05-widget")
    before = widget_image_src(widget)
    readout = widget.locator(".widget-readout").first
    assert readout.inner_text().strip() == "0"

    # Drag the slider's handle to the far right (continuous_update=False: the picture is
    # redrawn when the handle is released).
    handle = widget.locator(".widget-slider .noUi-handle").first
    track = widget.locator(".widget-slider .noUi-target, .widget-slider .slider").first
    hb, tb = handle.bounding_box(), track.bounding_box()
    page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
    page.mouse.down()
    page.mouse.move(tb["x"] + tb["width"] * 0.6, hb["y"] + hb["height"] / 2, steps=8)
    page.mouse.up()
    page.wait_for_function(
        """([el, before]) => { const i = el.querySelector('.widget-output img, .jupyter-widgets-output-area img');
                                return i && i.getAttribute('src') && i.getAttribute('src') !== before; }""",
        arg=[widget.element_handle(), before], timeout=jlab.MEDIUM)
    assert readout.inner_text().strip() != "0", "the slider's value did not change"
    p.shot("06-widget-after-slider")

    # The measurement's matplotlib figure (an image output of the timing cell).
    # JupyterLab renders only the cells near the viewport: scroll down to the timing cell
    box = jlab.notebook(page).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(40):
        if jlab.notebook(page).locator(".jp-CodeCell").filter(
                has=page.locator(".cm-content", has_text="lengths = [")).count():
            break
        page.mouse.wheel(0, 400)
        page.wait_for_timeout(150)
    timing = jlab.code_cell(page, "lengths = [")
    timing.locator(".jp-OutputArea-output img").first.wait_for(state="visible", timeout=jlab.MEDIUM)
    timing.locator(".jp-OutputArea-output img").first.scroll_into_view_if_needed()
    p.shot("07-timing-figure")

    errors = jlab.console_errors(p.errors)
    assert not errors, "browser console errors:\n" + "\n".join(errors)
