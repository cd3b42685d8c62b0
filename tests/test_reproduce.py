"""sd_lib.reproduce: skip-if-unchanged, continue after an interruption, failures named, run info.

The runner is tested on throwaway notebooks in a temporary folder: the skip logic with a fake
executor (milliseconds), the failure message with a real papermill kernel on a two-cell notebook.
"""

import json

import pytest

from sd_lib import reproduce


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Three percent-format notebooks and an empty build folder; `calls` records executions,
    `fail` names a notebook whose execution fails."""
    nb = tmp_path / "notebooks"
    nb.mkdir()
    for name in ("00_a", "01_b", "02_c"):
        (nb / f"{name}.py").write_text(f"# %%\nprint('{name}')\n")
    monkeypatch.setattr(reproduce, "NOTEBOOKS", nb)
    monkeypatch.setattr(reproduce, "BUILD", tmp_path / "build")
    monkeypatch.setattr(reproduce, "write_run_info", lambda *a, **k: tmp_path / "run_info.json")
    state = {"calls": [], "fail": None}

    def fake_run(src, *, parameters, out_dir, kernel="python3"):
        state["calls"].append(src.stem)
        if src.stem == state["fail"]:
            raise reproduce.NotebookFailed(f"notebook {src.name} failed in cell 1 (ValueError: bad)")
        return out_dir / (src.stem + ".ipynb")

    monkeypatch.setattr(reproduce, "run_notebook", fake_run)
    state["dir"] = nb
    return state


def test_unchanged_notebooks_are_skipped_and_an_edit_reruns_it_and_its_successors(sandbox):
    assert reproduce.main(["--profile", "smoke"]) == 0
    assert sandbox["calls"] == ["00_a", "01_b", "02_c"]
    sandbox["calls"].clear()
    assert reproduce.main(["--profile", "smoke"]) == 0
    assert sandbox["calls"] == []  # nothing changed: everything skipped
    (sandbox["dir"] / "01_b.py").write_text("# %%\nprint('edited')\n")
    assert reproduce.main(["--profile", "smoke"]) == 0
    assert sandbox["calls"] == ["01_b", "02_c"]  # the edited notebook and everything after it
    sandbox["calls"].clear()
    assert reproduce.main(["--profile", "smoke", "--seed", "1"]) == 0
    assert sandbox["calls"] == ["00_a", "01_b", "02_c"]  # other parameters: another stamp set


def test_a_failure_stops_the_run_names_it_and_the_rerun_continues_there(sandbox, capsys):
    sandbox["fail"] = "01_b"
    assert reproduce.main(["--profile", "smoke"]) == 1
    assert sandbox["calls"] == ["00_a", "01_b"]  # 02 never started
    assert "FAILED: notebook 01_b.py failed in cell 1" in capsys.readouterr().err
    sandbox["fail"], sandbox["calls"] = None, []
    assert reproduce.main(["--profile", "smoke"]) == 0
    assert sandbox["calls"] == ["01_b", "02_c"]  # 00 is not redone


def test_library_edit_changes_the_key(tmp_path, monkeypatch):
    lib = tmp_path / "sd_lib"
    lib.mkdir()
    (lib / "x.py").write_text("a = 1\n")
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    before = reproduce.library_digest()
    (lib / "x.py").write_text("a = 2\n")
    assert reproduce.library_digest() != before


def test_run_info_reads_the_stamps_and_renders_the_readme_section(tmp_path):
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    (stamps / "00_a.json").write_text(json.dumps({"key": "k0", "finished": "2026-12-04 10:00:00", "seconds": 60.0}))
    (stamps / "01_b.json").write_text(json.dumps({"key": "k1", "finished": "2026-12-04 10:02:00", "seconds": 120.4}))
    info = reproduce.run_info("cpu", 0, stamps_dir=stamps)
    assert info["notebooks"] == {"00_a": {"seconds": 60.0, "finished": "2026-12-04 10:00:00"},
                                 "01_b": {"seconds": 120.4, "finished": "2026-12-04 10:02:00"}}
    assert info["total_seconds"] == 180.4 and info["profile"] == "cpu" and info["seed"] == 0
    md = reproduce.run_info_markdown({**info, "note": "A note."})
    assert "make reproduce PROFILE=cpu SEED=0" in md and "A note." in md
    assert "| 01_b | 120 | 2026-12-04 10:02:00 |" in md
    assert "| total | 180 (3.0 min) |  |" in md


def test_run_info_dirty_ignores_the_runs_own_outputs(tmp_path, monkeypatch):
    """Checks `dirty` on a throwaway git repository: an edited result, figure or README (what a
    run writes) leaves it False; an edited library file makes it True."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for path in ("results/eval.json", "figures/a.png", "README.md", "sd_lib/x.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("v1")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "init")
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    for path in ("results/eval.json", "figures/a.png", "README.md"):
        (tmp_path / path).write_text("v2")
    assert reproduce.run_info("cpu", 0, stamps_dir=tmp_path)["dirty"] is False
    (tmp_path / "sd_lib/x.py").write_text("v2")
    assert reproduce.run_info("cpu", 0, stamps_dir=tmp_path)["dirty"] is True


def test_papermill_failure_names_notebook_and_cell(tmp_path, monkeypatch):
    """A real kernel: the second cell raises; the error names the notebook and that cell."""
    pytest.importorskip("papermill")
    monkeypatch.setattr(reproduce, "BUILD", tmp_path / "build")
    src = tmp_path / "07_fails.py"
    src.write_text("# %% tags=['parameters']\nPROFILE = 'x'\n\n# %%\nraise ValueError('planted ' + PROFILE)\n")
    with pytest.raises(reproduce.NotebookFailed, match=r"07_fails.py failed in cell \d+ \(ValueError: planted smoke\)"):
        reproduce.run_notebook(src, parameters={"PROFILE": "smoke"}, out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "07_fails.ipynb").exists()  # the executed copy with the traceback
