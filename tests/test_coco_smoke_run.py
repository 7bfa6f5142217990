"""tools/coco_smoke_run.py: a COCO-scale training run on synthetic 800x1333 images."""

import os
import sys

import pytest

from conftest import TINY_OPTS

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import coco_smoke_run  # noqa: E402


@pytest.mark.slow
def test_smoke_run_trains_every_level_at_coco_scale(tmp_path, capsys):
    argv = ["--iters", "2", "--images", "2", "--output", str(tmp_path)] + list(TINY_OPTS)
    assert coco_smoke_run.main(argv) == 0
    out = capsys.readouterr().out
    for level in range(3, 8):
        line = next(x for x in out.splitlines() if f"num_pos_anchors_p{level}:" in x)
        assert float(line.rsplit(":", 1)[1]) > 0, line
    assert "every level (P3, P4, P5, P6, P7) trained" in out
    assert os.path.isfile(tmp_path / "data" / "coco.json")
