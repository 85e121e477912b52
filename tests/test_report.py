"""The HTML report framework: escaping, embedded PNGs, sections, figures."""

from __future__ import annotations

import base64
import re

import numpy as np

from diffdissect.report import Report, bar_chart, heatmap, image_grid

PNG = b"\x89PNG\r\n\x1a\n"


def test_all_text_is_escaped(tmp_path):
    report = Report("<b>title</b>")
    s = report.section("a & b")
    s.paragraph('<script>alert("x")</script>').note("<i>n</i>").code("if a < b: pass")
    s.table(["<h>"], [["<td>"], [1.5]], caption="<cap>")
    s.image(image_grid(np.zeros((2, 4, 4, 3), np.uint8)), caption='"><img src=x onerror=alert(1)>')
    html = report.write(tmp_path / "r.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "<b>title</b>" not in html and "&lt;b&gt;title&lt;/b&gt;" in html
    assert '"><img src=x onerror' not in html and 'alt="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"' in html
    assert "<td>&lt;td&gt;</td>" in html and "a &amp; b" in html and "if a &lt; b" in html


def test_images_are_embedded_pngs(tmp_path):
    report = Report("r")
    report.section("s").image(image_grid(np.full((3, 5, 5, 3), 200, np.uint8), columns=2, scale=2), "grid")
    html = report.render()
    data = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(data).startswith(PNG)


def test_image_grid_layout():
    from io import BytesIO

    from PIL import Image

    images = np.zeros((5, 4, 6, 3), np.uint8)
    images[4] = 255
    grid = np.asarray(Image.open(BytesIO(image_grid(images, columns=2, scale=1, pad=1))))
    assert grid.shape == (3 * 5 + 1, 2 * 7 + 1, 3)
    assert (grid[11:15, 1:7] == 255).all() and (grid[1:5, 1:7] == 0).all()


def test_figures_are_pngs():
    assert heatmap(np.random.rand(3, 2), ["a", "b", "c"], ["x", "y"], "t").startswith(PNG)
    assert bar_chart(["g1", "g2"], {"s": [0.2, 0.5]}, errors={"s": [(0.1, 0.3), (0.4, 0.6)]}).startswith(PNG)
