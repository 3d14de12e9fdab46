"""Execute the example notebooks and write them back WITH their outputs (what the repository commits).

    python examples/run_notebooks.py                 # every notebook, full settings, outputs saved in place
    python examples/run_notebooks.py own_image_folder.ipynb segmentation_smp.ipynb
    python examples/run_notebooks.py --quick --check # RTL_NOTEBOOK_QUICK=1 in a temporary folder, nothing saved

Each notebook runs in a fresh ``python3`` kernel (this interpreter's ipykernel) with ``examples/`` as its working
directory, so run folders land in ``examples/rtl-runs/`` (ignored by git). Needs nbformat, nbclient and ipykernel
(``pip install -e ".[test]"``). Prints the wall time of every notebook; full settings take a few minutes each on
2 CPU cores (the slowest, speech, needs ``apt-get install espeak-ng sox``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 3600


def execute(path: Path, *, quick: bool, workdir: Path) -> tuple[object, float]:
    """The executed notebook and its wall time in seconds; raises on the first failing cell."""
    import nbclient
    import nbformat
    nb = nbformat.read(path, as_version=4)
    env = {"RTL_NOTEBOOK_QUICK": "1" if quick else "0", "TQDM_DISABLE": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONWARNINGS": "ignore:IProgress not found"}  # tqdm.auto's note that no notebook widgets exist
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    t = time.perf_counter()
    try:
        nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", help="file names in examples/ (default: all)")
    p.add_argument("--quick", action="store_true", help="RTL_NOTEBOOK_QUICK=1: tiny sizes, seconds per notebook")
    p.add_argument("--check", action="store_true", help="execute only; do not write the notebooks back")
    args = p.parse_args(argv)
    paths = [EXAMPLES / n for n in args.notebooks] or sorted(EXAMPLES.glob("*.ipynb"))
    missing = [str(q) for q in paths if not q.is_file()]
    if missing:
        print(f"run_notebooks: no such notebook: {missing}; choose from "
              f"{[q.name for q in sorted(EXAMPLES.glob('*.ipynb'))]}", file=sys.stderr)
        return 2
    if args.quick and not args.check:
        print("run_notebooks: --quick outputs are smoke-test numbers; add --check (the committed notebooks keep "
              "full-setting outputs)", file=sys.stderr)
        return 2
    import nbformat
    for path in paths:
        with tempfile.TemporaryDirectory() as tmp:
            nb, wall = execute(path, quick=args.quick, workdir=Path(tmp) if args.check else EXAMPLES)
        if not args.check:
            nbformat.write(nb, path)
        print(f"{path.name}: executed in {wall:.0f}s{'' if args.check else ', outputs written'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
