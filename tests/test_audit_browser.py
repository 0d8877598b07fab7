"""The audit report in a real browser (headless Chromium): it renders offline, its review
form's script builds the decisions document, and that document applies with `review apply`.

Skipped when no Chromium is installed (Debian: `apt-get install -y chromium`).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.test_audit import PLANTED, _fake_noise, _flip_rows
from tests.toy import toy_pairs

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # --disable-background-networking and no proxy: the report must need no network at all.
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--no-first-run", f"--user-data-dir={cwd / 'profile'}", *args],
                          capture_output=True, text=True, timeout=90, cwd=cwd)


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size[0], size[1], zlib.decompress(idat)


def test_report_renders_and_its_decisions_apply(home: Path, tmp_path: Path, cli) -> None:
    import factory.audit
    from factory.catalog import Catalog

    table = _flip_rows(toy_pairs(40, ties=4), PLANTED)
    for name, column in _fake_noise(table, PLANTED).items():
        table = table.append_column(name, column)
    ref = Catalog(home).commit("noisy", table).ref
    page = tmp_path / "audit.html"
    factory.audit(ref, compute=False, html=page, top=8)

    shot = tmp_path / "shot.png"
    _chromium("--window-size=1200,1600", f"--screenshot={shot}", page.as_uri(), cwd=tmp_path)
    assert shot.is_file() and shot.stat().st_size > 20_000
    width, height, raw = _png_pixels(shot)
    assert (width, height) == (1200, 1600)
    assert len(set(raw[: len(raw) // 2])) > 50  # text, bars and colours, not a blank page

    # The page's script reads decisions from the URL hash and renders the document it would save.
    dom = _chromium("--dump-dom", page.as_uri() + f"#decide={PLANTED[0]}:flip,{PLANTED[1]}:drop,{PLANTED[2]}:keep",
                    cwd=tmp_path).stdout
    start = dom.index('<pre id="decisions-json">') + len('<pre id="decisions-json">')
    doc = json.loads(dom[start:dom.index("</pre>", start)].replace("&quot;", '"').replace("&amp;", "&"))
    assert doc["format"] == "prefab-review/1" and doc["ref"] == ref
    assert [(d["row"], d["action"]) for d in doc["decisions"]] == [(PLANTED[0], "flip"), (PLANTED[1], "drop"),
                                                                   (PLANTED[2], "keep")]
    decisions = tmp_path / "decisions.json"
    decisions.write_text(json.dumps(doc))
    result = cli("review", "apply", ref, decisions, "--name", "noisy-reviewed", "--json")
    assert result.code == 0, result.stderr
    r = result.json()
    assert (r["rows_in"], r["rows_kept"], r["rows_dropped"], r["rows_flipped"]) == (44, 43, 1, 1)
    fixed = {row["pair_id"]: row for row in Catalog(home).read_table(r["ref"]).to_pylist()}
    original = toy_pairs(40, ties=4).to_pylist()[PLANTED[0]]
    assert fixed[original["pair_id"]]["chosen"] == original["chosen"]  # the planted flip is undone


# Appended to a copy of the report: measures where the suspects' cells and the plots land.
_MEASURE = """<script>
const vw = document.documentElement.clientWidth, out = {vw, page: document.documentElement.scrollWidth, cells: []};
document.querySelectorAll('tr.suspect').forEach(tr => [5, 6, 7].forEach(i => {
  const r = tr.children[i].getBoundingClientRect();
  out.cells.push({column: i, left: r.left, right: r.right, width: r.width});
}));
out.plots = [...document.querySelectorAll('figure.plot svg')].map(s => s.getBoundingClientRect().right);
const pre = document.createElement('pre'); pre.id = 'measure'; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


def test_narrow_window_keeps_suspects_and_plots_on_screen(home: Path, tmp_path: Path) -> None:
    """At 500 px the prompt, chosen, rejected and decision cells of every suspect, and every
    plot, lie inside the viewport without scrolling sideways."""
    import factory.audit
    from factory.catalog import Catalog

    table = _flip_rows(toy_pairs(40, ties=4), PLANTED)
    for name, column in _fake_noise(table, PLANTED).items():
        table = table.append_column(name, column)
    ref = Catalog(home).commit("noisy", table).ref
    page = tmp_path / "audit.html"
    factory.audit(ref, compute=False, html=page, top=8)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _MEASURE + "</body>"))

    dom = _chromium("--window-size=500,900", "--dump-dom", probe.as_uri(), cwd=tmp_path).stdout
    start = dom.index('<pre id="measure">') + len('<pre id="measure">')
    got = json.loads(dom[start:dom.index("</pre>", start)].replace("&quot;", '"').replace("&amp;", "&"))
    vw = got["vw"]
    assert 400 <= vw <= 500, got  # the window really is narrow
    assert len(got["cells"]) == 8 * 3
    for cell in got["cells"]:
        assert cell["left"] >= 0 and cell["right"] <= vw + 0.5, cell
        assert cell["width"] >= 0.6 * vw or cell["column"] == 7, cell  # text gets the full width
    assert all(right <= vw + 0.5 for right in got["plots"]), got["plots"]
    assert got["page"] <= vw, got  # nothing scrolls the page sideways
