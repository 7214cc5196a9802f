"""modeling/ ships inside the package as bd3lm_hf.modeling, in an editable install and in a built wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_maps_the_modeling_folder():
    import bd3lm_hf.modeling.modeling_bd3lm as modeling

    assert Path(modeling.__file__).resolve().parent.name == "modeling"


def test_wheel_contains_the_modeling_files(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                             "-q", "-w", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("bd3lm_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"bd3lm_hf/modeling/{p.name}" for p in (ROOT / "modeling").glob("*.py")}
    assert expected <= names, expected - names
    assert "bd3lm_hf/cli.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "bd3lm-hf = bd3lm_hf.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
