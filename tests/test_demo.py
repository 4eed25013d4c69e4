"""The README's main job runs end to end (at a small size) and checks itself."""

from ring_attn import demo


def test_demo_runs_and_reports(capsys):
    demo.main(["--length", "2048", "--ring-size", "4", "--rows", "4", "--heads", "4", "--kv-heads", "2"])
    printed = capsys.readouterr().out
    assert "forward:" in printed and "sampled rows vs float64" in printed and "per device:" in printed
    rel = float(printed.split("(relative ")[1].split(")")[0])
    assert rel < 1e-4
