# usage: run_quick.sh TREE OUTDIR  -- the quick demo and every task benchmark --quick of TREE, outputs in OUTDIR.
# TREE's code is used through PYTHONPATH when TREE/rtl_plugin/integrations exists (a worktree with that symlink),
# otherwise the installed (editable) package; the active Python environment must have the [test] extras.
T=$1; O=$2; cd "$T" || exit 1; export OMP_WAIT_POLICY=PASSIVE
[ -e "$T/rtl_plugin/integrations" ] && export PYTHONPATH="$T"
mkdir -p "$O"
(time python -m rtl_plugin.cli demo --quick --out "$O/demo") > "$O/demo.log" 2>&1
for s in fashion_detectors inr_regions segmentation_mosaic speech_enhancement collapse_sweep; do
  (time python benchmarks/$s.py --quick --out "$O/$s.json") > "$O/$s.log" 2>&1
done
