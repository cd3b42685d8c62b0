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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

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
    print(f"[reproduce] all notebooks done for {tag}; executed copies in {out_dir.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
