"""qalora-hf installs as a library: the wheel holds the model-card templates and the fidelity matrix as package data
and no demo code, and a card is built from the installed wheel alone (no source tree, no editable install)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_template_and_builds_a_card_when_installed(tmp_path):
    src = tmp_path / "src"  # build from a copy: the build writes build/ and *.egg-info next to pyproject.toml
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "runs", "results", "build", "dist",
                                                             "*.egg-info", "__pycache__", ".pytest_cache"))
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("qalora_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qalora_hf/templates/qalora_gptq.md" in names, names
    assert "qalora_hf/templates/fidelity_matrix.json" in names, names  # the fidelity matrix the card cites
    assert "qalora_hf/testing/hub_server.py" in names  # the test server ships as a testing utility
    assert not [n for n in names if n.split("/")[0] in ("demo", "bench", "recipes", "tests", "docs", "scripts", "model_cards")], names
    assert not {"qalora_hf/fetch.py", "qalora_hf/evaluate.py"} & set(names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "qalora-hf = qalora_hf.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    script = tmp_path / "card.py"
    script.write_text(
        "import qalora_hf, qalora_hf.card as c\n"
        f"assert qalora_hf.__file__.startswith({str(site)!r}), qalora_hf.__file__\n"
        "card = c.build_model_card(repo_id='user/m', base_model='user/base', qalora_config={'r': 8}, training_args={},\n"
        "    merge_metrics={'strategy': 'round', 'loss_base': 2.0, 'loss_trained': 1.0, 'loss_exported': 1.5},\n"
        "    framework_versions={}, bits=4, group_size=32, desc_act=False)\n"
        "print('CARD', '## Merge fidelity' in str(card), '| fraction of the fine-tuning loss gain kept by the export | 50.0% |' in str(card))\n"
        "import qalora_hf.fidelity as f\n"
        "print('MATRIX', isinstance(f.load_matrix()['cells'], list))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CARD True True" in run.stdout and "MATRIX True" in run.stdout, run.stdout[-2000:]
