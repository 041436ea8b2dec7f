import base64
import hashlib
import re

import pytest

from tsae.analysis.aggregate import build_final_info, comparison_table, write_final_info
from tsae.analysis.plotting import new_figure, save_png, styled
from tsae.analysis.report import (
    FigureRef,
    ReportError,
    Section,
    check_report,
    html_table,
    kv_table,
    write_report,
)


@styled
def tiny_figure(path, slope):
    fig, axes = new_figure(figsize=(3, 2))
    axes[0, 0].plot([0, 1, 2], [0, slope, 2 * slope])
    return save_png(fig, path)


@pytest.fixture
def run_dir(tmp_path):
    tiny_figure(tmp_path / "figures" / "a.png", 1.0)
    tiny_figure(tmp_path / "figures" / "b.png", -1.0)
    info = build_final_info({"shakespeare": [{"tsae": {"fvu": 0.1}, "topk": {"fvu": 0.2}},
                                             {"tsae": {"fvu": 0.2}, "topk": {"fvu": 0.2}}]})
    write_final_info(tmp_path / "final_info.json", info)
    sections = [
        Section("What this run did", text="Trained `tsae` and `topk`.\n\n- item <one>\n- item two",
                tables=[kv_table({"seeds": 2, "layer": 3})]),
        Section("Comparison", tables=[comparison_table(info["shakespeare"], fmt="html")],
                figures=[FigureRef("figures/a.png", "A & B")],
                links=[("final_info.json", "final_info.json")]),
        {"heading": "Transitions", "figures": [(tmp_path / "figures" / "b.png", "absolute path")],
         "tables": [html_table(["A", "B", "lift"], [[1, 2, 3.14159]])]},
        Section("Caveats", text="Small run <script>alert(1)</script>."),
    ]
    return tmp_path, write_report(tmp_path, "TSAE run", sections, subtitle="smoke")


def test_report_embeds_figures_and_checks(run_dir):
    out, path = run_dir
    html = path.read_text()
    srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(srcs) == 2
    for src, name in zip(srcs, ("a.png", "b.png"), strict=True):
        assert base64.b64decode(src) == (out / "figures" / name).read_bytes()
    assert "<code>tsae</code>" in html and "<li>item &lt;one&gt;</li>" in html
    assert "<script>" not in html and "3.142" in html and "A &amp; B" in html
    checked = check_report(out)
    assert sorted(p.name for p in checked) == ["a.png", "b.png", "final_info.json"]


def test_check_report_fails_on_missing_or_changed_files(run_dir):
    out, _ = run_dir
    (out / "final_info.json").unlink()
    with pytest.raises(ReportError, match="final_info.json"):
        check_report(out)
    (out / "final_info.json").write_text("{}")
    tiny_figure(out / "figures" / "a.png", 5.0)  # re-rendered after the report was written
    with pytest.raises(ReportError, match="differs"):
        check_report(out)
    (out / "figures" / "a.png").unlink()
    with pytest.raises(ReportError, match="a.png"):
        check_report(out)
    with pytest.raises(ReportError, match="does not exist"):
        check_report(out / "nowhere")


def test_check_report_rejects_tampered_embedding(run_dir):
    out, path = run_dir
    html = path.read_text()
    data = (out / "figures" / "a.png").read_bytes()
    fake = base64.b64encode(b"GIF89a" + data[6:]).decode()
    html = html.replace(base64.b64encode(data).decode(), fake, 1)
    path.write_text(html)
    with pytest.raises(ReportError, match="not a PNG"):
        check_report(out)
    assert hashlib.sha256(data).hexdigest() in html


def test_write_report_refuses_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report(tmp_path, "t", [Section("s", figures=[FigureRef("missing.png")])])
    (tmp_path / "not_png.png").write_bytes(b"hello")
    with pytest.raises(FileNotFoundError, match="not a PNG"):
        write_report(tmp_path, "t", [Section("s", figures=[FigureRef("not_png.png")])])
    with pytest.raises(FileNotFoundError, match="gone.json"):
        write_report(tmp_path, "t", [Section("s", links=[("x", "gone.json")])])
