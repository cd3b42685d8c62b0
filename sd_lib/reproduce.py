"""Run the numbered notebooks end to end with papermill; `make reproduce` calls this.

    python -m sd_lib.reproduce --profile cpu --seed 0            # all notebooks, in order
    python -m sd_lib.reproduce --profile smoke --only 00 01      # a subset

Each `notebooks/NN_*.py` (Jupytext percent format) is converted to an ipynb under
`build/notebooks/`, executed by papermill with PROFILE and SEED injected into its
parameters cell, and the executed copy is written to `build/executed/<profile>-seed<seed>/`.
A notebook whose inputs have not changed since its last successful run is skipped: its
inputs are its own source, the sd_lib sources, the parameters and the stamps of every
notebook before it. So a re-run after an interruption continues where it stopped (and the
training notebooks resume from their last checkpoint). A failing notebook stops the run
with the notebook and cell named.

When every notebook is done, `<results_dir>/run_info.json` records how the results were made
(profile, seed, commit, machine, torch, each notebook's wall time from its stamp) and, for
profiles other than smoke, the README's `run_info` section is generated from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .config import repo_relative

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "build"


class NotebookFailed(RuntimeError):
    pass


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def library_digest() -> str:
    files = sorted((ROOT / "sd_lib").rglob("*.py"))
    return _digest(*(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() for f in files))


def notebook_paths(only=None) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    if only:
        paths = [p for p in paths if p.name[:2] in set(only)]
    return paths


def run_notebook(src: Path, *, parameters: dict, out_dir: Path, kernel: str = "python3") -> Path:
    """Convert one percent-format notebook and execute it; raise `NotebookFailed` naming the cell."""
    import jupytext
    import papermill as pm

    ipynb = BUILD / "notebooks" / (src.stem + ".ipynb")
    ipynb.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(jupytext.read(src), ipynb)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (src.stem + ".ipynb")
    try:
        pm.execute_notebook(
            str(ipynb), str(out), parameters=parameters, cwd=str(NOTEBOOKS), kernel_name=kernel, language="python",
            progress_bar=False, log_output=True, request_save_on_cell_execute=True,
        )
    except pm.PapermillExecutionError as e:
        raise NotebookFailed(
            f"notebook {src.name} failed in cell {e.exec_count} ({e.ename}: {e.evalue}); "
            f"executed copy with the traceback: {out}"
        ) from None
    return out


RUN_OUTPUTS = ("results", "figures", "README.md")  # tracked paths a reproduction writes


def run_info(profile: str, seed: int, *, stamps_dir: Path | None = None) -> dict:
    """How a reproduction was made: profile, seed, commit, machine, torch, and per notebook the
    wall time and finish time of its last successful run (from `build/stamps/<profile>-seed<seed>/`).
    `dirty`: tracked files other than the run's outputs (`RUN_OUTPUTS`) differ from the commit."""
    import torch

    stamps_dir = Path(stamps_dir) if stamps_dir is not None else BUILD / "stamps" / f"{profile}-seed{seed}"
    notebooks = {}
    for stamp in sorted(stamps_dir.glob("[0-9][0-9]_*.json")):
        d = json.loads(stamp.read_text())
        notebooks[stamp.stem] = {"seconds": d.get("seconds"), "finished": d.get("finished")}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        # inputs only: the run itself rewrites results/, figures/ and the README's generated sections
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     *(f":(exclude){p}" for p in RUN_OUTPUTS)],
                                    cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "profile": profile,
        "seed": seed,
        "commit": commit,
        "dirty": dirty,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "torch_threads": torch.get_num_threads(),
        "notebooks": notebooks,
        "total_seconds": round(sum(n["seconds"] or 0.0 for n in notebooks.values()), 1),
    }


def run_info_markdown(info: dict) -> str:
    """The README's `run_info` section, generated from `run_info.json`."""
    from .report import markdown_table

    rows = [[name, f"{n['seconds']:.0f}", n["finished"]] for name, n in info["notebooks"].items()]
    rows.append(["total", f"{info['total_seconds']:.0f} ({info['total_seconds'] / 60:.1f} min)", ""])
    commit = f"commit `{info['commit']}`" + (" (with uncommitted changes)" if info.get("dirty") else "")
    text = (f"The committed `results/` and `figures/` come from `make reproduce PROFILE={info['profile']} "
            f"SEED={info['seed']}` at {commit} on {info['machine']}, torch {info['torch']} "
            f"({info['device']}, {info['torch_threads']} threads). Wall time of each notebook's last "
            f"successful run (papermill, from `build/stamps/`), recorded in `results/run_info.json`:")
    if info.get("note"):
        text += "\n\n" + info["note"]
    return text + "\n\n" + markdown_table(rows, ["notebook", "seconds", "finished (UTC)"], align=["l", "r", "l"])


def write_run_info(profile: str, seed: int, *, results_dir: Path, update_readme: bool) -> Path:
    from .evaluation import write_json
    from .report import update_readme as _update

    info = run_info(profile, seed)
    path = write_json(info, Path(results_dir) / "run_info.json")
    if update_readme:
        _update("run_info", run_info_markdown(info))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu", help="config profile passed to every notebook")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 00 01")
    ap.add_argument("--force", action="store_true", help="re-execute notebooks whose inputs did not change")
    args = ap.parse_args(argv)

    params = {"PROFILE": args.profile, "SEED": args.seed}
    tag = f"{args.profile}-seed{args.seed}"
    out_dir, stamps = BUILD / "executed" / tag, BUILD / "stamps" / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    stamps.mkdir(parents=True, exist_ok=True)
    lib = library_digest()
    upstream = b""
    timings = {}
    for src in notebook_paths(args.only):
        key = _digest(src.read_bytes(), lib.encode(), json.dumps(params, sort_keys=True).encode(), upstream)
        stamp = stamps / (src.stem + ".json")
        done = json.loads(stamp.read_text()) if stamp.exists() else {}
        if done.get("key") == key and not args.force:
            print(f"[reproduce] {src.name}: inputs unchanged since {done.get('finished')}, skipped", flush=True)
        else:
            print(f"[reproduce] {src.name}: running ({tag})", flush=True)
            t0 = time.time()
            try:
                run_notebook(src, parameters=params, out_dir=out_dir)
            except NotebookFailed as e:
                print(f"[reproduce] FAILED: {e}", file=sys.stderr, flush=True)
                return 1
            timings[src.name] = round(time.time() - t0, 1)
            stamp.write_text(json.dumps({"key": key, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": timings[src.name]}))
            print(f"[reproduce] {src.name}: done in {timings[src.name]} s", flush=True)
        upstream += key.encode()
    print(f"[reproduce] all notebooks done for {tag}; executed copies in {repo_relative(out_dir)}", flush=True)
    if not args.only:
        from .config import get_config, resolve_path

        results_dir = resolve_path(get_config(args.profile, seed=args.seed).results_dir)
        path = write_run_info(args.profile, args.seed, results_dir=results_dir,
                              update_readme=args.profile != "smoke")
        print(f"[reproduce] wrote {repo_relative(path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
